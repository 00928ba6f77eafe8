"""VLoRP projection granularity: reshape a gradient so that its projected dimension is cut into ``c`` pieces.

A granularity factor ``c`` (a power of two; ``c > 1`` finer, ``c < 1`` merges, ``c = 1`` is GaLore) changes the
*unit* a projection acts on, not the projection itself. The side is chosen on the original m×n shape
(:func:`~qgalore_dist.projection.projector.projection_side`), then

* right projection (m >= n, ``R = G' Qᵀ``): ``G [m, n] -> G' [m·c, n/c]``, so each projected row is 1/c of a
  weight row (``c > 1``) or ``1/c`` consecutive weight rows glued together (``c < 1``);
* left projection (m < n, ``R = Pᵀ G'``): ``G [m, n] -> G' [m/c, n·c]``;

and the back-projected update is reshaped to m×n again. Both reshapes are plain row-major ``reshape``, which keeps
every weight row inside a contiguous block of reshaped rows (and vice versa): weight rows ``[o, o + k)`` are
reshaped rows ``[o·a, (o + k)·a)`` with ``a = m' / m``, so row shards of the weight map to row shards of ``G'``
(:func:`granular_rows`) and a sharded engine never has to move data to apply the reshape.

Budget: at rank ``r`` the projected gradient (and each low-rank moment) holds ``max(m, n)·c·r`` numbers, so users
compare settings at equal ``M = c·r``.

These are pure shape helpers: no state, no collectives, no knowledge of other matrices except
:func:`resolve_granularity`, a pure function of (names, shapes, config) that every rank evaluates identically.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping

import torch

from .projector import Side, projection_side


def check_granularity(c: float, name: str = "granularity") -> float:
    """Validate ``c`` (a power of two, above or below 1) and return it as a float."""
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
        raise ValueError(f"{name}={c!r} is invalid: must be a positive power of two (e.g. 0.25, 0.5, 1, 2, 4)")
    e = math.log2(c)
    if not float(e).is_integer() or abs(e) > 30:
        raise ValueError(f"{name}={c!r} is invalid: must be a positive power of two (e.g. 0.25, 0.5, 1, 2, 4)")
    return float(c)


def _factor(c: float) -> tuple[int, bool]:
    """(k, finer): ``k = c`` when ``c >= 1`` (finer), ``k = 1/c`` otherwise (merging)."""
    return (int(c), True) if c >= 1 else (int(round(1.0 / c)), False)


def granular_shape(m: int, n: int, side: Side, c: float, name: str = "matrix") -> tuple[int, int]:
    """Shape of the reshaped gradient ``G'`` for an [m, n] matrix: right ``(m·c, n/c)``, left ``(m/c, n·c)``.

    Raises ``ValueError`` (one line, naming the matrix) when ``c`` or ``1/c`` does not divide the dimension it cuts.
    """
    c = check_granularity(c)
    if c == 1.0:
        return m, n
    k, finer = _factor(c)
    if side == "right":
        # finer: each row of length n is cut into c pieces; merging: 1/c consecutive rows are glued together
        cut, dim = (n, "n") if finer else (m, "m")
        if cut % k:
            raise ValueError(f"{name} [{m}, {n}]: granularity c={c:g} needs {k} to divide {dim}={cut} "
                             f"(right projection reshapes m×n to (m·c)×(n/c))")
        return (m * k, n // k) if finer else (m // k, n * k)
    cut, dim = (m, "m") if finer else (n, "n")
    if cut % k:
        raise ValueError(f"{name} [{m}, {n}]: granularity c={c:g} needs {k} to divide {dim}={cut} "
                         f"(left projection reshapes m×n to (m/c)×(n·c))")
    return (m // k, n * k) if finer else (m * k, n // k)


def check_rank_fits(m: int, n: int, side: Side, c: float, rank: int, name: str = "matrix") -> tuple[int, int]:
    """:func:`granular_shape`, plus a ``ValueError`` when ``rank`` exceeds the reshaped matrix's smaller side.

    (At ``c = 1`` the optimizer keeps GaLore's behaviour of clamping the rank to ``min(m, n)`` with a warning; at
    ``c != 1`` an over-large rank is a configuration error: the memory budget ``M = c·r`` would silently change.)
    """
    shape = granular_shape(m, n, side, c, name)
    if c != 1.0 and rank > min(shape):
        raise ValueError(f"{name} [{m}, {n}]: rank {rank} does not fit the granularity-{c:g} reshaped "
                         f"{shape[0]}×{shape[1]} matrix (needs rank <= {min(shape)})")
    return shape


def to_granular(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """[m, n] -> ``shape`` (= :func:`granular_shape`). Identity (the same tensor object) at ``c = 1``, so the
    GaLore path sees exactly the tensor — and the memory layout — it saw before."""
    return x if tuple(x.shape) == tuple(shape) else x.reshape(shape)


def from_granular(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Reshaped rows back to weight rows: [rows·a, cols/a] -> [rows, cols] (identity when already that shape)."""
    return x if tuple(x.shape) == (rows, cols) else x.reshape(rows, cols)


