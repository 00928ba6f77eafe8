"""Row pieces: a state saved by N ranks, each writing its own slices of whole tensors, read back by M ranks.

Every rank writes ``<stem>_rank<R>.safetensors`` (its tensors under the keys :func:`.save_load.flatten_state` gives
them, which name the whole tensor, never the rank) and ``<stem>_rank<R>.json``::

    {"format": "qgalore_dist.pieces/1", "rank": R, "tree": <flatten_state tree>,
     "pieces": {key: [start, axis] | null}}

``[start, axis]``: the file holds indices ``[start, start + size(axis))`` of the whole tensor along ``axis``;
``null``: the file holds the whole tensor (several ranks may each hold a copy). A reader at any other partition asks
for the slice it needs (:meth:`PieceReader.rows`) and reads only the overlapping parts of the overlapping files
(memory-mapped ``get_slice``) — a rank never holds more than its share plus one piece boundary. Nothing is pickled.

The layout of a state (which key is cut where) belongs to whoever owns that state — here, the row-sharded placement
(:meth:`~qgalore_dist.parallel.row_sharded.RowShardedQGaLoreOptimizer.piece_starts`); this module only stores and
assembles slices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..quant.state8 import Blockwise8bit
from .save_load import unflatten_state

__all__ = ["PIECES_FORMAT", "PieceReader", "piece_files", "read_full_state", "tensor_starts", "write_pieces"]

PIECES_FORMAT = "qgalore_dist.pieces/1"


def piece_files(stem: str, rank: int) -> tuple[str, str]:
    """(tensor file, JSON file) names of rank ``rank``'s pieces."""
    return f"{stem}_rank{rank:05d}.safetensors", f"{stem}_rank{rank:05d}.json"


def write_pieces(directory: Path, stem: str, rank: int, tree: Any, tensors: Mapping[str, torch.Tensor],
                 starts: Mapping[str, tuple[int, int] | None]) -> None:
    """Write one rank's pieces. ``starts[key]``: (first index, axis) of ``tensors[key]`` in the whole tensor, or
    None when it is the whole tensor; every key of ``tensors`` must be in ``starts``."""
    missing = sorted(set(tensors) - set(starts))
    if missing:
        raise ValueError(f"no piece position for {missing[:3]}")
    tfile, jfile = piece_files(stem, rank)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(Path(directory) / tfile))
    record = {"format": PIECES_FORMAT, "rank": rank, "tree": tree,
              "pieces": {k: (None if starts[k] is None else [int(starts[k][0]), int(starts[k][1])])
                         for k in tensors}}
    (Path(directory) / jfile).write_text(json.dumps(record), encoding="utf-8")


def tensor_starts(tree: Any, starts: Any) -> dict[str, tuple[int, int] | None]:
    """``{key: (first index, axis) | None}`` for every tensor of a :func:`.save_load.flatten_state` ``tree``: the
    position ``starts`` (a nested dict mirroring the state's dicts, with a (start, axis) or None where the state
    has a tensor) gives it, else None (the whole tensor)."""
    out: dict[str, tuple[int, int] | None] = {}

    def walk(node: Any, where: Any) -> None:
        if isinstance(node, dict) and set(node) == {"__tensor__"}:
            out[node["__tensor__"]] = where if isinstance(where, tuple) else None
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, where.get(k) if isinstance(where, dict) else None)
        elif isinstance(node, list):
            for v in node:
                walk(v, None)

    walk(tree, starts)
    return out


