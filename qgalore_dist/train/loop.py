"""The training loop, shared by every engine.

``train(args)`` resolves the model, tokenizer and data, builds the optimizer through an *engine*, and runs
steps of ``grad_accum`` micro-batches with periodic evaluation on the held-out split, checkpoints and metrics.
The engine owns model/optimizer preparation, backward, the optimizer step and the state to checkpoint;
:mod:`qgalore_dist.train.engines` holds them (``--engine``). The distributed engines (ddp / fsdp / deepspeed) implement
the same methods and add their communication — the loop itself contains no engine-specific code.

Loss: :class:`~qgalore_dist.data.TokenBatcher` yields labels already shifted, so the loss is plain token-level
cross-entropy of the logits (computed in fp32) against them.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.as_model import (
    checkpoint_model_config,
    checkpoint_model_record,
    checkpoint_source,
    checkpoint_tokenizer_dir,
    is_checkpoint,
)
from ..checkpoint.export import EXPORT_DTYPES, quantized_modules
from ..checkpoint.save_load import TRAINER_FILE, CheckpointError, capture_rng_state, restore_rng_state
from ..checkpoint.save_root import SaveRootLock, choose_resume, clean_leftovers, prune_checkpoints
from ..data import TokenBatcher, get_tokenizer, tokenizer_fingerprint
from ..errors import DataError, DistributedError, DivergenceError, UsageError, UserError
from ..models import (
    build_model,
    enable_activation_checkpointing,
    filled_defaults,
    param_count,
    pretrained_source,
    resolve_model_config,
    streamed_float_model,
)
from ..models.arch import parameter_counts
from ..nn.convert import find_target_linears
from ..nn.dense_storage import store_dense_params
from ..nn.materialize import KeyedRandomInit, PendingModel, cast_dense, int8_skeleton
from .args import INT8_OPTIMIZERS, LOWRANK_OPTIMIZERS, TrainArgs, flag_name
from .engines import Engine, make_engine
from .generate import exact_match
from .lora import LoraSource, add_lora
from .metrics import MetricsWriter, Progress, peak_memory_bytes, perplexity
from .optimizers import WEIGHT_GROUP_SIZE, make_optimizer, qgalore_config
from .schedule import build_scheduler

__all__ = ["TrainResult", "evaluate", "lm_loss", "train"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ============================================================================================ loss, eval
def lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
            reduction: str = "mean") -> torch.Tensor:
    """Token-level cross-entropy of the model's logits against already-shifted labels (``-100``: no loss there),
    all ``[batch, seq]``: in fp32, or fp64 for a ``--dtype float64`` model (an fp32 loss would round the gradients
    of N ranks' partial batches differently from the single-device batch's, and flip stochastic-rounding decisions
    in exact-parity runs).

    ``position_ids`` (packed fine-tuning rows): restart at 0 for every example; with no attention mask,
    transformers' sdpa / eager attention then keeps each example to itself. The KV cache stays off: with it on,
    packed examples would attend to each other."""
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits.flatten(0, 1)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, labels.flatten(), reduction=reduction, ignore_index=-100)


def _on(device: torch.device, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A batcher's micro-batch — ``(input_ids, labels)`` or ``(input_ids, labels, position_ids)`` — on ``device``."""
    x, y, *pos = batch
    return x.to(device), y.to(device), (pos[0].to(device) if pos else None)


@torch.no_grad()
def evaluate_sums(model: nn.Module, batcher: TokenBatcher, batches: int, batch_size: int, device: torch.device,
                  shard: bool = False) -> tuple[float, int, int]:
    """(Σ token loss, token count, batches run here) over the first ``batches`` held-out batches.

    ``shard``: the batches are global batches of ``batch_size × world size`` windows split by rank like training
    batches (:meth:`TokenBatcher.val_batches`), so N ranks each run 1/N of the evaluation, in lockstep (every rank
    the same number of equal forwards: safe where forwards are collectives), and the sums added over ranks give
    the value one device gets with ``batch_size × N``."""
    was_training = model.training
    model.eval()
    total, count, done = 0.0, 0, 0
    try:
        for i, batch in enumerate(batcher.val_batches(batch_size, shard=shard)):
            if i >= batches:
                break
            x, y, pos = _on(device, batch)
            total += float(lm_loss(model, x, y, pos, reduction="sum"))
            count += int((y != -100).sum())
            done += 1
    finally:
        model.train(was_training)
    return total, count, done


def evaluate(model: nn.Module, batcher: TokenBatcher, batches: int, batch_size: int,
             device: torch.device) -> float:
    """Mean token loss over the first ``batches`` held-out batches (deterministic: same windows every time)."""
    total, count, _ = evaluate_sums(model, batcher, batches, batch_size, device)
    return total / count if count else math.nan


