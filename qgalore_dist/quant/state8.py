"""8-bit blockwise optimizer state (Adam moments), as in bitsandbytes / torchao's ``optim``.

Each block of ``block`` consecutive elements inside a row is normalised by its absmax and mapped to the nearest
entry of a 256-entry *dynamic* code map: log-spaced decades with more linear steps in the upper decades, so small
moments keep relative precision that a linear int8 grid would round to zero. Signed map for the first moment,
unsigned (all 256 codes non-negative) for the second. Tensors under ``min_numel`` elements stay fp32: their
scales would cost more than they save.

Encoding is a table lookup, not a binary search: a float32's bit pattern, read as a signed integer and folded so
that it orders like the float (:func:`order_key`), is cut to its sign, exponent and top 8 mantissa bits; a table
gives, per such bucket, how many decision boundaries (midpoints of the map) lie below it, and one comparison with
the next boundary finishes the job. Buckets are at most 2⁻⁸ of their magnitude wide, narrower than the map's
smallest relative gap between boundaries (0.7%), so no bucket holds two boundaries (asserted when the table is
built) and the code equals ``torch.bucketize(x, midpoints)`` bit for bit for every float32 input, NaN included
(tests/unit/test_quant.py checks it against ``bucketize`` kept as the reference). On CPU ``bucketize`` cost ~70 ns per
element; the lookup is a handful of element-wise passes, and Inductor fuses it into one (:mod:`.fused`).

Measured error (tests/unit/test_quant.py pins it): |decode(encode(x)) - x| <= 0.0072 · blockmax for the signed map
and <= 0.0036 · blockmax for the unsigned one (half the widest gap of the map's top decade).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .groups import expand_scales, from_groups, group_absmax, to_groups

_DECADES = 7  # magnitudes 1e-6 .. 1


@lru_cache(maxsize=None)
def _dynamic_map_list(signed: bool) -> tuple[float, ...]:
    """Sorted 256 code values in [-1, 1] (signed) or [0, 1] (unsigned).

    Decade d (d = 0 for [1e-7, 1e-6], ..., 6 for [0.1, 1]) holds 2**d (signed) or 2**(d+1) (unsigned) values at
    the midpoints of an even split of [0.1, 1] · 10**(d-6): 127 (resp. 254) magnitudes, plus 0 and 1.
    """
    mags: list[float] = []
    for d in range(_DECADES):
        steps = 2 ** d if signed else 2 ** (d + 1)
        edges = torch.linspace(0.1, 1.0, steps + 1, dtype=torch.float64)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (d - (_DECADES - 1))
        mags += mids.tolist()
    values = [0.0, 1.0] + mags
    if signed:
        values += [-v for v in mags]  # 2 + 127 + 127: the negative end stops at -0.993
    assert len(values) == 256, len(values)
    return tuple(sorted(values))


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [256] code map."""
    return torch.tensor(_dynamic_map_list(signed), dtype=torch.float32, device=device)


def _midpoints(code_map: torch.Tensor) -> torch.Tensor:
    return (code_map[1:] + code_map[:-1]) / 2


# Bucket = order key >> 15: sign, 8 exponent bits and the top 8 mantissa bits of a float32.
KEY_SHIFT = 15


def order_key(x: torch.Tensor) -> torch.Tensor:
    """float32 [...] -> int32 [...] ordered like the floats (negative bit patterns folded; -0.0 sorts just below
    +0.0, NaNs beyond ±inf)."""
    b = x.view(torch.int32)
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b)


def _float_of_key(k: torch.Tensor) -> torch.Tensor:
    return torch.where(k < 0, k ^ 0x7FFFFFFF, k).view(torch.float32)


