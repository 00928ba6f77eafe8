"""The DeepSpeed engine (``--engine deepspeed``, implied by ``--ds_config FILE``): ZeRO 1/2/3 with a side-car.

    deepspeed --num_accelerators 2 launch/pretrain.py --ds_config ds_configs/qgalore.json
    torchrun --nproc_per_node 2 launch/pretrain.py --ds_config ds_configs/qgalore_zero3.json
    mpirun -np 2 python launch/pretrain.py --ds_config ds_configs/qgalore_zero1.json

DeepSpeed ZeRO shards and steps the dense parameters (embeddings, norms, ``lm_head``); qgalore_dist owns the
projected INT8 matrices (buffers ZeRO never sees) through :mod:`qgalore_dist.parallel.deepspeed_sidecar` (ZeRO-1/2:
replicated INT8, owner-only SVD and moments) or :mod:`qgalore_dist.parallel.deepspeed_zero3` (ZeRO-3: INT8 rows
partitioned across ranks). See docs/design.md §3.

``--optimizer adamw|adamw8bit`` (the full-AdamW reference and ``--method lora``'s adapters) have no projected
matrices: ZeRO holds and steps every trainable parameter — a LoRA model's frozen base stays out of the optimizer
(ZeRO-3 partitions and gathers it like any parameter) — with :class:`FlatTorchAdamW` (``torch.optim.AdamW``, the
rule of adamw on every engine) or :class:`~qgalore_dist.parallel.deepspeed_sidecar.FlatDenseAdamW` with 8-bit
moments, and :class:`DenseOnlySidecar` joining the ranks' partition norms into the clipping norm. ``--optimizer
galore`` (float projected matrices) runs under ZeRO-1/2 with the replicated side-car (its float weights stay out of
ZeRO's partitions); under ZeRO-3 it is refused (DeepSpeed would flatten those weights).

**The ds_config.** A DeepSpeed JSON with a ``"qgalore"`` block (DeepSpeed ignores unknown top-level keys). Three
ship as package data in ``qgalore_dist/ds_configs/`` (``ds_configs/`` in a checkout links there): ``--ds_config
qgalore`` (ZeRO-2), ``qgalore_zero1``, ``qgalore_zero3`` — a bare name that is not an existing file resolves to
them (:func:`qgalore_dist.train.args.shipped_ds_config`)::

    "qgalore": {"optimizer": "qgalore", "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_bits": 4,
                "gate": true, "comm_mode": "lowrank", "granularity": 1.0, "projection": "svd",
                "dense_state_bits": 8, "fused": true}

``proj_bits``: INT4 or INT8 projectors; ``dense_state_bits``: the dense AdamW moments of qgalore / projfactor
(8-bit blockwise or fp32; adamw / adamw8bit: fp32 / 8-bit by their name, a contradicting key is an error);
``fused``: the torch.compile'd update + re-quantisation kernel (false: eager, no compile at start-up). Every key
of the block is optional (absent: the command line's value / default), the block itself is required
(it is what says the config was written for qgalore_dist). A key that is set wins over the flag's default; a flag
set to another, non-default value is an error (``contradictory settings``, exit 2), never silently overridden
(the defaults are the command's: ``qgalore-finetune`` has its own). Under ``--method lora`` a block whose
``optimizer`` is a projected one describes the ``--method full`` run of the same comparison: its ``optimizer`` and
``dense_state_bits`` are not applied (the adapters train with ``--optimizer adamw``, or an ``adamw8bit`` the block
names), and its projection keys go unused.
Under ZeRO-3 (rows partitioned, no replicas) a non-default ``comm_mode`` / ``strict_replicas`` /
``replica_check_every`` — flag or key — is refused: the row-sharded side-car has no use for them.
How the standard keys map onto the run:

=====================================  ===================================================================
``train_micro_batch_size_per_gpu``     ``--batch-size`` (the ds_config wins; a flag whose value is neither
                                       its default nor the ds_config's is an error)
``gradient_accumulation_steps``        ``--grad-accum`` (same rule)
``train_batch_size``                   must equal micro × accumulation × world size (DeepSpeed's rule)
``gradient_clipping``                  ``--grad-clip`` (same rule): ONE global norm over the dense and projected
                                       gradients; DeepSpeed's own clipping is switched off (it would clip the
                                       dense side alone)
``bf16.enabled``                       ``--dtype bfloat16`` (compute and dense storage)
``fp16.enabled``                       refused: DeepSpeed's CPU accelerator has no fp16, and on GPU its loss
                                       scaler does not cover the side-car's projected gradients
``zero_optimization.stage``            1/2: replicated INT8 side-car; 3: row-partitioned INT8 side-car; 0
                                       refused (its client optimizer sees the full averaged dense gradients
                                       on every rank: the shared clipping norm would count them N times)
``optimizer`` / ``scheduler``          refused: the dense optimizer is qgalore_dist's
                                       (:class:`~qgalore_dist.parallel.deepspeed_sidecar.FlatDenseAdamW`, passed
                                       to ``deepspeed.initialize`` as a client optimizer — nothing is
                                       JIT-compiled) and the learning-rate schedule is the command line's,
                                       shared by both sides
``"auto"`` values                      refused (a Hugging Face Trainer feature; raw ``deepspeed.initialize``
                                       needs numbers)
=====================================  ===================================================================

**Gradient accumulation.** The loop calls ``backward`` once per micro-batch and ``step`` once per optimizer step;
the engine tells DeepSpeed which micro-batch ends the window (``set_gradient_accumulation_boundary``) and runs the
side-car exactly once, at the boundary — never per micro-batch (DeepSpeed's own Muon does that under ZeRO-3:
https://github.com/deepspeedai/DeepSpeed/issues/8443). The loop already divides each loss by the accumulation
count, so DeepSpeed's own division is turned off (``scale_wrt_gas=False``).

**DeepSpeed's traffic, measured.** Every metrics line carries ``dense_comm_bytes_est``: DeepSpeed's dense bytes per
optimizer step through this rank's link from a formula (:func:`dense_comm_bytes`). A ds_config that enables
DeepSpeed's own comms logger (``"comms_logger": {"enabled": true}``, ``prof_all`` left at its default ``true``)
adds ``dense_comm_bytes`` / ``dense_comm_calls``: DeepSpeed's collectives as ``deepspeed.comm`` logged them, from
this step's first training forward to the end of its optimizer step (start-up broadcasts, evaluation's ZeRO-3
gathers and checkpoint traffic are left out), converted to link bytes on the convention of our ``Collectives``
counters (:func:`logged_link_bytes`). The side-car's own traffic (``comm_bytes``) runs on a private torch group,
never through ``deepspeed.comm``: the two never count the same bytes. The logger times and synchronises every
DeepSpeed collective (its own cost, and it keeps the data it logs), so it stays off unless the ds_config asks;
``prof_all: false`` (only some ``prof_ops`` logged) reports no measured figure, it would be partial.

**Checkpoints** go to ``<save-dir>/global_step<N>/`` (DeepSpeed's layout): DeepSpeed's model / ZeRO files, one
``qgalore_rank<R>.safetensors`` + ``.json`` per rank (the side-car state — owned matrices' projectors, low-rank
moments, gate state; the INT8 codes + scales this rank is the keeper of — keyed by parameter name, and this rank's
RNG state), the tokenizer, and ``trainer.json`` with a sha256 manifest of every file. All of it is written into
``global_step<N>.tmp`` and renamed into place by rank 0 once complete, so an interrupted save never damages an
existing checkpoint; a damaged one fails with :class:`CheckpointError` (exit 2) before anything is built.
``--export`` writes a plain transformers model; :func:`export_deepspeed_checkpoint` does the same from a ZeRO-1/2
checkpoint directory.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ...checkpoint.save_load import (
    TRAINER_FILE,
    CheckpointError,
    build_manifest,
    capture_rng_state,
    flatten_state,
    list_checkpoints,
    manifest_files,
    publish_checkpoint,
    read_record,
    unflatten_state,
    verify_files,
)
from ...config import QGaLoreConfig
from ...errors import DistributedError, UsageError
from ...nn.int8_linear import QGaLoreLinear
from ...nn.materialize import PendingModel
from ...optim.norms import StepResult, closure_loss
from ...optim.optimizer import QGaLoreBase
from ..args import FINETUNE_DEFAULTS, INT8_OPTIMIZERS, TrainArgs
from .base import ResumePoint
from .distributed import DistributedEngine, joining

__all__ = ["DENSE_OPTIMIZERS", "DeepSpeedCommMeter", "DeepSpeedEngine", "DenseOnlySidecar", "FlatTorchAdamW",
           "QGALORE_KEYS", "dense_comm_bytes", "export_deepspeed_checkpoint", "logged_link_bytes",
           "resolve_ds_config"]

FORMAT = "qgalore_dist.deepspeed_checkpoint"
VERSION = 1
_TAG_RE = re.compile(r"^global_step(\d+)$")

# "qgalore" block key -> (TrainArgs field, type check, transform)
QGALORE_KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "optimizer": ("optimizer", (str,)),
    "rank": ("rank", (int,)),
    "update_proj_gap": ("update_proj_gap", (int,)),
    "scale": ("scale", (int, float)),
    "gate": ("no_gate", (bool,)),  # inverted
    "comm_mode": ("comm_mode", (str,)),
    "granularity": ("granularity", (int, float)),
    "projection": ("projection", (str,)),
    "proj_gap_cap": ("proj_gap_cap", (int,)),
    "replica_check_every": ("replica_check_every", (int,)),
    "strict_replicas": ("strict_replicas", (bool,)),
}
# keys of the block that are the engine's own (not TrainArgs fields)
_ENGINE_KEYS = {"proj_bits": (int,), "dense_state_bits": (int,), "fused": (bool,)}
# optimizers with no projected matrices: ZeRO holds and steps every trainable parameter (--method lora: the adapters)
DENSE_OPTIMIZERS = ("adamw", "adamw8bit")
_FIELDS = {f.name: f for f in dataclasses.fields(TrainArgs)}
_DEFAULTS = {name: f.default for name, f in _FIELDS.items()}


def _flag_text(fname: str, value: Any) -> str:
    """How the command line spelled a (non-default) setting: ``--no-gate``, ``--rank 64``."""
    flag = "--" + fname.replace("_", "-")
    return flag if _FIELDS[fname].metadata.get("flag") else f"{flag} {value}"


def _default(args: TrainArgs, fname: str) -> Any:
    """The command's own default of a setting (qgalore-finetune has defaults of its own: FINETUNE_DEFAULTS)."""
    if getattr(args, "task", "pretrain") == "finetune" and fname in FINETUNE_DEFAULTS:
        return FINETUNE_DEFAULTS[fname]
    return _DEFAULTS[fname]


