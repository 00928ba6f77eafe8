"""qgalore_dist: sharded Q-GaLore / VLoRP optimizer for single device, DDP, DeepSpeed ZeRO and FSDP2."""

from .config import QGaLoreConfig
from .nn import QGaLoreLinear, quantize_model
from .optim import LowRankAdamW, QGaLoreOptimizer

__all__ = ["QGaLoreConfig", "QGaLoreLinear", "LowRankAdamW", "QGaLoreOptimizer", "quantize_model"]
__version__ = "0.1.0"