@lru_cache(maxsize=None)
def _encode_tables_cpu(signed: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    bounds = _midpoints(dynamic_map(signed))  # float32 [255], what bucketize searches
    kmin = int(order_key(torch.tensor([-1.0]))[0])
    kmax = int(order_key(torch.tensor([1.0]))[0])
    first, last = kmin >> KEY_SHIFT, kmax >> KEY_SHIFT
    buckets = torch.arange(first, last + 1, dtype=torch.int64)
    lo_key = (buckets << KEY_SHIFT).clamp(min=kmin).to(torch.int32)
    hi_key = (((buckets + 1) << KEY_SHIFT) - 1).clamp(max=kmax).to(torch.int32)
    below = torch.searchsorted(bounds, _float_of_key(lo_key), right=False)  # boundaries < bucket's smallest value
    upto = torch.searchsorted(bounds, _float_of_key(hi_key), right=True)  # boundaries <= its largest value
    if int((upto - below).max()) > 1:  # the map changed: a bucket would need two comparisons
        raise AssertionError("8-bit state map: a lookup bucket holds two decision boundaries; lower KEY_SHIFT")
    ext = torch.cat([bounds, torch.tensor([float("inf")])])  # below == 255: nothing left to compare
    return below.to(torch.int32), ext, first


def encode_tables(signed: bool, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, int]:
    """(below int32 [B], boundaries float32 [256] (the 255 midpoints, then +inf), first bucket) for
    :func:`encode_unit`; B = 65026 buckets cover the keys of [-1, 1]."""
    below, ext, first = _encode_tables_cpu(signed)
    return below.to(device), ext.to(device), first


def encode_unit(x: torch.Tensor, below: torch.Tensor, ext: torch.Tensor, first: int) -> torch.Tensor:
    """Code index (int64, same shape) of float32 ``x`` already divided by its block absmax: equal to
    ``torch.bucketize(x.clamp(-1, 1), midpoints)`` for every input (NaN -> 255, as bucketize gives).
    Pure element-wise + gathers, so Inductor compiles it into one loop."""
    x = torch.nan_to_num(x, nan=1.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)
    bucket = ((order_key(x) >> KEY_SHIFT) - first).clamp(0, below.numel() - 1)
    lo = below[bucket.long()].long()
    return lo + (x > ext[lo]).long()


class Blockwise8bit:
    """An 8-bit encoded tensor (or a ``float_dtype`` tensor when small or ``bits=32``), with ``to_float`` /
    ``from_float``.

    Encoded: codes uint8 [rows, cols], absmax float32 [rows, G] (blocks inside rows, so row shards never split
    one). ``shape`` is the logical shape; 1-D tensors are treated as a single row.
    """

    def __init__(self, shape: tuple[int, ...], signed: bool, block: int = 256, min_numel: int = 4096,
                 device: torch.device | str = "cpu", bits: int = 8, float_dtype: torch.dtype = torch.float32):
        self.shape = tuple(int(s) for s in shape)
        self.signed = signed
        self.block = block
        numel = 1
        for s in self.shape:
            numel *= s
        self.quantized = bits == 8 and numel >= min_numel
        rows, cols = self._rows_cols()
        if self.quantized:
            zero_code = int(torch.searchsorted(dynamic_map(signed), torch.tensor(0.0)).item())
            self.codes = torch.full((rows, cols), zero_code, dtype=torch.uint8, device=device)
            self.absmax = torch.zeros(to_groups(torch.empty(rows, cols, device="meta"), block).shape[:2],
                                      dtype=torch.float32, device=device)
            self.data = None
        else:
            self.codes = self.absmax = None
            self.data = torch.zeros(self.shape, dtype=float_dtype, device=device)

    def _rows_cols(self) -> tuple[int, int]:
        if len(self.shape) == 1:
            return 1, self.shape[0]
        if len(self.shape) == 0:
            return 1, 1
        rows = 1
        for s in self.shape[:-1]:
            rows *= s
        return rows, self.shape[-1]

    def to_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if not self.quantized:
            return self.data.to(dtype)
        cmap = dynamic_map(self.signed, self.codes.device)
        rows, cols = self._rows_cols()
        vals = cmap[self.codes.long()] * expand_scales(self.absmax, cols, self.block)
        return vals.reshape(self.shape).to(dtype)

    def from_float(self, x: torch.Tensor) -> None:
        if not self.quantized:
            self.data.copy_(x.reshape(self.data.shape))
            return
        self.encode(x, self.absmax_of(x))

    def absmax_of(self, x: torch.Tensor) -> torch.Tensor:
        """The block scales ``from_float(x)`` would store: absmax [rows, G] of ``x`` (logical shape) in fp32. A
        placement whose blocks are split over ranks takes the max of every rank's partial scales before
        :meth:`encode` — the split from_float is how it reproduces the whole tensor's blocks."""
        rows, cols = self._rows_cols()
        return group_absmax(x.float().reshape(rows, cols), self.block)

    def encode(self, x: torch.Tensor, absmax: torch.Tensor) -> None:
        """Store ``x`` (logical shape) as codes under the given block scales (8-bit only)."""
        rows, cols = self._rows_cols()
        x2 = x.float().reshape(rows, cols)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        xg = to_groups(x2, self.block) / safe.unsqueeze(-1)
        idx = encode_unit(xg, *encode_tables(self.signed, x2.device))
        self.codes.copy_(from_groups(idx.to(torch.uint8), cols))
        self.absmax.copy_(absmax)

    def rows(self, start: int, stop: int) -> "Blockwise8bit":
        """A view of rows ``[start, stop)`` of the [rows, cols] layout sharing this tensor's storage (blocks lie
        inside rows, so a row range is a whole set of blocks): ``from_float`` on the view writes through."""
        rows, cols = self._rows_cols()
        if not 0 <= start < stop <= rows:
            raise ValueError(f"row range [{start}, {stop}) outside 0..{rows}")
        view = object.__new__(Blockwise8bit)
        view.shape = (stop - start, cols)
        view.signed, view.block, view.quantized = self.signed, self.block, self.quantized
        if self.quantized:
            view.codes, view.absmax, view.data = self.codes[start:stop], self.absmax[start:stop], None
        else:
            view.codes = view.absmax = None
            view.data = self.data.view(rows, cols)[start:stop]
        return view

    def nbytes(self) -> int:
        if not self.quantized:
            return self.data.numel() * self.data.element_size()
        return self.codes.numel() + self.absmax.numel() * 4

    # serialisation: plain tensors keyed by field
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.quantized:
            return {"codes": self.codes, "absmax": self.absmax}
        return {"data": self.data}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.quantized:
            self.codes.copy_(tensors["codes"])
            self.absmax.copy_(tensors["absmax"])
        else:
            self.data.copy_(tensors["data"])
