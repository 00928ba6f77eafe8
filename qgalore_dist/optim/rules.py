"""The rules by name: ``QGaLoreConfig.optimizer`` -> the per-matrix rule every placement drives
(docs/design.md §3a). Adding a rule is its own file plus one entry here (and its name in ``config.OPTIMIZERS``)."""

from __future__ import annotations

from ..config import QGaLoreConfig
from .lion import LowRankLion
from .lowrank_adamw import LowRankAdamW
from .projfactor import ProjFactor

RULES: dict[str, type[LowRankAdamW]] = {"adamw": LowRankAdamW, "projfactor": ProjFactor, "lion": LowRankLion}


def make_rule(config: QGaLoreConfig) -> LowRankAdamW:
    """The per-matrix rule ``config.optimizer`` names."""
    return RULES[config.optimizer](config)


__all__ = ["RULES", "make_rule"]
