"""The checkpoint root over a run's life: retention, resuming from a root, falling back past a damaged checkpoint,
one run per directory, a real kill -9 at several moments of a save, and workers that outlive their launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from qgalore_dist.checkpoint import load_checkpoint
from qgalore_dist.checkpoint.save_root import LOCK_FILE, SaveRootLock, clean_leftovers, prune_checkpoints
from qgalore_dist.train.cli import main

ROOT = Path(__file__).resolve().parents[2]


def args(ws: SimpleNamespace, *extra: str) -> list[str]:
    return ["--model", "llama_tiny", "--tokenizer", str(ws.tok), "--data", str(ws.corpus), "--batch-size", "2",
            "--seq-len", "16", "--rank", "8", "--update-proj-gap", "2", "--eval-every", "0", "--eval-batches", "1",
            "--warmup-steps", "1", "--log-every", "1000", *extra]


def steps_in(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ------------------------------------------------------------------------------------------ unit level
def test_clean_leftovers_restores_a_replaced_checkpoint_and_removes_the_rest(tmp_path: Path) -> None:
    for name in ("step_000002", "step_000002.old-77", "step_000003.tmp-12", "global_step4.tmp",
                 "step_000005.old-9", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_000005.old-9" / "trainer.json").write_text("{}")
    done = clean_leftovers(tmp_path)
    # step 5's replacement never arrived (a crash between the two renames): its old copy is the checkpoint
    assert steps_in(tmp_path) == ["notes", "step_000002", "step_000005"]
    assert (tmp_path / "step_000005" / "trainer.json").is_file()
    assert len(done) == 4 and any("restored step_000005" in d for d in done)
    assert clean_leftovers(tmp_path) == []


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    found = []
    for s in (1, 2, 10, 3):
        (tmp_path / f"step_{s:06d}").mkdir()
        found.append((s, tmp_path / f"step_{s:06d}"))
    assert prune_checkpoints(found, 0) == []
    gone = prune_checkpoints(found, 2)
    assert sorted(p.name for p in gone) == ["step_000001", "step_000002"]
    assert steps_in(tmp_path) == ["step_000003", "step_000010"]


def test_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with SaveRootLock(root) as held:
        holder = json.loads((root / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(Exception, match=f"in use by another run: pid {os.getpid()}"):
            SaveRootLock(root).acquire()
        assert held.previous is None
    assert not root.exists()  # created by the lock and left empty: removed with it
    root.mkdir()
    (root / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "started": 0, "command": "x"}))
    lock = SaveRootLock(root).acquire()  # a lock file nobody holds a flock on: its process died
    try:
        assert "pid 999999 on host gone" in lock.describe_previous()
    finally:
        lock.release()
    assert root.is_dir() and not (root / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------- CLI level
def test_keep_last_and_resume_from_a_root(ws: SimpleNamespace, tmp_path: Path) -> None:
    run = tmp_path / "run"
    main(args(ws, "--max-steps", "4", "--save-dir", str(run), "--save-every", "1", "--keep-last", "2"))
    assert steps_in(run) == ["step_000003", "step_000004"]  # no lock file, no leftovers
    other = tmp_path / "continued"
    res = main(args(ws, "--max-steps", "5", "--save-dir", str(other), "--resume", str(run)))
    assert res.start_step == 4 and res.steps == 5
    assert steps_in(other) == ["step_000005"]


def test_resume_auto_falls_back_past_a_damaged_checkpoint(ws: SimpleNamespace, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    main(args(ws, "--max-steps", "3", "--save-dir", str(run), "--save-every", "1",
              "--metrics-jsonl", str(tmp_path / "full.jsonl")))
    model_file = run / "step_000003" / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-3] ^= 0xFF
    model_file.write_bytes(bytes(data))
    capsys.readouterr()
    res = main(args(ws, "--max-steps", "3", "--save-dir", str(run), "--resume", "auto",
                    "--metrics-jsonl", str(tmp_path / "resumed.jsonl")))
    err = capsys.readouterr().err
    assert res.start_step == 2 and res.steps == 3
    assert "not resuming" in err and "step_000003" in err and "model.safetensors" in err
    # the step is trained again from the intact step 2 and saved over the damaged copy: the same bits
    full = [json.loads(x) for x in (tmp_path / "full.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in full if r["event"] == "train"}
    assert [r["loss"] for r in again if r["event"] == "train"] == [loss[3]]
    load_checkpoint(run / "step_000003")  # verifies: the damaged copy was replaced


def test_a_second_run_in_the_same_save_dir_is_refused(ws: SimpleNamespace, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    with SaveRootLock(run):  # another run holds the directory
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(args(ws, "--max-steps", "1", "--save-dir", str(run), "--resume", "auto"))
        assert exc.value.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and "is in use by another run" in lines[0] and f"pid {os.getpid()}" in lines[0]
        assert steps_in(run) == [LOCK_FILE]


# A run killed with SIGKILL at one moment of its second save (each moment: the wrapped function's n-th call
# during that save; "after" kills once the wrapped call has returned).
_KILLER = textwrap.dedent("""
    import os, signal, sys
    import qgalore_dist.checkpoint.save_load as sl
    target, when, saves = sys.argv[1], sys.argv[2], {"n": 0}
    real_save = sl.save_checkpoint
    def counting_save(*a, **k):
        saves["n"] += 1
        return real_save(*a, **k)
    sl.save_checkpoint = counting_save
    import qgalore_dist.train.engines.local as local
    local.save_checkpoint = counting_save
    owner = sl.os if target == "replace" else sl
    name = "replace" if target == "replace" else target
    real = getattr(owner, name)
    def wrapped(*a, **k):
        if saves["n"] == 2 and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*a, **k)
        if saves["n"] == 2 and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(owner, name, wrapped)
    from qgalore_dist.train.cli import main
    main(sys.argv[3:])
