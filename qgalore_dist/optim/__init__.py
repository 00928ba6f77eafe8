from .dense_adamw import dense_adamw_step, init_dense_state
from .lowrank_adamw import LowRankAdamW, MatrixState
from .optimizer import QGaLoreOptimizer

__all__ = ["LowRankAdamW", "MatrixState", "QGaLoreOptimizer", "dense_adamw_step", "init_dense_state"]
