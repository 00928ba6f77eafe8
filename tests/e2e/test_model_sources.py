"""``--model`` from a Hugging Face directory (streamed into INT8, the original's loss reported beside the INT8
one) and from one of our own checkpoints (its INT8 codes taken as they are), through the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qgalore_dist.checkpoint import load_checkpoint
from qgalore_dist.data import get_tokenizer
from qgalore_dist.train.cli import main


@pytest.fixture(scope="module")
def hf(ws: SimpleNamespace) -> Path:
    """A "pretrained" model directory as users bring it: config.json, sharded safetensors, tokenizer files."""
    d = ws.root / "hf"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=520, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(str(d), safe_serialization=True, max_shard_size="100KB")
    get_tokenizer(ws.tok).save_pretrained(str(d))
    return d


def args(ws: SimpleNamespace, *extra: str) -> list[str]:
    return ["--data", str(ws.corpus), "--batch-size", "2", "--seq-len", "16", "--rank", "8", "--update-proj-gap",
            "2", "--eval-every", "0", "--eval-batches", "2", "--warmup-steps", "1", "--log-every", "1000", *extra]


def evals(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "eval"]


def test_pretrained_directory_streams_into_int8_and_reports_the_original_loss(ws, hf, tmp_path, capsys) -> None:
    assert (hf / "model.safetensors.index.json").is_file()  # sharded, as real checkpoints are
    res = main(args(ws, "--model", str(hf), "--max-steps", "2", "--metrics-jsonl", str(tmp_path / "m.jsonl")))
    out = capsys.readouterr().out
    assert "vocab 520" in out and "tokenizer hf (512 tokens)" in out, out  # the model keeps its vocabulary
    assert "the original model" in out
    first = evals(tmp_path / "m.jsonl")[0]
    # the original float model, evaluated the same way through plain transformers
    from qgalore_dist.data import TokenBatcher
    from qgalore_dist.train.loop import evaluate

    plain = LlamaForCausalLM.from_pretrained(str(hf), local_files_only=True)
    batcher = TokenBatcher.from_source(str(ws.corpus), get_tokenizer(hf), 16, 2, seed=0)
    want = evaluate(plain, batcher, 2, 2, torch.device("cpu"))
    assert first["original_val_loss"] == pytest.approx(want, rel=1e-6, abs=0)
    assert res.original_val_loss == first["original_val_loss"]
    # INT8 to nearest moves each weight by at most half a step: the loss moves a little, not a lot
    assert first["val_loss"] != first["original_val_loss"]
    assert abs(first["val_loss"] - first["original_val_loss"]) < 0.05 * first["original_val_loss"]


def test_float_optimizers_load_the_directory_in_float(ws, hf, tmp_path) -> None:
    res = main(args(ws, "--model", str(hf), "--optimizer", "adamw", "--max-steps", "1"))
    assert res.original_val_loss is None and res.steps == 1


def test_our_checkpoint_is_a_model_directory(ws, hf, tmp_path) -> None:
    run = tmp_path / "run"
    first = main(args(ws, "--model", "llama_tiny", "--tokenizer", str(hf), "--max-steps", "3",
                      "--save-dir", str(run)))
    ckpt = run / "step_000003"
    tuned = main(args(ws, "--model", str(ckpt), "--max-steps", "1", "--metrics-jsonl", str(tmp_path / "t.jsonl")))
    # the INT8 codes are taken as they are, the tokenizer from the checkpoint: the fine-tune starts exactly where
    # the run ended (same weights, same held-out batches)
    assert evals(tmp_path / "t.jsonl")[0]["val_loss"] == first.evals[-1][1]
    assert tuned.start_step == 0 and tuned.original_val_loss is None
    # the float reference mode reads the same checkpoint dequantised
    main(args(ws, "--model", str(ckpt), "--optimizer", "galore", "--max-steps", "1"))
    assert load_checkpoint(ckpt).step == 3  # untouched


@pytest.mark.parametrize("case", ["pickle-only", "deepspeed-layout", "damaged-checkpoint"])
def test_model_directories_that_cannot_be_read(ws, hf, tmp_path, capsys, case) -> None:
    d = tmp_path / ("global_step1" if case == "deepspeed-layout" else case)
    if case == "pickle-only":
        d.mkdir()
        shutil.copy(hf / "config.json", d / "config.json")
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
        fragment = "safetensors"
    else:
        run = tmp_path / "run"
        main(args(ws, "--model", "llama_tiny", "--tokenizer", str(hf), "--max-steps", "1", "--save-dir",
                  str(run)))
        shutil.copytree(run / "step_000001", d)
        if case == "deepspeed-layout":  # DeepSpeed's global_stepN: what our reader cannot take as a model
            (d / "model.safetensors").unlink()
            fragment = "export it first"
        else:
            f = d / "model.safetensors"
            f.write_bytes(f.read_bytes()[:-7])
            fragment = "corrupted"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args(ws, "--model", str(d), "--max-steps", "1"))
    assert exc.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


@pytest.mark.parametrize("arch", ["gpt2", "mixtral"])
def test_other_architectures_train_and_restart_from_their_checkpoint(ws, hf, tmp_path, arch) -> None:
    """A config JSON of another architecture through the command line: GPT-2's Conv1D and Mixtral's 3-D experts
    are projected in INT8 (the banner counts them), a checkpoint of the run is a model directory again."""
    from transformers import GPT2Config, MixtralConfig

    cfg = (GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=96, vocab_size=512) if arch == "gpt2"
           else MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=512,
                              max_position_embeddings=64))
    spec = tmp_path / f"{arch}.json"
    spec.write_text(cfg.to_json_string())
    run = tmp_path / "run"
    first = main(args(ws, "--model", str(spec), "--tokenizer", str(hf), "--max-steps", "2", "--save-dir",
                      str(run)))
    assert first.steps == 2 and all(torch.isfinite(torch.tensor(first.losses)))
    state = load_checkpoint(run / "step_000002").model_state
    assert any(k.endswith("weight_codes") and (".c_attn." in k if arch == "gpt2" else ".experts." in k)
               for k in state)
    tuned = main(args(ws, "--model", str(run / "step_000002"), "--max-steps", "1", "--metrics-jsonl",
                      str(tmp_path / "t.jsonl")))
    assert evals(tmp_path / "t.jsonl")[0]["val_loss"] == first.evals[-1][1]
    assert tuned.steps == 1
