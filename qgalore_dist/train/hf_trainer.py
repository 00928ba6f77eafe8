"""``transformers.Trainer`` (and TRL's ``SFTTrainer``) with Q-GaLore: one process, or one per device under torchrun.

Trainer drives the optimizer itself — ``optimizer.step()`` once per ``gradient_accumulation_steps`` backward
passes, ``model.zero_grad()`` after it — and clips with ``clip_grad_norm_(model.parameters(), max_grad_norm)``
right before the step. Neither fits a layer-wise optimizer on its own:

* **clipping**: the projected gradients are consumed inside backward (projected into low-rank accumulators and
  freed), so ``model.parameters()`` carries only the dense gradients. Trainer's clip would scale the dense part by
  the dense-only norm and leave the projected part alone; with the optimizer clipping as well, the dense part would
  be clipped twice. The clip therefore belongs to the optimizer (``grad_clip``, by
  ``√(‖dense‖² + Σ‖low-rank‖²)``) and Trainer's ``max_grad_norm`` must be 0.
* **accumulation**: the optimizer must know the number of micro-batches per step. With ``grad_accum=1`` (and no
  clipping) it steps *inside* backward, which would turn Trainer's accumulation into extra steps — the optimizer
  raises on a second backward before ``step()``.

:func:`optimizer_for_trainer` builds the optimizer from the ``TrainingArguments`` and moves the clip into it. Note
that Trainer's logged ``grad_norm`` then is its own measurement over ``model.parameters()`` (dense gradients only);
``optimizer.last_step.grad_norm`` holds the global norm after ``optimizer.step()``.

**Several processes** (``torchrun --nproc_per_node N train.py``, Trainer's ``ParallelMode.DISTRIBUTED``): Trainer
wraps the model in ``DistributedDataParallel``. :func:`optimizer_for_trainer` then builds the ddp engine's
optimizer, :class:`~qgalore_dist.parallel.ShardedQGaLoreOptimizer` (low-rank traffic, one owner per projected
matrix), with ``reduce_dense=False``, and splits the work with DDP:

* the INT8 codes and scales are buffers, not parameters, so DDP buckets no gradient of theirs; they are also put
  in the model's ``_ddp_params_and_buffers_to_ignore``, so DDP neither broadcasts them at start-up nor before each
  forward. Their gradients are projected inside backward and reduced by the optimizer (to each matrix's owner, at
  ``step()``, on a process group of its own); every rank applies the owners' updates, so the replicas stay equal.
* the dense parameters (embeddings, norms, lm_head, biases) are ordinary parameters: DDP averages their gradients
  (on the last micro-batch of each step: Trainer runs the others under ``no_sync``) and the optimizer steps them
  alike on every rank without reducing them again.

The result is the ddp engine's step (``qgalore-pretrain --engine ddp`` / ``qgalore-finetune --engine ddp``) on the
same per-rank batches, bit for bit (tests/e2e/test_trainer.py). Build the optimizer on every rank at the same point,
before ``Trainer(...)`` (its construction is collective). Trainer's own DeepSpeed and FSDP integrations (and
single-process multi-GPU ``nn.DataParallel``) are refused: ``qgalore-finetune --engine deepspeed|fsdp`` runs
Q-GaLore under those. Trainer checkpoints under torchrun hold rank 0's optimizer shard only (Trainer saves
``optimizer.state_dict()`` on rank 0): resuming from one raises on every rank rather than resuming wrongly.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from torch import nn

from ..config import QGaLoreConfig
from ..nn.convert import DEFAULT_TARGET_MODULES
from ..nn.int8_linear import QGaLoreLinear
from ..optim import QGaLoreOptimizer

__all__ = ["check_trainer_args", "int8_tensor_names", "optimizer_for_trainer"]

_USE_QGALORE_FINETUNE = ("Q-GaLore keeps its weights in INT8 buffers and reduces their gradients itself; run it "
                         "under DeepSpeed or FSDP with `qgalore-finetune --engine deepspeed|fsdp` (or "
                         "`qgalore-pretrain`), or launch Trainer with plain torchrun (DDP), which "
                         "optimizer_for_trainer supports")


def _truthy(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


def _refuse_unsupported(training_args: Any) -> None:
    """``ValueError`` for Trainer's DeepSpeed / FSDP integrations and for one process over several GPUs."""
    state = getattr(training_args, "distributed_state", None)
    kind = str(getattr(getattr(state, "distributed_type", None), "value", "") or "").upper()
    if getattr(training_args, "deepspeed", None) or _truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED")) \
            or kind == "DEEPSPEED":
        raise ValueError(f"Trainer's DeepSpeed integration (TrainingArguments.deepspeed) is not supported by "
                         f"optimizer_for_trainer: {_USE_QGALORE_FINETUNE}")
    if getattr(training_args, "fsdp", None) or _truthy(os.environ.get("ACCELERATE_USE_FSDP")) or kind == "FSDP":
        raise ValueError(f"Trainer's FSDP integration (TrainingArguments.fsdp) is not supported by "
                         f"optimizer_for_trainer: {_USE_QGALORE_FINETUNE}")
    if int(getattr(training_args, "n_gpu", 1) or 1) > 1 and kind in ("", "NO"):
        raise ValueError(f"one process over {training_args.n_gpu} GPUs (Trainer's nn.DataParallel) would copy the "
                         "INT8 layers into replicas whose gradients the optimizer never sees: launch one process "
                         "per GPU with torchrun, or make one GPU visible (CUDA_VISIBLE_DEVICES)")


