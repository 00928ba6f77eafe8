"""Distribution: the ownership plan (who refreshes and keeps the state of each projected matrix) and the one
module that talks to ``torch.distributed`` for optimizer traffic (docs/design.md §3).

Engines (local, ddp, deepspeed, fsdp) build on these two; the math layers never import this package. The ddp engine's
optimizer is :class:`ShardedQGaLoreOptimizer`; :func:`init_distributed` discovers ranks under torchrun or mpirun.
"""

from qgalore_dist.parallel.collectives import Collectives, CommCounters
from qgalore_dist.parallel.launch_env import DistEnv, discover_launch, init_distributed
from qgalore_dist.parallel.plan import (
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
from qgalore_dist.parallel.replicas import ReplicaMismatch, check_replicas, check_same_setup, tensor_checksum
from qgalore_dist.parallel.sharded_optimizer import (
    COMM_MODES,
    ShardedQGaLoreOptimizer,
    default_plan,
    merge_state_dicts,
)

__all__ = [
    "COMM_MODES",
    "Collectives",
    "CommCounters",
    "DistEnv",
    "OwnershipPlan",
    "ReplicaMismatch",
    "ShardedQGaLoreOptimizer",
    "check_replicas",
    "check_same_setup",
    "default_plan",
    "discover_launch",
    "exact_max_cost",
    "init_distributed",
    "lower_bound",
    "make_plan",
    "matrix_state_bytes",
    "merge_state_dicts",
    "model_matrix_shapes",
    "plan_for_model",
    "plan_from_costs",
    "plan_options",
    "refresh_cost",
    "tensor_checksum",
]
