"""Training engines: what :func:`qgalore_dist.train.loop.train` runs through (``--engine``).

An engine owns model/optimizer preparation, backward, the optimizer step, cross-rank averaging of scalars, and
checkpoint save/verify/load; the loop contains no engine-specific code. :class:`~.base.Engine` documents the
interface, :class:`~.local.LocalEngine` is one process on one device. Distributed engines live in their own modules
and are imported only when asked for (DeepSpeed's import alone takes seconds).
"""

from __future__ import annotations

import importlib

from ...errors import UsageError
from ..args import TrainArgs
from .base import Engine
from .local import LocalEngine

__all__ = ["ENGINES", "Engine", "LocalEngine", "make_engine"]

# --engine name -> "module:class" (relative to this package), imported on demand
ENGINES = {
    "local": ".local:LocalEngine",
    "ddp": ".ddp:DDPEngine",
    "fsdp": ".fsdp:FSDPEngine",
    "deepspeed": ".deepspeed:DeepSpeedEngine",
}


def make_engine(args: TrainArgs) -> Engine:
    """The engine ``args.engine`` names, constructed from ``args`` (distributed ones join their process group)."""
    try:
        spec = ENGINES[args.engine]
    except KeyError:
        raise UsageError(f"--engine {args.engine!r} is unknown (choose from {', '.join(ENGINES)})") from None
    module, cls = spec.split(":")
    return getattr(importlib.import_module(module, __name__), cls).from_args(args)