class PieceReader:
    """All ranks' pieces of one state (written by ``ranks`` processes under ``root`` with file stem ``stem``): their
    trees, and any slice of any whole tensor assembled from the pieces that overlap it. Close it (or use ``with``).

    ``files``: explicit ``[(tensor file, JSON file), ...]`` instead of the stem's — a JSON file that is a bare
    :func:`.save_load.flatten_state` tree (the layout before pieces: a single-device or data-parallel optimizer
    state) is read as one rank holding every tensor of its file whole; no JSON file (None): a plain safetensors
    file of whole tensors (``model.safetensors``)."""

    def __init__(self, root: Path, stem: str = "", ranks: int = 1, device: str | torch.device = "cpu",
                 files: list[tuple[str, str | None]] | None = None) -> None:
        self.root, self.device = Path(root), device
        self.files = files if files is not None else [piece_files(stem, r) for r in range(int(ranks))]
        self.trees: list[Any] = []
        self._where: dict[str, list[tuple[int, int | None, int]]] = {}  # key -> [(rank, start, axis)]
        self._open: dict[int, Any] = {}
        for r, (tfile, jfile) in enumerate(self.files):
            if jfile is None:  # a plain safetensors file (a whole model.safetensors): every tensor whole
                self.trees.append({k: {"__tensor__": k} for k in self._file(r).keys()})
                for key in self._file(r).keys():
                    self._where.setdefault(key, []).append((r, None, 0))
                continue
            jpath = self.root / jfile
            try:
                record = json.loads(jpath.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{jpath}: cannot be read ({exc})") from exc
            if isinstance(record, dict) and record.get("format") == PIECES_FORMAT:
                if record.get("rank") != r:
                    raise CheckpointError(f"{jpath}: holds rank {record.get('rank')}'s pieces, not rank {r}'s")
                tree, pieces = record["tree"], record["pieces"]
            else:  # a bare tree: every tensor of the file whole
                tree, pieces = record, {k: None for k in self._file(r).keys()}
            self.trees.append(tree)
            for key, pos in pieces.items():
                self._where.setdefault(key, []).append((r, None, 0) if pos is None else (r, int(pos[0]),
                                                                                           int(pos[1])))

    def __enter__(self) -> "PieceReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keys(self) -> list[str]:
        """Every tensor key any rank saved."""
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        """The whole tensor's shape."""
        ax = self.axis(key)
        where = self._pieces(key)
        shape = self._shape(where[0][0], key)
        if ax is not None:
            shape[ax] = max(p0 + plen for _, p0, plen in self.pieces(key, ax))
        return tuple(shape)

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._file(self._pieces(key)[0][0]).get_slice(key).get_dtype()]

    def close(self) -> None:
        self._open.clear()  # a released safe_open handle unmaps its file

    def _file(self, rank: int):
        f = self._open.get(rank)
        if f is None:
            path = self.root / self.files[rank][0]
            try:
                f = self._open[rank] = safe_open(str(path), framework="pt", device=str(self.device))
            except Exception as exc:  # safetensors raises its own error types on malformed files
                raise CheckpointError(f"{path}: cannot be read ({exc})") from exc
        return f

    def _pieces(self, key: str) -> list[tuple[int, int | None, int]]:
        where = self._where.get(key)
        if not where:
            raise CheckpointError(f"{self.root}: no rank saved tensor {key!r}")
        return where

    def whole(self, key: str) -> torch.Tensor:
        """A tensor some rank saved whole."""
        for rank, start, _ in self._pieces(key):
            if start is None:
                return self._file(rank).get_tensor(key)
        raise CheckpointError(f"{self.root}: tensor {key!r} was saved in pieces only")

    def axis(self, key: str) -> int | None:
        """The axis ``key`` was cut along (None: some rank saved it whole)."""
        where = self._pieces(key)
        return None if any(s is None for _, s, _ in where) else where[0][2]

    def full(self, key: str) -> torch.Tensor:
        """The whole tensor: a whole copy, or its pieces joined (a gap is a :class:`CheckpointError`)."""
        ax = self.axis(key)
        if ax is None:
            return self.whole(key)
        return self.rows(key, 0, max(p0 + plen for _, p0, plen in self.pieces(key, ax)), ax)

    def pieces(self, key: str, axis: int = 0) -> list[tuple[int, int, int]]:
        """(rank, start, length along ``axis``) of every piece of ``key``, by start."""
        out = []
        for rank, start, ax in self._pieces(key):
            if start is None:
                out.append((rank, 0, self._shape(rank, key)[axis]))
            elif ax == axis:
                out.append((rank, start, self._shape(rank, key)[axis]))
        return sorted(out, key=lambda p: (p[1], p[0]))

    def piece(self, key: str, rank: int) -> torch.Tensor:
        """Rank ``rank``'s piece of ``key`` as saved."""
        return self._file(rank).get_tensor(key)

    def _shape(self, rank: int, key: str) -> list[int]:
        return list(self._file(rank).get_slice(key).get_shape())

    def rows(self, key: str, start: int, length: int, axis: int = 0) -> torch.Tensor:
        """Indices ``[start, start + length)`` along ``axis`` of the whole tensor ``key``, from the pieces that
        overlap them (each read only where it overlaps). A gap in the saved pieces is a :class:`CheckpointError`."""
        parts, at = [], start
        end = start + length
        for rank, p0, plen in self.pieces(key, axis):
            lo, hi = max(at, p0), min(end, p0 + plen)
            if hi <= lo:
                continue  # no overlap, or already read from another copy
            if lo > at:
                break  # a gap: nothing saved [at, lo)
            sl = self._file(rank).get_slice(key)
            parts.append(sl[tuple([slice(None)] * axis + [slice(lo - p0, hi - p0)])])
            at = hi
            if at >= end:
                break
        if at < end:
            raise CheckpointError(f"{self.root}: the saved pieces of {key!r} do not cover [{at}, {end}) "
                                  f"along axis {axis}")
        if not parts:  # an empty slice: shaped like the first piece
            rank, _, _ = self.pieces(key, axis)[0]
            shape = self._shape(rank, key)
            shape[axis] = 0
            dtype = self._file(rank).get_slice(key).get_dtype()
            return torch.empty(shape, dtype=_DTYPES[dtype], device=self.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)

    def block_row(self, codes_key: str, absmax_key: str, start: int, n: int, signed: bool, block: int
                  ) -> dict[str, torch.Tensor]:
        """Elements ``[start, start + n)`` of a one-row 8-bit tensor (a 1-D parameter's moment: codes [1, N],
        block scales [1, ceil(N / block)]) saved in pieces along its row: ``{"codes", "absmax"}`` in blocks that
        start at ``start``. Exact where one saved piece is exactly that range (the same partition); otherwise the
        overlapping pieces are decoded, cut and encoded again (a block's scale becomes its new elements' absmax:
        not bit-exact — the one resharding exception)."""
        pieces = self.pieces(codes_key, axis=1)
        for rank, p0, plen in pieces:
            if p0 == start and plen == n:
                return {"codes": self.piece(codes_key, rank), "absmax": self.piece(absmax_key, rank)}
        vals, at = [], start
        for rank, p0, plen in pieces:
            lo, hi = max(at, p0), min(start + n, p0 + plen)
            if hi <= lo:
                continue
            saved = Blockwise8bit((plen,), signed, block, 0, "cpu")
            saved.load_state_tensors({"codes": self.piece(codes_key, rank), "absmax": self.piece(absmax_key, rank)})
            vals.append(saved.to_float()[lo - p0:hi - p0])
            at = hi
        if at < start + n:
            raise CheckpointError(f"{self.root}: the saved pieces of {codes_key!r} do not cover elements "
                                  f"[{at}, {start + n})")
        fresh = Blockwise8bit((n,), signed, block, 0, "cpu")
        fresh.from_float(torch.cat(vals) if vals else torch.zeros(0))
        return fresh.state_tensors()

    def merged_tree(self) -> Any:
        """Every rank's tree joined (dicts merged key by key; elsewhere the first rank's value)."""
        out: Any = None
        for tree in self.trees:
            out = _merge(out, tree)
        return out


