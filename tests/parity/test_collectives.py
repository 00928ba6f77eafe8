"""Collectives on real gloo processes (world sizes 2 and 3), spawned once for the whole module.

This file is also the launcher: ``python tests/parity/test_collectives.py OUT_DIR PORT_W2 PORT_W3`` imports torch once and
forks one process per rank of both worlds. Each rank runs every sub-test in its process group (127.0.0.1, its
world's port), records each one's verdict and details in ``OUT_DIR/w{WORLD}_r{RANK}.json``, then plays the
dead-rank case: world 2's last rank exits, world 3's last rank
hangs; the survivors' next collective must raise within the group timeout. Expected values and byte counts are
written out here from the documented formulas, independently of the module's bucketing code.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # helpers, also when run as the rank launcher
from helpers import join_within  # noqa: E402

WORLDS = (2, 3)
DEAD_TIMEOUT_S = 5.0  # group timeout of the dead-rank case: survivors must fail within it (+ slack)
CHECKS = ("own_group", "all_reduce_values_and_dtype_buckets", "bucket_cap", "all_reduce_ops", "non_contiguous",
          "reduce", "broadcast", "broadcast_from_owners_unequal", "broadcast_from_owners_equal", "reduce_to_owners",
          "gather_to", "all_gather_into", "barrier_and_step_counters")


# ------------------------------------------------------------------------------------------------------------
# worker side
# ------------------------------------------------------------------------------------------------------------
def _nb(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _ring(p: int, n: int) -> int:
    """Documented ring all-reduce bytes for a p-byte bucket: ⌊2·(N−1)·P/N⌋."""
    return 2 * (n - 1) * p // n


class _Checker:
    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.results: dict[str, dict] = {}

    def run(self, name: str, fn) -> None:
        try:
            problems = fn()
            self.results[name] = {"ok": not problems, "detail": "; ".join(problems)}
        except Exception:  # record and go on: one broken primitive must not hide the others
            self.results[name] = {"ok": False, "detail": traceback.format_exc()}


def _expect(problems: list[str], cond: bool, what: str) -> None:
    if not cond:
        problems.append(what)


def _counts(c, problems: list[str], sent: int, received: int, calls: int) -> None:
    s = c.step_counters()
    _expect(problems, (s["comm_bytes_sent"], s["comm_bytes_received"], s["comm_calls"]) == (sent, received, calls),
            f"counters sent/received/calls {s['comm_bytes_sent']}/{s['comm_bytes_received']}/{s['comm_calls']}, "
            f"expected {sent}/{received}/{calls}")
    _expect(problems, s["comm_bytes"] == sent + received, "comm_bytes != sent + received")


def _worker(rank: int, world: int, port: int, out_dir: Path) -> None:
    import torch.distributed as dist

    from qgalore_dist.parallel.collectives import Collectives

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    t_start = time.monotonic()
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    tri = world * (world + 1) // 2  # Σ (rank + 1)
    ck = _Checker(rank, world)
    c = Collectives(timeout=datetime.timedelta(seconds=60))

    def own_group():
        p: list[str] = []
        _expect(p, c.group is not None and c.group != dist.group.WORLD, "collectives run on the default group")
        _expect(p, (c.rank, c.world_size, c.backend) == (rank, world, "gloo"),
                f"rank/world/backend {(c.rank, c.world_size, c.backend)}")
        return p

    def all_reduce_values_and_dtype_buckets():
        p: list[str] = []
        c.reset_step()
        ts, bases = [], []
        for i in range(30):  # interleave three dtypes: still one call per dtype
            base = torch.arange(15, dtype=torch.float32).reshape(3, 5) + i
            bases.append(base)
            ts.append(base * (rank + 1))
            if i % 10 == 0:
                b64 = torch.arange(4, dtype=torch.float64) - i
                bases.append(b64)
                ts.append(b64 * (rank + 1))
            if i % 10 == 5:
                bi = torch.arange(4, dtype=torch.int64).reshape(2, 2) * 7 + i
                bases.append(bi)
                ts.append(bi * (rank + 1))
        c.all_reduce(ts)
        _expect(p, all(torch.equal(t, b * tri) for t, b in zip(ts, bases)), "all_reduce sum values")
        f32, f64, i64 = 30 * 15 * 4, 3 * 4 * 8, 3 * 4 * 8
        exp = sum(_ring(x, world) for x in (f32, f64, i64))
        _counts(c, p, exp, exp, 3)
        return p

    def bucket_cap():
        p: list[str] = []
        small = Collectives(bucket_bytes=1024)
        smalls = [torch.full((64,), float(rank + 1 + i)) for i in range(40)]  # 256 B each: 4 per bucket
        big = torch.full((2000,), float(rank + 1))  # 8000 B > cap: a bucket of its own, sent without staging
        ts = smalls[:20] + [big] + smalls[20:]
        small.all_reduce(ts)
        _expect(p, all(torch.equal(t, torch.full((64,), float(tri + world * i))) for i, t in enumerate(smalls)),
                "small tensors' sums")
        _expect(p, torch.equal(big, torch.full((2000,), float(tri))), "large tensor's sum")
        exp = 10 * _ring(1024, world) + _ring(8000, world)
        _counts(small, p, exp, exp, 11)
        # the same list under the default 64 MiB cap is a single call
        c.reset_step()
        c.all_reduce([t.clone() for t in ts])
        _expect(p, c.step_counters()["comm_calls"] == 1, f"default cap: {c.step_counters()['comm_calls']} calls")
        return p

    def all_reduce_ops():
        p: list[str] = []
        a = torch.full((5,), float(rank + 1), dtype=torch.float64)
        c.all_reduce([a], op="avg")
        _expect(p, torch.allclose(a, torch.full((5,), (world + 1) / 2, dtype=torch.float64)), f"avg {a.tolist()}")
        m = torch.tensor([rank, -rank], dtype=torch.int32)
        c.all_reduce([m], op="max")
        _expect(p, m.tolist() == [world - 1, 0], f"max {m.tolist()}")
        try:
            c.all_reduce([torch.ones(2, dtype=torch.int64)], op="avg")
            p.append("avg on integers did not raise")
        except ValueError:
            pass
        return p

    def non_contiguous():
        p: list[str] = []
        base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        nc = (base * (rank + 1)).t()  # a non-contiguous view: staged, written back in place
        lone = base * (rank + 1)  # a lone contiguous tensor: reduced as is
        c.all_reduce([nc])
        c.all_reduce([lone])
        _expect(p, torch.equal(nc, base.t() * tri) and not nc.is_contiguous(), "non-contiguous in-place result")
        _expect(p, torch.equal(lone, base * tri), "direct tensor result")
        return p

    def reduce():
        p: list[str] = []
        c.reset_step()
        dst = world - 1
        f = torch.arange(10, dtype=torch.float32) * (rank + 1)
        i = torch.ones(3, dtype=torch.int64) * (rank + 1)
        c.reduce([f, i], dst)
        if rank == dst:
            _expect(p, torch.equal(f, torch.arange(10, dtype=torch.float32) * tri) and
                    torch.equal(i, torch.full((3,), tri)), "reduced values at dst")
            _counts(c, p, 0, 40 + 24, 2)
        else:
            _expect(p, torch.equal(f, torch.arange(10, dtype=torch.float32) * (rank + 1)) and
                    torch.equal(i, torch.ones(3, dtype=torch.int64) * (rank + 1)), "non-dst inputs changed")
            _counts(c, p, 40 + 24, 0, 2)
        lone = torch.full((6,), float(rank + 1))  # direct path, dst 0: non-root input must survive
        c.reduce([lone], 0)
        want = float(tri) if rank == 0 else float(rank + 1)
        _expect(p, torch.equal(lone, torch.full((6,), want)), f"lone reduce {lone.tolist()}")
        return p

    def broadcast():
        p: list[str] = []
        c.reset_step()
        src = 1
        pat = [torch.arange(5, dtype=torch.float32) * 3, torch.arange(7, dtype=torch.int8) - 3,
               torch.tensor([1.5, -2.0, 4.0], dtype=torch.bfloat16)]
        ts = [x.clone() if rank == src else torch.zeros_like(x) for x in pat]
        c.broadcast(ts, src)
        _expect(p, all(torch.equal(a, b) for a, b in zip(ts, pat)), "broadcast values")
        payload = 20 + 7 + 6
        _counts(c, p, payload if rank == src else 0, 0 if rank == src else payload, 3)
        return p

    def broadcast_from_owners_unequal():
        p: list[str] = []
        c.reset_step()
        want = {o: [torch.arange(4 * (o + 1), dtype=torch.float32) * (o + 1)] for o in range(world)}
        want[0].append(torch.tensor([7.0, 8.0], dtype=torch.float64))
        mine = {o: [x.clone() if o == rank else torch.zeros_like(x) for x in xs] for o, xs in want.items()}
        c.broadcast_from_owners(mine)
        _expect(p, all(torch.equal(a, b) for o in want for a, b in zip(mine[o], want[o])), "owner values")
        pay = {o: sum(_nb(x) for x in xs) for o, xs in want.items()}
        # unequal float32 payloads: one broadcast per owner; float64: owner 0 alone
        _counts(c, p, pay[rank], sum(v for o, v in pay.items() if o != rank), world + 1)
        return p

    def broadcast_from_owners_equal():
        p: list[str] = []
        c.reset_step()
        want = {o: [torch.full((3,), float(o)), torch.full((2, 2), float(10 * o))] for o in range(world)}
        mine = {o: [x.clone() if o == rank else torch.zeros_like(x) for x in xs] for o, xs in want.items()}
        c.broadcast_from_owners(mine)
        _expect(p, all(torch.equal(a, b) for o in want for a, b in zip(mine[o], want[o])), "owner values")
        b = (world - 1) * 28  # equal payloads: one all-gather, ring bytes (N−1)·P both ways
        _counts(c, p, b, b, 1)
        return p

    def reduce_to_owners():
        p: list[str] = []
        c.reset_step()
        ts = {o: [torch.full((o + 2,), float((rank + 1) * (o + 1)))] for o in range(world)}
        c.reduce_to_owners(ts)
        for o in range(world):
            want = float(tri * (o + 1)) if o == rank else float((rank + 1) * (o + 1))
            _expect(p, torch.equal(ts[o][0], torch.full((o + 2,), want)), f"owner {o}: {ts[o][0].tolist()}")
        sizes = {o: 4 * (o + 2) for o in range(world)}
        _counts(c, p, sum(v for o, v in sizes.items() if o != rank), sizes[rank], world)
        return p

    def gather_to():
        p: list[str] = []
        c.reset_step()
        rows = [r + 2 for r in range(world)]
        shard = torch.arange(rows[rank] * 3, dtype=torch.float32).reshape(rows[rank], 3) + 100 * rank
        full = torch.cat([torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + 100 * r
                          for r, n in enumerate(rows)])
        got = c.gather_to(shard, 0, sizes=rows)
        padded = max(rows) * 3 * 4
        if rank == 0:
            _expect(p, got is not None and torch.equal(got, full), "gathered rows at dst")
            _counts(c, p, 0, (world - 1) * padded, 1)
        else:
            _expect(p, got is None, "non-dst got a tensor")
            _counts(c, p, padded, 0, 1)
        eq = torch.full((2, 2), float(rank), dtype=torch.float64)
        got = c.gather_to(eq, world - 1)
        if rank == world - 1:
            _expect(p, torch.equal(got, torch.cat([torch.full((2, 2), float(r), dtype=torch.float64)
                                                   for r in range(world)])), "equal shards")
        return p

    def all_gather_into():
        p: list[str] = []
        c.reset_step()
        ins = [torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * rank, torch.full((1, 4), float(rank)),
               torch.arange(3, dtype=torch.int8) + rank]
        outs = [torch.empty(2 * world, 3), torch.empty(world, 4), torch.empty(3 * world, dtype=torch.int8)]
        c.all_gather_into(outs, ins)
        _expect(p, torch.equal(outs[0], torch.cat([torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * r
                                                   for r in range(world)])), "float rows")
        _expect(p, torch.equal(outs[1], torch.cat([torch.full((1, 4), float(r)) for r in range(world)])), "row 1x4")
        _expect(p, torch.equal(outs[2], torch.cat([torch.arange(3, dtype=torch.int8) + r for r in range(world)])),
                "int8 codes")
        b = (world - 1) * (40 + 3)
        _counts(c, p, b, b, 2)
        return p

    def barrier_and_step_counters():
        p: list[str] = []
        before = c.total_counters()
        last = c.reset_step()
        _expect(p, last["comm_calls"] >= 2, "reset_step did not return the finished step")
        _expect(p, c.step_counters()["comm_calls"] == 0, "step not reset")
        c.barrier()
        _counts(c, p, 0, 0, 1)
        after = c.total_counters()
        _expect(p, after["comm_calls"] == before["comm_calls"] + 1, "totals did not keep counting")
        return p

    t_init = time.monotonic()
    for name in CHECKS:
        ck.run(name, locals()[name])
    timings = {"init_s": t_init - t_start, "checks_s": time.monotonic() - t_init}

    # --- dead rank: world 2's last rank exits, world 3's last rank hangs ---------------------------------------
    timeout = datetime.timedelta(seconds=DEAD_TIMEOUT_S)
    short = Collectives(timeout=timeout)
    short.barrier()  # everybody is here; from now on the last rank is gone
    dead = rank == world - 1
    record = {"rank": rank, "world": world, "checks": ck.results, "dead_rank": dead,
              "totals": c.total_counters(), "timings": timings}
    path = out_dir / f"w{world}_r{rank}.json"
    if dead:
        path.write_text(json.dumps(record))
        if world == 2:
            os._exit(0)  # dies without a word: peers see their sockets close
        time.sleep(DEAD_TIMEOUT_S + 2)  # alive but never joins: peers must time out
        os._exit(0)
    t0 = time.monotonic()
    try:
        short.all_reduce([torch.ones(4)])
        record["dead_case"] = {"raised": False, "elapsed": time.monotonic() - t0}
    except Exception as exc:  # gloo raises RuntimeError / DistBackendError
        record["dead_case"] = {"raised": True, "elapsed": time.monotonic() - t0,
                               "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    path.write_text(json.dumps(record))
    # the group is broken: destroying it could block on the missing peer, so leave without teardown
    os._exit(0)


# ------------------------------------------------------------------------------------------------------------
# pytest side
# ------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: Path, ports: list[int]) -> int:
    """Launcher process: import torch once, then fork every rank of every world (forking a process that has
    only imported torch is safe, and saves four torch imports — seconds each on a busy machine)."""
    import multiprocessing as mp

    import qgalore_dist.parallel.collectives  # noqa: F401  (imported before the fork, shared by the children)

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(rank, world, port, out_dir))
             for world, port in zip(WORLDS, ports) for rank in range(world)]
    return join_within(procs, 100)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, dict]:
    """Run both worlds at once (one launcher, one forked process per rank) and load every rank's JSON record."""
    out = tmp_path_factory.mktemp("collectives")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no dependence on the hostname's address
    ports = [str(_free_port()) for _ in WORLDS]
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(out), *ports], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = proc.communicate(timeout=150)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        log = (proc.communicate()[0] or "") + "\n[killed: launcher timed out]"
    data: dict[int, dict] = {}
    for world in WORLDS:
        data[world] = {}
        for rank in range(world):
            f = out / f"w{world}_r{rank}.json"
            data[world][rank] = json.loads(f.read_text()) if f.exists() else {"missing": log[-3000:]}
    return data