""")


@pytest.mark.parametrize("target,when,resumed_from", [
    ("write_state", "after", 1),           # the model file is written, the optimizer's not yet
    ("finalize_checkpoint", "after", 1),   # complete but not yet published
    ("replace", "after", 2),               # published: the step-2 checkpoint is there
])
def test_kill_9_during_a_save_keeps_the_previous_checkpoint(ws: SimpleNamespace, tmp_path: Path, target: str,
                                                            when: str, resumed_from: int) -> None:
    run = tmp_path / "run"
    argv = args(ws, "--max-steps", "3", "--save-dir", str(run), "--save-every", "1")
    env = {**os.environ, "QGALORE_CACHE": str(ws.cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _KILLER, target, when, *argv], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert any(".tmp" in n for n in steps_in(run)) == (resumed_from == 1)
    res = main([*argv, "--resume", "auto"])
    assert res.start_step == resumed_from and res.steps == 3
    assert steps_in(run) == ["step_000001", "step_000002", "step_000003"]  # the leftover is gone


_ORPHAN = textwrap.dedent("""
    import os, subprocess, sys, time
    if sys.argv[1] == "launcher":  # starts one worker, reports its pid, then waits to be killed
        env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        w = subprocess.Popen([sys.executable, "-c", sys.argv[2], "worker", sys.argv[3]], env=env,
                             stderr=open(sys.argv[3] + ".err", "w"))
        print(w.pid, flush=True)
        time.sleep(600)
    else:
        from qgalore_dist.parallel.launch_env import watch_launcher
        assert watch_launcher(poll_s=0.1, what="rank 0 of 1") is not None
        open(sys.argv[2] + ".ready", "w").close()
        time.sleep(600)
        sys.exit(0)
""")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes, in a container without init, counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_workers_stop_when_their_launcher_is_killed(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        env.pop(k, None)
    base = tmp_path / "worker"
    launcher = subprocess.Popen([sys.executable, "-c", _ORPHAN, "launcher", _ORPHAN, str(base)], env=env,
                                stdout=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    deadline = time.monotonic() + 120
    while not Path(f"{base}.ready").exists():  # the worker watches its launcher from here on
        assert time.monotonic() < deadline and _alive(worker), Path(f"{base}.err").read_text()
        time.sleep(0.1)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    while _alive(worker):
        if time.monotonic() > deadline:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker kept running after its launcher died")
        time.sleep(0.1)
    assert "the launcher of this rank 0 of 1" in Path(f"{base}.err").read_text()


def test_a_checkpoint_resumes_on_another_engine_and_says_so(ws, tmp_path: Path, capsys) -> None:
    """A ddp checkpoint (here one process) resumed with --engine local: the start-up says which engine and world
    size wrote it and that the global batch is the saved one; the continued losses equal the uninterrupted run's
    (the same arithmetic on one device)."""
    full = main(args(ws, "--engine", "ddp", "--max-steps", "3", "--save-dir", str(tmp_path / "a"),
                     "--save-every", "2"))
    capsys.readouterr()
    resumed = main(args(ws, "--engine", "local", "--max-steps", "3", "--resume", str(tmp_path / "a" / "step_000002"),
                        "--save-dir", str(tmp_path / "b")))
    out = capsys.readouterr()
    err = out.out + out.err
    assert "resuming a checkpoint of --engine ddp on 1 rank(s) with --engine local on 1 (global batch 2 " \
           "sequences per step, as saved)" in err
    assert resumed.losses == full.losses[2:]
    main(args(ws, "--engine", "local", "--batch-size", "4", "--max-steps", "3", "--resume",
              str(tmp_path / "a" / "step_000002"), "--save-dir", str(tmp_path / "c")))
    out = capsys.readouterr()
    assert "the global batch changes from 2 to 4 sequences per step" in out.out + out.err
