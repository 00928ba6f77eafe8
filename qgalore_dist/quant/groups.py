"""Row-aligned groups: the one layout every quantised tensor in qgalore_dist uses.

A group is ``g`` consecutive elements *inside one row*; a row whose length ``g`` does not divide ends in a shorter
group. Groups never straddle rows, so splitting a matrix by rows (ZeRO-3, FSDP2) never splits a group and a row
shard quantises exactly like the corresponding rows of the whole matrix. (Q-GaLore flattens the tensor and lets
groups straddle rows; that breaks row sharding.)
"""

from __future__ import annotations

import math

import torch


def num_groups(cols: int, group_size: int) -> int:
    """Groups per row of ``cols`` elements."""
    return max(1, math.ceil(cols / group_size))


def to_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[m, n] -> [m, G, g] with zero padding at the end of each row (G = ceil(n / g)).

    Zero padding never changes an absmax, so the short last group gets the scale of its real elements.
    """
    m, n = x.shape
    g = min(group_size, n) if n > 0 else group_size
    groups = num_groups(n, g)
    pad = groups * g - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(m, groups, g)


def from_groups(xg: torch.Tensor, cols: int) -> torch.Tensor:
    """[m, G, g] -> [m, cols], dropping the padding."""
    m, groups, g = xg.shape
    return xg.reshape(m, groups * g)[:, :cols]  # explicit width: a shard may hold zero rows


def group_absmax(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group absolute maximum of a [m, n] tensor: float32 [m, G]."""
    return to_groups(x.float(), group_size).abs().amax(dim=-1)


def expand_scales(scales: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """[m, G] group scales -> [m, cols] per-element scales."""
    g = min(group_size, cols) if cols > 0 else group_size
    return scales.repeat_interleave(g, dim=1)[:, :cols]


def apply_group_scales(x: torch.Tensor, scales: torch.Tensor, group_size: int, divide: bool = False) -> torch.Tensor:
    """x [m, n] times (or divided by) its group scales [m, G], without materialising per-element scales.

    Full groups go through a [m, G_full, g] view (broadcast multiply); the short tail group, if any, is scaled
    on its own. Returns a new tensor of x's dtype.
    """
    m, n = x.shape
    g = min(group_size, n) if n > 0 else group_size
    full = n // g
    out = torch.empty_like(x)
    op = torch.div if divide else torch.mul
    if full:
        head = x[:, : full * g].reshape(m, full, g)
        op(head, scales[:, :full].unsqueeze(-1).to(x.dtype), out=out[:, : full * g].view(m, full, g))
    if full * g < n:
        op(x[:, full * g:], scales[:, full:full + 1].to(x.dtype), out=out[:, full * g:])
    return out
