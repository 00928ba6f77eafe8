"""Ownership plan: which rank owns (refreshes, keeps the moments of) each projected matrix.

docs/design.md §3: matrices stay whole at one *owner*. The plan is a pure, deterministic function of the matrices'
names and shapes, the world size and a few config numbers — never stored, recomputed at start-up — so checkpoints
are keyed by parameter name and can be resharded to another world size.

Cost model
----------
The load that must be balanced is the projector refresh (an SVD of the full gradient, on the owner only):

* exact SVD (``projection="svd"``): ``m·n·min(m, n)`` — the flop count of a thin SVD up to a constant;
* randomized SVD (``projection="rsvd"``): ``m·n·ℓ`` with ``ℓ = min(r + oversample, m, n)`` (the sketch width of
  :func:`qgalore_dist.projection.projector.randomized_svd`; power iterations multiply every matrix's cost by the
  same factor, so they do not change the plan).

The secondary criterion is the owner-only state: two low-rank moments of :func:`lowrank_shape` plus the projector
of :func:`basis_shape`, at ``state_bytes_per_element`` (default 2: two 8-bit moments) and
``projector_bytes_per_element`` (default 0.5: INT4). Block scales (≈ 4 bytes per 256 elements) are left out — they
scale with the same element counts and do not move the balance.

Algorithm
---------
Up to three candidate assignments, each refined, the best kept:

1. Greedy longest-processing-time (LPT): matrices sorted by (cost desc, state bytes desc, name), each placed on the
   rank with the least (cost, state bytes, rank index).
2. MULTIFIT: first-fit-decreasing under the smallest capacity that bisection between ⌈LB⌉ and the LPT maximum
   finds feasible — it packs equal-cost LLaMA blocks tighter where LPT leaves one rank a block too many.
3. Exact, when the costs take at most two distinct values (every LLaMA model without grouped-query attention: h×h
   attention blocks and h×i MLP blocks): a DP over ranks finds the optimal maximum and how many large matrices
   each rank takes (:func:`exact_max_cost`).

Each candidate is then refined by deterministic exchanges of up to two matrices between the most loaded rank and
one other rank (moves, swaps, 2-for-1 swaps) that strictly lower the top rank without lifting the other to it, so
the search terminates; a second pass does the same on state bytes without raising the maximum cost. The best
candidate by (max cost, max state bytes) wins, ties going to the earlier one (LPT first).

The result is judged against ``LB = max(Σcost/N, largest cost, c_N + c_{N+1})`` (costs sorted descending, 1-based):
no assignment can beat it (the pigeonhole term: N+1 largest matrices on N ranks put two of them on one rank). LB
is not always reachable with indivisible matrices: e.g. llama_7b at 64 ranks (128 attention blocks of cost 1, 96 MLP
blocks of cost 2.6875) has LB = Σ/N = 6.03 but no assignment below 6.375 = 1.057·LB, since every load under 6.375
is one of 6·1, 2.6875 + 3·1 or 2·2.6875 and those hold at most 96 attention blocks. :func:`exact_max_cost` gives
the true optimum in such cases, which tells "the plan is poor" apart from "the bound is loose".
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, NoReturn, Sequence

from ..errors import UsageError, UserError
from ..optim.lowrank_adamw import effective_rank
from ..projection.projector import basis_shape, lowrank_shape, projection_side

__all__ = [
    "OwnershipPlan",
    "refresh_cost",
    "matrix_state_bytes",
    "plan_from_costs",
    "make_plan",
    "plan_for_model",
    "model_matrix_shapes",
    "plan_options",
    "lower_bound",
    "exact_max_cost",
    "main",
]

PROJECTIONS = ("svd", "rsvd")
DEFAULT_RANK = 128  # QGaLoreConfig's default rank
DEFAULT_OVERSAMPLE = 8  # QGaLoreConfig's default rsvd_oversample


# ------------------------------------------------------------------------------------------------------------
# per-matrix numbers
# ------------------------------------------------------------------------------------------------------------
def refresh_cost(shape: tuple[int, int], rank: int = DEFAULT_RANK, projection: str = "svd",
                 oversample: int = DEFAULT_OVERSAMPLE) -> int:
    """Relative flop count of one projector refresh of an ``[m, n]`` matrix (an exact Python int)."""
    m, n = int(shape[0]), int(shape[1])
    if projection == "svd":
        return m * n * min(m, n)
    if projection == "rsvd":
        ell = min(effective_rank((m, n), rank) + oversample, m, n)
        return m * n * ell
    raise ValueError(f"projection={projection!r} is invalid: allowed: {', '.join(PROJECTIONS)}")


def matrix_state_bytes(shape: tuple[int, int], rank: int = DEFAULT_RANK, state_bytes_per_element: float = 2.0,
                       projector_bytes_per_element: float = 0.5) -> int:
    """Owner-only bytes of one matrix: both low-rank moments plus its projector (rounded up)."""
    m, n = int(shape[0]), int(shape[1])
    side = projection_side(m, n)
    r = effective_rank((m, n), rank)
    lm, ln = lowrank_shape(m, n, r, side)
    bm, bn = basis_shape(m, n, r, side)
    return math.ceil(lm * ln * state_bytes_per_element + bm * bn * projector_bytes_per_element)


def plan_options(config) -> dict:
    """``make_plan`` keyword arguments read from a :class:`~qgalore_dist.config.QGaLoreConfig`.

    Moments: two tensors at ``state_bits`` (8-bit codes + one fp32 absmax per block) or fp32 in reference mode;
    projector: INT4/INT8 codes + one fp32 scale per group, or fp32 in reference mode.
    """
    if config.quantize and config.state_bits == 8:
        moments = 2 * (1.0 + 4.0 / config.state_block_size)
    else:
        moments = 2 * 4.0
    if config.quantize:
        projector = config.proj_bits / 8 + 4.0 / config.proj_group_size
    else:
        projector = 4.0
    return {"rank": config.rank, "projection": config.projection, "oversample": config.rsvd_oversample,
            "state_bytes_per_element": moments, "projector_bytes_per_element": projector}


# ------------------------------------------------------------------------------------------------------------
# bounds
# ------------------------------------------------------------------------------------------------------------
def lower_bound(costs: Iterable[int], world_size: int) -> float:
    """``LB = max(Σcost/N, largest cost, c_N + c_{N+1})``: no assignment's maximum load is below it."""
    c = sorted((int(x) for x in costs), reverse=True)
    if not c:
        return 0.0
    pigeon = c[world_size - 1] + c[world_size] if len(c) > world_size else 0
    return float(max(sum(c) / world_size, c[0], pigeon))