# ================================================================================================ set-up
def resolve_device(spec: str | None) -> torch.device:
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(f"--device {spec!r} is not a device (use cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UsageError(f"--device {spec!r}: only cpu and cuda are supported")
    return dev


def resolve_dtype(spec: str | None, device: torch.device) -> torch.dtype:
    if spec is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[spec]


def dense_storage_dtype(spec: str | None, compute: torch.dtype) -> torch.dtype:
    """``--dense-dtype``: the storage dtype of the dense parameters (default: the compute dtype)."""
    return compute if spec is None else _DTYPES[spec]


def resolve_tokenizer(args: TrainArgs):
    """``--tokenizer``, else the model directory's own tokenizer (a checkpoint's ``tokenizer/``), else the default
    BPE (trained once, cached)."""
    if args.tokenizer is not None:
        return get_tokenizer(args.tokenizer)
    model_dir = Path(args.model).expanduser()
    if model_dir.is_dir() and is_checkpoint(model_dir):
        tok_dir = checkpoint_tokenizer_dir(model_dir)
        if tok_dir is not None:
            return get_tokenizer(tok_dir)
    if model_dir.is_dir() and any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return get_tokenizer(model_dir)
    return get_tokenizer()


# published checkpoint directories of every engine: step_NNNNNN (local, ddp, fsdp), global_stepN (deepspeed)
_CHECKPOINT_NAMES = re.compile(r"^(step_\d+|global_step\d+)$")


def _other_layout(save_dir: str, found: list[tuple[int, Path]]) -> list[str]:
    """Names of checkpoints in ``save_dir`` that this engine does not list: another engine's layout, which
    ``--resume auto`` would not see (it would start afresh beside them and mix two runs in one directory)."""
    root = Path(save_dir).expanduser()
    if not root.is_dir():
        return []
    own = {p.name for _, p in found}
    return sorted(p.name for p in root.iterdir() if p.name not in own and _CHECKPOINT_NAMES.match(p.name)
                  and (p / TRAINER_FILE).is_file())


def resolve_resume(args: TrainArgs, engine: Engine) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its verified trainer record ((None, None): fresh start).

    ``--resume`` names a checkpoint (verified; a damaged one is an error naming the file), a save root, or
    ``auto`` (the save root is ``--save-dir``): from a root the newest *intact* checkpoint is taken, each newer
    damaged one skipped with a warning saying why. A fresh start into a directory that already holds checkpoints
    — this engine's or another engine's layout — is refused, so a forgotten ``--resume`` can never overwrite
    them, and ``--resume auto`` never starts afresh beside another engine's checkpoints."""
    if args.save_dir is not None and args.resume in (None, "auto"):
        found = engine.list_checkpoints(args.save_dir)
        other = _other_layout(args.save_dir, found)
        if other:
            raise UsageError(f"--save-dir {args.save_dir} holds checkpoints of another engine's layout "
                             f"({', '.join(other[:3])}) that --engine {args.engine} cannot resume; resume them "
                             "with the engine that wrote them, or choose another --save-dir")
    if args.resume is None:
        if args.save_dir is not None:
            found = engine.list_checkpoints(args.save_dir)
            if found:
                raise UsageError(f"--save-dir {args.save_dir} already holds checkpoints (latest "
                                 f"{found[-1][1].name}); pass --resume auto to continue that run, or choose another "
                                 "--save-dir")
        return None, None
    root = Path(args.save_dir if args.resume == "auto" else args.resume).expanduser()
    if args.resume != "auto":
        if (root / TRAINER_FILE).is_file():  # one checkpoint: exactly that one, no fallback
            record = engine.verify_checkpoint(root)
            newer = [p.name for s, p in (engine.list_checkpoints(args.save_dir) if args.save_dir else [])
                     if s > int(record.get("step", 0))]
            if newer:  # its saves would interleave with them, and retention would keep theirs over ours
                raise UsageError(f"--save-dir {args.save_dir} holds checkpoints newer than {root.name} "
                                 f"({', '.join(newer[:3])}); resume the newest (--resume auto) or save elsewhere")
            return root, record
        if not engine.list_checkpoints(root):
            other = _other_layout(str(root), [])
            raise UsageError(f"--resume {args.resume}: " + (
                f"holds checkpoints of another engine's layout ({', '.join(other[:3])}) that --engine "
                f"{args.engine} cannot resume" if other else
                "is neither a checkpoint (no trainer.json) nor a save root holding checkpoints"))
    choice = choose_resume(engine.list_checkpoints(root), engine.verify_checkpoint)
    if engine.is_main:
        for path, why in choice.skipped:
            print(f"warning: not resuming {path}: {why}; falling back to an older checkpoint", file=sys.stderr,
                  flush=True)
    return choice.path, choice.record


def lock_save_root(args: TrainArgs, engine: Engine) -> SaveRootLock | None:
    """Collective: rank 0 takes ``--save-dir``'s lock (one run per directory) and removes what interrupted saves
    left there; every rank raises the same ``UsageError`` when another run holds it. None without ``--save-dir``
    or on ranks other than 0."""
    if args.save_dir is None:
        return None
    lock, error = None, None
    if engine.is_main:
        try:
            lock = SaveRootLock(Path(args.save_dir).expanduser()).acquire()
        except UsageError as exc:
            error = str(exc)
    engine._agree(error, UsageError, "locking --save-dir")
    if lock is not None:
        try:
            for line in filter(None, [lock.describe_previous(), *clean_leftovers(lock.root)]):
                print(f"{args.save_dir}: {line}", file=sys.stderr, flush=True)
        except OSError as exc:
            error = f"--save-dir {args.save_dir}: cannot remove what an interrupted save left ({exc})"
            lock.release()
    engine._agree(error, CheckpointError, "cleaning --save-dir")  # nobody lists checkpoints before rank 0 did
    return lock


def make_batcher(args: TrainArgs, tokenizer, engine: Engine):
    """The run's batcher and notes for the log: windows of a token stream (pre-training), or tokenized, masked and
    packed examples (``task == "finetune"``; the data are read and validated whole here, before any write).
    ``--epochs`` becomes ``--max-steps`` from the packed size of the first epoch."""
    if args.task != "finetune":
        return TokenBatcher.from_source(args.data, tokenizer, args.seq_len, args.batch_size, seed=args.seed,
                                        world_size=engine.world_size, rank=engine.rank), []
    from ..data.sft import SFTBatcher, SFTDataset, SFTOptions

    try:
        options = SFTOptions(format=args.format, train_on_prompt=args.train_on_prompt, truncation=args.truncation,
                             packing=not args.no_packing, chat_template=args.chat_template,
                             val_fraction=args.val_fraction)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    data = SFTDataset.build(args.data, tokenizer, args.seq_len, options, val_path=args.val_data, seed=args.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batcher = SFTBatcher(data, args.seq_len, args.batch_size, world_size=engine.world_size, rank=engine.rank,
                         seed=args.seed, packing=not args.no_packing, pad_id=pad)
    notes = list(data.log_lines())
    if args.epochs is not None:
        per_step = batcher.global_batch * args.grad_accum
        args.max_steps = max(1, math.ceil(args.epochs * batcher.n_windows / per_step))
        notes.append(f"--epochs {args.epochs:g}: {batcher.n_windows} sequences per epoch, {per_step} per step -> "
                     f"{args.max_steps} steps")
    if args.eval_generate and len(batcher.val_prompts(args.eval_generate)) == 0:
        raise UsageError(f"--eval-generate {args.eval_generate}: no held-out example has a final answer (text after "
                         "'####' in the completion, or an 'answer' field)")
    return batcher, notes


def check_one_step(args: TrainArgs, batcher, world_size: int) -> None:
    """Refuse training data that cannot fill one optimizer step: the batchers would wrap around and feed the same
    sequences several times within a step (or, with a huge --batch-size, allocate it and be OOM-killed).
    Evaluation needs no such check: it runs whatever held-out sequences there are, the last batch short."""
    per_step = args.batch_size * args.grad_accum * world_size
    have = batcher.n_windows  # fine-tuning: the packed rows of the first epoch (the next ones differ by a row or so)
    if have >= per_step:
        return
    data = args.data if args.data is not None else batcher.stream.source
    if args.task == "finetune":
        examples = len(batcher.data.train)
        what = (f"{examples} training examples (one per row, --no-packing)" if args.no_packing else
                f"{examples} training examples packed into {have} rows of --seq-len {args.seq_len}")
        unit = "rows"
    else:
        what, unit = f"{have} training sequences of --seq-len {args.seq_len} + 1 tokens", "sequences"
    ranks = f" × {world_size} ranks" if world_size > 1 else ""
    raise DataError(f"--data {data}: {what}, but one step needs {per_step} {unit} (--batch-size {args.batch_size} × "
                    f"--grad-accum {args.grad_accum}{ranks}); lower --batch-size or --grad-accum"
                    + (", use fewer ranks" if world_size > 1 else "") + ", or give more data")


def pending_training_model(args: TrainArgs, config, dtype: torch.dtype,
                           checkpoint_record: dict[str, Any] | None = None) -> PendingModel:
    """The model to train on the meta device, with where its values come from: fresh from ``config`` (keyed
    init, a pure function of (seed, name, global index)), a Hugging Face directory (safetensors, streamed) or
    one of our checkpoints (``checkpoint_record``: its verified trainer.json); the targeted linears an INT8
    skeleton for ``qgalore`` / ``projfactor``, dense parameters in their storage dtype; KV cache off, activation
    checkpointing on request. Nothing is allocated: the engine decides where each tensor lives (a sharding engine
    materialises only its rows), so a 7B model never exists in fp32/bf16 and never whole on a sharded rank."""
    model_dir = Path(args.model).expanduser()
    int8 = args.optimizer in INT8_OPTIMIZERS
    dense = dense_storage_dtype(args.dense_dtype, dtype) if int8 else dtype
    model = build_model(config, meta=True) if int8 else build_model(config, dtype=dense, meta=True)
    if checkpoint_record is not None:
        source = checkpoint_source(model_dir, checkpoint_record, model)
    elif model_dir.is_dir():
        source = pretrained_source(model_dir, model)
    else:
        source = KeyedRandomInit(model, args.seed)
    if int8:
        try:
            int8_skeleton(model, tuple(args.target_module_list), WEIGHT_GROUP_SIZE, bias_dtype=dense)
        except ValueError as exc:  # no targeted linear matched
            raise UsageError(f"--target-modules: {exc}") from exc
    cast_dense(model, dense)
    if args.method == "lora":  # adapters on the meta model too: every engine materialises them like the base
        model, source = add_lora(model, args), LoraSource(source, args.seed)
    model.config.use_cache = False
    if args.activation_checkpointing:
        enable_activation_checkpointing(model)
    return PendingModel(model, source)


def finish_training_model(args: TrainArgs, model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A materialised model made ready to train: ``--dense-dtype`` storage (local engine), train mode."""
    if args.dense_dtype is not None:  # after quantisation: the INT8 weights are buffers, only dense params remain
        try:
            store_dense_params(model, dense_storage_dtype(args.dense_dtype, dtype), dtype)
        except ValueError as exc:
            raise UsageError(f"--dense-dtype {args.dense_dtype}: {exc}") from exc
    model.train()
    return model


def build_training_model(args: TrainArgs, config, device: torch.device, dtype: torch.dtype,
                         checkpoint_record: dict[str, Any] | None = None) -> nn.Module:
    """:func:`pending_training_model`, materialised whole on ``device`` (engines that do not shard the model)."""
    pending = pending_training_model(args, config, dtype, checkpoint_record)
    return finish_training_model(args, pending.materialize(device), dtype)


# ================================================================================================= loop
@dataclass
class TrainResult:
    """What a run did (also returned by ``main``)."""

    start_step: int
    steps: int
    tokens: int
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    export_dir: str | None = None
    wall_s: float = 0.0
    original_val_loss: float | None = None  # the unquantised pretrained model's, when one was loaded into INT8
    exact_matches: list[tuple[int, float]] = field(default_factory=list)  # (step, fraction) under --eval-generate
    skipped_steps: list[int] = field(default_factory=list)  # steps skipped for a non-finite loss or gradient

    @property
    def final_val_loss(self) -> float | None:
        return self.evals[-1][1] if self.evals else None


def _trainer_state(args: TrainArgs, model: nn.Module, batcher: TokenBatcher, scheduler, tokens: int,
                   tok_fp: str, engine: Engine, result: TrainResult) -> dict[str, Any]:
    return {
        "engine": engine.name,
        "world_size": engine.world_size,
        "tokens_seen": tokens,
        "rng": capture_rng_state(),
        "data": batcher.state_dict(),
        "scheduler": scheduler.state_dict(),
        "args": args.to_dict(),
        "optimizer_kind": args.optimizer,
        "model_config": json.loads(model.config.to_json_string(use_diff=False)),
        "quantized_modules": quantized_modules(model),
        "tokenizer_fingerprint": tok_fp,
        "last_loss": result.losses[-1] if result.losses else None,
        "last_val_loss": result.final_val_loss,
    }


@dataclass
class _Run:
    """Everything :func:`train` set up before its first write."""

    tokenizer: Any
    tok_fp: str
    batcher: TokenBatcher
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    resume_dir: Path | None
    start_step: int = 0
    tokens: int = 0
    vocab_note: str = ""
    counts_note: str = ""
    original: Path | None = None  # a pretrained directory quantised on load: its float model is evaluated too
    data_notes: list[str] = field(default_factory=list)  # what reading the data did (truncated / skipped examples)
    schedule_note: str = ""  # a resumed run whose schedule settings changed
    reshard_note: str = ""  # a resumed run on another engine or world size


@dataclass
class _Inputs:
    """What :func:`_check_inputs` resolved: every input read and checked, nothing allocated."""

    dtype: torch.dtype
    config: Any
    config_vocab: int
    model_dir: Path
    from_checkpoint: bool
    resume_dir: Path | None
    tokenizer: Any
    tok_fp: str
    batcher: TokenBatcher
    data_notes: list[str]
    pending: PendingModel


_CHECKING = "checking the run's settings, model, checkpoint and data"


def _prepare(args: TrainArgs, engine: Engine) -> _Run | None:
    """Resolve, build and (when resuming) restore everything; raises user errors before anything is written.

    Every rank checks what it reads itself (its own copy of the data, model directory, checkpoint), and the ranks
    agree on the outcome before anything is built: one rank's bad input stops every rank with the same error
    (rank 0 prints it, naming the rank), instead of rank 0 going on into collectives its peer never joins.
    """
    try:
        inputs = _check_inputs(args, engine)
    except UserError as exc:
        if engine.world_size == 1 or getattr(exc, "agreed", False):
            raise  # one process, or already agreed by a collective inside the checks (its peers have gone on)
        engine._agree(str(exc), type(exc), _CHECKING)  # raises on every rank
        raise
    except Exception as exc:  # not a user error (a bug, an I/O failure): still stop the peers, keep the traceback
        if engine.world_size > 1 and not getattr(exc, "agreed", False) and not isinstance(exc, DistributedError):
            try:
                engine._agree(f"{type(exc).__name__}: {exc}", DistributedError, _CHECKING)
            except DistributedError:
                pass  # this rank raises its own exception, with its traceback
        raise
    engine._agree(None, UsageError, _CHECKING)  # healthy: one int all-reduce
    dtype, config, config_vocab, model_dir = inputs.dtype, inputs.config, inputs.config_vocab, inputs.model_dir
    from_checkpoint, resume_dir, tokenizer, tok_fp = (inputs.from_checkpoint, inputs.resume_dir, inputs.tokenizer,
                                                      inputs.tok_fp)
    batcher, data_notes, pending = inputs.batcher, inputs.data_notes, inputs.pending
    if args.dry_run:
        for line in data_notes:
            print(line, flush=True)
        print(f"dry run: settings, model config, tokenizer "
              f"({len(tokenizer)} tokens), data ({batcher.stream.source}: {batcher.n_windows} train / "
              f"{batcher.n_val_windows()} val sequences)" + (f", checkpoint {resume_dir}" if resume_dir else "")
              + " and output paths are valid; nothing was trained or written", flush=True)
        return None

    # counted on the meta model, before an engine partitions it (ZeRO-3 would leave empty dense shards)
    projected, dense = parameter_counts(pending.model)
    if args.optimizer in LOWRANK_OPTIMIZERS and args.optimizer not in INT8_OPTIMIZERS:  # galore: float targets
        moved = sum(m.weight.numel() for m in find_target_linears(pending.model, args.target_module_list).values())
        projected, dense = moved, dense - moved
    counts_note = f"{projected / 1e6:.2f}M projected, {dense / 1e6:.2f}M dense"
    # a sharding engine lays the meta model out first and materialises only its own rows
    model, optimizer = engine.prepare(
        pending if engine.sharded_start else finish_training_model(args, pending.materialize(engine.device), dtype),
        lambda m: make_optimizer(m, args))
    scheduler = build_scheduler(optimizer, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
                                schedule=args.lr_schedule, min_lr_ratio=args.min_lr_ratio)
    run = _Run(tokenizer, tok_fp, batcher, model, optimizer, scheduler, resume_dir, data_notes=data_notes)
    tok_name = Path(str(getattr(tokenizer, "name_or_path", "") or "default BPE")).name or "default BPE"
    run.vocab_note = (f"vocab {model.config.vocab_size}" + (
        f" (the config's {config_vocab} sized to the tokenizer's)" if config.vocab_size != config_vocab else "")
        + f", tokenizer {tok_name} ({len(tokenizer)} tokens)")
    if model_dir.is_dir() and not from_checkpoint and args.optimizer in INT8_OPTIMIZERS:
        run.original = model_dir
    run.counts_note = counts_note
    if resume_dir is not None:
        fresh_base = list(scheduler.base_lrs)  # this run's --lr, before the checkpoint's optimizer state lands
        ckpt = engine.load_checkpoint(resume_dir)
        try:
            scheduler.load_state_dict(ckpt.trainer["scheduler"])
            batcher.load_state_dict(ckpt.trainer["data"])
            restore_rng_state(ckpt.trainer["rng"])
            run.start_step, run.tokens = ckpt.step, int(ckpt.trainer["tokens_seen"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {resume_dir}: trainer state does not fit this run ({exc})") from exc
        run.schedule_note = _recompute_schedule(args, scheduler, fresh_base, ckpt.trainer.get("args", {}))
        run.reshard_note = _reshard_note(args, engine, ckpt.trainer)
    return run


def _reshard_note(args: TrainArgs, engine: Engine, record: dict[str, Any]) -> str:
    """A line when a checkpoint resumes on another engine or world size (every rank takes its share of the saved
    state), saying whether the global batch — the one thing that keeps the trajectory — is the same."""
    saved_engine, saved_world = record.get("engine"), record.get("world_size")
    if saved_engine == engine.name and saved_world == engine.world_size:
        return ""
    saved = record.get("args") or {}
    try:
        before = int(saved["batch_size"]) * int(saved["grad_accum"]) * int(saved_world)
    except (KeyError, TypeError, ValueError):
        before = None
    now = args.batch_size * args.grad_accum * engine.world_size
    line = (f"resuming a checkpoint of --engine {saved_engine} on {saved_world} rank(s) with --engine {engine.name} "
            f"on {engine.world_size}")
    if before is None or before == now:
        return line + f" (global batch {now} sequences per step, as saved)"
    return line + (f"; the global batch changes from {before} to {now} sequences per step (--batch-size × "
                   "--grad-accum × ranks: keep it to continue the same trajectory)")


def _check_inputs(args: TrainArgs, engine: Engine) -> _Inputs:
    """Every check of the run's inputs on this rank, cheap ones first (flags, model spec, checkpoint hashes), then
    the tokenizer and data, then the model on the meta device; raises user errors, allocates and writes nothing.
    """
    dtype = resolve_dtype(args.dtype, engine.device)
    if torch.finfo(dense_storage_dtype(args.dense_dtype, dtype)).bits > torch.finfo(dtype).bits:
        raise UsageError(f"--dense-dtype {args.dense_dtype} is wider than the compute dtype {dtype}: it must be "
                         "narrower (or the same)")
    if args.optimizer in LOWRANK_OPTIMIZERS:
        qgalore_config(args)  # raises UsageError on an invalid combination
    model_dir = Path(args.model).expanduser()
    from_checkpoint = model_dir.is_dir() and is_checkpoint(model_dir)
    model_record = checkpoint_model_record(model_dir) if from_checkpoint else None
    config = checkpoint_model_config(model_dir, model_record) if from_checkpoint else resolve_model_config(args.model)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and args.seq_len > max_pos:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings ({max_pos})")
    resume_dir, record = resolve_resume(args, engine)
    if resume_dir is not None:
        if record.get("optimizer_kind") != args.optimizer:
            raise CheckpointError(f"checkpoint {resume_dir} was trained with --optimizer "
                                  f"{record.get('optimizer_kind')}, this run uses {args.optimizer}")
        # loading would silently round the dense weights (or widen them, with their bf16 rounding baked in)
        saved_args = record.get("args", {})
        saved = dense_storage_dtype(saved_args.get("dense_dtype"),
                                    resolve_dtype(saved_args.get("dtype"), engine.device))
        if saved != dense_storage_dtype(args.dense_dtype, dtype):
            raise CheckpointError(f"checkpoint {resume_dir} stores its dense parameters in {saved}, this run in "
                                  f"{dense_storage_dtype(args.dense_dtype, dtype)}; pass the original --dense-dtype")

    tokenizer = resolve_tokenizer(args)
    tok_fp = tokenizer_fingerprint(tokenizer)
    if record is not None and record.get("tokenizer_fingerprint") != tok_fp:
        raise CheckpointError(f"checkpoint {resume_dir} was trained with another tokenizer (fingerprint "
                              f"{record.get('tokenizer_fingerprint')}, this run {tok_fp})")
    config_vocab = config.vocab_size
    if not model_dir.is_dir():  # a config spec: the model is sized to the tokenizer (a directory keeps its own)
        config = resolve_model_config(args.model, vocab_size=len(tokenizer))
    batcher, data_notes = make_batcher(args, tokenizer, engine)
    check_one_step(args, batcher, engine.world_size)
    filled = filled_defaults(config)
    size_note = (f"model {args.model}: {param_count(config) / 1e6:.2f}M parameters"
                 + (f" (transformers defaults for fields the config omits: {', '.join(filled)})" if filled else ""))
    if engine.is_main:  # the size before anything is allocated: a 7B model by mistake is seen here, not in swap
        print(size_note + ("" if args.dry_run else "; building"), flush=True)
    # the model on the meta device with its value source: cheap, and it checks the model directory / checkpoint
    # (readable safetensors, matching layers) before anything is allocated — a dry run stops after these checks
    pending = pending_training_model(args, config, dtype, model_record)
    # before the model is materialised: an id past the embedding would otherwise fail mid-forward (IndexError)
    if batcher.stream.vocab_size and batcher.stream.vocab_size > config.vocab_size:
        raise UsageError(f"--data {args.data}: token ids reach {batcher.stream.vocab_size - 1} but the model's "
                         f"vocabulary has {config.vocab_size} tokens")
    if len(tokenizer) > config.vocab_size:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                         f"{config.vocab_size}")
    return _Inputs(dtype, config, config_vocab, model_dir, from_checkpoint, resume_dir, tokenizer,
                   tok_fp, batcher, data_notes, pending)


_SCHEDULE_FLAGS = ("lr", "max_steps", "warmup_steps", "lr_schedule", "min_lr_ratio")


def _recompute_schedule(args: TrainArgs, scheduler, base_lrs: list[float], saved: dict[str, Any]) -> str:
    """The learning rate from the first resumed step on is this run's schedule (the checkpoint restored the
    step count and the optimizer's last lr, which belong to the old one): each group's lr is set to its base lr
    × the multiplier at the resumed step. Returns a note naming the schedule settings that changed ('' if none)."""
    scheduler.base_lrs = list(base_lrs)
    step = scheduler.last_epoch
    lrs = [base * fn(step) for base, fn in zip(base_lrs, scheduler.lr_lambdas)]
    for group, base, lr in zip(scheduler.optimizer.param_groups, base_lrs, lrs):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = lrs
    changed = [f"{flag_name(k)} {getattr(args, k)} (was {saved[k]})" for k in _SCHEDULE_FLAGS
               if k in saved and saved[k] != getattr(args, k)]
    if not changed:
        return ""
    return (f"resumed with {', '.join(changed)}: the learning-rate schedule is recomputed from these settings "
            f"from step {step + 1} on (lr {lrs[0]:.3e})")


def train(args: TrainArgs, engine: Engine | None = None) -> TrainResult:
    """Run training as ``args`` describes, through ``engine`` (default: the one ``--engine`` names).

    The engine is closed (process group left) when this returns or raises.

    User errors raise :class:`UsageError` / ``ModelSpecError`` / ``DataError`` / :class:`CheckpointError` before
    anything is written.
    """
    t_start = time.perf_counter()
    engine = engine or make_engine(args)
    lock = None
    try:
        lock = None if args.dry_run else lock_save_root(args, engine)  # a dry run writes nothing, cleans nothing
        return _train(args, engine, t_start)
    finally:
        try:
            engine.close()
        finally:
            if lock is not None:
                lock.release()


def _train(args: TrainArgs, engine: Engine, t_start: float) -> TrainResult:
    run = _prepare(args, engine)
    if run is None:  # --dry-run
        return TrainResult(start_step=0, steps=0, tokens=0, wall_s=time.perf_counter() - t_start)
    model, optimizer, scheduler, batcher = run.model, run.optimizer, run.scheduler, run.batcher
    tokenizer, resume_dir, start_step, tokens = run.tokenizer, run.resume_dir, run.start_step, run.tokens
    device, dtype = engine.device, resolve_dtype(args.dtype, engine.device)

    # --- from here on the run writes (metrics, checkpoints, export) -----------------------------------------
    result = TrainResult(start_step=start_step, steps=start_step, tokens=tokens)
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * engine.world_size
    progress = Progress(total=args.max_steps, start=start_step, log_every=args.log_every, enabled=engine.is_main)
    progress.note(
        f"model {args.model}: {param_count(model.config) / 1e6:.2f}M params ({run.counts_note}), {run.vocab_note} "
        f"| optimizer "
        f"{args.optimizer} | {device} {str(dtype).removeprefix('torch.')} | {tokens_per_step} tokens/step | "
        f"data {batcher.stream.source}: {batcher.n_windows} train / {batcher.n_val_windows()} val windows"
        + (f" | resumed from {resume_dir} at step {start_step}" if resume_dir is not None else "")
        + (" | no checkpoint to resume, starting fresh" if args.resume == "auto" and resume_dir is None else ""))
    for line in run.data_notes + [note for note in (run.schedule_note, run.reshard_note) if note]:
        progress.note(line)
    mem = engine.memory_bytes()
    if mem:
        progress.note("weights + optimizer state: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in mem.items()))

    resume_step = start_step if (resume_dir is not None or args.resume is not None) else None
    with MetricsWriter(args.metrics_jsonl if engine.is_main else None, resume_step=resume_step) as metrics:
        if metrics.dropped:
            progress.note(f"--metrics-jsonl {args.metrics_jsonl}: {metrics.dropped} record(s) after step "
                          f"{start_step} dropped (the interrupted run wrote them after its last checkpoint; they "
                          "are trained again now)")

        def held_out_loss(m: nn.Module) -> tuple[float, int]:
            # each rank evaluates its slice of every global batch; a held-out split smaller than one global batch
            # is evaluated whole by every rank instead (same value everywhere)
            shard = 1 < engine.world_size and args.batch_size * engine.world_size <= batcher.n_val_windows()
            total, count, done = evaluate_sums(m, batcher, args.eval_batches, args.batch_size, device, shard)
            if shard:
                total, count = engine.sum_over_ranks([total, float(count)])
            val = total / count if count else math.nan
            return (val if shard else engine.mean_over_ranks(val)), done

        def run_eval(step: int) -> None:
            t0 = time.perf_counter()
            val, done = held_out_loss(model)
            result.evals.append((step, val))
            record = {"event": "eval", "step": step, "tokens": tokens, "val_loss": val, "val_ppl": perplexity(val),
                      "eval_time_s": time.perf_counter() - t0, "eval_batches_this_rank": done}
            note = f"step {step}: val_loss {val:.4f} val_ppl {perplexity(val):.2f}"
            if step == 0 and run.original is not None:
                # where training starts from: the INT8-loaded model next to the original float one (streamed one
                # module at a time, never held whole)
                original, _ = held_out_loss(streamed_float_model(run.original, dtype=dtype, device=device))
                record["original_val_loss"] = result.original_val_loss = original
                note += f" (INT8-loaded; the original model {original:.4f})"
            if args.eval_generate:
                score = exact_match(model, batcher.val_prompts(args.eval_generate), tokenizer, engine, device,
                                    max_new_tokens=args.max_new_tokens)
                record.update(exact_match=score.exact_match, exact_match_correct=score.correct,
                              exact_match_total=score.total, generation_samples=score.samples)
                result.exact_matches.append((step, score.exact_match))
                note += f" exact_match {score.correct}/{score.total} ({score.exact_match:.1%})"
            metrics.write(record)
            progress.note(note)

        def on_main(what: str, fn) -> None:
            """``fn`` on rank 0; a file-system error there becomes one CheckpointError on every rank."""
            error = None
            if engine.is_main:
                try:
                    fn()
                except OSError as exc:
                    error = f"--save-dir {args.save_dir}: {what} failed ({exc})"
            engine._agree(error, CheckpointError, what)

        def cleanup() -> None:  # a save that failed earlier in this run (a disk error) leaves a .tmp
            for line in clean_leftovers(Path(args.save_dir).expanduser()):
                progress.note(f"{args.save_dir}: {line}")

        def prune(step: int) -> None:  # never a checkpoint newer than this run's own (a damaged one skipped)
            found = [(s, p) for s, p in engine.list_checkpoints(args.save_dir) if s <= step]
            for gone in prune_checkpoints(found, args.keep_last):
                progress.note(f"step {step}: removed {gone.name} (--keep-last {args.keep_last})")

        def save(step: int) -> None:
            on_main("removing an interrupted save", cleanup)
            path = engine.save_checkpoint(args.save_dir, step, _trainer_state(args, model, batcher, scheduler,
                                                                              tokens, run.tok_fp, engine, result),
                                          tokenizer)
            result.checkpoints.append(str(path))
            progress.note(f"step {step}: saved {path}")
            if args.keep_last:
                on_main("removing old checkpoints (--keep-last)", lambda: prune(step))

        if start_step == 0 and args.max_steps > 0:
            run_eval(0)  # the starting point of the validation curve
        if start_step >= args.max_steps:
            progress.note(f"checkpoint is at step {start_step} >= --max-steps {args.max_steps}: nothing to train")

        step, skips_in_a_row = start_step, 0
        try:
            while step < args.max_steps:
                t0 = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                engine.zero_grad()
                micro_batches, step_loss_tokens = batcher.step_batches(args.grad_accum)
                # the mean over the step's loss tokens of every micro-batch and rank: each rank's summed loss over
                # that global count, times the world size the engines' gradient averaging divides by again — so
                # packing, padding, accumulation and the number of ranks leave the gradient unchanged
                scale = engine.world_size / max(step_loss_tokens, 1)
                loss_sum, bad_loss = 0.0, False
                for batch in micro_batches:
                    loss = lm_loss(model, *_on(device, batch), reduction="sum")
                    loss_sum += float(loss.detach())
                    # checked before backward, on every rank together: in the in-backward mode (grad_accum 1)
                    # backward already updates the matrices, so a non-finite loss must never reach it
                    if engine.sum_over_ranks([0.0 if math.isfinite(loss_sum) else 1.0])[0]:
                        bad_loss = True
                        break
                    engine.backward(loss * scale)
                if bad_loss:
                    if not engine.can_skip_steps:
                        raise DivergenceError(f"step {step + 1}: non-finite loss ({loss_sum}); --engine "
                                              f"{engine.name} cannot skip a step, so the run stops here (the last "
                                              "checkpoint is kept)")
                    engine.skip_step(loss)
                    grad_norm = None
                else:
                    grad_norm = engine.step()
                # a non-finite norm: the optimizer applied nothing (every optimizer here skips on it)
                skipped = bad_loss or (grad_norm is not None and not math.isfinite(grad_norm))
                skips_in_a_row = skips_in_a_row + 1 if skipped else 0
                scheduler.step()
                step += 1
                tokens += tokens_per_step
                dt = time.perf_counter() - t0
                # with the loss, every rank's step time (its own slot, zeros elsewhere): the slowest rank's shows
                # a straggler that rank 0's own time would hide
                times = [0.0] * engine.world_size
                times[engine.rank] = dt
                sums = engine.sum_over_ranks([loss_sum, *times])
                loss_val, slowest = sums[0] / max(step_loss_tokens, 1), max(sums[1:])
                result.losses.append(loss_val)
                result.steps, result.tokens = step, tokens
                record = {"event": "train", "step": step, "loss": loss_val, "lr": lr, "tokens": tokens,
                          "tokens_per_s": tokens_per_step / dt, "step_time_s": dt,
                          "peak_mem_bytes": peak_memory_bytes(device),
                          "svd_count": int(getattr(optimizer, "svd_count", 0)), "grad_norm": grad_norm,
                          "loss_tokens": step_loss_tokens}
                if engine.world_size > 1:
                    record["slowest_rank_step_time_s"] = slowest
                if skipped:
                    record["skipped"] = "non-finite loss" if bad_loss else "non-finite gradient"
                    result.skipped_steps.append(step)
                phases = getattr(optimizer, "phase_times", None)
                if phases:
                    record["phase_times_s"] = {k: float(v) for k, v in phases.items()}
                record.update(engine.step_metrics())
                metrics.write(record)
                progress.update(step, loss_val, lr, tokens_per_step / dt, grad_norm,
                                slowest if engine.world_size > 1 else None)
                if skipped:
                    progress.note(f"step {step}: skipped ({record['skipped']}; {skips_in_a_row} in a row, the run "
                                  f"stops at {args.max_skipped_steps})")
                    if skips_in_a_row >= args.max_skipped_steps:
                        raise DivergenceError(
                            f"training diverged: {skips_in_a_row} steps in a row (to step {step}) had a non-finite "
                            "loss or gradient and were skipped; lower --lr or raise --grad-clip, and resume from "
                            "the last checkpoint" + (f" ({result.checkpoints[-1]})" if result.checkpoints else ""))
                if step == args.max_steps or (args.eval_every and step % args.eval_every == 0):
                    run_eval(step)
                if args.save_dir and (step == args.max_steps or (args.save_every and step % args.save_every == 0)):
                    save(step)
        finally:
            progress.close()

    if args.export:
        out = engine.export(model, args.export, tokenizer, EXPORT_DTYPES[args.export_dtype])
        if out is not None:
            result.export_dir = str(out)
            print(f"exported dequantised model to {result.export_dir}", flush=True)
    result.wall_s = time.perf_counter() - t_start
    return result
