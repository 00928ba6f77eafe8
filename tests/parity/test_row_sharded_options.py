"""The ``row_sharded`` placement (what FSDP2 and ZeRO-3 run) with every rule and option, driven by plain gloo
processes at world sizes 2 and 3, against the single-device ``QGaLoreOptimizer`` in fp64.

Each configuration covers one cell of {qgalore, projfactor, galore (float)} × granularity {1/4, 1, 4} ×
projection {svd, rsvd, rademacher, gaussian} × moments on refresh {keep, rotate}; every value occurs at least once.
The matrices are chosen so that ``torch.chunk``'s boundaries cut merged VLoRP rows (``ceil(m/N)`` not a multiple
of the merge factor) at both world sizes, that a rank covers a merged row whose moments another rank holds, and
that one shard is empty at N = 3.

The gradient of each matrix is a fixed function of the current (gathered) weights and the step, so any code that
differs changes every later step. Every rank holds the whole toy model, steps its rows through the placement and
all-gathers the rows for the next gradient; the reference steps the same model on one process. Compared: every
INT8 code and scale bit for bit, the clipping norm per step within 1e-10, the job's SVD count.

One launcher process forks every rank of both worlds once for the module (tests/parity/test_collectives.py's pattern).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from helpers import join_within

WORLDS = (2, 3)
STEPS = 7
CLIP = 0.05  # small enough that most steps clip
# (m, n): right-projected (m >= n) and left-projected (m < n) matrices; merged rows cut at N = 2 and 3
# "l4": left, c = 1/4 fits, and its third shard is empty at N = 3 (an empty shard must still project to [r, n'])
SHAPES = {"r44": (44, 16), "r16": (16, 8), "l20": (20, 48), "l12": (12, 40), "l4": (4, 40), "tiny": (2, 2),
          "dense": (6, 10)}
CONFIGS = {
    "qgalore_svd": dict(),
    "qgalore_merge_right_rotate": dict(granularity=0.25, moments_on_refresh="rotate"),
    "qgalore_merge_left_rademacher": dict(granularity=4.0, projection="rademacher"),
    "projfactor_svd": dict(optimizer="projfactor"),
    "projfactor_merge_right_rsvd": dict(optimizer="projfactor", granularity=0.25, projection="rsvd"),
    "projfactor_merge_left_gaussian": dict(optimizer="projfactor", granularity=4.0, projection="gaussian"),
    "galore_rotate_square": dict(quantize=False, moments_on_refresh="rotate", granularity=0.25),
    "qgalore_rsvd_keep_8bit": dict(projection="rsvd", state_bits=8),
    # a rule added as one file (optim/lion.py): on this placement with no change to it
    "lion_merge_rotate": dict(optimizer="lion", granularity=0.25, moments_on_refresh="rotate", lr=2e-3),
}


def qcfg(**kw):
    from qgalore_dist import QGaLoreConfig

    base = dict(rank=4, update_proj_gap=3, scale=0.25, lr=2e-2, weight_group_size=8, proj_group_size=8,
                state_min_numel=32, state_block_size=16, state_bits=32, fused=False, granularity_fallback=True,
                gate=False)
    base.update(kw)
    return QGaLoreConfig(**base)


class Toy(torch.nn.Module):
    """The matrices of :data:`SHAPES` as INT8 :class:`QGaLoreLinear` (float ``nn.Linear`` in the float mode),
    plus one dense fp64 parameter."""

    def __init__(self, quantize: bool):
        from qgalore_dist.nn.int8_linear import QGaLoreLinear
        from qgalore_dist.quant.int8 import quantize_rows

        super().__init__()
        g = torch.Generator().manual_seed(3)
        for name, (m, n) in SHAPES.items():
            w = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.5
            if name == "dense":
                self.dense = torch.nn.Parameter(w)
                continue
            if quantize:
                lin = QGaLoreLinear(n, m, group_size=8)
                codes, scales = quantize_rows(w, 8)
                lin.weight_codes.copy_(codes)
                lin.weight_scales.copy_(scales)
            else:
                lin = torch.nn.Linear(n, m, bias=False, dtype=torch.float64)
                lin.weight.data.copy_(w)
            setattr(self, name, lin)

    def matrices(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self, n) for n in SHAPES if n != "dense"}


def weight_of(mod) -> torch.Tensor:
    return mod.int8_weight.dequantize(torch.float64) if hasattr(mod, "int8_weight") else mod.weight.data


def gradient(name: str, w: torch.Tensor, step: int) -> torch.Tensor:
    """A gradient that depends on the current weight (any differing code changes every later step)."""
    g = torch.Generator().manual_seed(1000 * step + sum(map(ord, name)))
    noise = torch.randn(w.shape, generator=g, dtype=torch.float64)
    return torch.sin(3.0 * w + 0.1 * step) + 0.5 * noise


def reference(config_name: str) -> dict:
    """The single-device run (full gradients, ``layerwise=False``), as the row-sharded placement must give."""
    from qgalore_dist import QGaLoreOptimizer

    config = qcfg(**CONFIGS[config_name])
    model = Toy(config.quantize)
    opt = QGaLoreOptimizer(model, config, dense_state_bits=8, target_modules=tuple(model.matrices()),
                           layerwise=False, grad_clip=CLIP, stagger_refresh=True)
    norms = []
    for step in range(STEPS):
        for name, mod in model.matrices().items():
            g = gradient(name, weight_of(mod), step)
            if hasattr(mod, "int8_weight"):
                mod.weight_grad = g
            else:
                mod.weight.grad = g
        model.dense.grad = gradient("dense", model.dense.data, step)
        opt.step()
        norms.append(opt.last_step.grad_norm)
        opt.zero_grad()
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "norms": norms,
            "svd": opt.svd_count}


def _run_config(config_name: str, rank: int, world: int, out_dir: Path) -> dict:
    import torch.distributed as dist

    from qgalore_dist.parallel.collectives import Collectives
    from qgalore_dist.parallel.row_sharded import RowShard, RowShardedQGaLoreOptimizer, chunk_rows
    from qgalore_dist.quant.int8 import Int8Weight

    config = qcfg(**CONFIGS[config_name])
    model = Toy(config.quantize)
    coll = Collectives(timeout=datetime.timedelta(seconds=60))
    shards, rows = [], {}
    for name, mod in model.matrices().items():
        m, n = SHAPES[name]
        rows[name] = chunk_rows(m, world)
        r0 = sum(rows[name][:rank])
        k = rows[name][rank]
        if config.quantize:
            w = Int8Weight(mod.weight_codes[r0:r0 + k], mod.weight_scales[r0:r0 + k], 8)
        else:
            w = mod.weight.data[r0:r0 + k]
        shards.append(RowShard(f"{name}.weight", (m, n), rows[name], w))
    drows = chunk_rows(SHAPES["dense"][0], world)
    d0 = sum(drows[:rank])
    dense_local = torch.nn.Parameter(model.dense.data[d0:d0 + drows[rank]].clone())
    opt = RowShardedQGaLoreOptimizer(shards, config, coll, dense=[("dense", dense_local)],
                                     dense_shapes={"dense": SHAPES["dense"]},
                                     dense_offsets={"dense": d0 * SHAPES["dense"][1]}, dense_state_bits=8,
                                     grad_clip=CLIP, stagger_refresh=True)

    def gather_rows(full: torch.Tensor, counts: list[int]) -> None:
        """Every rank's rows of ``full`` (its own are current) to every rank, in place."""
        kmax = max(counts)
        r0 = sum(counts[:rank])
        mine = full[r0:r0 + counts[rank]]
        pad = torch.zeros((kmax,) + tuple(full.shape[1:]), dtype=full.dtype)
        pad[:counts[rank]] = mine
        out = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(out, pad)
        off = 0
        for r, c in enumerate(counts):
            full[off:off + c] = out[r][:c]
            off += c

    norms = []
    for step in range(STEPS):
        grads = {}
        for name, mod in model.matrices().items():
            r0, k = sum(rows[name][:rank]), rows[name][rank]
            grads[f"{name}.weight"] = gradient(name, weight_of(mod), step)[r0:r0 + k].contiguous()
        dense_local.grad = gradient("dense", model.dense.data, step)[d0:d0 + drows[rank]].contiguous()
        opt.step(grads=grads)
        norms.append(opt.last_step.grad_norm)
        opt.zero_grad()
        model.dense.data[d0:d0 + drows[rank]] = dense_local.data
        for name, mod in model.matrices().items():
            if config.quantize:
                gather_rows(mod.weight_codes, rows[name])
                gather_rows(mod.weight_scales, rows[name])
            else:
                gather_rows(mod.weight.data, rows[name])
        gather_rows(model.dense.data, drows)
    svd = torch.tensor([opt.svd_count])
    dist.all_reduce(svd)
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out_dir / f"w{world}_{config_name}.pt")
    return {"norms": norms, "svd": int(svd), "comm_bytes": opt.comm_bytes}