def _two_kind_optimum(costs: Sequence[int], world_size: int) -> tuple[int, list[int]] | None:
    """Optimal maximum load and, per rank, how many of the larger matrices it holds — when the costs take at most
    two distinct values (else None).

    For a capacity C, a rank holding b large matrices (cost B) fits at most ⌊(C − bB)/S⌋ small ones (cost S);
    C is feasible when some split Σb_r = n_B over the ranks leaves room for all n_S small ones, found by a DP over
    ranks. The optimum is the smallest feasible C among the sums b·B + s·S.
    """
    c = [int(x) for x in costs]
    if not c:
        return 0, [0] * world_size
    values = sorted(set(c), reverse=True)
    if len(values) > 2 or values[-1] <= 0:
        return None
    big = values[0]
    n_big = c.count(big)
    small = values[1] if len(values) == 2 else 0
    n_small = len(c) - n_big

    def split(cap: int) -> list[int] | None:
        bmax = min(n_big, cap // big)
        if n_big > bmax * world_size:
            return None
        room = [(cap - b * big) // small if small else 0 for b in range(bmax + 1)]
        # best[k]: most small matrices that fit once k large ones sit on the ranks so far; pick[r][k]: rank r's b
        best = [0] + [-1] * n_big
        pick: list[list[int]] = []
        for _ in range(world_size):
            nxt = [-1] * (n_big + 1)
            choice = [0] * (n_big + 1)
            for k, have in enumerate(best):
                if have < 0:
                    continue
                for b in range(min(bmax, n_big - k) + 1):
                    if have + room[b] > nxt[k + b]:
                        nxt[k + b], choice[k + b] = have + room[b], b
            best = nxt
            pick.append(choice)
        if best[n_big] < n_small:
            return None
        per_rank, k = [], n_big
        for choice in reversed(pick):
            per_rank.append(choice[k])
            k -= choice[k]
        return per_rank[::-1]

    start = math.ceil(lower_bound(c, world_size))
    sums = sorted({b * big + s * small for b in range(n_big + 1) for s in range(n_small + 1)
                   if b * big + s * small >= start})
    for cap in sums:  # feasibility is monotone in the capacity: the first feasible sum is the optimum
        per_rank = split(cap)
        if per_rank is not None:
            return cap, per_rank
    raise AssertionError("unreachable: the total cost on one rank is always feasible")


def exact_max_cost(costs: Iterable[int], world_size: int) -> int | None:
    """The optimal maximum load when the costs take at most two distinct values, else None.

    LLaMA blocks without grouped-query attention have exactly two distinct refresh costs (attention h×h, MLP h×i):
    this tells "the plan is poor" apart from "LB is not reachable with indivisible matrices".
    """
    found = _two_kind_optimum(list(costs), world_size)
    return None if found is None else found[0]


# ------------------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------------------
@dataclass
class OwnershipPlan:
    """Owner rank per matrix, and the resulting per-rank loads.

    ``owner`` maps name -> rank; ``matrices[r]`` lists rank r's matrices sorted by name; ``svd_cost[r]`` and
    ``state_bytes[r]`` are rank r's summed refresh cost and owner-only state bytes. ``costs`` / ``matrix_bytes``
    hold the per-matrix numbers the plan was made from.
    """

    world_size: int
    owner: dict[str, int]
    matrices: list[list[str]]
    svd_cost: list[int]
    state_bytes: list[int]
    costs: dict[str, int]
    matrix_bytes: dict[str, int]
    projection: str = "svd"
    rank: int | None = None
    method: str = "lpt"
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    # --- queries ----------------------------------------------------------------------------------------------
    def owner_of(self, name: str) -> int:
        return self.owner[name]

    def owned_by(self, rank: int) -> list[str]:
        return list(self.matrices[rank])

    @property
    def total_cost(self) -> int:
        return sum(self.svd_cost)

    def max_cost(self) -> int:
        return max(self.svd_cost) if self.svd_cost else 0

    def mean_cost(self) -> float:
        return self.total_cost / self.world_size

    def balance(self) -> float:
        """max / mean refresh cost over ranks (1.0 is a perfect split; 1.0 when there is nothing to split)."""
        mean = self.mean_cost()
        return self.max_cost() / mean if mean > 0 else 1.0

    def lower_bound(self) -> float:
        """``LB = max(Σcost/N, largest cost, c_N + c_{N+1})`` over this plan's matrices."""
        return lower_bound(self.costs.values(), self.world_size)

    def balance_vs_lb(self) -> float:
        """max / LB: how far the plan is from the bound (1.0 = provably optimal)."""
        lb = self.lower_bound()
        return self.max_cost() / lb if lb > 0 else 1.0

    def state_balance(self) -> float:
        """max / mean owner-only state bytes over ranks."""
        mean = sum(self.state_bytes) / self.world_size
        return max(self.state_bytes) / mean if mean > 0 else 1.0

    # --- printing ---------------------------------------------------------------------------------------------
    def format(self) -> str:
        """A per-rank table (matrix count, cost share, state bytes) and the balance figures."""
        total = self.total_cost or 1
        lines = [f"{'rank':>5} {'matrices':>8} {'svd cost share':>14} {'state MiB':>10}"]
        for r in range(self.world_size):
            lines.append(f"{r:>5} {len(self.matrices[r]):>8} {100.0 * self.svd_cost[r] / total:>13.2f}% "
                         f"{self.state_bytes[r] / 2**20:>10.2f}")
        lb = self.lower_bound()
        mean = self.mean_cost()
        lines.append(f"balance max/mean = {self.balance():.4f}; LB/mean = {lb / mean if mean else 1.0:.4f}; "
                     f"max/LB = {self.balance_vs_lb():.4f}; state max/mean = {self.state_balance():.4f} "
                     f"(method {self.method})")
        opt = exact_max_cost(self.costs.values(), self.world_size)
        if opt is not None and lb > 0:
            verdict = "optimal" if self.max_cost() == opt else f"max/optimum = {self.max_cost() / opt:.4f}"
            lines.append(f"exact optimum/LB = {opt / lb:.4f}: the plan is {verdict}")
        return "\n".join(lines)


class _Loads:
    """Mutable assignment used while planning: per-rank member lists and (cost, bytes) loads."""

    def __init__(self, world_size: int, cost: list[int], sbytes: list[int]):
        self.n = world_size
        self.cost = cost
        self.sbytes = sbytes
        self.members: list[set[int]] = [set() for _ in range(world_size)]
        self.c = [0] * world_size
        self.s = [0] * world_size

    def put(self, i: int, r: int) -> None:
        self.members[r].add(i)
        self.c[r] += self.cost[i]
        self.s[r] += self.sbytes[i]

    def take(self, i: int, r: int) -> None:
        self.members[r].remove(i)
        self.c[r] -= self.cost[i]
        self.s[r] -= self.sbytes[i]

    def key(self) -> tuple[int, int]:
        return max(self.c), max(self.s)

    def owners(self) -> list[int]:
        out = [0] * len(self.cost)
        for r, mem in enumerate(self.members):
            for i in mem:
                out[i] = r
        return out


def _lpt(order: list[int], world_size: int, cost: list[int], sbytes: list[int]) -> _Loads:
    loads = _Loads(world_size, cost, sbytes)
    for i in order:
        r = min(range(world_size), key=lambda k: (loads.c[k], loads.s[k], k))
        loads.put(i, r)
    return loads


def _ffd(order: list[int], world_size: int, cost: list[int], sbytes: list[int], cap: int) -> _Loads | None:
    loads = _Loads(world_size, cost, sbytes)
    for i in order:
        for r in range(world_size):
            if loads.c[r] + cost[i] <= cap:
                loads.put(i, r)
                break
        else:
            return None
    return loads


def _multifit(order: list[int], world_size: int, cost: list[int], sbytes: list[int], lo: int, hi: int,
              iterations: int = 24) -> _Loads | None:
    """First-fit-decreasing under the smallest capacity in [lo, hi] that bisection finds feasible."""
    best = None
    for _ in range(iterations):
        if lo > hi:
            break
        mid = (lo + hi) // 2
        packed = _ffd(order, world_size, cost, sbytes, mid)
        if packed is not None:
            best, hi = packed, mid - 1
        else:
            lo = mid + 1
    return best


def _from_two_kind_split(order: list[int], world_size: int, cost: list[int], sbytes: list[int]) -> _Loads | None:
    """Optimal packing for at most two distinct costs (None otherwise).

    The DP of :func:`_two_kind_optimum` fixes how many large matrices each rank takes; they are placed first (LPT
    order puts them first), each on the least loaded rank with a free slot, then every small one on the least
    loaded rank it still fits on under the optimal capacity. Placing a small matrix uses up exactly one unit of the
    DP's room, so a rank with room is always left for the next one.
    """
    found = _two_kind_optimum(cost, world_size)
    if found is None:
        return None
    cap, slots = found
    loads = _Loads(world_size, cost, sbytes)
    top = max(cost, default=0)
    for i in order:
        if cost[i] == top:
            fits = [r for r in range(world_size) if slots[r] > 0]
        else:
            fits = [r for r in range(world_size) if loads.c[r] + cost[i] <= cap]
        r = min(fits, key=lambda k: (loads.c[k], loads.s[k], k))
        if cost[i] == top:
            slots[r] -= 1
        loads.put(i, r)
    return loads


def _subsets(members: Iterable[int], cost: list[int], sbytes: list[int], names: list[str],
             size: int) -> list[tuple[int, ...]]:
    """Sub-multisets of at most ``size`` matrices of one rank, one per distinct multiset of (cost, bytes).

    Equal matrices are interchangeable, so only the lexicographically smallest names of each kind are used: the
    search stays tiny (a handful of kinds per rank) and its choice deterministic.
    """
    kinds: dict[tuple[int, int], list[int]] = {}
    for i in sorted(members, key=lambda k: names[k]):
        kinds.setdefault((cost[i], sbytes[i]), []).append(i)
    groups = list(kinds.values())
    out: list[tuple[int, ...]] = [()]

    def extend(start: int, chosen: list[int]) -> None:
        if len(chosen) == size:
            return
        for g in range(start, len(groups)):
            used = sum(1 for i in chosen if i in groups[g])
            if used < len(groups[g]):
                nxt = chosen + [groups[g][used]]
                out.append(tuple(nxt))
                extend(g, nxt)

    extend(0, [])
    return out


def _refine(loads: _Loads, names: list[str], primary: str, cost_cap: int | None, max_steps: int,
            size: int = 2) -> None:
    """Exchanges of up to ``size`` matrices between the most loaded rank (by ``primary``: "cost" or "bytes")
    and one other rank (moves, 1-for-1 swaps, 2-for-1 swaps ...) that strictly lower the top rank.

    Every accepted exchange takes the top rank strictly below the current maximum and keeps its partner strictly
    below it too, so (maximum, number of ranks at it) decreases and the loop terminates. ``cost_cap`` (used by the
    bytes pass) forbids raising any rank's cost above the plan's maximum cost.
    """
    cost, sbytes = loads.cost, loads.sbytes
    prim, sec = (loads.c, loads.s) if primary == "cost" else (loads.s, loads.c)
    pval, sval = (cost, sbytes) if primary == "cost" else (sbytes, cost)
    for _ in range(max_steps):
        r = max(range(loads.n), key=lambda k: (prim[k], sec[k], -k))
        top = prim[r]
        best: tuple | None = None
        action: tuple = ()
        mine = [(a, sum(pval[i] for i in a), sum(sval[i] for i in a))
                for a in _subsets(loads.members[r], cost, sbytes, names, size) if a]
        for t in range(loads.n):
            if t == r:
                continue
            theirs = [(b, sum(pval[j] for j in b), sum(sval[j] for j in b))
                      for b in _subsets(loads.members[t], cost, sbytes, names, size)]
            for a, pa, sa in mine:
                for b, pb, sb in theirs:
                    if pa <= pb:
                        continue  # r would not go down
                    new_t = prim[t] + pa - pb
                    if new_t >= top:
                        continue
                    new_r = top - pa + pb
                    sec_r, sec_t = sec[r] - sa + sb, sec[t] + sa - sb
                    if cost_cap is not None and max(sec_r, sec_t) > cost_cap:
                        continue
                    cand = (max(new_r, new_t), max(sec_r, sec_t), len(a) + len(b),
                            tuple(names[i] for i in a), tuple(names[j] for j in b), t)
                    if best is None or cand < best:
                        best, action = cand, (a, b, t)
        if best is None:
            return
        a, b, t = action
        for i in a:
            loads.take(i, r)
            loads.put(i, t)
        for j in b:
            loads.take(j, t)
            loads.put(j, r)


def plan_from_costs(costs: Mapping[str, int], world_size: int, state_bytes: Mapping[str, int] | None = None,
                    *, refine: bool = True, projection: str = "svd", rank: int | None = None,
                    shapes: Mapping[str, tuple[int, int]] | None = None) -> OwnershipPlan:
    """Assign matrices with given refresh ``costs`` (and optional state bytes) to ``world_size`` ranks.

    Deterministic and independent of the mapping's order: everything is sorted by name first.
    ``refine=False`` gives plain LPT (for comparison).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} is invalid: must be a positive integer")
    names = sorted(costs)
    cost = [int(costs[k]) for k in names]
    if any(c < 0 for c in cost):
        raise ValueError("refresh costs must be >= 0")
    sbytes = [int(state_bytes[k]) if state_bytes is not None else 0 for k in names]
    order = sorted(range(len(names)), key=lambda i: (-cost[i], -sbytes[i], names[i]))

    lpt = _lpt(order, world_size, cost, sbytes)
    method, best = "lpt", lpt
    if refine and names and world_size > 1:
        # bounded, deterministic effort (never a wall-clock limit: every rank must compute the same plan)
        steps = min(8 * len(names) + 4 * world_size, 4096)
        lb = lower_bound(cost, world_size)
        candidates = [("lpt", lpt)]
        if max(lpt.c) > lb:  # LPT already meets the bound (common at large N): nothing can beat it on cost
            mf = _multifit(order, world_size, cost, sbytes, math.ceil(lb), max(lpt.c))
            if mf is not None:
                candidates.append(("multifit", mf))
            ex = _from_two_kind_split(order, world_size, cost, sbytes)
            if ex is not None:
                candidates.append(("exact", ex))
        best = None
        for label, cand in candidates:
            before = cand.key()
            if max(cand.c) > lb:
                _refine(cand, names, "cost", None, steps)
            _refine(cand, names, "bytes", max(cand.c), steps)
            tag = label if cand.key() == before else f"{label}+swaps"
            if best is None or cand.key() < best.key():
                method, best = tag, cand

    owners = best.owners()
    owner = {names[i]: owners[i] for i in range(len(names))}
    matrices = [sorted(names[i] for i in best.members[r]) for r in range(world_size)]
    return OwnershipPlan(world_size=world_size, owner=owner, matrices=matrices, svd_cost=list(best.c),
                         state_bytes=list(best.s), costs=dict(zip(names, cost)),
                         matrix_bytes=dict(zip(names, sbytes)), projection=projection, rank=rank, method=method,
                         shapes={k: tuple(shapes[k]) for k in names} if shapes else {})


def make_plan(shapes: Mapping[str, tuple[int, int]], world_size: int, rank: int = DEFAULT_RANK,
              projection: str = "svd", *, oversample: int = DEFAULT_OVERSAMPLE, state_bytes_per_element: float = 2.0,
              projector_bytes_per_element: float = 0.5, refine: bool = True) -> OwnershipPlan:
    """Ownership plan for matrices given as ``{name: (m, n)}``.

    ``rank`` sets the state bytes (and the rsvd sketch width); ``projection`` picks the cost model ("svd":
    ``m·n·min(m,n)``, "rsvd": ``m·n·min(r+oversample, m, n)``).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} is invalid: must be a positive integer")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection={projection!r} is invalid: allowed: {', '.join(PROJECTIONS)}")
    clean: dict[str, tuple[int, int]] = {}
    for name, shape in shapes.items():
        if len(shape) != 2 or int(shape[0]) < 1 or int(shape[1]) < 1:
            raise ValueError(f"{name}: shape {tuple(shape)} is not a non-empty 2-D matrix shape")
        clean[name] = (int(shape[0]), int(shape[1]))
    costs = {k: refresh_cost(s, rank, projection, oversample) for k, s in clean.items()}
    sb = {k: matrix_state_bytes(s, rank, state_bytes_per_element, projector_bytes_per_element)
          for k, s in clean.items()}
    return plan_from_costs(costs, world_size, sb, refine=refine, projection=projection, rank=rank, shapes=clean)


