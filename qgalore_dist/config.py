"""One typed, validated configuration for the Q-GaLore / VLoRP optimizer.

Every engine (single device, DDP, DeepSpeed, FSDP2) reads the same :class:`QGaLoreConfig`; a bad value raises
``ValueError`` naming the field, the value and what is allowed, so the CLI can turn it into one line and exit 2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .projection.vlorp import check_granularity

PROJECTIONS = ("svd", "rsvd", "gaussian", "rademacher")
OPTIMIZERS = ("adamw", "projfactor", "lion")  # optim/rules.py maps them to rules
SIMILARITIES = ("cos", "overlap")
MOMENT_ON_REFRESH = ("keep", "rotate")
SECOND_MOMENT_ON_ROTATE = ("keep", "reset", "square")
PROJ_TYPES = ("std",)


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid: {allowed}")


@dataclass
class QGaLoreConfig:
    """Settings of the projected-matrix optimizer (defaults follow the Q-GaLore paper).

    ``quantize=False`` is the float reference mode: no INT8 weights, no INT4 projectors, fp32 moments — it
    reproduces ``galore_torch.GaLoreAdamW`` and serves as the test oracle.

    VLoRP: ``granularity`` (c, a power of two) reshapes each projected gradient so its projected dimension is cut
    into c pieces (:mod:`qgalore_dist.projection.vlorp`; 1 = GaLore); ``projection="gaussian"`` / ``"rademacher"``
    draw a seeded random basis every ``update_proj_gap`` steps instead of an SVD (fixed gap: the convergence gate
    is skipped for them — the similarity of two independent random draws says nothing about the gradient);
    ``optimizer="projfactor"`` selects VLoRP's ProjFactor rule instead of low-rank AdamW, ``"lion"`` low-rank Lion
    (:mod:`qgalore_dist.optim.lion`, library only: the command line does not offer it).
    """

    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    projection: str = "svd"
    rsvd_oversample: int = 8
    rsvd_niter: int = 2
    granularity: float = 1.0
    granularity_fallback: bool = False  # matrices that cannot take `granularity` use c=1 (one warning), not an error
    optimizer: str = "adamw"

    # quantisation
    quantize: bool = True
    weight_group_size: int = 256
    proj_bits: int = 4
    proj_group_size: int = 256
    state_bits: int = 8
    state_block_size: int = 256
    state_min_numel: int = 4096
    stochastic_round: bool = True
    # fuse "update + stochastic-rounding re-quantisation" and the 8-bit moment update with torch.compile (equal to
    # eager up to fp32 rounding, quant/fused.py; ~5x faster on CPU; the first compilation of each column count costs
    # ~10-60 s per process, cached on disk afterwards)
    fused: bool = True

    # AdamW
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0

    # convergence-gated refresh
    gate: bool = True
    similarity: str = "cos"
    cos_threshold: float = 0.4
    overlap_threshold: float = 0.9
    gamma_proj: float = 2.0
    queue_size: int = 5
    max_proj_gap: int = 5000

    # what happens to the moments when the subspace changes
    moments_on_refresh: str = "keep"
    second_moment_on_rotate: str = "square"
    # ProjFactor: carry the projected first moment into the new basis at every refresh / resampling
    projfactor_momentum_transfer: bool = True

    seed: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # JSON gives lists
        if isinstance(self.granularity, int) and not isinstance(self.granularity, bool):
            self.granularity = float(self.granularity)  # JSON / CLI give 2 for 2.0
        self.validate()

    def validate(self) -> None:
        positive_ints = ("rank", "update_proj_gap", "weight_group_size", "proj_group_size", "state_block_size",
                         "queue_size", "max_proj_gap", "rsvd_niter")
        for name in positive_ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise _bad(name, v, "must be a positive integer")
        if isinstance(self.rsvd_oversample, bool) or not isinstance(self.rsvd_oversample, int) \
                or self.rsvd_oversample < 0:
            raise _bad("rsvd_oversample", self.rsvd_oversample, "must be an integer >= 0")
        if self.state_min_numel < 0:
            raise _bad("state_min_numel", self.state_min_numel, "must be >= 0")
        if self.proj_type not in PROJ_TYPES:
            raise _bad("proj_type", self.proj_type, f"allowed: {', '.join(PROJ_TYPES)}")
        if self.projection not in PROJECTIONS:
            raise _bad("projection", self.projection, f"allowed: {', '.join(PROJECTIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise _bad("optimizer", self.optimizer, f"allowed: {', '.join(OPTIMIZERS)}")
        check_granularity(self.granularity)
        if self.similarity not in SIMILARITIES:
            raise _bad("similarity", self.similarity, f"allowed: {', '.join(SIMILARITIES)}")
        if self.moments_on_refresh not in MOMENT_ON_REFRESH:
            raise _bad("moments_on_refresh", self.moments_on_refresh, f"allowed: {', '.join(MOMENT_ON_REFRESH)}")
        if self.second_moment_on_rotate not in SECOND_MOMENT_ON_ROTATE:
            raise _bad("second_moment_on_rotate", self.second_moment_on_rotate,
                       f"allowed: {', '.join(SECOND_MOMENT_ON_ROTATE)}")
        if self.proj_bits not in (4, 8):
            raise _bad("proj_bits", self.proj_bits, "allowed: 4 or 8")
        if self.state_bits not in (8, 32):
            raise _bad("state_bits", self.state_bits, "allowed: 8 or 32")
        if not (0.0 <= self.cos_threshold <= 1.0):
            raise _bad("cos_threshold", self.cos_threshold, "must lie in [0, 1]")
        if not (0.0 <= self.overlap_threshold <= 1.0):
            raise _bad("overlap_threshold", self.overlap_threshold, "must lie in [0, 1]")
        if not self.gamma_proj >= 1.0:
            raise _bad("gamma_proj", self.gamma_proj, "must be >= 1")
        if self.max_proj_gap < self.update_proj_gap:
            raise _bad("max_proj_gap", self.max_proj_gap, f"must be >= update_proj_gap ({self.update_proj_gap})")
        if not self.scale > 0:
            raise _bad("scale", self.scale, "must be > 0")
        if not self.lr >= 0:
            raise _bad("lr", self.lr, "must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise _bad("betas", self.betas, "must be two numbers in [0, 1)")
        if not self.eps > 0:
            raise _bad("eps", self.eps, "must be > 0")
        if not self.weight_decay >= 0:
            raise _bad("weight_decay", self.weight_decay, "must be >= 0")

    @property
    def similarity_threshold(self) -> float:
        return self.cos_threshold if self.similarity == "cos" else self.overlap_threshold

    def replace(self, **changes: Any) -> "QGaLoreConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QGaLoreConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown qgalore setting(s): {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**dict(d))


__all__ = ["QGaLoreConfig", "PROJECTIONS", "SIMILARITIES", "OPTIMIZERS"]