def _no_conflict(args: TrainArgs, fname: str, value: Any, what: str) -> None:
    """The ds_config's ``value`` for ``fname`` wins over the default; a flag set to anything else is an error
    (defaults cannot be told apart from explicit values, so a flag equal to its default is not refused)."""
    flag = getattr(args, fname)
    if flag != _default(args, fname) and flag != value:
        raise UsageError(f"contradictory settings: {what}, the command line {_flag_text(fname, flag)} (set it in "
                         "one place only)")


@dataclasses.dataclass
class DSSettings:
    """What :func:`resolve_ds_config` decided: the dict handed to ``deepspeed.initialize`` and the engine's own."""

    ds_config: dict
    stage: int
    proj_bits: int
    dense_state_bits: int
    source: str
    fused: bool = True


def _read_json(path: str) -> dict:
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--ds_config {p}: cannot read it ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"--ds_config {p}: malformed JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") \
            from exc
    if not isinstance(data, dict):
        raise UsageError(f"--ds_config {p}: expected a JSON object, got a {type(data).__name__}")
    return data


def _enabled(block: Any) -> bool:
    return isinstance(block, dict) and bool(block.get("enabled", False))


def resolve_ds_config(args: TrainArgs, world_size: int, on_cpu: bool) -> DSSettings:
    """Validate ``args.ds_config`` and fold it into ``args`` (in place); returns what DeepSpeed gets.

    Raises :class:`UsageError` (one line) for: no usable ``"qgalore"`` block, unknown or mistyped keys in it,
    a flag contradicting the ds_config (batch sizes, clipping, a ``"qgalore"`` key), ``"auto"`` values, fp16, a
    ds_config ``optimizer`` / ``scheduler``, a stage other than 1-3, replicated-side-car settings under ZeRO-3.
    Pure apart from reading the file: nothing is written.
    """
    src = str(args.ds_config)
    cfg = _read_json(src)
    where = f"--ds_config {src}"
    autos = sorted(k for k, v in cfg.items() if v == "auto")
    if autos:
        raise UsageError(f"{where}: {', '.join(autos)} = \"auto\" is a Hugging Face Trainer placeholder; "
                         "give numbers (raw deepspeed.initialize cannot resolve it)")
    q = cfg.get("qgalore")
    if not isinstance(q, dict):
        raise UsageError(f"{where} has no usable \"qgalore\" block (a JSON object with the optimizer settings, "
                         "e.g. {\"rank\": 128, \"update_proj_gap\": 200}); see ds_configs/qgalore.json")
    unknown = sorted(set(q) - set(QGALORE_KEYS) - set(_ENGINE_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown \"qgalore\" key(s) {', '.join(unknown)} (allowed: "
                         f"{', '.join(sorted([*QGALORE_KEYS, *_ENGINE_KEYS]))})")
    for key, value in q.items():
        types = QGALORE_KEYS[key][1] if key in QGALORE_KEYS else _ENGINE_KEYS[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise UsageError(f"{where}: \"qgalore\".{key} = {value!r} has the wrong type (expected "
                             f"{' or '.join(t.__name__ for t in types)})")
    # --method lora trains its adapters with AdamW: a block written for --method full (a projected "optimizer")
    # serves LoRA too — its optimizer and dense-moment keys are the full run's, the projection keys go unused
    full_block = args.method == "lora" and q.get("optimizer", "adamw") not in DENSE_OPTIMIZERS
    for key, (fname, _) in QGALORE_KEYS.items():
        if key not in q:
            continue
        value = q[key]
        if key == "gate":
            value = not value
        elif fname in ("scale", "granularity"):
            value = float(value)
        choices = _FIELDS[fname].metadata["choices"]
        if choices and value not in choices:
            raise UsageError(f"{where}: \"qgalore\".{key} = {value!r} is invalid: allowed: {', '.join(choices)}")
        if key == "optimizer" and args.method == "lora":
            if full_block:
                continue
            if args.optimizer == "adamw":  # LoRA's default optimizer: the block's adamw8bit wins over it
                args.optimizer = value
                continue
        _no_conflict(args, fname, value, f"{where} sets \"qgalore\".{key} = {json.dumps(q[key])}")
        setattr(args, fname, value)
    if args.optimizer not in (*INT8_OPTIMIZERS, "galore", *DENSE_OPTIMIZERS):
        raise UsageError(f"the deepspeed engine trains {' / '.join(INT8_OPTIMIZERS)} (INT8 projected matrices "
                         f"beside ZeRO), galore (float projected matrices, ZeRO-1/2) and "
                         f"{' / '.join(DENSE_OPTIMIZERS)} (every trainable parameter in ZeRO), not --optimizer "
                         f"{args.optimizer}")
    proj_bits = q.get("proj_bits", 4)
    if proj_bits not in (4, 8):
        raise UsageError(f"{where}: \"qgalore\".proj_bits must be 4 or 8, got {proj_bits}")
    given_bits = q.get("dense_state_bits")
    if given_bits is not None and given_bits not in (8, 32):
        raise UsageError(f"{where}: \"qgalore\".dense_state_bits must be 8 or 32, got {given_bits}")
    if args.optimizer in DENSE_OPTIMIZERS:
        # the moments are what the optimizer's name says: adamw fp32 (the reference rule), adamw8bit 8-bit blocks
        dense_bits = 32 if args.optimizer == "adamw" else 8
        if given_bits not in (None, dense_bits) and not full_block:
            raise UsageError(f"contradictory settings: {where} sets \"qgalore\".dense_state_bits = {given_bits}, "
                             f"--optimizer {args.optimizer} keeps {dense_bits}-bit moments (use "
                             f"{'adamw8bit' if given_bits == 8 else 'adamw'} for {given_bits}-bit ones)")
    else:
        dense_bits = 8 if given_bits is None else given_bits

    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise UsageError(f"{where}: remove the \"{key}\" block — the dense parameters' optimizer is "
                             "qgalore_dist's (client optimizer, nothing compiled) and the learning-rate schedule is "
                             "the command line's, shared with the projected matrices")
    if _enabled(cfg.get("fp16")):
        if on_cpu:
            raise UsageError(f"{where}: fp16 is not supported by DeepSpeed on CPU (its CPU accelerator refuses "
                             "it); use \"bf16\": {\"enabled\": true} or fp32")
        raise UsageError(f"{where}: fp16 is refused: DeepSpeed's loss scaler does not cover the projected INT8 "
                         "matrices' gradients; use \"bf16\": {\"enabled\": true}")
    if _enabled(cfg.get("bf16")):
        if args.dtype not in (None, "bfloat16"):
            raise UsageError(f"{where} enables bf16 but --dtype is {args.dtype}")
        args.dtype = "bfloat16"

    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UsageError(f"{where}: \"zero_optimization\" must be an object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (1, 2, 3):
        # stage 0 hands the client optimizer the full, already averaged dense gradients on every rank: the shared
        # clipping norm (a sum of each rank's dense norm² over ranks) would count them N times
        raise UsageError(f"{where}: zero_optimization.stage must be 1, 2 or 3, got {stage!r} (stage 0, DeepSpeed "
                         "without ZeRO, is not supported: use --engine ddp for plain data parallelism)")
    if stage == 3 and args.optimizer == "galore":
        # ZeRO-3 partitions every module parameter into flat slices before any client code sees it, and the float
        # projected weights are parameters (qgalore's INT8 codes are buffers, which the row-sharded side-car
        # partitions by rows itself); the row-sharded side-car has no float row source yet
        raise UsageError(f"{where}: --optimizer galore (float projected matrices) runs under ZeRO-1/2 (replicated "
                         "float weights, owner-only SVD); under ZeRO-3 DeepSpeed would partition those weights "
                         "into flat slices, where no projection can run, and the row-sharded side-car shards INT8 "
                         "rows only: use zero_optimization.stage 1 or 2, --optimizer qgalore, or --engine fsdp")
    if stage == 3:
        # ZeRO-3's side-car partitions the INT8 rows: no replicas to check, one traffic pattern of its own
        # (RowShardedQGaLoreOptimizer); a setting for the replicated side-car would silently do nothing
        unused = [(args.comm_mode != "lowrank", f"--comm-mode {args.comm_mode}", "comm_mode"),
                  (args.strict_replicas, "--strict-replicas", "strict_replicas"),
                  (args.replica_check_every != _default(args, "replica_check_every"),
                   f"--replica-check-every {args.replica_check_every}", "replica_check_every")]
        for bad, text, key in unused:
            if bad:
                raise UsageError(f"{where}: {text} (flag or \"qgalore\".{key}) does not apply to ZeRO-3: its "
                                 "side-car partitions the INT8 rows across ranks (no replicas, the row-sharded "
                                 "traffic pattern); drop it or use ZeRO-1/2")

    def take(key: str, field: str) -> int:
        raw = cfg.get(key)
        if raw is None:
            return getattr(args, field)
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            raise UsageError(f"{where}: {key} must be a positive integer, got {raw!r}")
        flag = getattr(args, field)
        if flag != _default(args, field) and flag != raw:
            raise UsageError(f"contradictory batch sizes: {where} sets {key} = {raw}, the command line "
                             f"--{field.replace('_', '-')} {flag}")
        setattr(args, field, raw)
        return raw

    micro = take("train_micro_batch_size_per_gpu", "batch_size")
    gas = take("gradient_accumulation_steps", "grad_accum")
    total = cfg.get("train_batch_size")
    if total is not None and total != micro * gas * world_size:
        raise UsageError(f"contradictory batch sizes: {where} sets train_batch_size = {total}, but "
                         f"train_micro_batch_size_per_gpu {micro} × gradient_accumulation_steps {gas} × "
                         f"{world_size} ranks = {micro * gas * world_size}")
    clip = cfg.get("gradient_clipping")
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
            raise UsageError(f"{where}: gradient_clipping must be a number >= 0, got {clip!r}")
        _no_conflict(args, "grad_clip", float(clip), f"{where} sets gradient_clipping = {clip}")
        args.grad_clip = float(clip)

    ds = {k: copy.deepcopy(v) for k, v in cfg.items() if k != "qgalore"}
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas,
              train_batch_size=micro * gas * world_size,
              gradient_clipping=0.0,  # the shared norm clips both sides (FlatDenseAdamW + side-car)
              zero_allow_untested_optimizer=True)  # FlatDenseAdamW maps flat slices back to parameter rows
    ds.setdefault("steps_per_print", 1 << 30)
    if stage == 3:
        zo = ds.setdefault("zero_optimization", {})
        # one sub-group: ZeRO-3 calls the client optimizer once per sub-group, and the shared clipping norm
        # needs all of this rank's dense gradients in one call
        zo["sub_group_size"] = max(int(zo.get("sub_group_size", 10**9)), 10**12)
    return DSSettings(ds, stage, proj_bits, dense_bits, src, fused=q.get("fused", True))


def dense_comm_bytes(numel: int, elem_bytes: int, world_size: int, stage: int, grad_accum: int = 1,
                     bucket_allreduce: bool = True) -> int:
    """Ring-model bytes (sent + received, one rank) DeepSpeed moves for ``numel`` dense elements per optimizer step.

    One reduce-scatter or all-gather moves ``one = 2·(N−1)/N·numel·b``, an all-reduce two of them.

    * ZeRO-1/2: the gradients are reduced — ZeRO-1 once per optimizer step, ZeRO-2 after every micro-batch's
      backward (A times) — and the updated partitions all-gathered once. DeepSpeed 0.19 reduces them as all-reduces
      of whole buckets, every rank keeping its partition's slices (``zero_optimization.
      use_multi_rank_bucket_allreduce``, true by default; as its comms logger measures): ZeRO-1 ``3·one``, ZeRO-2
      ``(2A + 1)·one``; with that key false each bucket's slices are reduced to their owner instead, ``numel·b``
      per reduction (``one`` at N = 2, the reduce-scatter lower bound; this variant is not measured here).
    * ZeRO-3: per micro-batch, the parameters all-gathered for forward and again for backward and the gradients
      reduce-scattered: ``3·one·A``. (Parameters under ``stage3_param_persistence_threshold`` — norms — stay
      gathered and are all-gathered once per step instead: the measurement is a few KiB lower.)
    """
    if world_size == 1:
        return 0
    one = 2 * (world_size - 1) * numel * elem_bytes // world_size
    if stage == 3:
        return 3 * one * grad_accum
    reductions = grad_accum if stage == 2 else 1
    per_reduction = 2 * one if bucket_allreduce else numel * elem_bytes
    return reductions * per_reduction + one


# deepspeed.comm's logged op (the wrapped function's name) -> how its "msg size" becomes link bytes
_ALL_REDUCE_OPS = ("all_reduce", "all_reduce_coalesced", "inference_all_reduce")
_GATHER_OPS = ("all_gather", "all_gather_into_tensor")  # msg: this rank's input chunk
_SCATTER_OPS = ("reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single")  # msg: the whole input
_ONE_WAY_OPS = ("broadcast", "reduce", "send", "recv", "isend", "irecv", "batch_isend_irecv", "gather", "scatter")


def logged_link_bytes(op: str, msg_size: int, world_size: int) -> int | None:
    """Bytes through one rank's link (sent + received) of one collective that DeepSpeed's comms logger recorded as
    ``op`` with ``msg_size`` — on the convention of :class:`~qgalore_dist.parallel.collectives.Collectives`' counters.

    The logger's ``msg size`` is ``element_size · nelement`` of the op's *input* tensor (a list: their sum)
    (``deepspeed.comm.utils.get_msg_size_from_args``), so, N ranks:

    =====================================  =================  ====================================================
    op                                     msg size           link bytes (sent + received)
    =====================================  =================  ====================================================
    all_reduce (and _coalesced,            the payload P      ``2·⌊2(N−1)·P/N⌋`` (ring: reduce-scatter + gather)
    inference_all_reduce)
    all_gather, all_gather_into_tensor     this rank's        ``2·(N−1)·P`` (forward every other chunk once)
                                           chunk P
    reduce_scatter(_tensor), all_to_all    the whole input S  ``2·⌊(N−1)·S/N⌋`` (send every chunk but one's own)
    broadcast, reduce, send/recv, gather,  P                  ``P`` (sent by the source / non-root, received by
    scatter                                                   the others / the root; gather's and scatter's root
                                                              moves (N−1)·P: exact at N = 2, unused by ZeRO)
    barrier, ``*_object`` ops              0                  0 (pickled objects are not measured; ZeRO's steps
                                                              use none)
    =====================================  =================  ====================================================

    Returns ``None`` for an op this table does not know (counted as a call, not as bytes).
    """
    n = int(world_size)
    if n <= 1:
        return 0
    p = int(msg_size)
    if op in _ALL_REDUCE_OPS:
        return 2 * (2 * (n - 1) * p // n)
    if op in _GATHER_OPS:
        return 2 * (n - 1) * p
    if op in _SCATTER_OPS:
        return 2 * ((n - 1) * p // n)
    if op in _ONE_WAY_OPS:
        return p
    if op in ("barrier", "monitored_barrier", "all_gather_object", "broadcast_object_list"):
        return 0
    return None


class DeepSpeedCommMeter:
    """DeepSpeed's own collectives per optimizer step, as ``deepspeed.comm``'s comms logger records them.

    Every ZeRO collective of DeepSpeed 0.19 goes through a ``@timed_op`` wrapper of ``deepspeed.comm`` (ZeRO-1/2's
    bucket all-reduces and partition all-gathers, ZeRO-3's parameter all-gathers, gradient reduce-scatters and norm
    all-reduce — checked against torch.distributed underneath, per process group, on CPU/gloo at N = 2), which hands
    ``(op, log name, latency, msg size)`` to ``comms_logger.append`` when the logger is enabled. This wraps that
    method on the logger instance (DeepSpeed's own record is kept: the user asked for it) and adds up
    :func:`logged_link_bytes` per op until :meth:`take`. ``active`` is false — nothing measured, nothing wrapped —
    unless the logger is enabled with ``prof_all`` (every op logged)."""

    def __init__(self, world_size: int) -> None:
        from deepspeed import comm as ds_comm

        self.world_size = int(world_size)
        self.logger = ds_comm.comms_logger
        self.active = bool(self.logger.enabled and self.logger.prof_all)
        self._reset()
        if self.active:
            original = self.logger.append

            def append(raw_name, record_name, latency, msg_size):
                self.add(raw_name, msg_size)
                return original(raw_name, record_name, latency, msg_size)

            self.logger.append = append  # an instance attribute: shadows CommsLogger.append for this logger only
            self._wrapper = append

    def _reset(self) -> None:
        self.bytes, self.calls, self.by_op = 0, 0, {}

    def add(self, op: str, msg_size: int) -> None:
        b = logged_link_bytes(op, msg_size, self.world_size)
        d = self.by_op.setdefault(op, {"bytes": 0, "calls": 0, "unconverted_calls": 0})
        d["calls"] += 1
        self.calls += 1
        if b is None:
            d["unconverted_calls"] += 1
        else:
            d["bytes"] += b
            self.bytes += b

    def restart(self) -> None:
        """Forget what was counted (the start of a step's window)."""
        self._reset()

    def take(self) -> dict[str, Any]:
        """What was counted since the last restart / take, then restart."""
        out = {"bytes": self.bytes, "calls": self.calls, "by_op": {k: dict(v) for k, v in sorted(self.by_op.items())}}
        self._reset()
        return out

    def close(self) -> None:
        if self.active and vars(self.logger).get("append") is self._wrapper:
            del self.logger.append
        self.active = False


class DeepSpeedEngine(DistributedEngine):
    """ZeRO 1/2/3 for the dense parameters, the qgalore side-car for the projected ones (module docstring)."""

    name = "deepspeed"
    _sidecar_params: frozenset | set = frozenset()  # ids of parameters the side-car steps (galore's float weights)
    # DeepSpeed owns the dense gradients' buffers and its micro-step counters: a step abandoned half-way (a
    # non-finite loss before some micro-batches' backward) would leave them out of step; the loop stops instead
    can_skip_steps = True

    def __init__(self, args: TrainArgs, settings: DSSettings, denv, owns_group: bool) -> None:
        self.args = args
        self.settings = settings
        self.stage = settings.stage
        self.denv = denv
        self.rank, self.world_size = denv.rank, denv.world_size
        self.device = denv.device
        self._owns_group = owns_group
        self.ds = None
        self.module: nn.Module | None = None
        self.sidecar = None
        self.client = None
        self.collectives = None
        self._micro = 0
        self._coef = 1.0
        self._closed = False
        self.ds_comm: DeepSpeedCommMeter | None = None  # DeepSpeed's logged traffic (ds_config "comms_logger")
        self.last_ds_comm: dict[str, Any] | None = None

    @classmethod
    def from_args(cls, args: TrainArgs) -> "DeepSpeedEngine":
        from ...parallel.launch_env import discover_launch, init_distributed

        if args.ds_config is None:
            raise UsageError("--engine deepspeed needs --ds_config FILE (a DeepSpeed JSON with a \"qgalore\" block; "
                             "see ds_configs/qgalore.json) or the name of a shipped one (--ds_config qgalore, "
                             "qgalore_zero1, qgalore_zero3)")
        try:
            info = discover_launch()
        except ValueError as exc:
            raise UsageError(f"launcher environment: {exc}") from exc
        on_cpu = not torch.cuda.is_available() or (args.device is not None and args.device.startswith("cpu"))
        settings = resolve_ds_config(args, info.world_size, on_cpu)  # every user error before any group starts
        owns = not (dist.is_available() and dist.is_initialized())
        timeout = datetime.timedelta(seconds=args.dist_timeout)
        with joining(args):
            denv = init_distributed("gloo" if on_cpu else None, timeout=timeout)
            import deepspeed  # deferred: importing it takes seconds

            # DeepSpeed adopts the default group started above (no MPI discovery, no second rendezvous)
            deepspeed.init_distributed(dist_backend=denv.backend if denv.backend != "none" else "gloo",
                                       auto_mpi_discovery=False, timeout=timeout)
        if denv.backend == "none":  # one process without a launcher: DeepSpeed started a world of one
            from ...parallel.launch_env import DistEnv

            denv = DistEnv("single", 0, 1, 0, 1, "gloo", denv.device, None, None)
        return cls(args, settings, denv, owns)._started()

    # --- model and step --------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, make_opt: Callable[[nn.Module], torch.optim.Optimizer]
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
        import deepspeed

        from ...parallel.collectives import Collectives
        from ...parallel.deepspeed_sidecar import FlatDenseAdamW
        from ..optimizers import ADAM_EPS, qgalore_config

        args = self.args
        if isinstance(model, PendingModel):  # ZeRO-3's sharded start: this rank's INT8 rows only
            model = self._materialize_rows(model)
        model = model.to(self.device)
        self.collectives = Collectives(timeout=datetime.timedelta(seconds=args.dist_timeout))
        if args.optimizer in DENSE_OPTIMIZERS:
            # adamw / adamw8bit (--method lora: the adapters): nothing projected, ZeRO holds and steps every
            # trainable parameter; the side-car only joins the ranks' partition norms into the clipping norm
            if any(isinstance(m, QGaLoreLinear) for m in model.modules()):
                raise UsageError(f"--optimizer {args.optimizer} trains a float model, but this one holds INT8 "
                                 "weights")
            config = QGaLoreConfig()  # the dense moments' 8-bit block layout only
            with self._guard("start-up (the ranks' setting agreement)"):
                try:
                    self.sidecar = DenseOnlySidecar(model, self.collectives, args.grad_clip, args.optimizer)
                except ValueError as exc:
                    raise UsageError(f"--engine deepspeed: {exc}") from exc
        else:
            config = qgalore_config(args).replace(proj_bits=self.settings.proj_bits, fused=self.settings.fused)
            common = dict(target_modules=tuple(args.target_module_list), stagger_refresh=True)
            try:
                with self._guard("start-up (the side-car's config agreement and replica check)"):
                    self._build_sidecar(model, config, common)
            except ValueError as exc:
                raise UsageError(f"cannot build the {args.optimizer} side-car: {exc}") from exc
        # galore's float projected weights are parameters: the side-car's, never ZeRO's (it would flatten them)
        projected = {id(pm.tensor()) for pm in getattr(self.sidecar, "matrices", ())}
        self._sidecar_params = projected  # counted by the side-car, moved by it: not ZeRO's (memory, bytes)
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in projected]
        if args.optimizer == "adamw":  # torch's rule, as --optimizer adamw (and LoRA's adapters) on every engine
            self.client = FlatTorchAdamW(dense, lr=args.lr, betas=(args.beta1, args.beta2), eps=ADAM_EPS,
                                         weight_decay=args.weight_decay, norm_fn=self._shared_norm)
        else:
            self.client = FlatDenseAdamW(dense, lr=args.lr, betas=(args.beta1, args.beta2), eps=ADAM_EPS,
                                         weight_decay=args.weight_decay, state_bits=self.settings.dense_state_bits,
                                         block=config.state_block_size, min_numel=config.state_min_numel,
                                         norm_fn=self._shared_norm)
        from deepspeed import comm as ds_comm

        logger = ds_comm.comms_logger
        # DeepSpeed's logger is process-wide and initialize only ever switches it on: put it back as found on close
        self._logger_state = (logger.enabled, logger.prof_all)
        with self._guard("deepspeed.initialize"):
            self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=self.client,
                                                    config=copy.deepcopy(self.settings.ds_config))
        if _enabled(self.settings.ds_config.get("comms_logger")):
            self.ds_comm = DeepSpeedCommMeter(self.world_size)
            if not self.ds_comm.active:
                self.ds_comm = None
        self.module = self.ds.module
        if isinstance(self.client, FlatDenseAdamW) and self.client.state_bits == 8:
            self._bind_dense_fragments()
        self.optimizer = _JointOptimizer(self)
        # the loop's forward must go through DeepSpeed's engine, not the bare module: ZeRO-3 counts micro-batches
        # in DeepSpeedEngine.forward (clear_backward_seen_flag), and without it the second micro-batch's dense
        # gradients would overwrite the first's instead of adding to them
        return _ThroughEngine(self.ds, self._guard, self._train_forward), self.optimizer

    def _train_forward(self) -> None:
        """A training forward: the first of an optimizer step opens the window of DeepSpeed's measured traffic
        (what came before — start-up, evaluation, checkpoints — is not this step's)."""
        if self.ds_comm is not None and self._micro == 0:
            self.ds_comm.restart()

    def _bind_dense_fragments(self) -> None:
        """8-bit dense moments on parameter rows, as on one device: map ZeRO's flat partitions back to parameter
        elements and agree, once, on the blocks a partition boundary cuts (every rank's fragments gathered)."""
        from ...parallel.deepspeed_sidecar import cut_groups, zero_fragments

        index = {id(p): i for i, p in enumerate(p for p in self.module.parameters() if p.requires_grad)}
        with self._guard("mapping ZeRO's partitions to parameter rows"):
            mine = zero_fragments(self.ds.optimizer, self.stage, self.collectives.rank, index)
            everyone: list = [None] * self.world_size
            if self.world_size > 1:
                dist.all_gather_object(everyone, [f for fs in mine.values() for f in fs], group=self.collectives.group)
            else:
                everyone = [[f for fs in mine.values() for f in fs]]
        c = self.client
        cuts = cut_groups(everyone, c.block, c.is_8bit)
        c.bind_fragments(mine, cuts, lambda t: self.collectives.all_reduce([t], op="max"))

    @property
    def sharded_start(self) -> bool:  # type: ignore[override]
        return self.stage == 3

    def _materialize_rows(self, pending: PendingModel) -> nn.Module:
        """ZeRO-3: every INT8 matrix allocated and filled only in this rank's ``torch.chunk`` rows (what the
        side-car's row shard keeps), so no rank ever holds the whole INT8 model. The dense parameters are
        materialised whole and partitioned by ``deepspeed.initialize`` right after (DeepSpeed partitions a built
        module; ``zero.Init`` would need the model constructed inside it): a transient of the dense part."""
        from ...parallel.row_sharded import chunk_rows

        for mod in pending.model.modules():
            if isinstance(mod, QGaLoreLinear):
                rows = chunk_rows(mod.out_features, self.world_size)
                r0 = sum(rows[:self.rank])
                mod.weight_codes = mod.weight_codes[r0:r0 + rows[self.rank]]
                mod.weight_scales = mod.weight_scales[r0:r0 + rows[self.rank]]
                mod.row_offset = r0
        model = pending.materialize(self.device)
        model.train()
        return model

    def _build_sidecar(self, model: nn.Module, config, common: dict) -> None:
        from ...parallel.deepspeed_sidecar import SidecarQGaLoreOptimizer

        args = self.args
        if self.stage == 3:
            from ...parallel.deepspeed_zero3 import Zero3Sidecar

            self.sidecar = Zero3Sidecar(model, config, self.collectives, grad_clip=args.grad_clip, **common)
        else:
            self.sidecar = SidecarQGaLoreOptimizer(
                model, config, self.collectives, comm_mode=args.comm_mode, grad_clip=args.grad_clip,
                replica_check_every=args.replica_check_every, strict_replicas=args.strict_replicas, **common)

    def _shared_norm(self, dense_local_sq: float) -> tuple[float, float]:
        """Called by FlatDenseAdamW inside DeepSpeed's step: the side-car folds this rank's dense norm² into the
        clipping norm (one all-reduce); the factor is kept for finish_step, which steps the projected matrices
        after DeepSpeed's step returns."""
        norm, self._coef = self.sidecar.shared_norm(dense_local_sq)
        return norm, self._coef

    def backward(self, loss: torch.Tensor) -> None:
        self._micro += 1
        # DeepSpeed reduces (ZeRO-2) / accumulates at the boundary it is told about; the side-car waits for step()
        self.ds.set_gradient_accumulation_boundary(self._micro >= self.args.grad_accum)
        with self._guard("backward"):  # ZeRO-2/3 reduce dense gradients, ZeRO-3 gathers INT8 rows, in backward
            self.ds.backward(loss, scale_wrt_gas=False)  # the loop already divided by grad_accum

    def step(self) -> float | None:
        self.optimizer.step()
        return self.optimizer.last_step.grad_norm

    def _step(self, skipping: bool = False) -> float | None:
        if self._micro != self.args.grad_accum:
            raise RuntimeError(f"step() after {self._micro} micro-batches; gradient_accumulation_steps is "
                               f"{self.args.grad_accum}")
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed is not at a gradient accumulation boundary at step()")
        calls = self.client.calls
        with self._guard("optimizer step"):
            self.sidecar.begin_step()
            self.ds.step()
            if self.client.calls == calls and (skipping or getattr(self.ds.optimizer, "overflow", False)):
                # ZeRO-1/2 saw non-finite gradients itself (its overflow check — DeepSpeed 0.19 runs it for every
                # dtype but bf16 — agreed over ranks) and skipped the client optimizer: the side-car's norm is
                # non-finite all the same, on every rank
                _, self._coef = self.sidecar.shared_norm(float("nan"))
                self.client.last_step = StepResult(float("nan"), 1.0, skipped=True)
            elif self.client.calls != calls + 1:
                raise RuntimeError(f"DeepSpeed called the dense optimizer {self.client.calls - calls} times in one "
                                   "step (expected once: fp16 overflow skips or ZeRO-3 sub-groups would break the "
                                   "shared clipping norm)")
            self.sidecar.finish_step(self._coef)
        if self.ds_comm is not None:
            self.last_ds_comm = self.ds_comm.take()
        self._micro = 0
        return self.client.last_step.grad_norm

    def skip_step(self, loss: torch.Tensor | None = None) -> None:
        """A non-finite loss at some micro-batch of the window (on some rank): DeepSpeed still steps — its step
        counters and LR scheduler advance and its window closes, as a DeepSpeed user expects — but nothing is
        applied. That micro-batch's backward (of ``loss × NaN``, on every rank) closes the window early, so every
        gradient is non-finite; the agreed norm is then non-finite and both the dense client optimizer and the
        side-car skip (no update, no moment change; a refresh due on the step leaves basis and gate as they are)."""
        if loss is None:
            raise RuntimeError("DeepSpeed's skip_step needs the micro-batch's loss (its backward closes the window)")
        self._micro = self.args.grad_accum
        self.ds.set_gradient_accumulation_boundary(True)
        with self._guard("backward of a skipped step"):
            self.ds.backward(loss * float("nan"), scale_wrt_gas=False)
        norm = self._step(skipping=True)
        side = getattr(self.sidecar, "opt", self.sidecar)  # ZeRO-3's side-car steps its row-sharded optimizer
        if not self.client.last_step.skipped or not side.last_step.skipped:
            raise RuntimeError(f"a step with a non-finite loss was not skipped (norm {norm})")

    def zero_grad(self) -> None:
        # DeepSpeed zeroes its gradients at the end of its own step
        self.sidecar.zero_grad()
        self._micro = 0

    def _metric_device(self) -> torch.device:
        return self.collectives.device

    def _metric_all_reduce(self, t: torch.Tensor) -> None:
        # on the side-car's group but past its counters: not optimizer traffic. (It used to go through Collectives
        # and reset the step's counters after it; the loop's non-finite-loss check between each micro-batch's
        # forward and backward then wiped the forward's ZeRO-3 INT8 gathers from comm_bytes.)
        dist.all_reduce(t, group=self.collectives.group)

    def step_metrics(self) -> dict[str, Any]:
        c = self.sidecar.last_comm
        out = {"comm_bytes": int(c["comm_bytes"]), "comm_calls": int(c["comm_calls"]),
               "dense_comm_bytes_est": self.dense_comm_bytes(), "zero_stage": self.stage,
               "rank_svd_count": int(self.sidecar.svd_count)}
        if self.last_ds_comm is not None:  # the ds_config enabled DeepSpeed's comms logger: measured
            out["dense_comm_bytes"] = int(self.last_ds_comm["bytes"])
            out["dense_comm_calls"] = int(self.last_ds_comm["calls"])
        return out

    def dense_comm_bytes(self) -> int:
        """DeepSpeed's dense traffic per optimizer step through this rank's link (sent + received), from the ring
        formulas of :func:`dense_comm_bytes` (``dense_comm_bytes_est``; the measured figure, when the ds_config
        enables DeepSpeed's comms logger, is ``dense_comm_bytes`` in the step metrics). ``D`` dense elements of
        ``b`` bytes, N ranks, A micro-batches."""
        n = self.world_size
        if n == 1:
            return 0
        dense = [p for p in self.module.parameters() if p.requires_grad and id(p) not in self._sidecar_params]
        numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in dense)
        b = dense[0].element_size() if dense else 4
        zero = self.settings.ds_config.get("zero_optimization") or {}
        return dense_comm_bytes(numel, b, n, self.stage, self.args.grad_accum,
                                bucket_allreduce=bool(zero.get("use_multi_rank_bucket_allreduce", True)))

    def close(self) -> None:
        if self.ds_comm is not None:
            self.ds_comm.close()
            self.ds_comm = None
        state = getattr(self, "_logger_state", None)
        if state is not None:
            from deepspeed import comm as ds_comm

            ds_comm.comms_logger.enabled, ds_comm.comms_logger.prof_all = state
            self._logger_state = None
        super().close()

    def memory_bytes(self) -> dict[str, int] | None:
        """This rank's resident weights + optimizer state, exact tensor accounting (gradients not included)."""
        out = {k: v for k, v in self.sidecar.memory_bytes().items() if k != "total"}
        dense_w = 0
        for p in self.module.parameters():
            if id(p) in self._sidecar_params:  # galore's float projected weights: the side-car's projected_weights
                continue
            t = getattr(p, "ds_tensor", None)
            dense_w += (t.numel() * t.element_size()) if t is not None else p.numel() * p.element_size()
        out["dense_weights"] = dense_w
        opt = self.ds.optimizer
        masters = getattr(opt, "single_partition_of_fp32_groups", None) or \
            getattr(opt, "fp32_partitioned_groups_flat", None) or []
        out["dense_master"] = sum(t.numel() * t.element_size() for t in masters)
        out["dense_moments"] = self.client.state_nbytes()
        out["total"] = sum(out.values())
        return out

    # --- checkpoints -----------------------------------------------------------------------------------------
    def list_checkpoints(self, save_dir: str | Path) -> list[tuple[int, Path]]:
        return list_checkpoints(save_dir, _TAG_RE)

    def verify_checkpoint(self, path: Path) -> dict[str, Any]:
        root = Path(path)
        record = read_record(root, "deepspeed checkpoint of this engine")
        if record.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {root}: {TRAINER_FILE} is not a {FORMAT} record")
        if record.get("version") != VERSION:
            raise CheckpointError(f"checkpoint {root}: format version {record.get('version')!r} is not supported")
        if record.get("world_size") != self.world_size:
            raise CheckpointError(f"checkpoint {root} was saved by {record.get('world_size')} ranks, this run has "
                                  f"{self.world_size} (DeepSpeed's ZeRO files are per rank)")
        if record.get("zero_stage") != self.stage:
            raise CheckpointError(f"checkpoint {root} was saved under ZeRO stage {record.get('zero_stage')}, this "
                                  f"run uses stage {self.stage}")
        verify_files(root, manifest_files(root, record,
                                          lambda files: f"qgalore_rank{self.rank}.safetensors" in files))
        return record

    def _rank_state(self) -> dict[str, Any]:
        return {"optimizer": self.sidecar.state_dict(), "weights": self.sidecar.weight_state(),
                "rng": capture_rng_state(), "micro": 0}

    def save_checkpoint(self, save_dir: str | Path, step: int, trainer_state: dict[str, Any],
                        tokenizer: Any) -> Path:
        from safetensors.torch import save_file

        root = Path(save_dir)
        tag = f"global_step{step}"
        path = root / tag
        # everything goes into <tag>.tmp first (DeepSpeed's files included) and is renamed into place only when
        # complete, so an interrupted save never damages an existing checkpoint of the same step
        work = root / f"{tag}.tmp"
        what = f"saving checkpoint {path}"
        # a rank that cannot write (disk full, permissions) makes every rank raise CheckpointError at the next
        # agreement point instead of leaving the others in a barrier; the existing checkpoints stay untouched
        error = None
        if self.is_main:
            try:
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(work, ignore_errors=True)
            except OSError as exc:
                error = f"{what}: cannot create {root} ({exc.strerror or exc})"
        self._agree(error, CheckpointError, what)
        error = None
        try:
            with self._guard(what):  # ZeRO-3 gathers inside DeepSpeed's save
                self.ds.save_checkpoint(str(root), tag=work.name, save_latest=False)
            work.mkdir(parents=True, exist_ok=True)
            tree, tensors = flatten_state(self._rank_state())
            save_file(tensors, str(work / f"qgalore_rank{self.rank}.safetensors"), metadata={"format": FORMAT})
            (work / f"qgalore_rank{self.rank}.json").write_text(json.dumps(tree), encoding="utf-8")
        except OSError as exc:
            error = f"{what}: rank {self.rank} cannot write into {work} ({exc.strerror or exc})"
        self._agree(error, CheckpointError, what)
        error = None
        try:
            self._publish(root, tag, path, work, step, trainer_state, tokenizer)
        except OSError as exc:
            error = f"{what}: cannot publish {work} ({exc.strerror or exc}); existing checkpoints are untouched"
        self._agree(error, CheckpointError, what)
        self.collectives.reset_step()
        return path

    def _publish(self, root: Path, tag: str, path: Path, work: Path, step: int, trainer_state: dict[str, Any],
                 tokenizer: Any) -> None:
        """Rank 0: tokenizer, manifest, then the rename of ``work`` into ``path``."""
        if self.is_main:
            from ...checkpoint.export import quantized_modules

            if tokenizer is not None:
                tokenizer.save_pretrained(str(work / "tokenizer"))
            record = {"format": FORMAT, "version": VERSION, "step": int(step), "zero_stage": self.stage,
                      **dict(trainer_state), "world_size": self.world_size,
                      # names as in DeepSpeed's module file (the loop saw the engine wrapper: "module." prefixes)
                      "quantized_modules": quantized_modules(self.module), "manifest": build_manifest(work)}
            (work / TRAINER_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
            publish_checkpoint(work, path)  # same step saved again: the old one goes only once the new is in place
            (root / "latest").write_text(tag, encoding="utf-8")  # DeepSpeed's own pointer, for its tools

    def load_checkpoint(self, path: Path) -> ResumePoint:
        from safetensors.torch import load_file

        path = Path(path)
        what = f"loading checkpoint {path}"
        # every rank reads its own files: a failure on one must end all of them (not leave the others waiting in
        # DeepSpeed's load), hence the agreement after each phase
        error, record, state = None, {}, {}
        try:
            record = self.verify_checkpoint(path)
            try:
                tensors = load_file(str(path / f"qgalore_rank{self.rank}.safetensors"))
                tree = json.loads((path / f"qgalore_rank{self.rank}.json").read_text(encoding="utf-8"))
                state = unflatten_state(tree, tensors)
            except (OSError, ValueError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"checkpoint {path}: rank {self.rank}'s side-car state is unreadable "
                                      f"({exc})") from exc
        except CheckpointError as exc:
            error = str(exc)
        self._agree(error, CheckpointError, what)
        error = None
        try:
            with self._guard(what):
                loaded, _ = self.ds.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                                    load_optimizer_states=True, load_lr_scheduler_states=False)
            if loaded is None:
                raise CheckpointError(f"checkpoint {path}: DeepSpeed found no checkpoint files there")
            try:
                self.sidecar.load_weight_state(state["weights"])
                self.sidecar.load_state_dict(state["optimizer"])
            except (KeyError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"checkpoint {path}: side-car state does not fit this run ({exc})") from exc
        except (OSError, RuntimeError, KeyError, ValueError, AssertionError) as exc:
            if isinstance(exc, DistributedError):
                raise
            error = str(exc) if isinstance(exc, CheckpointError) else \
                f"checkpoint {path}: DeepSpeed could not load it ({exc})"
        self._agree(error, CheckpointError, what)
        self.collectives.reset_step()
        trainer = dict(record)
        trainer["rng"] = state["rng"]  # this rank's own random state
        return ResumePoint(int(record["step"]), trainer)

    def export(self, model: nn.Module, out_dir: str | Path, tokenizer: Any, dtype: torch.dtype) -> Path | None:
        """Plain transformers model on rank 0 (ZeRO-3: dense parameters and INT8 rows gathered first)."""
        from ...checkpoint.export import export_model

        if self.stage == 3:
            with self._guard("gathering the ZeRO-3 model for --export"):
                return self.sidecar.export(self.module, out_dir, tokenizer, self.is_main, dtype)
        return export_model(self.module, out_dir, tokenizer, dtype) if self.is_main else None


class FlatTorchAdamW(torch.optim.AdamW):
    """DeepSpeed's client optimizer for ``--optimizer adamw`` (``--method lora``'s adapters included):
    ``torch.optim.AdamW`` — the rule of the adamw baseline on every other engine — on ZeRO's flat fp32 slices
    (element-wise, so any slice is fine), clipped by the global norm that ``norm_fn(Σ‖this rank's slice‖²) ->
    (norm, coef)`` returns (collective). ``last_step`` / ``calls``: as :class:`FlatDenseAdamW`'s."""

    def __init__(self, params, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 norm_fn: Callable[[float], tuple[float, float]]) -> None:
        from ...optim.norms import StepResult

        super().__init__(list(params), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.norm_fn = norm_fn
        self.last_step = StepResult()
        self.calls = 0

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        from ...parallel.deepspeed_sidecar import client_step_result

        loss = closure_loss(closure)
        live = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.last_step = client_step_result(self.norm_fn, live)
        self.calls += 1
        if self.last_step.skipped:  # agreed on every rank: the side-car skips its half too
            return loss
        if self.last_step.clip_coef != 1.0:
            for p in live:
                p.grad.mul_(self.last_step.clip_coef)
        super().step()
        return loss

    def state_nbytes(self) -> int:
        """Exact bytes of the moments held."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                   if torch.is_tensor(t) and t.dim() > 0)


class DenseOnlySidecar(QGaLoreBase):
    """The side-car of ``--optimizer adamw|adamw8bit`` (and ``--method lora``'s adapters): no projected matrices —
    ZeRO partitions, reduces and steps every trainable parameter through :class:`FlatDenseAdamW`, and this only
    turns the ranks' partition norms² into the global clipping norm (ZeRO partitions are disjoint: their sum is the
    whole gradient's norm²), with the interface of the INT8 side-cars."""

    def __init__(self, model: nn.Module, collectives, grad_clip: float, optimizer: str) -> None:
        from ...parallel.collectives import CommCounters
        from ...parallel.replicas import check_same_setup

        self.collectives, self.grad_clip = collectives, float(grad_clip)
        self.param_groups: list[dict] = []
        self.svd_count = 0
        self.phase_times: dict[str, float] = {}
        self.last_comm = CommCounters().as_dict()
        # every rank must agree on what ZeRO will flatten and partition (shapes drive its collectives)
        check_same_setup(collectives, {
            "optimizer": [optimizer, self.grad_clip],
            "trainable": [[n, list(p.shape), str(p.dtype)] for n, p in model.named_parameters() if p.requires_grad],
            "frozen": [[n, list(p.shape), str(p.dtype)] for n, p in model.named_parameters()
                       if not p.requires_grad],
        })
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameter")
        collectives.reset_step()

    # the optimizer's step halves (QGaLoreBase) with nothing projected: the norm share is DeepSpeed's dense one,
    # added by its client optimizer through shared_norm
    def _begin(self) -> tuple[list[float], None]:
        return [0.0], None

    def _apply(self, payload, coef: float) -> None:
        pass

    def _after_step(self) -> None:
        self.last_comm = self.collectives.reset_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._open = self._norm = None  # ZeRO holds the gradients; only an abandoned step is ours to drop

    def memory_bytes(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        if sd:
            raise ValueError("the checkpoint holds projected-matrix optimizer state; this run has none")

    def weight_state(self) -> dict:
        return {}

    def load_weight_state(self, state: dict) -> None:
        if state:
            raise ValueError("the checkpoint holds INT8 matrices; this run trains a float model")

    def export(self, module: nn.Module, out_dir, tokenizer, is_main: bool, dtype: torch.dtype = torch.bfloat16):
        """ZeRO-3: one parameter gathered to the main rank at a time, written shard by shard."""
        from ...checkpoint.export import merge_lora_stream
        from ...parallel.deepspeed_zero3 import export_gathered, gathered_state

        # --method lora: each adapter merged into its gathered base weight as the stream passes (plain names)
        return export_gathered(merge_lora_stream(gathered_state(module, is_main), module), [], module.config,
                               out_dir, tokenizer, is_main, dtype)


class _ThroughEngine(nn.Module):
    """What the loop calls forward on: DeepSpeed's engine, with the model's own ``config`` (DeepSpeed's engine has
    a ``config`` attribute of its own, the ds_config). Holds the engine outside ``_modules`` so module names stay
    those of the model."""

    def __init__(self, ds_engine, guard, on_train_forward: Callable[[], None] | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_ds", ds_engine)
        object.__setattr__(self, "_guard", guard)
        object.__setattr__(self, "_on_train_forward", on_train_forward)

    @property
    def config(self):
        return self._ds.module.config

    def forward(self, *args, **kwargs):
        if self.training and self._on_train_forward is not None:
            self._on_train_forward()
        with self._guard("forward"):  # ZeRO-3 gathers dense partitions and INT8 rows here
            return self._ds(*args, **kwargs)

    def train(self, mode: bool = True):
        self._ds.train(mode)
        return super().train(mode)


class _JointOptimizer(torch.optim.Optimizer):
    """What the loop and its scheduler see: the projected group(s) of the side-car followed by the dense group of
    DeepSpeed's client optimizer — the very same dicts, so one ``LambdaLR`` drives both learning rates. ``step()``
    is the engine's boundary step (side-car halves around ``deepspeed_engine.step()``)."""

    def __init__(self, engine: DeepSpeedEngine) -> None:
        self.engine = engine
        super().__init__([torch.zeros(0)], {})
        self.param_groups = [*engine.sidecar.param_groups, *engine.client.param_groups]

    def step(self, closure=None):  # type: ignore[override]
        loss = closure_loss(closure)
        self.engine._step()
        return loss

    @property
    def last_step(self):
        return self.engine.client.last_step

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()

    @property
    def svd_count(self) -> int:
        return int(self.engine.sidecar.svd_count)

    @property
    def phase_times(self) -> dict[str, float]:
        return self.engine.sidecar.phase_times

    def state_dict(self):  # type: ignore[override]
        raise RuntimeError("the deepspeed engine checkpoints through DeepSpeedEngine.save_checkpoint")


def export_deepspeed_checkpoint(path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantised transformers model from a ZeRO-1/2 checkpoint directory (``global_stepN``), offline.

    DeepSpeed's ``mp_rank_00_model_states.pt`` holds the full module state (ZeRO-1/2 keep full dense weights and the
    INT8 buffers on every rank); the side-car's per-rank files are not needed for the weights.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ...checkpoint.export import export_state

    root = Path(path)
    tfile = root / TRAINER_FILE
    if not tfile.is_file():
        raise CheckpointError(f"checkpoint {root} has no {TRAINER_FILE}")
    record = json.loads(tfile.read_text(encoding="utf-8"))
    if record.get("zero_stage") == 3:
        raise CheckpointError(f"checkpoint {root} is a ZeRO-3 checkpoint: export it from the run (--export)")
    states = root / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise CheckpointError(f"checkpoint {root} is corrupted: {states.name} is missing")
    module = torch.load(str(states), map_location="cpu", weights_only=False)["module"]
    cfg = dict(record["model_config"])
    config = CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
    tokenizer = None
    if (root / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    return export_state(module, config, record["quantized_modules"], out_dir, tokenizer, dtype)
