"""Rank side of ``tests/parity/test_ddp_engine.py``, and its launcher: the real CLI (``qgalore_dist.train.cli.main``) with
``--engine ddp`` in forked ranks.

``python tests/ddp_engine_worker.py SPEC.json`` imports torch, transformers and qgalore_dist once, then forks every
rank of every world in ``WORLDS``; each rank runs the scenarios of :func:`scenarios` in order, each a
``main(argv)`` call joining a fresh process group through torchrun-style variables (127.0.0.1; the port of each
world and scenario is picked by its rank 0 just before, see :func:`agree_port`). After each scenario the rank rewrites ``OUT/w{W}_r{R}.json``: exit status, the
one ``error:`` line, per-step losses, and checksums of its final model (taken when the engine closes).

Global batch 6 in every world (``--batch-size 3`` at world 2, ``2`` at world 3) so each world, and the single-device
run with ``--batch-size 6`` the test computes meanwhile, see the same samples; ``--dtype float64`` with the RMSNorm
patch below makes the runs agree to ~1e-16, so INT8 codes can be compared exactly.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import join_within  # noqa: E402

WORLDS = (2, 3)
GLOBAL_BATCH = 6
STEPS = 6
SAVE_EVERY = 3
DIST_TIMEOUT = 20  # seconds: the dead-rank scenario must end within it
DIES_AT = 2  # the dying rank exits inside its optimizer step of this step number
HANG_TIMEOUT = 8  # seconds: --dist-timeout of the scenario where the last rank stops answering
HANG_FOR = 16  # seconds the hanging rank sleeps inside its step DIES_AT (alive, sockets open)


def base_args(spec: dict, batch: int, *extra: str) -> list[str]:
    """The settings every run shares (single-device reference included): llama_tiny in fp64 on a 512-token BPE,
    refreshes every 3 steps (staggered), clipping on (the CLI default); a failure in a collective costs at most
    60 s instead of the default 300 (not for ``--engine local``: it communicates nothing and refuses the flag)."""
    local = ("--engine", "local") in zip(extra, extra[1:])
    return ["--model", "llama_tiny", "--tokenizer", spec["tok"], "--data", spec["corpus"], "--seq-len", "32",
            "--batch-size", str(batch), "--rank", "8", "--update-proj-gap", "3", "--eval-batches", "2",
            "--eval-every", "0", "--warmup-steps", "2", "--lr", "0.01", "--log-every", "1000", "--dtype", "float64",
            "--device", "cpu", "--max-steps", str(STEPS), *([] if local else ["--dist-timeout", "60"]), *extra]


def rmsnorm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm computes in fp32 even for fp64 inputs, rounding gradients scaled by 1/(3T) on one
    device and (1/T)/3 across 3 ranks differently (tests/ddp_worker.py explains): compute in the input dtype."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def patch_rmsnorm():
    """Class-level patch (undo with the returned function)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    orig = LlamaRMSNorm.forward
    LlamaRMSNorm.forward = rmsnorm_in_input_dtype
    return lambda: setattr(LlamaRMSNorm, "forward", orig)


def checksums(model) -> dict[str, int]:
    from qgalore_dist.parallel.replicas import tensor_checksum

    return {k: tensor_checksum(v) for k, v in model.state_dict().items()}


