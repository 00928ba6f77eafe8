"""Distribution: the ownership plan (who refreshes and keeps the state of each projected matrix) and the one
module that talks to ``torch.distributed`` for optimizer traffic (DESIGN.md §3).

Engines (local, ddp, deepspeed, fsdp) build on these two; the math layers never import this package.
"""

from qgalore_dist.dist.collectives import Collectives, CommCounters
from qgalore_dist.dist.plan import (
    OwnershipPlan,
    exact_max_cost,
    lower_bound,
    make_plan,
    matrix_state_bytes,
    model_matrix_shapes,
    plan_for_model,
    plan_from_costs,
    plan_options,
    refresh_cost,
)

__all__ = [
    "Collectives",
    "CommCounters",
    "OwnershipPlan",
    "exact_max_cost",
    "lower_bound",
    "make_plan",
    "matrix_state_bytes",
    "model_matrix_shapes",
    "plan_for_model",
    "plan_from_costs",
    "plan_options",
    "refresh_cost",
]