def granular_rows(row_offset: int, rows: int, m: int, m_granular: int) -> tuple[int, int]:
    """Weight rows ``[row_offset, row_offset + rows)`` -> (offset, count) of the matching reshaped rows.

    When rows are merged (``m_granular < m``, a factor ``k = m / m_granular``) the shard must start and end on a
    multiple of ``k`` — a reshaped row spans ``k`` weight rows and cannot be split.
    """
    if m_granular >= m:
        a = m_granular // m
        return row_offset * a, rows * a
    k = m // m_granular
    if row_offset % k or rows % k:
        raise ValueError(f"rows [{row_offset}, {row_offset + rows}) are not aligned to the granularity: each "
                         f"reshaped row spans {k} weight rows, so a shard must start and end on a multiple of {k}")
    return row_offset // k, rows // k


def covering_rows(row_offset: int, rows: int, m: int, m_granular: int) -> tuple[int, int, int, int]:
    """Weight rows ``[row_offset, row_offset + rows)`` -> ``(g_off, g_rows, w_off, w_rows)``: the reshaped rows
    ``[g_off, g_off + g_rows)`` that touch them, and the weight rows ``[w_off, w_off + w_rows)`` those cover.

    Unlike :func:`granular_rows` the shard need not be aligned: when rows are merged (``k = m / m_granular``
    weight rows per reshaped row) a shard boundary may cut a reshaped row, which then belongs partly to this shard
    (``w_off < row_offset`` or ``w_off + w_rows > row_offset + rows``). An empty shard covers nothing.
    """
    if m_granular >= m:
        a = m_granular // m
        return row_offset * a, rows * a, row_offset, rows
    if rows == 0:
        return row_offset // (m // m_granular), 0, row_offset, 0
    k = m // m_granular
    g_off = row_offset // k
    g_end = -(-(row_offset + rows) // k)
    return g_off, g_end - g_off, g_off * k, (g_end - g_off) * k


def held_rows(row_offset: int, rows: int, m: int, m_granular: int) -> tuple[int, int]:
    """The reshaped rows ``[h_off, h_off + h_rows)`` whose *first* weight row lies in ``[row_offset, row_offset +
    rows)``: the rows whose state (low-rank moments) a row shard holds. Every reshaped row is held by exactly one
    shard of a partition of the weight rows, also where a shard boundary cuts it."""
    if m_granular >= m:
        a = m_granular // m
        return row_offset * a, rows * a
    k = m // m_granular
    h_off = -(-row_offset // k)
    return h_off, max(0, -(-(row_offset + rows) // k) - h_off)


def resolve_granularity(shapes: Mapping[str, tuple[int, int]], granularity: float, rank: int,
                        proj_type: str = "std", fallback: bool = False) -> dict[str, float]:
    """Per-matrix granularity for a model: ``granularity`` wherever it fits, else an error or ``c = 1``.

    A matrix "cannot take" ``c`` when ``c`` (or ``1/c``) does not divide the dimension it cuts, or when ``rank``
    does not fit the reshaped matrix (e.g. LLaMA-1B's 5461-wide MLP at ``c = 1/2``). Without ``fallback`` this
    raises one ``ValueError`` listing every such matrix; with it, those matrices use ``c = 1`` and one warning lists
    them. Pure and deterministic, so every rank of a distributed job resolves the same plan.
    """
    c = check_granularity(granularity)
    out: dict[str, float] = {}
    bad: list[str] = []
    for name, (m, n) in shapes.items():
        out[name] = c
        if c == 1.0:
            continue
        try:
            check_rank_fits(int(m), int(n), projection_side(int(m), int(n), proj_type), c, rank, name)
        except ValueError as e:
            bad.append(str(e))
            out[name] = 1.0
    if bad and not fallback:
        raise ValueError(f"granularity={c:g} does not fit {len(bad)} matrices: " + "; ".join(bad)
                         + " — choose another granularity or set granularity_fallback=True to use c=1 for them")
    if bad:
        warnings.warn(f"granularity={c:g} does not fit {len(bad)} matrices, which fall back to c=1: "
                      + "; ".join(bad), stacklevel=3)
    return out


__all__ = ["check_granularity", "granular_shape", "check_rank_fits", "to_granular", "from_granular",
           "granular_rows", "covering_rows", "held_rows", "resolve_granularity"]
