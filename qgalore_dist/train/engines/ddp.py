"""The data-parallel engine (``--engine ddp``): replicated model, one process per device, launched by ``torchrun``
or ``mpirun`` (rank discovery: :func:`qgalore_dist.parallel.launch_env.init_distributed`).

* ``--optimizer qgalore|projfactor|galore``: :class:`~qgalore_dist.parallel.ShardedQGaLoreOptimizer` with
  ``--comm-mode {lowrank,full}`` (and ``--full-reduce`` for full mode under accumulation). It reduces the dense
  gradients itself and moves the projected matrices' traffic on its own process group, so the model is **not**
  wrapped in ``DistributedDataParallel``: the INT8 codes / scales are buffers that never enter a DDP gradient
  bucket nor ``broadcast_buffers``. Every rank builds the model from the same keyed initialisation; the
  optimizer's start-up check compares config + plan + parameter shapes across ranks and checksums every replica.
* ``--optimizer adamw|adamw8bit`` (baselines): the float model in ``torch.nn.parallel.DistributedDataParallel``
  (no buffer sync before each forward: the only buffers are deterministic rotary tables), its gradient all-reduce
  counted by a communication hook, micro-batches before the last one of a step without gradient sync.

Rank ``k`` trains on part ``k`` of each global batch (the batcher slices it), so N ranks with ``--batch-size b``
see the samples one device sees with ``--batch-size N·b``. Rank 0 writes metrics and logs; the loss it reports
is the mean over ranks, ``svd_count`` is the job's total (each refresh counted once, at its owner) and
``comm_bytes`` this rank's optimizer traffic of the step (sent + received).

Checkpoints (``<save-dir>/step_NNNNNN/``, :mod:`qgalore_dist.checkpoint.save_load`'s format): rank 0 writes the
(replicated) model once, the tokenizer and ``trainer.json``; every rank writes its share of the single-device
optimizer state (``optimizer_rankRRRRR.safetensors`` + ``.json``, :mod:`qgalore_dist.checkpoint.pieces`: its owned
matrices keyed by parameter name; rank 0 also the replicated dense state) and ``trainer_rankRRRRR.json`` (its
RNG). All ranks write into one ``step_NNNNNN.tmp-<pid of rank
0>`` directory, meet at a barrier, rank 0 writes the manifest, verifies and renames it into place, and a second
barrier releases everyone. Resuming verifies every hash on every rank; each rank reads the matrices the ownership
plan of this run gives it, from a checkpoint of any engine but deepspeed at any world size (an fsdp checkpoint's
model rows and optimizer pieces are joined). Any failure on any rank raises on every rank (one all-reduced
flag), so a corrupted checkpoint ends every rank with ``CheckpointError`` (exit 2) and nothing is overwritten.

Failure behaviour: every collective runs under ``--dist-timeout``; a rank that dies (its sockets close) or hangs
makes the others raise :class:`~qgalore_dist.errors.DistributedError` — one ``error:`` line, exit 1 — at
once or within the timeout, never a hang.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ...checkpoint.pieces import PieceReader, read_full_state
from ...checkpoint.save_load import (
    MODEL_FILE,
    SHARDS_KEY,
    TOKENIZER_DIR,
    CheckpointError,
    checkpoint_name,
    finalize_checkpoint,
    list_checkpoints,
    load_model_state,
    optimizer_files,
    publish_checkpoint,
    read_model_state,
    trainer_shard_file,
    verify_checkpoint,
    write_optimizer,
    write_state,
)
from ...errors import DistributedError, UsageError
from ...nn.int8_linear import QGaLoreLinear
from ...parallel.collectives import Collectives, all_reduce_bytes
from ...parallel.launch_env import DistEnv, init_distributed
from ...parallel.replicas import ReplicaMismatch
from ...parallel.sharded_optimizer import ShardedQGaLoreOptimizer
from ..args import INT8_OPTIMIZERS, LOWRANK_OPTIMIZERS, TrainArgs
from .base import ResumePoint
from .distributed import DistributedEngine, joining, rank_backend

__all__ = ["DDPEngine"]

class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that still answers ``.config`` (the loop reads the transformers config off the model it trains)."""

    @property
    def config(self):
        return self.module.config


