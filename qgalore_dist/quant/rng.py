"""Counter-based random numbers for stochastic rounding.

Why counter-based: a row shard on one rank and the whole matrix on another must draw *the same* number for the
same element, and every replica of a weight must round identically, with no RNG state to keep in sync. So each
uniform is a pure hash of (seed, step, parameter name, global element index) — like Philox, but written with
plain int64 tensor ops so it runs identically on CPU and GPU.

The per-element hash runs in int32 with wrap-around multiplies (checked at import); the per-key mixing runs on
Python integers.
"""

from __future__ import annotations

import zlib

import torch

_M32 = 0xFFFFFFFF
# odd multipliers < 2**31 (valid int32 scalars)
_C1 = 0x45D9F3B5
_C2 = 0x2C1B3C6D
_C3 = 0x297A2D39
_GOLDEN = 0x1E3779B9

_MAX_INDEX = 1 << 31

# salts separating the streams drawn for one (seed, step, name)
SALT_INIT = 0x1A17    # initial quantisation of a weight
SALT_UPDATE = 0x5EED  # stochastic rounding after an optimizer step
SALT_RSVD = 0x05BD    # randomized-SVD sketch


def _signed32(k: int) -> int:
    """A uint32 as the int32 with the same bits."""
    k &= _M32
    return k - (1 << 32) if k >= (1 << 31) else k


def _mix32(x: torch.Tensor, k1: int, k2: int) -> torch.Tensor:
    """Keyed avalanche of an int32 tensor, in place: two multiply-xorshift rounds.

    int32 multiplies wrap modulo 2**32 on every torch backend (two's complement SIMD multiplies), and right
    shifts are arithmetic, so each shift is masked to make it logical. In place, 32-bit and only two rounds
    because this runs over every weight element at every step (each pass is a trip through memory on CPU);
    stochastic rounding needs uniform, independent-looking bits, not a cryptographic hash — the tests check
    uniformity and cross-key correlation. :func:`_self_check` verifies the wrap-around at import.
    """
    x ^= _signed32(k1)
    x *= _C1
    x ^= (x >> 16) & 0xFFFF
    x ^= _signed32(k2)
    x *= _C2
    x ^= (x >> 15) & 0x1FFFF
    return x


def _mix32_exact(i: int, k1: int, k2: int) -> int:
    """The same hash on Python integers (reference for :func:`_self_check`)."""
    x = (i ^ k1) & _M32
    x = (x * _C1) & _M32
    x ^= x >> 16
    x ^= k2 & _M32
    x = (x * _C2) & _M32
    x ^= x >> 15
    return x


def _mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    x ^= x >> 16
    x = (x * _C3) & _M32
    x ^= x >> 15
    return x


def name_key(name: str) -> int:
    """Stable 32-bit key of a parameter name (Python's ``hash`` is salted per process, crc32 is not)."""
    return zlib.crc32(name.encode("utf-8")) & _M32


def stream_key(seed: int, step: int, name: str, salt: int = 0) -> tuple[int, int]:
    """Two 32-bit keys for (seed, step, name, salt); salt separates uses (init, update, ...)."""
    k = _mix32_int(seed ^ _GOLDEN)
    k = _mix32_int(k ^ (step & _M32))
    k = _mix32_int(k ^ ((step >> 32) & _M32) ^ name_key(name))
    k1 = _mix32_int(k ^ salt)
    k2 = _mix32_int(k1 ^ _GOLDEN)
    return k1, k2


def uniform_from_index(index: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """U[0, 1) float32 per element of ``index`` (integer tensor, values < 2**31), a pure function of (index, key).

    24 random bits per draw: the float32 mantissa, so every value is exactly representable and < 1.
    """
    h = _mix32(index.to(torch.int32, copy=True), key[0], key[1])
    # arithmetic shift keeps the top 24 bits as a signed value in [-2**23, 2**23): shift to [0, 2**24) in float
    return (h >> 8).to(torch.float32).add_(float(1 << 23)).mul_(1.0 / (1 << 24))


def uniform_rows(row_offset: int, rows: int, cols: int, key: tuple[int, int],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniforms for rows ``[row_offset, row_offset + rows)`` of a matrix with ``cols`` columns.

    Returns float32 of shape [rows, cols]; element (i, j) is keyed by global index ``(row_offset + i) * cols + j``
    so a row shard draws exactly what the whole matrix draws for those rows.
    """
    start, stop = row_offset * cols, (row_offset + rows) * cols
    if stop > _MAX_INDEX:
        raise ValueError("stochastic-rounding stream covers matrices of < 2**31 elements; rows up to "
                         f"{row_offset + rows} x {cols} columns is larger")
    idx = torch.arange(start, stop, dtype=torch.int32, device=device).reshape(rows, cols)
    h = _mix32(idx, key[0], key[1])
    # arithmetic shift keeps the top 24 bits as a signed value in [-2**23, 2**23): shift to [0, 2**24) in float
    return (h >> 8).to(torch.float32).add_(float(1 << 23)).mul_(1.0 / (1 << 24))


def normal_rows(row_offset: int, rows: int, cols: int, key: tuple[int, int],
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal float32 [rows, cols], keyed by global index like :func:`uniform_rows` (Box-Muller)."""
    u1 = uniform_rows(row_offset, rows, cols, key, device)
    u2 = uniform_rows(row_offset, rows, cols, (key[1], key[0]), device)
    u1 = u1 + (0.5 / (1 << 24))  # keep log() finite: u1 in (0, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * torch.pi) * u2)


def keyed_normal_rows(row_offset: int, rows: int, cols: int, key: tuple[int, int], std: float = 1.0,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """N(0, std²) float32 [rows, cols] whose row ``i`` is a pure function of ``key`` and its global row index
    ``row_offset + i``: a row shard draws exactly the whole matrix's rows, so a rank draws only its own.

    Each row comes from torch's CPU generator seeded by a hash of (key, row) — as fast as ``torch.randn`` (a
    per-element hash is ~40× slower in torch, whose integer shifts are not vectorised; 40 minutes for a 7B model).
    Drawn on the CPU whatever ``device`` (then moved), so every device gets the same values; equal bits need the
    same CPU kernel of ``normal_`` (AVX2 and scalar ``log`` / ``cos`` may differ in the last bit across machines
    — which only matters for comparing two machines' fresh models, never within one job).
    """
    k1, k2 = key
    out = torch.empty(rows, cols, dtype=torch.float32)
    g = torch.Generator(device="cpu")
    for i in range(rows):
        r = row_offset + i
        hi = _mix32_int(k1 ^ _mix32_int(r & _M32) ^ ((r >> 32) & _M32))
        lo = _mix32_int(k2 ^ hi ^ _GOLDEN)
        g.manual_seed(((hi & 0x7FFFFFFF) << 32) | lo)
        out[i].normal_(0.0, std, generator=g)
    return out if torch.device(device).type == "cpu" else out.to(device)


def _self_check() -> None:
    idx = torch.tensor([0, 1, 2, 12345, 2**31 - 1], dtype=torch.int32)
    k1, k2 = 0xDEADBEEF, 0x9E3779B9
    got = _mix32(idx.clone(), k1, k2).tolist()
    want = [_signed32(_mix32_exact(int(i), k1, k2)) for i in idx.tolist()]
    if got != want:  # pragma: no cover - would mean int32 multiply does not wrap on this build
        raise RuntimeError("qgalore_dist: int32 hash self-check failed; stochastic rounding would not be "
                           "reproducible on this torch build")


_self_check()
