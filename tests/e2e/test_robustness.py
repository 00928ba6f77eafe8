"""Nothing lost, nothing silent (issue 17): divergence stops the run with exit 3 and keeps the checkpoints,
non-finite settings and unwritable paths are refused before any work, an existing metrics file is never truncated
silently, a resumed run's schedule follows the new settings, and ``--dry-run`` writes nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from qgalore_dist.train import Progress, lr_multiplier, main


def args(ws: SimpleNamespace, *extra: str) -> list[str]:
    return ["--model", "llama_tiny", "--tokenizer", str(ws.tok), "--data", str(ws.corpus), "--batch-size", "2",
            "--seq-len", "32", "--rank", "8", "--update-proj-gap", "10", "--eval-batches", "1", "--eval-every", "0",
            "--warmup-steps", "1", "--log-every", "1000", *extra]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def error_lines(capsys) -> list[str]:
    c = capsys.readouterr()
    return [ln for ln in (c.out + c.err).splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("extra", [
    ("--optimizer", "adamw"),
    # Q-GaLore in the in-backward mode (grad_accum 1, no clipping): matrices update inside backward, so the loss
    # is checked before backward
    ("--optimizer", "qgalore", "--grad-clip", "0"),
], ids=["adamw", "qgalore-in-backward"])
def test_divergence_skips_then_stops_with_exit_3_keeping_checkpoints(ws, tmp_path, capsys, extra) -> None:
    m, save = tmp_path / "m.jsonl", tmp_path / "ckpt"
    with pytest.raises(SystemExit) as exc:
        main(args(ws, *extra, "--lr", "1e30", "--max-steps", "12", "--save-dir", str(save), "--save-every", "1",
                  "--metrics-jsonl", str(m), "--max-skipped-steps", "2"))
    assert exc.value.code == 3
    errors = error_lines(capsys)
    assert len(errors) == 1 and "training diverged: 2 steps in a row" in errors[0], errors
    train = [r for r in records(m) if r["event"] == "train"]
    skipped = [r for r in train if r.get("skipped")]
    assert len(skipped) == 2 and train[-1]["skipped"] and train[-2]["skipped"]
    # every checkpoint written is intact and resumable (none is half-written or non-finite in its trainer record)
    ckpts = sorted(p for p in save.iterdir() if p.name.startswith("step_"))
    assert ckpts and all((p / "trainer.json").is_file() for p in ckpts)


@pytest.mark.parametrize("flag,value,fragment", [
    ("--lr", "inf", "--lr must be a finite number"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number"),
    ("--scale", "nan", "--scale must be a finite number"),
    ("--seed", str(2**63), "--seed must lie in [0, 2**63 - 1]"),
    ("--metrics-jsonl", "/proc/nope/m.jsonl", "cannot write into"),
    ("--max-skipped-steps", "0", "--max-skipped-steps must be a positive integer"),
])
def test_bad_settings_are_refused_before_work(ws, capsys, flag, value, fragment) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args(ws, flag, value, "--max-steps", "1"))
    assert exc.value.code == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and fragment in errors[0], errors


def test_existing_metrics_file_is_refused_overwritten_on_request_trimmed_on_resume(ws, tmp_path, capsys) -> None:
    m, save = tmp_path / "m.jsonl", tmp_path / "ckpt"
    m.write_text('{"event": "train", "step": 1, "loss": 1.0}\n')
    with pytest.raises(SystemExit) as exc:
        main(args(ws, "--optimizer", "adamw", "--max-steps", "2", "--metrics-jsonl", str(m)))
    assert exc.value.code == 2 and "already exists" in error_lines(capsys)[0]
    assert m.read_text() == '{"event": "train", "step": 1, "loss": 1.0}\n'  # untouched
    common = ("--optimizer", "adamw", "--max-steps", "4", "--metrics-jsonl", str(m), "--save-dir", str(save),
              "--save-every", "2")
    main(args(ws, *common, "--overwrite"))
    assert [r["step"] for r in records(m) if r["event"] == "train"] == [1, 2, 3, 4]
    # resuming the step-2 checkpoint into another save root: the records of steps 3 and 4 are superseded
    main(args(ws, *common[:-4], "--resume", str(save / "step_000002"), "--save-dir", str(tmp_path / "b")))
    assert [r["step"] for r in records(m) if r["event"] == "train"] == [1, 2, 3, 4]
    assert "3 record(s) after step 2 dropped" in capsys.readouterr().out  # train 3, 4 and the eval at 4


def test_resume_with_a_longer_schedule_is_reported_and_recomputed(ws, tmp_path, capsys) -> None:
    save, m = tmp_path / "ckpt", tmp_path / "m.jsonl"
    main(args(ws, "--optimizer", "adamw", "--max-steps", "4", "--warmup-steps", "1", "--lr", "0.01",
              "--save-dir", str(save)))
    capsys.readouterr()
    main(args(ws, "--optimizer", "adamw", "--max-steps", "10", "--warmup-steps", "1", "--lr", "0.01",
              "--save-dir", str(save), "--resume", "auto", "--metrics-jsonl", str(m)))
    out = capsys.readouterr().out
    assert "resumed with --max-steps 10 (was 4)" in out
    first = next(r for r in records(m) if r["event"] == "train")
    assert first["step"] == 5
    assert first["lr"] == pytest.approx(0.01 * lr_multiplier(4, warmup_steps=1, max_steps=10), rel=1e-12)


def test_dry_run_checks_everything_and_writes_nothing(ws, tmp_path, capsys) -> None:
    save, m, export = tmp_path / "ckpt", tmp_path / "m.jsonl", tmp_path / "export"
    result = main(args(ws, "--dry-run", "--save-dir", str(save), "--metrics-jsonl", str(m), "--export", str(export)))
    assert result.steps == 0
    assert not save.exists() and not m.exists() and not export.exists()
    assert "dry run:" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SystemExit) as exc:
        main(args(ws, "--dry-run", "--data", str(bad)))
    assert exc.value.code == 2 and str(bad) in error_lines(capsys)[0]


def test_plain_progress_lines_carry_eta_and_slowest_rank() -> None:
    out = io.StringIO()
    prog = Progress(total=4, log_every=2, stream=out)
    for step in range(1, 5):
        prog.update(step, 2.0, 1e-3, 100.0, None, slowest_step_s=0.25)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all("eta " in ln and "slowest rank 0.25s/step" in ln for ln in lines)
    assert lines[-1].endswith("eta 0.0s")


def test_token_shard_with_ids_past_the_vocabulary_is_refused_before_the_model(ws, tmp_path, capsys) -> None:
    import numpy as np

    shard = tmp_path / "tok.bin"
    np.arange(4000, dtype=np.uint16).tofile(shard)  # ids up to 3999, the model's vocabulary is 512
    (tmp_path / "tok.bin.json").write_text('{"dtype": "uint16"}')
    with pytest.raises(SystemExit) as exc:
        main(args(ws, "--data", str(shard), "--max-steps", "1"))
    assert exc.value.code == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and str(tmp_path) in errors[0] and "4000" in errors[0], errors