def _merge(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if isinstance(a, dict) and isinstance(b, dict) and "__tensor__" not in a:
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge(out.get(k), v)
        return out
    return a


def read_full_state(reader: PieceReader, projected: set[str] | None = None) -> dict:
    """The single-device optimizer state (``QGaLoreOptimizer.state_dict()``'s layout) from the pieces of any
    engine at any world size: each tensor whole. ``projected``: only these matrices' state (a data-parallel rank
    reads only what it owns). A 1-D parameter's 8-bit dense moments cut along their row are joined through
    :meth:`PieceReader.block_row`."""
    tree = reader.merged_tree()
    if not isinstance(tree, dict):
        raise CheckpointError(f"{reader.root}: the optimizer state is not a dict")
    tree = {k: v for k, v in tree.items() if k != "shard"}  # which rank held what: the writer's, not the reader's
    if projected is not None and isinstance(tree.get("projected"), dict):
        tree["projected"] = {n: e for n, e in tree["projected"].items() if n in projected}
    block = int((tree.get("config") or {}).get("state_block_size", 256))
    tensors: dict[str, torch.Tensor] = {}
    for name, e in (tree.get("dense") or {}).items() if isinstance(tree.get("dense"), dict) else ():
        refs = e.get("tensors", {}) if isinstance(e, dict) else {}
        for moment, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            c, a = refs.get(f"{moment}.codes"), refs.get(f"{moment}.absmax")
            if c is not None and a is not None and reader.axis(c["__tensor__"]) == 1:
                n = max(p0 + plen for _, p0, plen in reader.pieces(c["__tensor__"], 1))
                got = reader.block_row(c["__tensor__"], a["__tensor__"], 0, n, signed, block)
                tensors[c["__tensor__"]], tensors[a["__tensor__"]] = got["codes"], got["absmax"]

    # an explicit stack, not a recursive closure: a closure that calls itself is a reference cycle, which would keep
    # every tensor read here alive until the next garbage collection (115 MiB at llama_130m)
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict) and set(node) == {"__tensor__"}:
            if node["__tensor__"] not in tensors:
                tensors[node["__tensor__"]] = reader.full(node["__tensor__"])
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return unflatten_state(tree, tensors)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