def digest(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def flip_byte(path: Path) -> None:
    """Corrupt one byte of a safetensors file's data (past its header), keeping the size."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    pos = 8 + header + (len(data) - 8 - header) // 2
    data[pos] ^= 0x5A
    path.write_bytes(bytes(data))


def agree_port(out: Path, world: int, rank: int, name: str) -> int:
    """MASTER_PORT of one scenario: rank 0 takes a free port from the OS right before it binds the store there and
    publishes it in a file. (Ports reserved for the whole module in advance can be taken meanwhile by the ephemeral
    ports of gloo's own connections — then the store cannot bind and the other ranks wait out --dist-timeout.)"""
    f = out / f"port_w{world}_{name}"
    if rank == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tmp = f.with_name(f.name + ".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, f)
        return port
    deadline = time.monotonic() + 300
    while not f.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 never published {f.name}")
        time.sleep(0.05)
    return int(f.read_text())


def scenarios(spec: dict, world: int, rank: int) -> list[tuple[str, list[str]]]:
    """(name, argv) in the order every rank of ``world`` runs them."""
    out = Path(spec["out"])
    b = GLOBAL_BATCH // world
    other = [w for w in WORLDS if w != world][0]
    w = f"w{world}"
    return [
        ("lowrank", base_args(spec, b, "--engine", "ddp", "--comm-mode", "lowrank", "--save-dir",
                              str(out / f"{w}_lowrank"), "--save-every", str(SAVE_EVERY),
                              "--metrics-jsonl", str(out / f"{w}_lowrank.jsonl"))),
        ("full", base_args(spec, b, "--engine", "ddp", "--comm-mode", "full", "--save-dir", str(out / f"{w}_full"),
                           "--metrics-jsonl", str(out / f"{w}_full.jsonl"), "--export", str(out / f"{w}_export"), "--export-dtype", "float32")),
        ("resume", base_args(spec, b, "--engine", "ddp", "--comm-mode", "lowrank", "--resume",
                             str(out / f"{w}_lowrank" / "step_000003"), "--metrics-jsonl",
                             str(out / f"{w}_resume.jsonl"))),
        # the other world's checkpoint: another ownership plan, shards merged, each rank takes what it owns
        ("reshard", base_args(spec, b, "--engine", "ddp", "--comm-mode", "lowrank", "--resume",
                              str(out / f"w{other}_lowrank" / "step_000003"), "--metrics-jsonl",
                              str(out / f"{w}_reshard.jsonl"))),
        # the single-device reference's checkpoint (written by the test meanwhile): one optimizer file, split here
        ("from_local", base_args(spec, b, "--engine", "ddp", "--comm-mode", "lowrank", "--resume",
                                 str(Path(spec["ref"]) / "step_000003"))),
        ("accum_boundary", base_args(spec, b, "--engine", "ddp", "--comm-mode", "full", "--grad-accum", "2",
                                     "--max-steps", "3", "--metrics-jsonl", str(out / f"{w}_accum_boundary.jsonl"))),
        ("accum_micro", base_args(spec, b, "--engine", "ddp", "--comm-mode", "full", "--grad-accum", "2",
                                  "--full-reduce", "micro_batch", "--max-steps", "3", "--metrics-jsonl",
                                  str(out / f"{w}_accum_micro.jsonl"))),
        ("bf16_wire", base_args(spec, b, "--engine", "ddp", "--update-dtype", "bfloat16", "--max-steps", "3",
                                "--metrics-jsonl", str(out / f"{w}_bf16_wire.jsonl"))),
        ("adamw", base_args(spec, b, "--engine", "ddp", "--optimizer", "adamw", "--max-steps", "3",
                            "--metrics-jsonl", str(out / f"{w}_adamw.jsonl"))),
        # the last rank starts with another learning rate: the start-up agreement must stop every rank
        ("mismatch", base_args(spec, b, "--engine", "ddp", *(["--lr", "0.02"] if rank == world - 1 else []))),
        ("corrupt", base_args(spec, b, "--engine", "ddp", "--save-dir", str(out / f"{w}_corrupt"), "--resume",
                              "auto", "--max-steps", "8")),
        ("hangs", base_args(spec, b, "--engine", "ddp", "--dist-timeout", str(HANG_TIMEOUT))),
        ("dies", base_args(spec, b, "--engine", "ddp", "--dist-timeout", str(DIST_TIMEOUT))),
    ]


def _rank(spec: dict, world: int, rank: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from qgalore_dist.train.cli import main
    from qgalore_dist.train.engines.ddp import DDPEngine

    out = Path(spec["out"])
    record: dict = {"world": world, "rank": rank, "scenarios": {}}
    closed: dict = {}
    orig_close, orig_step = DDPEngine.close, DDPEngine.step

    def close(self):
        if self.model is not None:
            closed["checksums"] = checksums(self.model)
            closed["ddp_wrapped"] = self.wrapped is not None
            closed["param_bytes"] = sum(p.numel() * p.element_size() for p in self.model.parameters()
                                        if p.requires_grad)
        orig_close(self)

    DDPEngine.close = close

    def save():
        (out / f"w{world}_r{rank}.json").write_text(json.dumps(record))

    for name, argv in scenarios(spec, world, rank):
        res: dict = {}
        if name == "corrupt" and rank == 0:
            # a copy of this world's final lowrank checkpoint with one byte of rank 1's optimizer shard flipped
            src, dst = out / f"w{world}_lowrank" / "step_000006", out / f"w{world}_corrupt" / "step_000006"
            shutil.copytree(src, dst)
            flip_byte(dst / "optimizer_rank00001.safetensors")
            res["digest_before"] = digest(dst.parent)
        if name in ("reshard", "from_local"):  # wait (bounded) for the other run's checkpoint
            ckpt = Path(argv[argv.index("--resume") + 1]) / "trainer.json"
            deadline = time.monotonic() + 240
            while not ckpt.is_file() and time.monotonic() < deadline:
                time.sleep(0.5)
        if name == "hangs" and rank == world - 1:
            def hanging_step(self, _count=[0]):
                _count[0] += 1
                if _count[0] == DIES_AT:
                    res["hung_at"] = time.time()
                    time.sleep(HANG_FOR)  # then steps into a group its peers have left: fails at once
                return orig_step(self)
            DDPEngine.step = hanging_step
        if name == "dies" and rank == world - 1:
            def dying_step(self, _count=[0]):
                _count[0] += 1
                if _count[0] == DIES_AT:
                    record["scenarios"]["dies"] = {"died_at": time.time()}
                    save()
                    os._exit(1)
                return orig_step(self)
            DDPEngine.step = dying_step
        os.environ["MASTER_PORT"] = str(agree_port(out, world, rank, name))
        closed.clear()
        err = io.StringIO()
        t0 = time.time()
        try:
            with contextlib.redirect_stderr(err):
                result = main(argv)
            res.update(exit=0, losses=result.losses, steps=result.steps, start_step=result.start_step,
                       export_dir=result.export_dir, evals=result.evals)
        except SystemExit as exc:
            res["exit"] = exc.code
        except BaseException:
            res.update(exit="exception", traceback=traceback.format_exc())
        res.update(stderr=err.getvalue(), seconds=time.time() - t0, ended_at=time.time(), **closed)
        if name == "corrupt" and rank == 0:
            res["digest_after"] = digest(out / f"w{world}_corrupt")
        record["scenarios"][name] = res
        DDPEngine.step = orig_step
        save()
    os._exit(0)


def launch(spec_path: str) -> int:
    """Import once, fork every rank of every world, wait (bounded), kill stragglers."""
    import multiprocessing as mp

    import transformers.models.llama.modeling_llama  # noqa: F401  (heavy imports shared by the forked ranks)

    import qgalore_dist.train.engines.ddp  # noqa: F401
    import qgalore_dist.train.loop  # noqa: F401

    spec = json.loads(Path(spec_path).read_text())
    patch_rmsnorm()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(spec, world, rank))
             for world in WORLDS for rank in range(world)]
    return join_within(procs, spec.get("limit_s", 420))


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1]))