@pytest.mark.dist
@pytest.mark.parametrize("world", WORLDS)
def test_every_rank_reported(results, world):
    for rank, rec in results[world].items():
        assert "missing" not in rec, f"world {world} rank {rank} wrote no result; output:\n{rec.get('missing')}"


@pytest.mark.dist
@pytest.mark.parametrize("name", CHECKS)
@pytest.mark.parametrize("world", WORLDS)
def test_primitive(results, world, name):
    for rank, rec in results[world].items():
        if "missing" in rec:
            pytest.fail(f"world {world} rank {rank} wrote no result:\n{rec['missing']}")
        res = rec["checks"].get(name)
        assert res is not None, f"world {world} rank {rank}: check {name} did not run"
        assert res["ok"], f"world {world} rank {rank}: {name}: {res['detail']}"


@pytest.mark.dist
@pytest.mark.parametrize("world", WORLDS)
def test_dead_rank_fails_within_timeout(results, world):
    survivors = [rec for rec in results[world].values() if "missing" not in rec and not rec["dead_rank"]]
    assert len(survivors) == world - 1, f"survivors reporting: {len(survivors)} of {world - 1}"
    for rec in survivors:
        case = rec["dead_case"]
        assert case["raised"], f"rank {rec['rank']}: collective with a dead peer returned after {case['elapsed']:.1f}s"
        assert case["elapsed"] <= DEAD_TIMEOUT_S + 5, f"rank {rec['rank']}: raised only after {case['elapsed']:.1f}s"
        if world == 3:  # the hung (alive, silent) peer: it is the group timeout that ended the wait
            assert case["elapsed"] >= 0.5 * DEAD_TIMEOUT_S, f"rank {rec['rank']}: {case}"


