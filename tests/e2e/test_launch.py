"""``launch/pretrain.py`` end to end on CPU: training, metrics, resume equality, export, one-line errors.

Everything runs in-process through ``qgalore_dist.train.main(argv)`` on ``llama_tiny`` with a 512-token BPE
trained once for the module on Shakespeare's sonnets (~100 KB), sequences of 32 tokens.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qgalore_dist.checkpoint import load_checkpoint
from qgalore_dist.checkpoint.export import main as export_main
from qgalore_dist.errors import UsageError
from qgalore_dist.models import build_model, resolve_model_config
from qgalore_dist.nn import quantize_model
from qgalore_dist.train import lr_multiplier, main, parse_args

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 512


# ------------------------------------------------------------------------------------------------ fixtures
def base_args(ws: SimpleNamespace, *extra: str) -> list[str]:
    return ["--model", "llama_tiny", "--tokenizer", str(ws.tok), "--data", str(ws.corpus), "--batch-size", "4",
            "--seq-len", "32", "--rank", "16", "--update-proj-gap", "10", "--eval-batches", "4",
            "--warmup-steps", "4", "--lr", "0.01", "--log-every", "1000", *extra]


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in recs if r["event"] == "train"], [r for r in recs if r["event"] == "eval"]


def tree_digest(*roots: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``roots`` (files or folders): proves nothing was rewritten."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        if root.is_dir():
            out[f"{root}/<entries>"] = (repr(sorted(str(p.relative_to(root)) for p in root.rglob("*"))), 0)
    return out


@pytest.fixture(scope="module")
def trained(ws: SimpleNamespace) -> SimpleNamespace:
    """One 40-step Q-GaLore run with metrics, checkpoints every 20 steps and an export (shared by tests)."""
    out = ws.root / "run"
    args = base_args(ws, "--optimizer", "qgalore", "--max-steps", "40", "--eval-every", "20",
                     "--save-dir", str(out / "ckpt"), "--save-every", "20", "--metrics-jsonl",
                     str(out / "metrics.jsonl"), "--export", str(out / "export"),
                     "--export-dtype", "float32")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QGALORE_CACHE", str(ws.cache))
        result = main(args)
    return SimpleNamespace(result=result, dir=out, ckpt=out / "ckpt", metrics=out / "metrics.jsonl",
                           export=out / "export")


# ------------------------------------------------------------------------------------------- end to end
def test_qgalore_end_to_end_val_loss_falls(trained: SimpleNamespace) -> None:
    res = trained.result
    assert res.steps == 40 and res.start_step == 0
    steps = [s for s, _ in res.evals]
    assert steps == [0, 20, 40]
    val = [v for _, v in res.evals]
    assert val[0] > 6.0  # ~ln(512) at initialisation
    assert val[2] < val[1] < val[0] and val[2] < val[0] - 0.8
    assert sorted(p.name for p in trained.ckpt.iterdir()) == ["step_000020", "step_000040"]


def test_metrics_jsonl_fields(trained: SimpleNamespace) -> None:
    train, evals = read_metrics(trained.metrics)
    assert [r["step"] for r in train] == list(range(1, 41))
    for r in train:
        for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "step_time_s", "peak_mem_bytes", "svd_count",
                    "grad_norm"):
            assert key in r, key
        assert r["tokens"] == r["step"] * 4 * 32
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0
        assert r["peak_mem_bytes"] > 10 * 2**20  # RSS of a python process with torch: far above 10 MiB
        assert r["grad_norm"] is not None and r["grad_norm"] > 0  # clipping is on by default
    assert train[0]["svd_count"] > 0 and train[-1]["svd_count"] > train[0]["svd_count"]  # refreshes every 10
    assert train[0]["lr"] == pytest.approx(0.01 / 4)  # warm-up: (step + 1) / 4 of the peak
    assert set(train[-1]["phase_times_s"]) >= {"svd", "projection", "optimizer", "requantize"}
    assert [r["step"] for r in evals] == [0, 20, 40]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(torch.tensor(r["val_loss"]).exp().item(), rel=1e-6)


def test_export_loads_in_transformers_with_same_logits(trained: SimpleNamespace, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the INT8 model, rebuilt from the final checkpoint
    ckpt = load_checkpoint(trained.ckpt / "step_000040")
    config = resolve_model_config("llama_tiny", vocab_size=VOCAB)
    int8 = build_model(config)
    quantize_model(int8, seed=0)
    int8.load_state_dict(ckpt.model_state)
    exported = AutoModelForCausalLM.from_pretrained(str(trained.export), local_files_only=True)
    assert not any("weight_codes" in k for k in exported.state_dict())
    tok = AutoTokenizer.from_pretrained(str(trained.export), local_files_only=True)
    ids = torch.tensor([tok.encode("Shall I compare thee to a summer's day?")])
    with torch.no_grad():
        ref = int8(input_ids=ids).logits
        got = exported(input_ids=ids).logits
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)

    # the stand-alone export command (`python -m qgalore_dist.checkpoint.export CKPT OUT`) gives the same
    # weights from the checkpoint alone (in-process here: a subprocess would only add ~10 s of imports)
    out = tmp_path / "from_ckpt"
    export_main([str(trained.ckpt / "step_000040"), str(out), "--dtype", "float32"])
    again = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    for (k, a), (k2, b) in zip(exported.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert (out / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("extra", [
    ("--optimizer", "qgalore", "--grad-accum", "2"),             # low-rank accumulators, clipped step
    ("--optimizer", "qgalore", "--grad-clip", "0"),              # whole step inside backward
    ("--optimizer", "qgalore", "--dense-dtype", "bfloat16"),  # bf16-stored dense weights, stochastic rounding
    ("--optimizer", "adamw"),
], ids=["qgalore-accum2", "qgalore-inbackward", "qgalore-bf16-dense", "adamw"])
def test_resume_reproduces_uninterrupted_run_exactly(ws: SimpleNamespace, tmp_path: Path, extra) -> None:
    common = base_args(ws, "--max-steps", "20", "--update-proj-gap", "4", "--eval-every", "0", "--eval-batches",
                       "1", *extra)
    full = tmp_path / "full"
    main([*common, "--save-dir", str(full), "--save-every", "10", "--metrics-jsonl", str(tmp_path / "full.jsonl")])
    # the resumed run sees only the step-10 checkpoint: `auto` must pick it up
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "step_000010", part / "step_000010")
    res = main([*common, "--save-dir", str(part), "--resume", "auto", "--metrics-jsonl",
                str(tmp_path / "resumed.jsonl")])
    assert res.start_step == 10 and res.steps == 20
    a, _ = read_metrics(tmp_path / "full.jsonl")
    b, _ = read_metrics(tmp_path / "resumed.jsonl")
    assert [r["step"] for r in b] == list(range(11, 21))
    assert [r["loss"] for r in b] == [r["loss"] for r in a[10:]]  # bit-exact
    assert [r["lr"] for r in b] == [r["lr"] for r in a[10:]]
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a[10:]]
    # the final checkpoints hold identical model state
    fa = load_checkpoint(full / "step_000020").model_state
    fb = load_checkpoint(part / "step_000020").model_state
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


# ------------------------------------------------------------------------------------- other optimizers
@pytest.mark.parametrize("optimizer", ["galore", "adamw", "adamw8bit"])
def test_baseline_optimizers_train(ws: SimpleNamespace, optimizer: str) -> None:
    res = main(base_args(ws, "--optimizer", optimizer, "--max-steps", "8", "--eval-every", "0"))
    assert res.steps == 8
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert res.evals[-1][1] < res.evals[0][1] - 0.3


def test_activation_checkpointing_gives_identical_losses(ws: SimpleNamespace, monkeypatch) -> None:
    import transformers.modeling_utils as mu

    args = base_args(ws, "--max-steps", "3", "--eval-every", "0", "--eval-batches", "1")
    plain = main(args).losses
    calls = []
    if hasattr(mu, "checkpoint"):  # count recomputed blocks (transformers binds torch's checkpoint here)
        real = mu.checkpoint
        monkeypatch.setattr(mu, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ckpt = main([*args, "--activation-checkpointing"]).losses
    assert plain == ckpt  # INT8 layers recompute bit-identically, in-backward steps included
    if hasattr(mu, "checkpoint"):
        assert len(calls) == 3 * 2  # 3 steps x 2 decoder layers (evaluation runs without grad: no checkpoints)


# ------------------------------------------------------------------------------------ CLI and schedule
def test_config_file_merging(ws: SimpleNamespace, tmp_path: Path) -> None:
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"max_steps": 7, "lr": 0.02, "no_gate": True, "target_modules": ["q_proj", "v_proj"],
                               "optimizer": "galore"}))
    args = parse_args(["--config", str(cfg), "--lr", "0.03"])
    assert args.max_steps == 7 and args.lr == 0.03 and args.no_gate and args.optimizer == "galore"
    assert args.target_module_list == ["q_proj", "v_proj"]
    assert args.batch_size == 8 and args.model == "llama_20m"  # untouched defaults
    with pytest.raises(UsageError, match="must be an integer"):
        cfg.write_text(json.dumps({"max_steps": 7.5}))
        parse_args(["--config", str(cfg)])


def test_lr_schedule_shapes() -> None:
    kw = {"warmup_steps": 10, "max_steps": 110, "min_lr_ratio": 0.1}
    assert lr_multiplier(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(60, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_multiplier(60, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_multiplier(35, schedule="linear", **kw) == pytest.approx(0.775)
    for s in ("cosine", "linear"):
        assert lr_multiplier(110, schedule=s, **kw) == pytest.approx(0.1)
        assert lr_multiplier(500, schedule=s, **kw) == pytest.approx(0.1)  # held after max_steps
    assert lr_multiplier(80, schedule="constant", **kw) == 1.0


def test_plain_progress_lines_every_n_steps() -> None:
    import io

    from qgalore_dist.train import Progress

    out = io.StringIO()
    prog = Progress(total=5, log_every=2, stream=out)
    for step in range(1, 6):
        prog.update(step, 2.5, 1e-3, 1000.0, 0.5 if step % 2 else None)
    prog.note("done")
    prog.close()
    lines = out.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines[:-1]] == ["2/5", "4/5", "5/5"]  # every 2 steps and the last one
    assert "grad_norm 0.5000" in lines[2] and "grad_norm" not in lines[0] and lines[-1] == "done"


# ---------------------------------------------------------------------------------------------- errors
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bad_cases(ws: SimpleNamespace, trained: SimpleNamespace, tmp: Path):
    """(argv, expected message fragment). Every argv points at the trained run's checkpoints and metrics: a run
    that got past validation would resume and overwrite them."""
    keep = ["--save-dir", str(trained.ckpt), "--resume", "auto", "--metrics-jsonl", str(trained.metrics)]
    corrupt = tmp / "corrupt"
    shutil.copytree(trained.ckpt / "step_000020", corrupt / "step_000020")
    data = bytearray((corrupt / "step_000020" / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (corrupt / "step_000020" / "model.safetensors").write_bytes(bytes(data))
    truncated = tmp / "truncated"
    shutil.copytree(trained.ckpt / "step_000020", truncated / "step_000020")
    tj = truncated / "step_000020" / "trainer.json"
    tj.write_text(tj.read_text()[:100])
    other_model = json.loads((ROOT / "qgalore_dist/models/configs/llama_tiny.json").read_text())
    other_model["hidden_size"] = 32
    other_cfg = _write(tmp / "other_model.json", json.dumps(other_model))
    ck20 = str(trained.ckpt / "step_000020")
    foreign = tmp / "foreign"  # a deepspeed-layout checkpoint: --engine local does not list it
    shutil.copytree(trained.ckpt / "step_000020", foreign / "global_step20")
    return {
        "unknown-model": (base_args(ws, "--model", "llama_nope", *keep), "llama_nope"),
        "missing-data": (base_args(ws, "--data", str(tmp / "nope.txt"), *keep), "nope.txt"),
        "malformed-config": (base_args(ws, "--config", str(_write(tmp / "bad.json", "{not json")), *keep),
                             "malformed JSON"),
        "unknown-config-key": (base_args(ws, "--config", str(_write(tmp / "k.json", '{"max-steps": 3}')), *keep),
                               "unknown setting"),
        "non-int-flag": (base_args(ws, "--batch-size", "abc", *keep), "--batch-size"),
        "bad-choice": (base_args(ws, "--lr-schedule", "sawtooth", *keep), "--lr-schedule"),
        "zero-rank": (base_args(ws, "--rank", "0", *keep), "--rank"),
        "qgalore-config-value": (base_args(ws, "--scale", "0", *keep), "scale"),
        "engine": (base_args(ws, "--engine", "horovod", *keep), "--engine"),
        "no-target": (base_args(ws, "--target-modules", "no_such_layer", *keep), "no_such_layer"),
        "save-every-without-dir": (base_args(ws, "--save-every", "5"), "--save-dir"),
        "fresh-run-into-checkpoints": (base_args(ws, "--save-dir", str(trained.ckpt)), "already holds checkpoints"),
        "missing-resume-dir": (base_args(ws, "--resume", str(tmp / "nowhere"), *keep[:2]), "does not exist"),
        "corrupted-checkpoint": (base_args(ws, "--save-dir", str(corrupt), "--resume", "auto"), "corrupted"),
        "truncated-trainer-json": (base_args(ws, "--save-dir", str(truncated), "--resume", "auto"), "unreadable"),
        "other-model": (base_args(ws, "--model", str(other_cfg), "--resume", ck20),
                        "does not match this model"),
        "other-optimizer": (base_args(ws, "--optimizer", "adamw", *keep), "--optimizer qgalore"),
        "other-seq-len": (base_args(ws, "--seq-len", "16", "--resume", ck20), "seq_len"),
        "resume-older-into-save-dir": (base_args(ws, "--resume", ck20, *keep[:2]), "newer than step_000020"),
        "save-dir-is-a-file": (base_args(ws, "--save-dir", str(trained.metrics)), "not a directory"),
        "local-comm-mode": (base_args(ws, "--comm-mode", "full", *keep), "--comm-mode full does nothing"),
        "local-strict-replicas": (base_args(ws, "--strict-replicas", *keep), "--strict-replicas does nothing"),
        "local-replica-check": (base_args(ws, "--replica-check-every", "5", *keep), "--replica-check-every 5"),
        "local-dist-timeout": (base_args(ws, "--dist-timeout", "30", *keep), "--dist-timeout 30"),
        "dense-dtype-adamw": (base_args(ws, "--optimizer", "adamw", "--dense-dtype", "bfloat16", *keep),
                              "--dense-dtype bfloat16 applies to --optimizer qgalore"),
        "dense-dtype-wider": (base_args(ws, "--dense-dtype", "float64", *keep), "must be narrower"),
        "dense-dtype-on-resume": (base_args(ws, "--dense-dtype", "bfloat16", "--resume", ck20),
                                  "stores its dense parameters in torch.float32"),
        "fresh-run-beside-other-layout": (base_args(ws, "--save-dir", str(foreign)), "another engine's layout"),
        "auto-resume-beside-other-layout": (base_args(ws, "--save-dir", str(foreign), "--resume", "auto"),
                                            "another engine's layout"),
        "export-into-save-dir": (base_args(ws, *keep, "--export", str(trained.ckpt)), "--save-dir"),
        "export-into-checkpoint": (base_args(ws, "--export", ck20), "is a checkpoint"),
        "export-into-nonempty-dir": (base_args(ws, *keep, "--export", str(ws.tok)),
                                     "not empty and is not an earlier export"),
        "export-dtype-without-export": (base_args(ws, "--export-dtype", "float32"), "needs --export"),
        "keep-last-without-save-dir": (base_args(ws, "--keep-last", "2"), "--keep-last needs --save-dir"),
        "resume-root-without-checkpoints": (base_args(ws, "--resume", str(tmp), *keep[:2]),
                                            "neither a checkpoint"),
        "resume-root-of-other-layout": (base_args(ws, "--resume", str(foreign), *keep[:2]),
                                        "another engine's layout"),
    }, [trained.ckpt, trained.metrics, corrupt, truncated, foreign]


BAD_CASES = ["unknown-model", "missing-data", "malformed-config", "unknown-config-key", "non-int-flag", "bad-choice",
             "zero-rank", "qgalore-config-value", "engine", "no-target", "save-every-without-dir",
             "fresh-run-into-checkpoints", "missing-resume-dir", "corrupted-checkpoint", "truncated-trainer-json",
             "other-model", "other-optimizer", "other-seq-len", "save-dir-is-a-file", "local-comm-mode",
             "local-strict-replicas", "local-replica-check", "local-dist-timeout", "dense-dtype-adamw",
             "dense-dtype-wider", "dense-dtype-on-resume", "fresh-run-beside-other-layout",
             "auto-resume-beside-other-layout", "export-into-save-dir", "export-into-checkpoint",
             "export-into-nonempty-dir", "export-dtype-without-export", "keep-last-without-save-dir",
             "resume-root-without-checkpoints", "resume-root-of-other-layout", "resume-older-into-save-dir"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_error_line_exit_2_nothing_overwritten(ws, trained, tmp_path, capsys, case) -> None:
    cases, watched = _bad_cases(ws, trained, tmp_path)
    assert set(cases) == set(BAD_CASES)
    argv, fragment = cases[case]
    before = tree_digest(*watched)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert tree_digest(*watched) == before


def test_launch_script_runs_from_a_checkout(ws: SimpleNamespace) -> None:
    """``python launch/pretrain.py`` without installation: error path (fast) shows the wrapper and exit code."""
    proc = subprocess.run([sys.executable, "launch/pretrain.py", "--model", "llama_nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "", "QGALORE_CACHE": str(ws.cache), "PYTHONPATH": ""})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: model spec 'llama_nope'") and proc.stderr.count("\n") == 1


def _as_rank(monkeypatch, rank: int, port: str) -> None:
    for k, v in {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": port, "TORCHELASTIC_RUN_ID": "test"}.items():
        monkeypatch.setenv(k, v)


def test_a_refused_flag_prints_once_per_job(monkeypatch, capsys, tmp_path) -> None:
    """Every rank of a launched job meets the same bad flag: rank 0 prints the one ``error:`` line, the others
    wait for it and exit 2 silently; a rank whose error rank 0 does not share prints its own, naming its rank."""
    import tempfile

    import qgalore_dist.train.cli as cli

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for rank, expect in ((0, "error: --lr must be > 0, got -1.0\n"), (1, "")):
        _as_rank(monkeypatch, rank, "40001")
        with pytest.raises(SystemExit) as e:
            main(["--lr", "-1"])
        assert e.value.code == 2
        assert capsys.readouterr().err == expect
    monkeypatch.setattr(cli, "PEER_WAIT_S", 0.2)
    _as_rank(monkeypatch, 1, "40002")  # another job: rank 0 printed nothing there
    with pytest.raises(SystemExit) as e:
        main(["--lr", "-2"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: rank 1: --lr must be > 0, got -2.0\n"


def test_torchrun_job_prints_one_error_line(ws: SimpleNamespace) -> None:
    """Under a real launcher: two workers, one ``error:`` line from our processes (torchrun adds its own failure
    summary after it, and exits 1)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, "launch/pretrain.py", "--engine", "fsdp", "--granularity", "3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "QGALORE_CACHE": str(ws.cache)})
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert ours == ["error: invalid optimizer setting: granularity=3.0 is invalid: must be a positive power of two "
                    "(e.g. 0.25, 0.5, 1, 2, 4)"], proc.stdout + proc.stderr
    assert proc.returncode != 0


