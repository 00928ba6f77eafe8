"""Replicated state across data-parallel ranks: start-up agreement and periodic replica hashing (docs/design.md §3).

Data-parallel engines (ddp, ZeRO-1/2) keep a full INT8 copy of every projected weight on every rank and update it
identically, but ranks can compute a value one ulp apart (different thread counts, different hardware) and flip a
stochastic-rounding decision. Two checks catch what would otherwise drift silently:

* :func:`check_same_setup` — at start-up, every rank hashes its config, ownership plan and parameter names / shapes;
  one all-gather of the hashes, and a mismatch raises the same ``ValueError`` on every rank (before any collective
  whose shapes depend on the setup could hang).
* :func:`check_replicas` — every K steps, every rank checksums each replicated group of tensors (a projected
  matrix's codes + scales, a dense parameter + its moments); one all-gather of the checksums; a group that differs
  from its reference rank (the matrix's owner) is re-broadcast from it with a warning, or raises under ``strict``.

Both speak to other ranks only through :class:`~qgalore_dist.parallel.collectives.Collectives`. No math here.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..errors import ReplicaMismatch
from .collectives import Collectives

__all__ = ["ReplicaGroup", "ReplicaMismatch", "check_replicas", "check_same_setup", "flat_view",
           "setup_fingerprint", "tensor_checksum"]

_PRIME = 65521  # weights (i mod p) + 1: a transposition or a moved value changes the sum, not just a changed one
_CHUNK = 1 << 22  # elements per checksum chunk: bounds the int64 temporaries (32 MiB) on 7B-sized matrices


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a contiguous tensor (writes through it land in ``t``); other tensors as they are.

    ``Collectives.broadcast_from_owners`` all-gathers when every owner's payload is equal, and sends a lone
    contiguous tensor without staging it — as is, multi-dimensional, which gloo's all-gather into a flat buffer
    rejects ("invalid tensor size"). Non-contiguous tensors are staged through a flat buffer anyway.
    """
    return t.view(-1) if t.is_contiguous() else t


def _int_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat integer tensor of ≤ 2-byte lanes (so weighted int64 sums cannot overflow)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype in (torch.int8, torch.uint8, torch.bool):
        return flat.view(torch.uint8) if flat.dtype == torch.bool else flat
    if flat.element_size() % 2:
        raise TypeError(f"cannot checksum a {flat.dtype} tensor")
    return flat.view(torch.int16)


def tensor_checksum(t: torch.Tensor) -> int:
    """``Σ_i v_i · ((i mod 65521) + 1)`` over the tensor's bytes, read as int8 / int16 lanes (a Python int).

    Exact integer arithmetic, so the value does not depend on summation order, thread count or device: equal
    tensors give equal checksums on every rank. Each chunk's int64 sum stays below 2⁵³ (|v| ≤ 2¹⁵, weights ≤ 2¹⁶,
    2²² lanes); chunks add as Python ints.
    """
    v = _int_view(t)
    total = 0
    for start in range(0, v.numel(), _CHUNK):
        part = v[start:start + _CHUNK].to(torch.int64)
        w = torch.arange(start, start + part.numel(), dtype=torch.int64, device=part.device).remainder_(_PRIME)
        total += int(part.mul_(w.add_(1)).sum())
    return total


# ------------------------------------------------------------------------------------------------------------
# start-up agreement
# ------------------------------------------------------------------------------------------------------------
def _digest(value: Any) -> int:
    """First 8 bytes of the SHA-256 of ``value``'s canonical JSON, as a signed int64."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def setup_fingerprint(parts: Mapping[str, Any]) -> dict[str, int]:
    """``{part name: int64 digest}`` of JSON-serialisable parts (config dict, plan owners, parameter shapes...)."""
    return {k: _digest(v) for k, v in parts.items()}


def check_same_setup(collectives: Collectives, parts: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` on every rank unless every rank passed equal ``parts`` (compared by digest).

    All ranks must pass the same part *names* in the same order (the digests travel in one int64 tensor).
    The error names the parts that differ and the ranks that disagree with rank 0.
    """
    names = list(parts)
    mine = setup_fingerprint(parts)
    local = torch.tensor([mine[k] for k in names], dtype=torch.int64, device=collectives.device)
    table = torch.empty(collectives.world_size * len(names), dtype=torch.int64, device=collectives.device)
    collectives.all_gather_into([table], [local])
    table = table.view(collectives.world_size, len(names)).cpu()
    bad = {}
    for j, k in enumerate(names):
        ranks = [r for r in range(collectives.world_size) if table[r, j] != table[0, j]]
        if ranks:
            bad[k] = ranks
    if bad:
        detail = "; ".join(f"{k} differs on rank(s) {ranks}" for k, ranks in bad.items())
        raise ValueError(f"distributed start-up check failed: every rank must run the same setup, but compared "
                         f"with rank 0: {detail} (this is rank {collectives.rank} of {collectives.world_size})")


# ------------------------------------------------------------------------------------------------------------
# replica hashing
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ReplicaGroup:
    """Tensors that must be bit-identical on every rank, and the rank whose copy is the truth."""

    name: str
    owner: int
    tensors: Sequence[torch.Tensor]


def check_replicas(collectives: Collectives, groups: Sequence[ReplicaGroup], strict: bool = False,
                   where: str = "") -> dict[str, list[int]]:
    """Compare every group's checksum with its owner's; repair (or, ``strict``, raise) where they differ.

    One all-gather of ``len(groups)`` int64 checksums per rank; then, only if something differs, the owners
    re-broadcast the differing groups (``broadcast_from_owners``). Every rank sees the same table, so every rank
    takes the same branch (repairs, warns or raises) and no collective is left unmatched.

    Returns ``{group name: ranks that differed}`` (empty when all replicas agree).
    """
    if collectives.world_size == 1 or not groups:
        return {}
    sums = [sum(tensor_checksum(t) for t in g.tensors) & 0x7FFF_FFFF_FFFF_FFFF for g in groups]  # one int64 each
    local = torch.tensor(sums, dtype=torch.int64, device=collectives.device)
    table = torch.empty(collectives.world_size * len(groups), dtype=torch.int64, device=collectives.device)
    collectives.all_gather_into([table], [local])
    table = table.view(collectives.world_size, len(groups)).cpu()
    bad: dict[str, list[int]] = {}
    for j, g in enumerate(groups):
        ranks = [r for r in range(collectives.world_size) if table[r, j] != table[g.owner, j]]
        if ranks:
            bad[g.name] = ranks
    if not bad:
        return bad
    listing = ", ".join(f"{name} (rank(s) {ranks})" for name, ranks in list(bad.items())[:8])
    more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
    if strict:
        raise ReplicaMismatch(f"replica check{where}: {len(bad)} replicated tensor group(s) differ from their "
                              f"owner's copy: {listing}{more} (strict_replicas: aborting)")
    by_owner: dict[int, list[torch.Tensor]] = {}
    for g in groups:
        if g.name in bad:
            by_owner.setdefault(g.owner, []).extend(flat_view(t) for t in g.tensors)
    collectives.broadcast_from_owners(by_owner)
    warnings.warn(f"replica check{where}: {listing}{more} differed from the owner's copy; re-broadcast from the "
                  "owner", RuntimeWarning, stacklevel=2)
    return bad