class DDPEngine(DistributedEngine):
    """Data-parallel training over a replicated model (see the module docstring)."""

    name = "ddp"

    def __init__(self, args: TrainArgs, env: DistEnv, timeout: datetime.timedelta) -> None:
        self.args = args
        self.env = env
        self.rank, self.world_size, self.device = env.rank, env.world_size, env.device
        self.timeout = timeout
        self.sharded = args.optimizer in LOWRANK_OPTIMIZERS
        self.model: nn.Module | None = None  # the unwrapped model (checkpoints, export)
        self.wrapped: _DDP | None = None  # baselines only
        self.optimizer: torch.optim.Optimizer | None = None
        self.collectives: Collectives | None = None
        self._micro = 0
        self._ddp_comm = {"comm_bytes": 0, "comm_calls": 0}  # the DDP hook's count for the current step
        self._closed = False

    # --- set-up ----------------------------------------------------------------------------------------------
    @classmethod
    def from_args(cls, args: TrainArgs) -> "DDPEngine":
        """Join the process group the launcher describes (torchrun / mpirun / none: one process)."""
        backend = rank_backend(args)
        timeout = datetime.timedelta(seconds=args.dist_timeout)
        with joining(args):
            env = init_distributed(backend, timeout=timeout)
        return cls(args, env, timeout)._started()

    def prepare(self, model: nn.Module, make_opt: Callable[[nn.Module], torch.optim.Optimizer]
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
        from ..optimizers import qgalore_config

        args = self.args
        self.model = model.to(self.device)
        if self.sharded:
            # no DDP wrapper: the sharded optimizer averages the dense gradients and owns the projected traffic;
            # the INT8 buffers therefore never sit in a DDP bucket nor in broadcast_buffers
            self.collectives = Collectives(timeout=self.timeout)
            try:
                with self._guard("start-up (config agreement and replica check)"):
                    self.optimizer = ShardedQGaLoreOptimizer(
                        self.model, qgalore_config(args), self.collectives, comm_mode=args.comm_mode,
                        full_reduce=args.full_reduce, replica_check_every=args.replica_check_every,
                        update_dtype=torch.bfloat16 if args.update_dtype == "bfloat16" else None,
                        strict_replicas=args.strict_replicas,
                        dense_state_bits=8 if args.optimizer in INT8_OPTIMIZERS else 32,
                        target_modules=tuple(args.target_module_list), stagger_refresh=True,
                        grad_clip=args.grad_clip)
            except ReplicaMismatch as exc:
                raise DistributedError(f"start-up: the ranks' initial weights differ ({exc})") from exc
            except ValueError as exc:  # bad setting, or ranks started with different configs (raised on all)
                raise UsageError(f"--engine ddp: {exc}") from exc
            return self.model, self.optimizer
        if any(isinstance(m, QGaLoreLinear) for m in self.model.modules()):
            raise UsageError(f"--engine ddp: --optimizer {args.optimizer} trains a float model, but this one holds "
                             "INT8 weights (DistributedDataParallel must never carry them)")
        self.optimizer = make_opt(self.model)
        if self.world_size == 1:
            return self.model, self.optimizer
        # no buffer sync before every forward (the only buffers are deterministic rotary tables); torch >= 2.13
        # names it forward_sync_buffers and deprecates broadcast_buffers
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            nn.parallel.DistributedDataParallel.__init__).parameters else "broadcast_buffers"
        with self._guard("DistributedDataParallel start-up"):
            self.wrapped = _DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                **{no_sync: False})
        self.wrapped.register_comm_hook(self, DDPEngine._count_allreduce)
        return self.wrapped, self.optimizer

    @staticmethod
    def _count_allreduce(engine, bucket):  # no annotations: DDP rejects any but the exact, unstringified types
        """DDP communication hook: the default averaging all-reduce, with its ring bytes counted."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        buf = bucket.buffer()
        engine._ddp_comm["comm_bytes"] += 2 * all_reduce_bytes(buf.numel() * buf.element_size(), engine.world_size)
        engine._ddp_comm["comm_calls"] += 1
        return allreduce_hook(None, bucket)

    # --- the step --------------------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        if self.wrapped is not None:
            # DDP decides at forward time whether the coming backward all-reduces: only the step's last one does
            self.wrapped.require_backward_grad_sync = self.args.grad_accum == 1

    def backward(self, loss: torch.Tensor) -> None:
        with self._guard("backward"):  # lowrank refreshes and DDP all-reduce inside backward
            loss.backward()
        self._micro += 1
        if self.wrapped is not None:
            self.wrapped.require_backward_grad_sync = self._micro == self.args.grad_accum - 1

    def step(self) -> float | None:
        with self._guard("optimizer step"):
            self.optimizer.step()
        return self.optimizer.last_step.grad_norm

    def step_metrics(self) -> dict[str, Any]:
        """This step's bytes through this rank's link (sent + received) and the job's SVD total."""
        if not self.sharded:
            out, self._ddp_comm = dict(self._ddp_comm), {"comm_bytes": 0, "comm_calls": 0}
            return out
        last = self.optimizer.last_comm
        out = {k: int(last[k]) for k in ("comm_bytes", "comm_bytes_sent", "comm_bytes_received", "comm_calls")}
        out["comm_by_primitive"] = last.get("by_primitive", {})
        own = int(self.optimizer.svd_count)
        out["svd_count_rank"] = own
        if self.world_size > 1:
            t = torch.tensor([own], dtype=torch.int64, device=self.device)
            with self._guard("summing SVD counts"):
                dist.all_reduce(t)
            own = int(t)
        out["svd_count"] = own  # each refresh is computed once in the job, by its owner
        out["replica_repairs"] = len(self.optimizer.replica_repairs)
        return out

    # --- checkpoints -----------------------------------------------------------------------------------------
    def list_checkpoints(self, save_dir: str | Path) -> list[tuple[int, Path]]:
        return list_checkpoints(save_dir)

    def verify_checkpoint(self, path: Path) -> dict[str, Any]:
        """Every rank checks every hash; a failure on any rank raises ``CheckpointError`` on all."""
        record, error = None, None
        try:
            record = verify_checkpoint(path)
        except CheckpointError as exc:
            error = str(exc)
        self._agree(error, CheckpointError, f"verifying checkpoint {path}")
        return record

    def _broadcast_int(self, value: int) -> int:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        with self._guard("checkpoint set-up"):
            dist.broadcast(t, src=0)
        return int(t)

    def save_checkpoint(self, save_dir: str | Path, step: int, trainer_state: dict[str, Any],
                        tokenizer: Any) -> Path:
        save_dir = Path(save_dir)
        final = save_dir / checkpoint_name(step)
        tag = self._broadcast_int(os.getpid())  # one temporary directory for all ranks: rank 0's pid names it
        tmp = save_dir / f"{final.name}.tmp-{tag}"
        error = None
        if self.is_main:
            try:
                save_dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as exc:
                error = f"cannot create checkpoint directory {tmp}: {exc}"
        self._agree(error, CheckpointError, f"saving checkpoint {final}")
        try:
            try:
                if self.sharded:  # its matrices' state; the replicated dense state once, from rank 0
                    state = {k: v for k, v in self.optimizer.state_dict().items()
                             if k != "shard" and (k != "dense" or self.is_main)}
                    write_optimizer(tmp, self.rank, state)
                (tmp / trainer_shard_file(self.rank)).write_text(
                    json.dumps({"rank": self.rank, "rng": trainer_state["rng"]}), encoding="utf-8")
                if self.is_main:
                    write_state(tmp, {k: v.detach() for k, v in self.model.state_dict().items()}, MODEL_FILE)
                    if not self.sharded:  # baselines: the optimizer state is replicated — stored once
                        write_optimizer(tmp, 0, self.optimizer.state_dict())
                    if tokenizer is not None:
                        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            except (OSError, ValueError, TypeError) as exc:
                error = f"writing checkpoint {final} failed on rank {self.rank}: {exc}"
            self._agree(error, CheckpointError, f"saving checkpoint {final}")  # every rank's files are in tmp
            if self.is_main:
                try:
                    record = dict(trainer_state, ranks=self.world_size)
                    record[SHARDS_KEY] = self.world_size if self.sharded else 1
                    finalize_checkpoint(tmp, step, record)
                    verify_checkpoint(tmp)
                    publish_checkpoint(tmp, final, tag)
                except (OSError, CheckpointError) as exc:
                    error = f"publishing checkpoint {final} failed: {exc}"
            self._agree(error, CheckpointError, f"saving checkpoint {final}")  # published before anyone goes on
        except BaseException:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _read_optimizer_state(self, root: Path, record: dict[str, Any]) -> dict[str, Any]:
        """The single-device optimizer state from any engine's checkpoint at any world size — of the Q-GaLore
        optimizer, only the matrices this rank owns (the rest it never reads)."""
        files = optimizer_files(record)
        if not files:
            raise CheckpointError(f"checkpoint {root} holds --engine fsdp's torch AdamW state inside its dcp/, which "
                                  "resumes under --engine fsdp only")
        with PieceReader(root, files=files, device=str(self.device)) as reader:
            return read_full_state(reader, projected=set(self.optimizer.owned) if self.sharded else None)

    def load_checkpoint(self, path: Path) -> ResumePoint:
        root = Path(path)
        error, record, opt_state = None, None, None
        try:
            record = verify_checkpoint(root)
            load_model_state(self.model, read_model_state(root, record, self.device), f"checkpoint {root}")
            opt_state = self._read_optimizer_state(root, record)
            mine = root / trainer_shard_file(self.rank)
            if self.rank < int(record.get("ranks", 1)) and mine.is_file():
                record["rng"] = json.loads(mine.read_text(encoding="utf-8"))["rng"]
        except CheckpointError as exc:
            error = str(exc)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            error = f"checkpoint {root} cannot be loaded on rank {self.rank}: {exc}"
        self._agree(error, CheckpointError, f"loading checkpoint {root}")
        if self.sharded:
            try:
                with self._guard(f"loading checkpoint {root}"):
                    self.optimizer.load_state_dict(opt_state)  # collective; raises on every rank alike
            except ValueError as exc:
                raise CheckpointError(f"checkpoint {root}: {exc}") from exc
        else:
            error = None
            try:
                self.optimizer.load_state_dict(opt_state)
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                error = f"checkpoint {root}: optimizer state does not fit this run ({exc})"
            self._agree(error, CheckpointError, f"loading checkpoint {root}")
        return ResumePoint(int(record["step"]), record)

    # --- end -------------------------------------------------------------------------------------------------
    def export(self, model: nn.Module, out_dir: str | Path, tokenizer: Any, dtype: torch.dtype) -> Path | None:
        return super().export(self.model, out_dir, tokenizer, dtype)