def model_matrix_shapes(model_or_config, target_modules: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
    """``{"<module>.weight": (out, in)}`` of the projected linears of a model, a ``PretrainedConfig`` or a model
    spec (shipped name / config path). Configs and specs are built on the meta device: no storage at any size."""
    import torch.nn as nn

    from ..nn.convert import DEFAULT_TARGET_MODULES, find_target_linears

    targets = tuple(target_modules) if target_modules is not None else DEFAULT_TARGET_MODULES
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
    else:
        from ..models import build_model, resolve_model_config

        config = model_or_config
        if isinstance(config, (str, Path)):
            config = resolve_model_config(config)
        model = build_model(config, meta=True)
    found = find_target_linears(model, targets)
    # names match the optimizer's ProjectedMatrix names, so the plan keys the same state-dict entries
    return {f"{name}.weight": (int(mod.out_features), int(mod.in_features)) for name, mod in found.items()}


def plan_for_model(model_or_config, world_size: int, target_modules: Sequence[str] | None = None,
                   rank: int = DEFAULT_RANK, projection: str = "svd", **kwargs) -> OwnershipPlan:
    """:func:`make_plan` over the projected matrices of a model / config / spec (see
    :func:`model_matrix_shapes`); extra keyword arguments go to :func:`make_plan`."""
    shapes = model_matrix_shapes(model_or_config, target_modules)
    if not shapes:
        raise ValueError(f"target_modules={list(target_modules or [])!r} matched no linear layer in the model")
    return make_plan(shapes, world_size, rank=rank, projection=projection, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# CLI: python -m qgalore_dist.plan --model llama_1b --world-size 8
# ------------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse whose errors become one ``error:`` line (raised, so ``main`` can return 2 in-process)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not a positive integer")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m qgalore_dist.plan",
                description="Print the ownership plan (which rank refreshes which projected matrix) of a model.")
    p.add_argument("--model", required=True, help="shipped config name (llama_1b ...), config JSON or model dir")
    p.add_argument("--world-size", type=_positive_int, required=True, help="number of ranks")
    p.add_argument("--rank", type=_positive_int, default=DEFAULT_RANK, help="projection rank (state bytes, rsvd)")
    p.add_argument("--projection", choices=PROJECTIONS, default="svd", help="refresh cost model")
    p.add_argument("--oversample", type=int, default=DEFAULT_OVERSAMPLE, help="rsvd oversampling")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module names to project (default: q/k/v/o/gate/up/down_proj)")
    p.add_argument("--no-refine", action="store_true", help="plain LPT, no MULTIFIT / swap refinement")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan; returns 0, or 2 after one ``error:`` line on stderr for a bad command line."""
    try:
        args = build_parser().parse_args(argv)
        if args.oversample < 0:
            raise UsageError(f"--oversample {args.oversample} must be >= 0")
        targets = None
        if args.target_modules is not None:
            targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
            if not targets:
                raise UsageError("--target-modules is empty")
        plan = plan_for_model(args.model, args.world_size, targets, rank=args.rank, projection=args.projection,
                              oversample=args.oversample, refine=not args.no_refine)
    except (UserError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 2
    print(f"model {args.model}: {len(plan.owner)} projected matrices, world size {plan.world_size}, "
          f"projection {plan.projection}, rank {plan.rank}")
    print(plan.format())
    return 0
