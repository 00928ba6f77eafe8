"""The FSDP2 engine (``--engine fsdp``): torch ``fully_shard`` over INT8 weights, one process per device, launched by
``torchrun`` or ``mpirun`` (rank discovery: :func:`qgalore_dist.parallel.launch_env.init_distributed`).

* Every decoder layer and the root are ``fully_shard``-ed on a 1-D mesh: parameters are split by rows like
  ``torch.chunk`` (uneven and empty shards included). Projected weights are
  :class:`~qgalore_dist.nn.int8_fsdp.Int8RowTensor` parameters — FSDP2 all-gathers their INT8 codes + scales
  (``1 + 4/g`` bytes per element) and the layer dequantises after the gather; dense parameters (embeddings, norms,
  ``lm_head``) are ordinary sharded parameters.
* Gradients are reduce-scattered by FSDP2 into ``Shard(0)`` DTensors. FSDP2 is told to reduce with plain sums
  (``set_force_sum_reduction_for_comms``) and divides by N itself afterwards: gloo has no AVG reduction, and
  pytorch issue #162338 reports FSDP2 summing instead of averaging on gloo; the tests check the mean against a
  single-device reference.
* ``--optimizer qgalore|projfactor|galore``: :class:`~qgalore_dist.parallel.row_sharded.RowShardedQGaLoreOptimizer`
  (the row-sharded placement: any rule, granularity, projection) over the local rows, and AdamW (8-bit for the INT8
  optimizers) over the dense shards; ``--optimizer adamw8bit``: the same placement with no projected matrices.
  ``--optimizer adamw``: FSDP2 + ``torch.optim.AdamW`` over the float model (the baseline).
* Gradient accumulation (``--fsdp-grad-sync``): ``micro_batch`` (default) reduce-scatters every micro-batch's
  gradients (``grad_accum`` times the gradient traffic; each rank holds 1/N of the gradient); ``boundary`` calls
  ``set_requires_gradient_sync(False)`` before every micro-batch but the last, so FSDP2 keeps each rank's
  *unsharded* gradient of every parameter — the whole model's gradient per rank, fp32 — until the step.
* Checkpoints (``<save-dir>/step_NNNNNN/``), resumable at **any** world size: ``dcp/`` written with
  ``torch.distributed.checkpoint`` — INT8 codes and scales of every projected weight and the dense parameters as
  row-sharded DTensors keyed by parameter name (DCP reshards them on load) —; ``optimizer_rank<R>.safetensors`` /
  ``.json``, each rank's optimizer state as pieces of the whole single-device tensors
  (:mod:`qgalore_dist.checkpoint.pieces`; where each piece lies: ``RowShardedQGaLoreOptimizer.checkpoint_state``), from
  which a run at any world size reads its own rows (``load_pieces``); ``trainer_rank<R>.json`` (RNG), the tokenizer
  and ``trainer.json`` (run record + sha256 manifest of every file) written last. All ranks write into one
  ``.tmp-<pid of rank 0>`` directory that rank 0 publishes by rename. Resuming verifies every hash first.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ...checkpoint.pieces import PieceReader, write_pieces
from ...checkpoint.save_load import (
    DCP_DIR,
    FSDP_LAYOUT,
    MODEL_SHARDS_KEY,
    MODEL_STEM,
    SHARDS_KEY,
    TOKENIZER_DIR,
    CheckpointError,
    capture_rng_state,
    checkpoint_name,
    finalize_checkpoint,
    list_checkpoints,
    model_files,
    optimizer_files,
    publish_checkpoint,
    restore_rng_state,
    trainer_shard_file,
    verify_checkpoint,
    write_optimizer,
)
from ...errors import ModelSpecError, UsageError
from ...models.arch import decoder_layer_modules
from ...nn.int8_fsdp import ALL_GATHER_COUNTER, Int8RowTensor, to_fsdp_int8
from ...nn.int8_linear import QGaLoreLinear
from ...nn.materialize import PendingModel, allocate_and_fill
from ...parallel.collectives import Collectives
from ...parallel.launch_env import DistEnv, init_distributed
from ...parallel.row_sharded import RowShard, RowShardedQGaLoreOptimizer, chunk_rows
from ..args import INT8_OPTIMIZERS, LOWRANK_OPTIMIZERS, TrainArgs
from .base import ResumePoint
from .distributed import DistributedEngine, joining, rank_backend

__all__ = ["FSDPEngine"]



class FSDPEngine(DistributedEngine):
    """FSDP2 training over row-sharded INT8 weights (see the module docstring)."""

    name = "fsdp"

    def __init__(self, args: TrainArgs, env: DistEnv, timeout: datetime.timedelta, config=None) -> None:
        """``config``: the projected-matrix settings (default: ``qgalore_config(args)``, what the CLI asks for)."""
        self.args = args
        self.config = config
        self.env = env
        self.rank, self.world_size, self.device = env.rank, env.world_size, env.device
        self.timeout = timeout
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.collectives: Collectives | None = None
        self.mesh = None
        self.fsdp_modules: list[nn.Module] = []
        self.projected: dict[str, tuple[nn.Module, nn.Parameter]] = {}  # parameter name -> (module, sharded param)
        self.rows: dict[str, list[int]] = {}
        self._micro = 0
        self._last_int8 = ALL_GATHER_COUNTER.reset()
        self._closed = False

    # --- set-up ----------------------------------------------------------------------------------------------
    sharded_start = True

    @classmethod
    def from_args(cls, args: TrainArgs) -> "FSDPEngine":
        backend = rank_backend(args)
        timeout = datetime.timedelta(seconds=args.dist_timeout)
        with joining(args):
            env = init_distributed(backend, timeout=timeout)
        return cls(args, env, timeout)._started()

    def prepare(self, model: nn.Module, make_opt: Callable[[nn.Module], torch.optim.Optimizer]
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from ..optimizers import qgalore_config

        args = self.args
        # sharded start: the model arrives on the meta device and each rank allocates and fills only its rows
        # after fully_shard has laid it out (FSDP2's meta-device initialisation; the INT8 row tensor allocates its
        # codes + scales shard through empty_like); a materialised model (library use) is moved as before
        pending = model if isinstance(model, PendingModel) else None
        model = pending.model if pending is not None else model.to(self.device)
        compute = next(p.dtype for p in model.parameters() if p.is_floating_point())
        lowrank = args.optimizer in LOWRANK_OPTIMIZERS
        # adamw8bit: the row-sharded placement with no projected matrices — 8-bit blocks inside the rows of each
        # parameter's row shard (so the same state at any N), the clipping norm over all shards
        placed = lowrank or args.optimizer == "adamw8bit"
        targets: set[str] = set()
        config = self.config if self.config is not None else (qgalore_config(args) if placed else None)
        if lowrank:
            targets = self._target_names(model, config)
            to_fsdp_int8(model, compute)  # every QGaLoreLinear's codes + scales -> an Int8RowTensor Parameter
        elif any(isinstance(m, QGaLoreLinear) for m in model.modules()):
            raise UsageError(f"--engine fsdp: --optimizer {args.optimizer} trains a float model, but this one "
                             "holds INT8 weights")
        # one rank: nothing to shard or gather, and FSDP2's world-size-1 shortcut hands an all-gather extension only
        # its first input (the codes, not the scales), so the model stays unwrapped
        if self.world_size > 1:
            with self._guard("FSDP2 start-up (device mesh, sharding)"):
                self.mesh = init_device_mesh(self.device.type, (self.world_size,))
                # every decoder layer of any architecture (the classes transformers never splits), each its own
                # unit: gathered for its forward / backward only
                try:
                    layers = decoder_layer_modules(model)
                except ModelSpecError as exc:
                    raise UsageError(f"--engine fsdp: {exc}") from exc
                for layer in layers:
                    fully_shard(layer, mesh=self.mesh, reshard_after_forward=True)
                    self.fsdp_modules.append(layer)
                fully_shard(model, mesh=self.mesh)  # the root stays gathered from forward to backward (default)
            self.fsdp_modules.append(model)
            self._guard_forward(model)
        for m in self.fsdp_modules:
            # sums on the wire, one explicit ÷N (gloo has no AVG; pytorch issue #162338)
            m.set_force_sum_reduction_for_comms(True)
        if pending is not None:
            allocate_and_fill(model, pending.source, self.device)
            model.train()
        self.model = model
        if not placed:
            self.optimizer = make_opt(model)
            return model, self.optimizer
        self.collectives = Collectives(timeout=self.timeout)
        shards, dense, dense_shapes = [], [], {}
        proj_ids = set()
        for mod_name, mod in model.named_modules():
            pname = f"{mod_name}.weight"
            if pname not in targets:
                continue
            p = mod.weight
            m, n = int(p.shape[0]), int(p.shape[1])
            rows = chunk_rows(m, self.world_size)
            self.projected[pname] = (mod, p)
            self.rows[pname] = rows
            proj_ids.add(id(p))
            if isinstance(mod, QGaLoreLinear) and mod.source.kind == "fsdp":
                def weight(p=p):
                    with torch.no_grad():
                        return p.to_local().int8_weight() if hasattr(p, "to_local") else p.int8_weight()
            else:
                def weight(p=p):
                    with torch.no_grad():
                        return p.to_local() if hasattr(p, "to_local") else p.data
            shards.append(RowShard(pname, (m, n), rows, weight, param=p))
        dense_offsets = {}
        for n, p in model.named_parameters():
            if p.requires_grad and id(p) not in proj_ids:
                dense.append((n, p))
                dense_shapes[n] = tuple(p.shape)
                # FSDP2 shards dim 0 like torch.chunk: the global index of this rank's first element (keys the
                # stochastic rounding of bf16 dense weights as on one device)
                rows = chunk_rows(int(p.shape[0]), self.world_size) if p.dim() else [1]
                dense_offsets[n] = sum(rows[:self.rank]) * (p.numel() // max(1, int(p.shape[0]) if p.dim() else 1))
        try:
            with self._guard("start-up of the row-sharded optimizer"):
                self.optimizer = RowShardedQGaLoreOptimizer(
                    shards, config, self.collectives, dense=dense, dense_shapes=dense_shapes,
                    dense_offsets=dense_offsets,
                    dense_state_bits=8 if args.optimizer in (*INT8_OPTIMIZERS, "adamw8bit") else 32,
                    grad_clip=args.grad_clip, stagger_refresh=True)
        except ValueError as exc:
            raise UsageError(f"--engine fsdp: {exc}") from exc
        return model, self.optimizer

    def _guard_forward(self, model: nn.Module) -> None:
        """The loop calls the model itself, and FSDP2 all-gathers the parameters in forward (the root's in a
        pre-forward hook): give this one instance a class whose ``__call__`` runs under :meth:`_guard`, the way
        ``fully_shard`` itself swaps in an ``FSDP<Module>`` class, so a dead peer in forward is one error line."""
        engine, cls = self, type(model)

        def __call__(module, *args, **kwargs):
            with engine._guard("forward (FSDP2 all-gather)"):
                return cls.__call__(module, *args, **kwargs)

        def __new__(_, *args, **kwargs):  # a new instance (deepcopy, container slicing) gets fully_shard's class
            return cls.__new__(cls, *args, **kwargs)

        model.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__new__": __new__,
                                                      "__module__": cls.__module__})

    def _target_names(self, model: nn.Module, config) -> set[str]:
        from ...optim.optimizer import collect_projected

        try:
            return {pm.name for pm in collect_projected(model, config, tuple(self.args.target_module_list))}
        except ValueError as exc:
            raise UsageError(f"--engine fsdp: {exc}") from exc

    # --- step ------------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self._micro += 1
        if self.args.fsdp_grad_sync == "boundary" and self.args.grad_accum > 1:
            last = self._micro % self.args.grad_accum == 0
            for m in self.fsdp_modules:
                m.set_requires_gradient_sync(last, recurse=False)
        with self._guard("backward (FSDP2 all-gather / reduce-scatter)"):
            loss.backward()

    def step(self) -> float | None:
        if isinstance(self.optimizer, RowShardedQGaLoreOptimizer):
            grads = {}
            for name, (_, p) in self.projected.items():
                g = p.grad
                grads[name] = None if g is None else (g.to_local() if hasattr(g, "to_local") else g)
            with self._guard("optimizer step"):
                self.optimizer.step(grads=grads)
        else:
            with self._guard("optimizer step"):
                self.optimizer.step()
        # the gradient shards are spent: FSDP2 keeps them as fp32 (4 bytes per weight element / N, four times the
        # INT8 weights) until the next zero_grad, through evaluation and checkpointing — free them now
        self.optimizer.zero_grad(set_to_none=True)
        return self.optimizer.last_step.grad_norm

    def zero_grad(self) -> None:
        self._micro = 0  # a new accumulation window: the grad_accum-th backward after this one syncs
        self.optimizer.zero_grad(set_to_none=True)

    def step_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(ALL_GATHER_COUNTER.reset())
        opt = self.optimizer
        if isinstance(opt, RowShardedQGaLoreOptimizer):
            out["comm_bytes"] = opt.comm_bytes
            svd = torch.tensor([opt.svd_count], dtype=torch.int64, device=self.device)
            if self.world_size > 1:
                with self._guard("summing SVD counts"):
                    dist.all_reduce(svd)
            out["svd_count"] = int(svd)
        return out

    # --- checkpoints -----------------------------------------------------------------------------------------
    def list_checkpoints(self, save_dir: str | Path) -> list[tuple[int, Path]]:
        return list_checkpoints(save_dir)

    def verify_checkpoint(self, path: Path) -> dict[str, Any]:
        """Format, world size and every file's size + sha256 against ``trainer.json``'s manifest (every rank
        checks; any failure raises :class:`CheckpointError` on every rank)."""
        error, record = None, {}
        try:
            record = self._verify(Path(path))
        except CheckpointError as exc:
            error = str(exc)
        self._agree(error, CheckpointError, f"verifying checkpoint {path}")
        return record

    def _verify(self, root: Path) -> dict[str, Any]:
        """Any checkpoint of the local, ddp or fsdp engine at any world size (hashes checked)."""
        record = verify_checkpoint(root)
        placed = self.args.optimizer in LOWRANK_OPTIMIZERS or self.args.optimizer == "adamw8bit"
        if not placed and (record.get("fsdp_format") is None or SHARDS_KEY in record):
            raise CheckpointError(f"checkpoint {root}: --optimizer {self.args.optimizer} under --engine fsdp keeps "
                                  f"torch AdamW's state in {DCP_DIR}/ and resumes only its own fsdp checkpoints "
                                  f"(this one was written by --engine {record.get('engine')})")
        return record

    def _model_pieces(self) -> Iterator[tuple[str, torch.Tensor, Int8RowTensor | None, int]]:
        """``(state name, this rank's tensor, INT8 holder or None, global rows)`` of every model tensor this rank
        holds: INT8 weights as ``<name>_codes`` / ``_scales`` (as ``model.state_dict()`` names them on one device),
        dense parameters as their local row shard (FSDP2 splits dim 0 like ``torch.chunk``)."""
        from torch.distributed.tensor import DTensor

        self._reshard()
        for n, p in self.model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            m = int(p.shape[0]) if p.dim() else 1
            if isinstance(local, Int8RowTensor):
                yield f"{n}_codes", local.codes, local, m
                yield f"{n}_scales", local.scales, local, m
            else:
                yield n, local.data if isinstance(local, nn.Parameter) else local, None, m

    def _row0(self, m: int) -> int:
        return sum(chunk_rows(m, self.world_size)[:self.rank])

    def _write_model(self, directory: Path) -> None:
        """This rank's rows of every model tensor as pieces of the whole (:mod:`...checkpoint.pieces`), rank 0 the
        persistent buffers — the model layout any engine reads at any world size."""
        tensors, starts = {}, {}
        for name, t, _, m in self._model_pieces():
            tensors[name] = t.detach()
            starts[name] = (self._row0(m), 0) if t.dim() else None
        if self.is_main:
            keys = set(self.model.state_dict())
            for n, b in self.model.named_buffers():
                if n in keys:
                    tensors[n], starts[n] = b.detach(), None
        write_pieces(directory, MODEL_STEM, self.rank, {k: {"__tensor__": k} for k in tensors}, tensors, starts)

    def _load_model(self, reader) -> None:
        """This rank's rows of every parameter and the buffers from any engine's model (``reader``: the
        checkpoint's model pieces, or its whole ``model.safetensors``): only these rows are read."""
        with torch.no_grad():
            for name, t, _, m in self._model_pieces():
                got = reader.rows(name, self._row0(m), int(t.shape[0])) if t.dim() else reader.full(name)
                if tuple(got.shape) != tuple(t.shape):
                    raise CheckpointError(f"{reader.root}: {name} has {tuple(got.shape)} for this rank's rows, "
                                          f"the model {tuple(t.shape)}")
                t.copy_(got)
            have = set(reader.keys())
            for n, b in self.model.named_buffers():
                if n in have:
                    b.copy_(reader.full(n))

    def _dcp_optimizer(self) -> dict[str, Any]:
        """torch AdamW's state over the DTensors (``--optimizer adamw``), keyed by parameter name by DCP's own
        helper: saved and loaded with ``torch.distributed.checkpoint``, which reshards it."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        self._reshard()
        return {"optim": get_optimizer_state_dict(self.model, self.optimizer)}

    def _reshard(self) -> None:
        """Back to the sharded parameters: an evaluation forward (no backward) leaves the root gathered, and
        checkpoints / exports must see the row-sharded DTensors."""
        for m in self.fsdp_modules:
            m.reshard()

    def save_checkpoint(self, save_dir: str | Path, step: int, trainer_state: dict[str, Any],
                        tokenizer: Any) -> Path:
        import torch.distributed.checkpoint as dcp

        save_dir = Path(save_dir)
        final = save_dir / checkpoint_name(step)
        # one temporary directory for all ranks, named by rank 0's pid; broadcast from the engine's device (NCCL
        # only moves CUDA tensors)
        tag = torch.tensor([os.getpid()], dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            with self._guard("checkpoint set-up"):
                dist.broadcast(tag, 0)
        tmp = save_dir / f"{final.name}.tmp-{int(tag)}"
        error = None
        if self.is_main:
            try:
                save_dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as exc:
                error = f"cannot create {tmp}: {exc}"
        self._agree(error, CheckpointError, "creating the checkpoint directory")
        try:
            self._write_model(tmp)
            if isinstance(self.optimizer, RowShardedQGaLoreOptimizer):
                write_optimizer(tmp, self.rank, *self.optimizer.checkpoint_state())
            else:
                dcp.save(self._dcp_optimizer(), checkpoint_id=str(tmp / DCP_DIR))
            (tmp / trainer_shard_file(self.rank)).write_text(json.dumps({"rng": capture_rng_state()}), encoding="utf-8")
            if self.is_main and tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            error = None
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = f"writing checkpoint {tmp} failed on rank {self.rank}: {type(exc).__name__}: {exc}"
        self._agree(error, CheckpointError, "writing the checkpoint")
        if self.is_main:
            try:
                record = {**trainer_state, "fsdp_format": FSDP_LAYOUT, MODEL_SHARDS_KEY: self.world_size}
                if isinstance(self.optimizer, RowShardedQGaLoreOptimizer):
                    record[SHARDS_KEY] = self.world_size
                finalize_checkpoint(tmp, step, record)
                publish_checkpoint(tmp, final, int(tag))
            except Exception as exc:  # noqa: BLE001
                shutil.rmtree(tmp, ignore_errors=True)
                error = f"publishing checkpoint {final} failed: {exc}"
        self._agree(error, CheckpointError, "publishing the checkpoint")
        return final

    def load_checkpoint(self, path: Path) -> ResumePoint:
        import torch.distributed.checkpoint as dcp

        root = Path(path)
        error, rng = None, None
        try:
            record = self._verify(root)
            # RNG: per rank at the same world size; else the main rank's (every stream the step draws is keyed
            # globally — stochastic rounding, random projections — so this only matters to user code)
            mine = root / trainer_shard_file(self.rank)
            same = record.get("world_size") == self.world_size and mine.is_file()
            rng = json.loads(mine.read_text(encoding="utf-8"))["rng"] if same else record.get("rng")
        except (CheckpointError, OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            error = f"checkpoint {root}: {exc}"
        self._agree(error, CheckpointError, f"reading checkpoint {root}")
        try:
            with PieceReader(root, files=model_files(record)) as reader:
                self._load_model(reader)
            if not isinstance(self.optimizer, RowShardedQGaLoreOptimizer):
                state = self._dcp_optimizer()  # destination: the live tensors, loaded in place (DCP reshards them)
                dcp.load(state, checkpoint_id=str(root / DCP_DIR))
            error = None
        except Exception as exc:  # noqa: BLE001
            error = f"checkpoint {root} could not be loaded on rank {self.rank}: {exc}"
        self._agree(error, CheckpointError, f"loading checkpoint {root}")
        try:
            if isinstance(self.optimizer, RowShardedQGaLoreOptimizer):
                with PieceReader(root, files=optimizer_files(record)) as reader:
                    self.optimizer.load_pieces(reader)  # collective; this rank reads its share only
            else:
                from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

                set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {root}: optimizer state does not fit this run ({exc})") from exc
        if rng is not None:
            restore_rng_state(rng)
        return ResumePoint(int(record["step"]), record)

    # --- export ----------------------------------------------------------------------------------------------
    def _gathered(self) -> Iterator[tuple[str, Any]]:
        """Collective generator — every rank must run it to the end: each parameter and buffer whole, one at a
        time, on rank 0 (None on the others); an INT8 weight as ``(codes [m, n], scales [m, G], group size)``
        under its parameter name. At most one gathered tensor exists at a time."""
        from torch.distributed.tensor import DTensor

        self._reshard()
        coll = self.collectives or Collectives(timeout=self.timeout)
        for n, p in self.model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if isinstance(local, Int8RowTensor):
                rows = chunk_rows(int(p.shape[0]), self.world_size)
                codes = coll.gather_to(local.codes.detach(), 0, rows)
                scales = coll.gather_to(local.scales.detach(), 0, rows)
                yield n, ((codes.cpu(), scales.cpu(), local.group_size) if self.is_main else None)
            else:
                full = p.full_tensor() if isinstance(p, DTensor) else p
                yield n, (full.detach().cpu() if self.is_main else None)
        for n, b in self.model.named_buffers():
            yield n, (b.detach().cpu() if self.is_main else None)

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Collective: the whole model state on rank 0 (INT8 projected weights as ``<module>.weight_codes`` /
        ``_scales``, as a single-device ``QGaLoreLinear`` model stores them); None on other ranks."""
        out: dict[str, torch.Tensor] = {}
        for n, v in self._gathered():
            if isinstance(v, tuple):
                base = n[: -len(".weight")]
                out[f"{base}.weight_codes"], out[f"{base}.weight_scales"] = v[0], v[1]
            elif v is not None:
                out[n] = v
        return out if self.is_main else None

    def export(self, model: nn.Module, out_dir: str | Path, tokenizer: Any, dtype: torch.dtype) -> Path | None:
        """Streaming export: one matrix gathered to rank 0 and dequantised at a time, written shard by shard
        (rank 0 holds its share, one gathered matrix and the current <= 2 GB shard)."""
        from torch.distributed.tensor import DTensor

        from ...checkpoint.export import DequantizedTensors, export_tensors, merge_lora_stream
        from ...quant.int8 import dequantize_rows

        expected = set(_model_state_keys(self.model.config))
        int8 = [n.removesuffix(".weight") for n, p in self.model.named_parameters()
                if isinstance(p.to_local() if isinstance(p, DTensor) else p, Int8RowTensor)]

        # --method lora: each adapter merged into its gathered base weight as the stream passes (plain names)
        gathered = merge_lora_stream(self._gathered(), self.model)

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for n, v in gathered:
                if isinstance(v, tuple):
                    yield n, dequantize_rows(v[0], v[1], v[2], dtype)
                elif v is not None and n in expected:
                    yield n, (v.to(dtype) if v.is_floating_point() else v)

        with self._guard("gathering the model for --export"):
            if not self.is_main:
                for _ in self._gathered():  # the same collectives as rank 0's export, in order
                    pass
                return None
            try:
                return export_tensors(DequantizedTensors(tensors(), int8), self.model.config, out_dir, tokenizer,
                                      dtype=dtype)
            except BaseException:
                for _ in gathered:  # the other ranks are in these gathers: finish them, then fail
                    pass
                raise

    def memory_bytes(self) -> dict[str, int] | None:
        fn = getattr(self.optimizer, "memory_bytes", None)
        return fn() if fn is not None else None


def _model_state_keys(config) -> list[str]:
    from ...models import build_model

    return list(build_model(config, meta=True).state_dict())
