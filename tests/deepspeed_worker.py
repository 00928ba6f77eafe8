"""Rank side of ``tests/parity/test_deepspeed.py``, started the way users start DeepSpeed::

    deepspeed --num_accelerators 2 --master_port P tests/deepspeed_worker.py OUT_DIR

Every rank joins the default group once (:func:`qgalore_dist.parallel.launch_env.init_distributed`, from the launcher's
``RANK`` / ``WORLD_SIZE`` / ``MASTER_*``), then runs every scenario of ``OUT_DIR/scenarios.json`` in order through
the real CLI path — ``parse_args(argv)`` → :class:`~qgalore_dist.train.engines.deepspeed.DeepSpeedEngine` →
``train`` — each with its own ds_config (ZeRO-1/2/3). After each scenario it records, per rank, the losses, this
rank's SVD count and resident bytes, and each step's byte metrics (the side-car's ``comm_bytes``, DeepSpeed's
``dense_comm_bytes`` — measured, where the ds_config enables its comms logger — and ``dense_comm_bytes_est``)
(``OUT_DIR/<name>_r<R>.json``), and rank 0 writes the final model as float
tensors (``<name>.pt``: projected matrices dequantised, ZeRO-3's rows and dense partitions gathered).
Failures are recorded (``error``) instead of ending the process, so one broken scenario does not hide the rest.
A scenario may give each rank its own argv (``rank_argv``: ranks started with different settings); the last one,
``dies``, has rank 1 leave in the middle of training (its sockets close) and rank 0 record the error it ended with.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

_COMM_KEYS = ("comm_bytes", "dense_comm_bytes", "dense_comm_calls", "dense_comm_bytes_est")


def _final_state(engine) -> dict[str, torch.Tensor] | None:
    """The whole model in float on rank 0 (collective under ZeRO-3)."""
    from qgalore_dist.checkpoint.export import dequantized_state_dict, quantized_modules

    if engine.stage == 3:
        return engine.sidecar.full_state(engine.module, engine.is_main)
    if not engine.is_main:
        return None
    module = engine.module
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return dequantized_state_dict(state, quantized_modules(module))


def _leave_at_backward(engine, n: int, out: Path, name: str, rank: int) -> None:
    """Make this rank leave (process exit: its sockets close) on its ``n``-th backward, after writing its record."""
    calls = [0]
    backward = engine.backward

    def wrapped(loss):
        calls[0] += 1
        if calls[0] == n:
            (out / f"{name}_r{rank}.json").write_text(json.dumps({"name": name, "left": True}), encoding="utf-8")
            os._exit(0)
        backward(loss)

    engine.backward = wrapped


def run(out: Path, name: str, argv: list[str], rank: int) -> None:
    from qgalore_dist.checkpoint.save_load import CheckpointError
    from qgalore_dist.errors import DistributedError, DivergenceError, UsageError
    from qgalore_dist.train.cli import parse_args
    from qgalore_dist.train.engines import make_engine
    from qgalore_dist.train.loop import train

    rec: dict = {"name": name}
    t0 = time.monotonic()
    try:
        args = parse_args(argv)
        try:
            engine = make_engine(args)
            if name.endswith("_start"):  # start-up only: the model as each rank materialised it, gathered
                from qgalore_dist.train.loop import _prepare

                try:
                    _prepare(args, engine)
                    rec.update(memory=engine.memory_bytes())
                    state = _final_state(engine)
                finally:
                    engine.close()
                if state is not None:
                    torch.save(state, out / f"{name}.pt")
                (out / f"{name}_r{rank}.json").write_text(json.dumps(rec), encoding="utf-8")
                return
            if name == "dies" and rank == 1:
                _leave_at_backward(engine, 2, out, name, rank)
            step_metrics, comm = engine.step_metrics, []

            def recorded():  # the loop asks once per optimizer step
                m = step_metrics()
                comm.append({k: m[k] for k in _COMM_KEYS if k in m})
                return m

            engine.step_metrics = recorded
            result = train(args, engine)
        except (CheckpointError, UsageError) as exc:
            rec["user_error"] = f"{type(exc).__name__}: {exc}"
        except DivergenceError as exc:
            rec["diverged"] = str(exc)
        except DistributedError as exc:
            rec["dist_error"] = str(exc)
            rec["seconds"] = time.monotonic() - t0
        else:
            rec.update(losses=result.losses, steps=result.steps, rank_svd_count=int(engine.sidecar.svd_count),
                       step_comm=comm, last_ds_comm=engine.last_ds_comm,
                       memory=engine.memory_bytes(), gather_calls=getattr(engine.sidecar, "gather_calls", 0),
                       export_dir=result.export_dir, checkpoints=result.checkpoints)
            state = _final_state(engine)
            if state is not None:
                torch.save(state, out / f"{name}.pt")
    except Exception:  # noqa: BLE001 - recorded for the test, which fails with the traceback
        rec["error"] = traceback.format_exc()
    (out / f"{name}_r{rank}.json").write_text(json.dumps(rec), encoding="utf-8")


def main() -> None:
    # the deepspeed launcher passes --local_rank=N first (the rank itself comes from the environment)
    out = Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
    import datetime

    from qgalore_dist.parallel.launch_env import init_distributed

    denv = init_distributed("gloo", timeout=datetime.timedelta(seconds=240))
    scenarios = json.loads((out / "scenarios.json").read_text(encoding="utf-8"))
    for sc in scenarios:
        if "corrupt" in sc:
            src, dst, victim = sc["corrupt"]
            if denv.rank == 0:
                shutil.copytree(src, dst)
                with open(Path(dst) / victim, "r+b") as fh:
                    fh.seek(-1, 2)
                    last = fh.read(1)
                    fh.seek(-1, 2)
                    fh.write(bytes([last[0] ^ 0xFF]))
            torch.distributed.barrier()
        run(out, sc["name"], sc["rank_argv"][denv.rank] if "rank_argv" in sc else sc["argv"], denv.rank)
    if any(sc["name"] == "dies" for sc in scenarios):
        os._exit(0)  # the group lost rank 1: no final barrier nor destroy_process_group
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