def test_local_mode_is_a_no_op():
    """Without a process group: world size 1, data untouched (gather returns a copy), nothing counted."""
    import torch.distributed as dist

    from qgalore_dist.parallel.collectives import Collectives

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    c = Collectives()
    a = torch.arange(4.0)
    c.all_reduce([a], op="avg")
    c.reduce([a], 0)
    c.broadcast([a], 0)
    c.broadcast_from_owners({0: [a]})
    c.reduce_to_owners({0: [a]})
    c.barrier()
    out = torch.empty(4)
    c.all_gather_into([out], [a])
    g = c.gather_to(a.reshape(2, 2), 0)
    assert torch.equal(a, torch.arange(4.0)) and torch.equal(out, a) and torch.equal(g, a.reshape(2, 2))
    assert (c.rank, c.world_size, c.backend) == (0, 1, "local")
    assert c.step_counters()["comm_calls"] == 0 and c.total_counters()["comm_bytes"] == 0
    with pytest.raises(ValueError):
        c.reduce([a], 1)
    with pytest.raises(ValueError):
        c.all_reduce([a], op="mean")


def test_buckets_group_by_dtype_and_cap():
    """Bucket plan: dtype groups in first-appearance order, greedy under the cap, oversize tensors alone, empty
    tensors skipped."""
    from qgalore_dist.parallel.collectives import Collectives

    c = Collectives(bucket_bytes=100)
    ts = [torch.zeros(10), torch.zeros(2, dtype=torch.float64), torch.zeros(10), torch.zeros(10), torch.zeros(0),
          torch.zeros(50), torch.zeros(1, dtype=torch.float64)]
    assert c.buckets(ts) == [[0, 2], [3], [5], [1, 6]]
    assert c.buckets(ts, scale=3) == [[0], [2], [3], [5], [1, 6]]


if __name__ == "__main__":
    sys.exit(_launch(Path(sys.argv[1]), [int(p) for p in sys.argv[2:]]))
