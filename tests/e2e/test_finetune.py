"""``qgalore-finetune`` / ``launch/finetune.py`` end to end (issue 16): every method trains from a pretrained base,
the loss normalisation makes accumulation and world size invisible, resume mid-epoch, bad data, LoRA export, and
the distributed engines under a real launcher.

The base model is our own: a few steps of pre-training on the embedded sonnets, exported as a transformers
directory (no hub). The task is generated arithmetic with the answer after ``####``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qgalore_dist.train import main

ROOT = Path(__file__).resolve().parents[2]


def ft(argv: list[str]):
    """``launch/finetune.py argv`` in this process."""
    return main(argv, task="finetune")


def _records(n: int, seed: int, fmt: str) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = (int(v) for v in torch.randint(0, 50, (2,), generator=g))
        prompt, answer = f"What is {a} plus {b}?", f"{a} + {b} = {a + b}. #### {a + b}"
        if fmt == "chat":
            out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        elif fmt == "alpaca":
            out.append({"instruction": prompt, "input": "", "output": answer})
        elif fmt == "sharegpt":
            out.append({"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]})
        else:
            out.append({"prompt": prompt + "\n", "completion": answer})
    return out


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def base(ws: SimpleNamespace) -> SimpleNamespace:
    """A pretrained base (8 steps of our own pre-training, exported in fp32) and fine-tuning data files."""
    out = ws.root / "base"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QGALORE_CACHE", str(ws.cache))
        main(["--model", "llama_tiny", "--tokenizer", str(ws.tok), "--data", str(ws.corpus), "--batch-size", "4",
              "--seq-len", "32", "--max-steps", "8", "--optimizer", "adamw", "--eval-batches", "1",
              "--log-every", "1000", "--export", str(out), "--export-dtype", "float32"])
    data = ws.root / "ft"
    data.mkdir()
    files = {fmt: _write_jsonl(data / f"{fmt}.jsonl", _records(48, i, fmt))
             for i, fmt in enumerate(("prompt_completion", "chat", "alpaca", "sharegpt"))}
    return SimpleNamespace(model=out, files=files, dir=data)


def ft_args(base: SimpleNamespace, *extra: str, fmt: str = "chat") -> list[str]:
    return ["--model", str(base.model), "--data", str(base.files[fmt]), "--batch-size", "2", "--seq-len", "128",
            "--rank", "8", "--update-proj-gap", "10", "--eval-batches", "2", "--warmup-steps", "1",
            "--log-every", "1000", "--val-fraction", "0.25", *extra]


def metrics(path: Path) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in recs if r["event"] == "train"], [r for r in recs if r["event"] == "eval"]


@pytest.mark.parametrize("method", ["qgalore", "projfactor", "galore", "adamw", "adamw8bit", "lora"])
def test_every_method_fine_tunes_a_pretrained_directory(base, tmp_path, method) -> None:
    extra = ["--method", "lora", "--lora-r", "4"] if method == "lora" else ["--optimizer", method]
    if method == "projfactor":
        extra += ["--granularity", "2"]
    m = tmp_path / "m.jsonl"
    result = ft(ft_args(base, *extra, "--max-steps", "4", "--lr", "1e-3", "--eval-every", "4",
                          "--metrics-jsonl", str(m), "--eval-generate", "3", "--max-new-tokens", "4"))
    train, evals = metrics(m)
    assert len(train) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert [e["step"] for e in evals] == [0, 4]
    assert evals[-1]["exact_match_total"] == 3 and 0.0 <= evals[-1]["exact_match"] <= 1.0
    assert result.final_val_loss is not None and result.final_val_loss == pytest.approx(evals[-1]["val_loss"])


@pytest.mark.parametrize("fmt", ["prompt_completion", "alpaca", "sharegpt"])
def test_every_format_reads_and_trains(base, fmt) -> None:
    result = ft(ft_args(base, "--optimizer", "adamw", "--max-steps", "2", "--lr", "1e-3", fmt=fmt))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_accumulation_and_micro_batch_leave_the_step_unchanged(base, tmp_path) -> None:
    """fp64: 4 rows per step as one micro-batch of 4 or as 2 × 2 (and as 4 × 1) give the same losses and the same
    weights: each micro-batch's summed loss is divided by the step's global loss-token count, not averaged."""
    runs = {}
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"b{batch}"
        res = ft(ft_args(base, "--optimizer", "adamw", "--dtype", "float64", "--max-steps", "3", "--lr", "1e-3",
                           "--batch-size", str(batch), "--grad-accum", str(accum), "--export", str(out),
                           "--export-dtype", "float64"))
        from safetensors.torch import load_file

        runs[(batch, accum)] = (res.losses, load_file(str(out / "model.safetensors")))
    ref_losses, ref_w = runs[(4, 1)]
    for key, (losses, w) in runs.items():
        assert losses == pytest.approx(ref_losses, rel=1e-12, abs=0), key
        for name, t in ref_w.items():
            torch.testing.assert_close(w[name], t, rtol=1e-10, atol=1e-12, msg=f"{key} {name}")


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(base, tmp_path) -> None:
    """6 steps of 4 rows over 36 training examples: step 3 stops mid-epoch; resuming its checkpoint gives the
    uninterrupted run's last three losses exactly (data position, RNG, optimizer state, schedule)."""
    common = ("--optimizer", "qgalore", "--max-steps", "6", "--lr", "1e-3", "--eval-every", "0", "--batch-size", "4")
    whole = ft(ft_args(base, *common, "--save-dir", str(tmp_path / "a"), "--save-every", "3"))
    resumed = ft(ft_args(base, *common, "--resume", str(tmp_path / "a" / "step_000003"),
                         "--save-dir", str(tmp_path / "b")))
    assert resumed.start_step == 3
    assert resumed.losses == whole.losses[3:]