def _world_size(training_args: Any) -> int:
    """Ranks of Trainer's data-parallel world. Reading ``training_args.device`` sets Trainer's distributed state
    up first — under torchrun that joins the process group, as Trainer itself would."""
    _ = training_args.device
    from transformers.training_args import ParallelMode

    if training_args.parallel_mode != ParallelMode.DISTRIBUTED:
        return 1
    return int(training_args.world_size)


def int8_tensor_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_buffers()``) of every INT8 layer's codes and scales."""
    out = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, QGaLoreLinear):
            out.extend(f"{mod_name}.{b}" if mod_name else b for b, _ in mod.named_buffers(recurse=False))
    return out


def _leave_int8_to_the_optimizer(model: nn.Module) -> None:
    """Put the INT8 buffers in ``model._ddp_params_and_buffers_to_ignore`` (DDP's start-up broadcast and its
    per-forward buffer sync skip them), keeping whatever the model listed there already."""
    ignore = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()) or ())
    ignore += [n for n in int8_tensor_names(model) if n not in ignore]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)


def optimizer_for_trainer(model: nn.Module, config: QGaLoreConfig, training_args: Any, *,
                          dense_state_bits: int = 8, target_modules=DEFAULT_TARGET_MODULES,
                          stagger_refresh: bool = True, **sharded_options: Any) -> QGaLoreOptimizer:
    """A Q-GaLore optimizer for ``transformers.Trainer(args=training_args, optimizers=(opt, sched))`` (or TRL's
    ``SFTTrainer``), in one process or under torchrun.

    Takes ``grad_accum`` from ``training_args.gradient_accumulation_steps`` and the clip from
    ``training_args.max_grad_norm``, then sets ``training_args.max_grad_norm = 0`` so Trainer does not clip the
    dense gradients a second time by a partial norm (module docstring). The model is moved to
    ``training_args.device`` first (the optimizer's state is created beside the weights).

    One process: a layer-wise :class:`QGaLoreOptimizer`. Several (Trainer in ``ParallelMode.DISTRIBUTED``): a
    :class:`~qgalore_dist.parallel.ShardedQGaLoreOptimizer` with ``reduce_dense=False`` — Trainer's DDP wrapper
    averages the dense gradients, the optimizer reduces the projected ones — and the INT8 buffers listed in
    ``model._ddp_params_and_buffers_to_ignore``. ``sharded_options`` (``comm_mode``, ``update_dtype``,
    ``replica_check_every``, ...) go to that optimizer. Collective under torchrun: call it on every rank.

    Raises ``ValueError`` for Trainer's DeepSpeed / FSDP integrations (use ``qgalore-finetune``) and for one
    process over several GPUs.
    """
    _refuse_unsupported(training_args)
    clip = float(getattr(training_args, "max_grad_norm", 0.0) or 0.0)
    world = _world_size(training_args)
    _refuse_unsupported(training_args)  # the distributed state is known now (accelerate launch configs)
    device = training_args.device
    if device.type != "cpu":
        model.to(device)
    if world > 1:
        from ..parallel import Collectives, ShardedQGaLoreOptimizer

        timeout = datetime.timedelta(seconds=int(getattr(training_args, "ddp_timeout", 1800) or 1800))
        _leave_int8_to_the_optimizer(model)
        opt = ShardedQGaLoreOptimizer(model, config, Collectives(timeout=timeout), dense_state_bits=dense_state_bits,
                                      target_modules=target_modules, stagger_refresh=stagger_refresh,
                                      grad_clip=clip, reduce_dense=False, **sharded_options)
    else:
        if sharded_options:
            raise ValueError(f"{sorted(sharded_options)}: options of the multi-process optimizer, but this is one "
                             "process")
        opt = QGaLoreOptimizer(model, config, dense_state_bits=dense_state_bits, target_modules=target_modules,
                               stagger_refresh=stagger_refresh, layerwise=True,
                               grad_accum=int(training_args.gradient_accumulation_steps), grad_clip=clip)
    training_args.max_grad_norm = 0.0
    return opt


def check_trainer_args(training_args: Any, optimizer: QGaLoreOptimizer) -> None:
    """Raise ``ValueError`` if ``training_args`` would make Trainer clip by a partial norm or step more often than
    the optimizer expects, or if the optimizer does not fit Trainer's process layout (for optimizers built by hand
    rather than with :func:`optimizer_for_trainer`)."""
    _refuse_unsupported(training_args)
    if float(getattr(training_args, "max_grad_norm", 0.0) or 0.0) > 0:
        raise ValueError(f"TrainingArguments.max_grad_norm={training_args.max_grad_norm} would clip only the dense "
                         "gradients (the projected ones are consumed inside backward): set max_grad_norm=0 and pass "
                         "grad_clip to QGaLoreOptimizer")
    ga = int(training_args.gradient_accumulation_steps)
    if optimizer.in_backward and ga > 1:  # other mismatches are harmless: step() applies what was accumulated
        raise ValueError(f"TrainingArguments.gradient_accumulation_steps={ga} but the optimizer steps inside "
                         "backward (grad_accum=1, no clipping): build it with grad_accum="
                         f"{ga}")
    world = _world_size(training_args)
    if world > 1:
        from ..parallel import ShardedQGaLoreOptimizer

        if not isinstance(optimizer, ShardedQGaLoreOptimizer) or optimizer.world_size != world:
            raise ValueError(f"Trainer runs {world} processes, but {type(optimizer).__name__} steps each replica on "
                             "its own gradients (the INT8 replicas would drift apart): build it with "
                             "optimizer_for_trainer on every rank")
        if optimizer.reduce_dense:
            raise ValueError("Trainer's DistributedDataParallel wrapper averages the dense gradients already: build "
                             "the ShardedQGaLoreOptimizer with reduce_dense=False (optimizer_for_trainer does)")
