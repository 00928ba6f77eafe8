"""Counter-based random numbers for stochastic rounding.

Why counter-based: a row shard on one rank and the whole matrix on another must draw *the same* number for the
same element, and every replica of a weight must round identically, with no RNG state to keep in sync. So each
uniform is a pure hash of (seed, step, parameter name, global element index) — like Philox, but written with
plain int64 tensor ops so it runs identically on CPU and GPU.

All arithmetic stays below 2**63: values are kept in [0, 2**32) and multiplied by odd constants < 2**31.
"""

from __future__ import annotations

import zlib

import torch

_M32 = 0xFFFFFFFF
# odd multipliers < 2**31 (so x * C < 2**63 for x < 2**32: no int64 overflow on any backend)
_C1 = 0x45D9F3B5
_C2 = 0x2C1B3C6D
_C3 = 0x297A2D39
_GOLDEN = 0x1E3779B9

# salts separating the streams drawn for one (seed, step, name)
SALT_INIT = 0x1A17    # initial quantisation of a weight
SALT_UPDATE = 0x5EED  # stochastic rounding after an optimizer step
SALT_RSVD = 0x05BD    # randomized-SVD sketch


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Avalanche a uint32 held in int64 (a fmix32-style finaliser with our own constants)."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    x = x ^ (x >> 16)
    x = (x * _C3) & _M32
    x = x ^ (x >> 15)
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
    """U[0, 1) float32 per element of ``index`` (int64, any shape), a pure function of (index, key).

    24 random bits per draw: the float32 mantissa, so every value is exactly representable and < 1.
    """
    k1, k2 = key
    lo = index & _M32
    hi = (index >> 32) & _M32
    h = _mix32(lo ^ k1)
    h = _mix32(h ^ hi ^ k2)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def uniform_rows(row_offset: int, rows: int, cols: int, key: tuple[int, int],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniforms for rows ``[row_offset, row_offset + rows)`` of a matrix with ``cols`` columns.

    Returns float32 of shape [rows, cols]; element (i, j) is keyed by global index ``(row_offset + i) * cols + j``
    so a row shard draws exactly what the whole matrix draws for those rows.
    """
    r = torch.arange(row_offset, row_offset + rows, dtype=torch.int64, device=device).unsqueeze(1)
    c = torch.arange(cols, dtype=torch.int64, device=device).unsqueeze(0)
    return uniform_from_index(r * cols + c, key)


def normal_rows(row_offset: int, rows: int, cols: int, key: tuple[int, int],
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal float32 [rows, cols], keyed by global index like :func:`uniform_rows` (Box-Muller)."""
    u1 = uniform_rows(row_offset, rows, cols, key, device)
    u2 = uniform_rows(row_offset, rows, cols, (key[1], key[0]), device)
    u1 = u1 + (0.5 / (1 << 24))  # keep log() finite: u1 in (0, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * torch.pi) * u2)
