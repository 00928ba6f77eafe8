"""Training: the ``launch/pretrain.py`` command line, the engine-agnostic loop, LR schedules and metrics.

Typical use (what ``python launch/pretrain.py ...`` does)::

    from qgalore_dist.train import main
    main(["--model", "llama_20m", "--optimizer", "qgalore", "--max-steps", "200"])
"""

from ..errors import UsageError
from .args import OPTIMIZERS, TrainArgs
from .cli import build_parser, main, parse_args
from .engines import ENGINES, Engine, LocalEngine, make_engine
from .loop import TrainResult, evaluate, lm_loss, train
from .metrics import MetricsWriter, Progress, peak_memory_bytes, perplexity
from .optimizers import DenseAdamW8bit, TorchAdamW, make_optimizer, qgalore_config
from .schedule import SCHEDULES, build_scheduler, lr_multiplier

__all__ = [
    "ENGINES",
    "Engine",
    "make_engine",
    "qgalore_config",
    "OPTIMIZERS",
    "SCHEDULES",
    "DenseAdamW8bit",
    "LocalEngine",
    "MetricsWriter",
    "Progress",
    "TorchAdamW",
    "TrainArgs",
    "TrainResult",
    "UsageError",
    "build_parser",
    "build_scheduler",
    "evaluate",
    "lm_loss",
    "lr_multiplier",
    "main",
    "make_optimizer",
    "parse_args",
    "peak_memory_bytes",
    "perplexity",
    "train",
]