def _worker(rank: int, world: int, port: int, out_dir: Path) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    record: dict = {"configs": {}}
    t0 = time.monotonic()
    for name in CONFIGS:
        try:
            record["configs"][name] = _run_config(name, rank, world, out_dir)
        except Exception:
            record["configs"][name] = {"error": traceback.format_exc()}
    record["seconds"] = time.monotonic() - t0
    (out_dir / f"w{world}_r{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _launch(out_dir: Path, ports: list[int]) -> int:
    import multiprocessing as mp

    import qgalore_dist.parallel.row_sharded  # noqa: F401  (imported once, before the fork)

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(rank, world, port, out_dir))
             for world, port in zip(WORLDS, ports) for rank in range(world)]
    return join_within(procs, 240)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both worlds at once in the background; the references are computed here meanwhile."""
    out = tmp_path_factory.mktemp("row_sharded_options")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), str(root / "tests"),
                                                        os.environ.get("PYTHONPATH")])))
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ports = [str(_free_port()) for _ in WORLDS]
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(out), *ports], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    torch.set_num_threads(1)
    refs = {name: reference(name) for name in CONFIGS}
    try:
        log = proc.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        log = (proc.communicate()[0] or "") + "\n[killed: launcher timed out]"
    data = {"refs": refs, "out": out, "log": log}
    for world in WORLDS:
        for rank in range(world):
            f = out / f"w{world}_r{rank}.json"
            data[(world, rank)] = json.loads(f.read_text()) if f.exists() else {"missing": log[-3000:]}
    return data


@pytest.mark.dist
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_row_sharded_equals_single_device(runs, world, config_name):
    ref = runs["refs"][config_name]
    for rank in range(world):
        rec = runs[(world, rank)]
        assert "missing" not in rec, rec.get("missing")
        got = rec["configs"][config_name]
        assert "error" not in got, got.get("error")
        assert got["svd"] == ref["svd"], (got["svd"], ref["svd"])
        for a, b in zip(got["norms"], ref["norms"]):
            assert abs(a - b) <= 1e-10 * max(1.0, abs(b)), (got["norms"], ref["norms"])
    state = torch.load(runs["out"] / f"w{world}_{config_name}.pt")
    for key, want in ref["state"].items():
        have = state[key]
        if want.dtype == torch.int8:
            assert torch.equal(have, want), f"{key}: {(have != want).sum().item()} codes differ"
        else:
            assert torch.equal(have, want) or torch.allclose(have, want, rtol=0, atol=1e-12), key


def test_the_configurations_cut_merged_rows():
    """The shapes really exercise cut rows (right c < 1) at both world sizes, a rank that covers a merged row
    whose first row (and moments) another rank holds, and an empty shard."""
    from qgalore_dist.optim.lowrank_adamw import LowRankAdamW
    from qgalore_dist.parallel.row_sharded import RowGeometry, chunk_rows

    rule = LowRankAdamW(qcfg(granularity=0.25))
    st = rule.init_state("r44", SHAPES["r44"], granularity=0.25)
    for world in WORLDS:
        geos = [RowGeometry.of(st, chunk_rows(44, world), r) for r in range(world)]
        assert geos[0].cut, world
    st16 = rule.init_state("r16", SHAPES["r16"], granularity=0.25)  # 4 reshaped rows of 4 weight rows
    g = RowGeometry.of(st16, chunk_rows(16, 3), 1)  # rows 6..11: covers reshaped rows 1-2, holds only 2
    assert (g.g_off, g.g_rows, g.h_off, g.h_rows, g.cut) == (1, 2, 2, 1, (1,))
    assert chunk_rows(SHAPES["tiny"][0], 3)[-1] == 0


if __name__ == "__main__":
    sys.exit(_launch(Path(sys.argv[1]), [int(p) for p in sys.argv[2:]]))