def test_epochs_sets_the_number_of_steps(base, capsys) -> None:
    result = ft(ft_args(base, "--optimizer", "adamw", "--epochs", "0.5", "--eval-every", "0"))
    captured = capsys.readouterr()
    assert "--epochs 0.5:" in captured.out + captured.err
    assert 1 <= result.steps < 20


def test_lora_trains_only_adapters_and_exports_merged(base, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    ft(ft_args(base, "--method", "lora", "--lora-r", "4", "--max-steps", "3", "--lr", "5e-2", "--export",
                 str(out), "--export-dtype", "float32"))
    before = AutoModelForCausalLM.from_pretrained(str(base.model), torch_dtype=torch.float32)
    after = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    b, a = before.state_dict(), after.state_dict()
    assert set(a) == set(b)  # plain transformers names: no peft prefixes, no adapter tensors
    changed = {k for k in b if not torch.equal(a[k], b[k])}
    # the merged adapters change exactly the targeted projections; the frozen rest is the base bit for bit
    assert changed and all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj")) for k in changed), sorted(changed)


def _bad(base: SimpleNamespace, tmp: Path):
    def write(name: str, text: str) -> str:
        p = tmp / name
        p.write_text(text)
        return str(p)

    good = json.dumps(_records(1, 0, "chat")[0])
    yield "bad json line", write("badjson.jsonl", good + "\n" + good + "\n{not json\n"), "badjson.jsonl:3:"
    yield "missing field", write("missing.jsonl", '{"prompt": "a"}\n'), "missing.jsonl:1:"
    yield "empty file", write("empty.jsonl", ""), "empty.jsonl"
    yield "unknown role", write("role.jsonl", good + "\n" + json.dumps(
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}) + "\n"), \
        "role.jsonl:2:"
    yield "empty completion", write("emptyc.jsonl", '{"prompt": "a", "completion": ""}\n'), "emptyc.jsonl:1:"


@pytest.mark.parametrize("case", range(5))
def test_bad_data_one_error_line_with_file_and_line_nothing_written(base, tmp_path, capsys, case) -> None:
    name, path, fragment = list(_bad(base, tmp_path))[case]
    save = tmp_path / "save"
    with pytest.raises(SystemExit) as exc:
        ft(ft_args(base, "--data", path, "--save-dir", str(save), "--max-steps", "2"))
    assert exc.value.code == 2, name
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], (name, err)
    assert not save.exists() or not any(save.iterdir()), name


@pytest.mark.parametrize("argv,fragment", [
    (["--method", "lora", "--optimizer", "qgalore"], "--method lora trains small dense adapters"),
    (["--lora-r", "4"], "--lora-r / --lora-alpha / --lora-dropout apply to --method lora only"),
    (["--epochs", "1", "--max-steps", "3"], "give --epochs or --max-steps, not both"),
    (["--val-fraction", "1.5"], "--val-fraction must lie in (0, 1)"),
])
def test_bad_fine_tuning_flags(base, capsys, argv, fragment) -> None:
    with pytest.raises(SystemExit) as exc:
        ft(ft_args(base, *argv))
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_pretraining_refuses_fine_tuning_flags(ws, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--format", "chat"])  # the pre-training command
    assert exc.value.code == 2 and "--format" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- real launchers
def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _torchrun(ws, nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", _port(), "launch/finetune.py", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "QGALORE_CACHE": str(ws.cache)})


@pytest.fixture(scope="module")
def launched(ws, base) -> SimpleNamespace:
    """One torchrun job per engine family, run once for the module: ddp (2 ranks, fp64, adamw) next to the same
    run on one process, and fsdp (3 ranks, qgalore, with --eval-generate: answers of different lengths in
    lockstep)."""
    out = ws.root / "launched"
    out.mkdir()
    common = ("--optimizer", "adamw", "--dtype", "float64", "--max-steps", "3", "--lr", "1e-3", "--eval-every", "0")
    ddp = _torchrun(ws, 2, ft_args(base, *common, "--batch-size", "1", "--grad-accum", "2", "--engine", "ddp",
                                   "--metrics-jsonl", str(out / "ddp.jsonl")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QGALORE_CACHE", str(ws.cache))
        local = ft(ft_args(base, *common, "--batch-size", "2", "--grad-accum", "2"))
    fsdp = _torchrun(ws, 3, [*ft_args(base, "--engine", "fsdp", "--max-steps", "2", "--lr", "1e-3",
                                      "--eval-generate", "4", "--max-new-tokens", "6",
                                      "--metrics-jsonl", str(out / "fsdp.jsonl"))])
    return SimpleNamespace(out=out, ddp=ddp, local=local, fsdp=fsdp)


@pytest.mark.dist
def test_ddp_fine_tune_equals_one_process(launched) -> None:
    """2 ranks × micro-batch 1 × accumulation 2 = one process × 2 × 2, in fp64: the same losses (the global
    loss-token normalisation makes the ranks' unequal token counts invisible)."""
    assert launched.ddp.returncode == 0, launched.ddp.stderr[-3000:]
    train, _ = metrics(launched.out / "ddp.jsonl")
    assert [r["loss"] for r in train] == pytest.approx(launched.local.losses, rel=1e-10, abs=0)


@pytest.mark.dist
def test_fsdp_fine_tune_with_generation_in_lockstep(launched) -> None:
    assert launched.fsdp.returncode == 0, launched.fsdp.stderr[-3000:]
    train, evals = metrics(launched.out / "fsdp.jsonl")
    assert len(train) == 2
    assert [e["exact_match_total"] for e in evals] == [4, 4]