# each worker runs main() in its own "node" folder, so one relative --data names a different file on each rank (as on
# two machines with their own copies); SIGTERM is ignored so that the status recorded is the one the worker chose,
# not torchrun stopping the others once the first has exited
_NODE_WORKER = """
import os, signal, sys
from pathlib import Path
signal.signal(signal.SIGTERM, signal.SIG_IGN)
here, rank = Path(sys.argv[1]), os.environ["RANK"]
os.chdir(here / f"node{rank}")
sys.path.insert(0, sys.argv[2])
from qgalore_dist.train.cli import main
code = 0
try:
    main(sys.argv[3:])
except SystemExit as exc:
    code = exc.code
(here / f"exit.{rank}").write_text(str(code))
sys.exit(code)
"""


def _torchrun_nodes(ws: SimpleNamespace, root: Path, *argv: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Two workers of ``_NODE_WORKER`` under torchrun: the process and each rank's exit status."""
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    (root / "worker.py").write_text(_NODE_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, "--no-python", sys.executable, str(root / "worker.py"), str(root), str(ROOT), *argv],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "QGALORE_CACHE": str(ws.cache)})
    return proc, [(root / f"exit.{r}").read_text() if (root / f"exit.{r}").is_file() else "none" for r in (0, 1)]


def test_one_rank_with_bad_data_stops_every_rank_with_one_line(ws: SimpleNamespace, tmp_path: Path) -> None:
    """Only rank 1's copy of the data is damaged: the ranks agree on the checks' outcome before anything is built,
    rank 0 prints the one ``error:`` line naming rank 1 and FILE:LINE, and every worker exits 2 (before: rank 0
    reported a valid dry run, then a second error line about a lost peer, exit 1). With both copies intact the same
    job runs through the agreement (one all-reduce) and exits 0."""
    records = [json.dumps({"text": p}) + "\n" for p in ws.corpus.read_text().split("\n\n") if p.strip()]
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        (tmp_path / f"node{rank}" / "data.jsonl").write_text("".join(records))
    argv = ("--engine", "ddp", "--device", "cpu", "--model", "llama_tiny", "--tokenizer", str(ws.tok), "--data",
            "data.jsonl", "--seq-len", "32", "--batch-size", "4", "--dry-run")
    proc, codes = _torchrun_nodes(ws, tmp_path, *argv)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and codes == ["0", "0"], out[-3000:]
    assert not [line for line in out.splitlines() if line.startswith("error:")] and "dry run:" in out

    records[2] = '{"text": "a record cut short\n'
    (tmp_path / "node1" / "data.jsonl").write_text("".join(records))
    proc, codes = _torchrun_nodes(ws, tmp_path, *argv)
    out = proc.stdout + proc.stderr
    ours = [line for line in out.splitlines() if line.startswith("error:")]
    assert ours == ["error: rank 1: data.jsonl:3: malformed JSON line (Invalid control character at)"], out[-3000:]
    assert codes == ["2", "2"], out[-3000:]
    assert "dry run:" not in out


def test_package_lists_its_commands_and_installs_console_scripts(capsys) -> None:
    """``python -m qgalore_dist`` prints the commands; the installed metadata declares the console scripts (the
    venv's ``bin/`` holds them once ``make setup`` installed the package)."""
    from importlib.metadata import entry_points

    from qgalore_dist.__main__ import main as package_main

    assert package_main([]) == 0
    out = capsys.readouterr().out
    assert "qgalore-pretrain" in out and "qgalore-export" in out
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("qgalore-pretrain") == "qgalore_dist.train.cli:console"
    assert scripts.get("qgalore-export") == "qgalore_dist.checkpoint.export:main"
    with pytest.raises(SystemExit) as exc:  # the console wrapper keeps main's exit status for bad input
        from qgalore_dist.train.cli import console

        console(["--lr", "-1"])
    assert exc.value.code == 2
