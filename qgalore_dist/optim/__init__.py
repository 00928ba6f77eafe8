from .dense_adamw import dense_adamw_step, init_dense_state
from .lowrank_adamw import LowRankAdamW, MatrixState
from .optimizer import QGaLoreOptimizer
from .projfactor import ProjFactor, ProjFactorState

__all__ = ["LowRankAdamW", "MatrixState", "ProjFactor", "ProjFactorState", "QGaLoreOptimizer", "dense_adamw_step",
           "init_dense_state"]
