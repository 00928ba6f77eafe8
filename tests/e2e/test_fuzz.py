"""Fuzz suite of the command line (issue 17): bad and unusual inputs end in exit 0, or exit 2 with exactly one
``error:`` line naming the problem — never a traceback, never another exception.

* ``test_case``: a table of inputs across flags, ``--config`` files, model configs, ds_configs, data files (text,
  JSONL, the fine-tuning formats, token shards ``.bin`` + sidecar and ``.safetensors``), checkpoints (``--resume`` of
  damaged and foreign directories) and output paths, each with its expected outcome: the fragment of the one error
  line, or ``RUNS`` (exit 0; most cases through ``--dry-run``, which validates everything and writes nothing). Every
  case measured in issue 17 is here (ids ``measured-*``).
* ``test_generated_command_lines``: hypothesis draws argument lists from the parser's own flags with edge values
  (negatives, 0, huge, inf, nan, empty strings, words where numbers belong, missing paths) and asserts, through
  ``--dry-run``, "exit 0, or exit 2 with exactly one ``error:`` line".

Everything runs in-process through :func:`qgalore_dist.train.cli.main`; the launcher-level message (one line per job
under torchrun / deepspeed) is covered by tests/e2e/test_launch.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgalore_dist.train.cli import build_parser, main

RUNS = None  # expected outcome of a case that must run (exit 0, no error line)
NO_DRY_RUN = "<no-dry-run>"  # a case's argv holding this runs for real (the marker and the base --dry-run dropped)

TINY_MODEL = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}
SFT_RECORDS = [{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(24)]
CHAT_RECORDS = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
                for i in range(24)]


class Fx:
    """What a case builds its inputs with: a fresh folder of its own, the workspace (tokenizer, corpus) and a real
    two-step checkpoint (read-only: copy it to damage it)."""

    def __init__(self, ws: SimpleNamespace, root: Path, ckpt: Path) -> None:
        self.ws, self.d, self.ckpt = ws, root, ckpt
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> str:
        return str(self.d / name)

    def file(self, name: str, content: str | bytes) -> str:
        p = self.d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        return str(p)

    def json(self, name: str, value: Any) -> str:
        return self.file(name, json.dumps(value))

    def jsonl(self, name: str, records: list[Any]) -> str:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in records))

    def model(self, name: str = "model.json", drop: tuple[str, ...] = (), **fields: Any) -> str:
        data = {k: v for k, v in {**TINY_MODEL, **fields}.items() if k not in drop}
        return self.json(name, data)

    def dir(self, name: str) -> str:
        (self.d / name).mkdir(parents=True, exist_ok=True)
        return str(self.d / name)

    def bin(self, name: str, tokens: np.ndarray, sidecar: Any = "auto") -> str:
        p = self.d / name
        np.asarray(tokens).tofile(p)
        if sidecar == "auto":
            sidecar = {"dtype": np.asarray(tokens).dtype.name}
        if sidecar is not None:
            self.file(name + ".json", sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
        return str(p)

    def safetensors(self, name: str, tensors: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> str:
        from safetensors.numpy import save_file

        save_file(tensors, str(self.d / name), metadata=meta)
        return str(self.d / name)

    def raw_safetensors(self, name: str, header: Any, tail: bytes = b"\0" * 64) -> str:
        h = json.dumps(header).encode()
        return self.file(name, len(h).to_bytes(8, "little") + h + tail)

    def mixed_folder(self, name: str) -> str:
        self.file(f"{name}/a.txt", "hello")
        self.bin(f"{name}/t.bin", SHARD_OK)
        return str(self.d / name)

    def ckpt_copy(self, name: str, damage: Callable[[Path], None] | None = None) -> str:
        target = self.d / name
        shutil.copytree(self.ckpt, target)
        if damage is not None:
            damage(target)
        return str(target)


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        f = ckpt / name
        f.write_bytes(f.read_bytes()[:100])
    return damage


def _write(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / name).write_bytes(content)


def _remove(name: str) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / name).unlink()


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Fx], list[str]]
    expect: str | None  # the error line's fragment, or RUNS
    task: str = "pretrain"
    output: str | None = None  # RUNS: a fragment the run's output must hold


def C(id: str, argv: Callable[[Fx], list[str]], expect: str | None, **kw: Any) -> Case:
    return Case(id, argv, expect, **kw)


def F(id: str, argv: Callable[[Fx], list[str]], expect: str | None, **kw: Any) -> Case:
    return Case(id, argv, expect, task="finetune", **kw)


U16 = np.uint16
SHARD_OK = (np.arange(4000) % 500).astype(U16)

CASES = [
    # ---- measured in issue 17 -----------------------------------------------------------------------------------
    C("measured-lr-inf", lambda f: ["--lr", "inf"], "--lr must be a finite number"),
    C("measured-weight-decay-inf", lambda f: ["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    C("measured-jsonl-binary-garbage", lambda f: ["--data", f.file("g.jsonl", b"\xff\xfe\x00\x81garbage\n")],
      "g.jsonl:1: not UTF-8"),
    C("measured-model-hidden-not-divisible-by-heads", lambda f: ["--model", f.model(hidden_size=66)],
      "hidden_size 66 is not divisible by num_attention_heads 4"),
    C("measured-metrics-unwritable", lambda f: ["--metrics-jsonl", "/proc/nope/m.jsonl"], "cannot write into"),
    C("measured-metrics-under-a-file", lambda f: ["--metrics-jsonl", f.file("plain", "x") + "/m.jsonl"],
      "is not a directory"),
    C("measured-shard-ids-past-vocab", lambda f: ["--data", f.bin("big.bin", np.arange(4000, dtype=U16))],
      "shards need a vocabulary of 4000 tokens"),
    C("measured-seed-1e20-flag", lambda f: ["--seed", "1e20"], "argument --seed: invalid int value"),
    C("measured-seed-1e20-config", lambda f: ["--config", f.json("c.json", {"seed": 1e20})],
      "seed must be an integer"),
    C("measured-seed-2**64", lambda f: ["--seed", str(2**64)], "--seed must lie in [0, 2**63 - 1]"),
    C("measured-metrics-exists-fresh-run", lambda f: ["--metrics-jsonl", f.file("m.jsonl", '{"step": 1}\n')],
      "already exists"),
    C("measured-model-bare-model-type", lambda f: ["--model", f.json("bare.json", {"model_type": "llama"})],
      "lacks the size field(s) hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size"),
    C("measured-resume-with-longer-max-steps",
      lambda f: ["--optimizer", "adamw", "--resume", f.ckpt_copy("ck"), "--max-steps", "3", NO_DRY_RUN],
      RUNS, output="resumed with --max-steps 3 (was 2)"),
    # ---- flags: numbers out of range, non-finite, wrong types ------------------------------------------------------
    C("lr-nan", lambda f: ["--lr", "nan"], "--lr must be a finite number"),
    C("lr-overflow-1e309", lambda f: ["--lr", "1e309"], "--lr must be a finite number"),
    C("lr-negative", lambda f: ["--lr", "-0.1"], "--lr must be > 0"),
    C("lr-zero", lambda f: ["--lr", "0"], "--lr must be > 0"),
    C("lr-word", lambda f: ["--lr", "fast"], "argument --lr: invalid float value"),
    C("lr-empty", lambda f: ["--lr", ""], "argument --lr: invalid float value"),
    C("scale-nan", lambda f: ["--scale", "nan"], "--scale must be a finite number"),
    C("beta1-one", lambda f: ["--beta1", "1"], "--beta1 must lie in [0, 1)"),
    C("beta2-negative", lambda f: ["--beta2", "-0.5"], "--beta2 must lie in [0, 1)"),
    C("weight-decay-negative", lambda f: ["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    C("grad-clip-negative", lambda f: ["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    C("min-lr-ratio-2", lambda f: ["--min-lr-ratio", "2"], "--min-lr-ratio must lie in [0, 1]"),
    C("seed-negative", lambda f: ["--seed", "-1"], "--seed must lie in"),
    C("max-steps-zero", lambda f: ["--max-steps", "0"], "--max-steps must be a positive integer"),
    C("max-steps-float", lambda f: ["--max-steps", "1.5"], "argument --max-steps: invalid int value"),
    C("batch-size-negative", lambda f: ["--batch-size", "-3"], "--batch-size must be a positive integer"),
    C("seq-len-zero", lambda f: ["--seq-len", "0"], "--seq-len must be a positive integer"),
    C("seq-len-past-model-positions", lambda f: ["--seq-len", "100000"], "exceeds the model's max_position_embeddings"),
    C("rank-zero", lambda f: ["--rank", "0"], "--rank must be a positive integer"),
    C("grad-accum-zero", lambda f: ["--grad-accum", "0"], "--grad-accum must be a positive integer"),
    C("warmup-negative", lambda f: ["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    C("eval-batches-zero", lambda f: ["--eval-batches", "0"], "--eval-batches must be a positive integer"),
    C("log-every-zero", lambda f: ["--log-every", "0"], "--log-every must be a positive integer"),
    C("max-skipped-steps-zero", lambda f: ["--max-skipped-steps", "0"], "--max-skipped-steps must be a positive"),
    C("proj-gap-cap-below-gap", lambda f: ["--proj-gap-cap", "5"], "--proj-gap-cap (5) must be >= --update-proj-gap"),
    C("granularity-not-power-of-two", lambda f: ["--granularity", "3"], "must be a positive power of two"),
    C("granularity-negative", lambda f: ["--granularity", "-2"], "must be a positive power of two"),
    C("target-modules-empty", lambda f: ["--target-modules", " , "], "--target-modules is empty"),
    C("optimizer-unknown", lambda f: ["--optimizer", "sgd"], "argument --optimizer: invalid choice"),
    C("engine-unknown", lambda f: ["--engine", "horovod"], "argument --engine: invalid choice"),
    C("unknown-flag", lambda f: ["--learning-rate", "0.1"], "unrecognized arguments"),
    C("flag-without-value", lambda f: ["--lr"], "argument --lr: expected one argument"),
    C("device-unknown", lambda f: ["--device", "tpu9"], "is not a device"),
    C("save-every-without-save-dir", lambda f: ["--save-every", "5"], "--save-every needs --save-dir"),
    C("keep-last-without-save-dir", lambda f: ["--keep-last", "2"], "--keep-last needs --save-dir"),
    C("resume-auto-without-save-dir", lambda f: ["--resume", "auto"], "--resume auto needs --save-dir"),
    C("comm-mode-with-local-engine", lambda f: ["--comm-mode", "full"], "does nothing with --engine local"),
    C("dist-timeout-with-local-engine", lambda f: ["--dist-timeout", "0"], "--dist-timeout"),
    C("full-reduce-outside-ddp", lambda f: ["--full-reduce", "micro_batch"], "applies to --engine ddp"),
    C("export-dtype-without-export", lambda f: ["--export-dtype", "float32"], "needs --export"),
    C("dense-dtype-with-adamw", lambda f: ["--optimizer", "adamw", "--dense-dtype", "bfloat16"],
      "applies to --optimizer qgalore or projfactor"),
    C("dense-dtype-wider-than-compute", lambda f: ["--dense-dtype", "float64"], "is wider than the compute dtype"),
    C("empty-model", lambda f: ["--model", ""], "--model is empty"),
    C("empty-data", lambda f: ["--data", ""], "--data is empty"),
    C("empty-save-dir", lambda f: ["--save-dir", ""], "--save-dir is empty"),
    C("empty-tokenizer", lambda f: ["--tokenizer", ""], "--tokenizer is empty"),
    C("missing-tokenizer", lambda f: ["--tokenizer", f.path("nope")], "path does not exist"),
    C("unusual-but-valid-flags", lambda f: ["--lr", "1e-300", "--seed", str(2**63 - 1), "--beta2", "0",
                                            "--grad-clip", "0", "--max-steps", str(10**12), "--batch-size", "1"],
      RUNS),
    # ---- --config files -----------------------------------------------------------------------------------------
    C("config-missing", lambda f: ["--config", f.path("nope.json")], "cannot read it"),
    C("config-is-a-directory", lambda f: ["--config", f.dir("cfgdir")], "cannot read it"),
    C("config-binary-garbage", lambda f: ["--config", f.file("c.json", b"\xff\xfe\x00\x81")], "not UTF-8 text"),
    C("config-malformed", lambda f: ["--config", f.file("c.json", '{"lr": 0.1,')], "malformed JSON"),
    C("config-nested-too-deep", lambda f: ["--config", f.file("c.json", "[" * 100000 + "]" * 100000)],
      "nested too deeply"),
    C("config-array", lambda f: ["--config", f.json("c.json", [1, 2])], "expected a JSON object, got a list"),
    C("config-unknown-key", lambda f: ["--config", f.json("c.json", {"learning_rate": 0.1})],
      "unknown setting(s) learning_rate"),
    C("config-dashed-key", lambda f: ["--config", f.json("c.json", {"max-steps": 3})], "use underscores"),
    C("config-finetune-key-in-pretrain", lambda f: ["--config", f.json("c.json", {"lora_r": 4})],
      "fine-tuning settings"),
    C("config-string-for-number", lambda f: ["--config", f.json("c.json", {"lr": "fast"})], "lr must be a number"),
    C("config-float-for-int", lambda f: ["--config", f.json("c.json", {"max_steps": 1.5})],
      "max_steps must be an integer"),
    C("config-bool-for-int", lambda f: ["--config", f.json("c.json", {"max_steps": True})],
      "max_steps must be an integer"),
    C("config-string-for-flag", lambda f: ["--config", f.json("c.json", {"no_gate": "yes"})],
      "no_gate must be true or false"),
    C("config-null", lambda f: ["--config", f.json("c.json", {"lr": None})], "lr must not be null"),
    C("config-bad-choice", lambda f: ["--config", f.json("c.json", {"optimizer": "sgd"})], "is invalid: allowed"),
    C("config-nan-literal", lambda f: ["--config", f.file("c.json", '{"lr": NaN}')], "--lr must be a finite number"),
    C("config-1e400-is-inf", lambda f: ["--config", f.file("c.json", '{"weight_decay": 1e400}')],
      "--weight-decay must be a finite number"),
    C("config-empty-object", lambda f: ["--config", f.json("c.json", {})], RUNS),
    C("config-overridden-by-flag", lambda f: ["--config", f.json("c.json", {"lr": -1}), "--lr", "0.01"], RUNS),
    # ---- model configs (--model FILE or DIR) ---------------------------------------------------------------------
    C("model-unknown-name", lambda f: ["--model", "llama_3t"], "not a shipped config name"),
    C("model-missing-path", lambda f: ["--model", f.path("nope/config.json")], "does not exist"),
    C("model-dir-without-config", lambda f: ["--model", f.dir("empty_model")], "has no config.json"),
    C("model-malformed-json", lambda f: ["--model", f.file("m.json", '{"model_type": "llama",')], "malformed JSON"),
    C("model-binary", lambda f: ["--model", f.file("m.json", b"\xff\xfe\x00")], "is not UTF-8 text"),
    C("model-json-array", lambda f: ["--model", f.json("m.json", [1])], "expected an object"),
    C("model-no-model-type", lambda f: ["--model", f.model(drop=("model_type",))], "has no 'model_type' field"),
    C("model-unknown-model-type", lambda f: ["--model", f.model(model_type="llama9")], "unknown model_type 'llama9'"),
    C("model-missing-two-size-fields", lambda f: ["--model", f.model(drop=("vocab_size", "intermediate_size"))],
      "lacks the size field(s) intermediate_size, vocab_size"),
    C("model-size-as-string", lambda f: ["--model", f.model(hidden_size="64")],
      "hidden_size must be a positive integer, got '64'"),
    C("model-negative-layers", lambda f: ["--model", f.model(num_hidden_layers=-1)],
      "num_hidden_layers must be a positive integer"),
    C("model-zero-heads", lambda f: ["--model", f.model(num_attention_heads=0)],
      "num_attention_heads must be a positive integer"),
    C("model-kv-heads-not-dividing", lambda f: ["--model", f.model(num_key_value_heads=3)],
      "num_attention_heads 4 is not divisible by num_key_value_heads 3"),
    C("model-bad-activation", lambda f: ["--model", f.model(hidden_act="wiggle")],
      "transformers cannot build a causal LM from this config"),
    C("model-bad-field-type", lambda f: ["--model", f.model(rms_norm_eps="small")], "rms_norm_eps"),
    C("model-positions-below-seq-len", lambda f: ["--model", f.model(max_position_embeddings=16)],
      "--seq-len 32 exceeds the model's max_position_embeddings (16)"),
    C("model-gpt2-missing-n-embd", lambda f: ["--model", f.json("g.json", {"model_type": "gpt2", "n_layer": 2,
                                                                            "n_head": 4, "vocab_size": 512})],
      "lacks the size field(s) n_embd"),
    C("model-gpt2-tiny-runs", lambda f: ["--optimizer", "adamw", "--model", f.json(
        "g.json", {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512,
                   "n_positions": 128})], RUNS),
    C("model-minimal-llama-runs", lambda f: ["--model", f.model(drop=("num_key_value_heads",
                                                                     "max_position_embeddings"))], RUNS),
    # a directory is a pretrained model: the dry run builds it on the meta device and finds no weights to read
    C("model-directory-without-weights", lambda f: ["--model", str(Path(f.model("cfgdir/config.json")).parent)],
      "has no weights"),
    # ---- ds_configs ----------------------------------------------------------------------------------------------
    C("ds-config-missing", lambda f: ["--ds_config", f.path("nope.json")], "file does not exist"),
    C("ds-config-with-fsdp", lambda f: ["--engine", "fsdp", "--ds_config", "qgalore"], "cannot be combined"),
    C("ds-config-malformed", lambda f: ["--ds_config", f.file("ds.json", "{")], "malformed JSON"),
    C("ds-config-binary", lambda f: ["--ds_config", f.file("ds.json", b"\xff\xfe")], "not UTF-8 text"),
    C("ds-config-nested-too-deep", lambda f: ["--ds_config", f.file("ds.json", "[" * 100000 + "]" * 100000)],
      "nested too deeply"),
    C("ds-config-array", lambda f: ["--ds_config", f.json("ds.json", [])], "expected a JSON object"),
    C("ds-config-no-qgalore-block", lambda f: ["--ds_config", f.json("ds.json", {"zero_optimization": {"stage": 2}})],
      'has no usable "qgalore" block'),
    C("ds-config-contradicts-flag", lambda f: ["--ds_config", "qgalore"], "contradictory settings"),
    # ---- pre-training data: text and JSONL -----------------------------------------------------------------------
    C("data-missing", lambda f: ["--data", f.path("nope.txt")], "path does not exist"),
    C("data-latin1-text", lambda f: ["--data", f.file("l.txt", "café ".encode("latin-1") * 100)],
      "not UTF-8 text (byte 3)"),
    C("data-empty-text", lambda f: ["--data", f.file("e.txt", "")], "no text found to tokenize"),
    C("data-whitespace-text", lambda f: ["--data", f.file("w.txt", "  \n\n\t")], "no text found to tokenize"),
    C("data-too-short", lambda f: ["--data", f.file("s.txt", "hi")], "too short for seq_len 32"),
    C("data-unsupported-suffix", lambda f: ["--data", f.file("d.csv", "a,b\n")], "unsupported file type '.csv'"),
    C("data-empty-folder", lambda f: ["--data", f.dir("nodata")], "no text (.txt/.md), JSONL"),
    C("data-folder-mixing-text-and-shards", lambda f: ["--data", f.mixed_folder("mix")],
      "mixes text/JSONL files and token shards"),
    C("jsonl-malformed-line", lambda f: ["--data", f.file("m.jsonl", '{"text": "a"}\n{"text": \n')],
      "m.jsonl:2: malformed JSON line"),
    C("jsonl-missing-text-field", lambda f: ["--data", f.jsonl("m.jsonl", [{"body": "a"}])],
      "m.jsonl:1: JSON record has no 'text' field"),
    C("jsonl-text-not-a-string", lambda f: ["--data", f.jsonl("m.jsonl", [{"text": 5}])],
      "field 'text' is int, expected a string"),
    C("jsonl-array-record", lambda f: ["--data", f.jsonl("m.jsonl", [[1, 2]])], "JSON record has no 'text' field"),
    C("jsonl-unpaired-surrogate", lambda f: ["--data", f.file("m.jsonl", '{"text": "ok"}\n{"text": "a\\ud800b"}\n')],
      "m.jsonl:2: field 'text' holds an unpaired surrogate"),
    C("jsonl-nested-too-deep", lambda f: ["--data", f.file("m.jsonl", "[" * 100000 + "]" * 100000 + "\n")],
      "m.jsonl:1: JSON nested too deeply"),
    C("text-with-bom-runs", lambda f: ["--data", f.file("bom.txt", b"\xef\xbb\xbf" + f.ws.corpus.read_bytes()[:30000])],
      RUNS),
    C("text-of-nul-bytes-runs", lambda f: ["--data", f.file("nul.txt", b"\0" * 8000)], RUNS),
    C("jsonl-with-blank-lines-runs", lambda f: ["--data", f.file(
        "ok.jsonl", "\n".join(json.dumps({"text": t}) for t in f.ws.corpus.read_text().split("\n\n")[:300]) + "\n\n")],
      RUNS),
    # ---- data that cannot fill one step (was: OOM-killed, or the same few rows repeated within a step) ------------
    C("batch-larger-than-data", lambda f: ["--batch-size", "100000"],
      "one step needs 100000 sequences (--batch-size 100000 × --grad-accum 1); lower --batch-size or --grad-accum"),
    C("grad-accum-larger-than-data", lambda f: ["--grad-accum", "100000"],
      "one step needs 200000 sequences (--batch-size 2 × --grad-accum 100000)"),
    # 4000 tokens, 129 held out (4 windows of 32 + 1), 3871 for training: 120 windows of 33 tokens at stride 32
    C("shard-batch-one-more-than-windows", lambda f: ["--data", f.bin("t.bin", SHARD_OK), "--batch-size", "121"],
      "t.bin: 120 training sequences of --seq-len 32 + 1 tokens, but one step needs 121 sequences"),
    C("shard-batch-equal-to-windows", lambda f: ["--data", f.bin("t.bin", SHARD_OK), "--batch-size", "120"], RUNS,
      output="120 train"),
    C("batch-larger-than-data-real-run", lambda f: ["--batch-size", "100000", NO_DRY_RUN], "one step needs 100000"),
    F("ft-batch-larger-than-examples", lambda f: ["--data", f.jsonl("d.jsonl", SFT_RECORDS), "--no-packing",
                                                  "--batch-size", "1000"],
      "23 training examples (one per row, --no-packing), but one step needs 1000 rows"),
    F("ft-batch-larger-than-packed-rows", lambda f: ["--data", f.jsonl("d.jsonl", SFT_RECORDS), "--batch-size", "8"],
      "23 training examples packed into 6 rows of --seq-len 64, but one step needs 8 rows"),
    F("ft-epochs-batch-larger-than-examples", lambda f: ["--data", f.jsonl("d.jsonl", SFT_RECORDS), "--epochs", "1",
                                                         "--batch-size", "4", "--grad-accum", "64"],
      "but one step needs 256 rows (--batch-size 4 × --grad-accum 64)"),
    # ---- token shards ---------------------------------------------------------------------------------------------
    C("bin-without-sidecar", lambda f: ["--data", f.bin("t.bin", SHARD_OK, sidecar=None)], "missing JSON sidecar"),
    C("bin-sidecar-malformed", lambda f: ["--data", f.bin("t.bin", SHARD_OK, sidecar="{")], "unreadable shard sidecar"),
    C("bin-sidecar-bad-dtype", lambda f: ["--data", f.bin("t.bin", SHARD_OK, sidecar={"dtype": "int8"})],
      "sidecar 'dtype' must be one of"),
    C("bin-sidecar-num-tokens-word", lambda f: ["--data", f.bin("t.bin", SHARD_OK, sidecar={
        "dtype": "uint16", "num_tokens": "many"})], "sidecar 'num_tokens' must be a positive integer"),
    C("bin-sidecar-num-tokens-wrong", lambda f: ["--data", f.bin("t.bin", SHARD_OK, sidecar={
        "dtype": "uint16", "num_tokens": 7})], "holds 4000 tokens but its sidecar says 7"),
    C("bin-sidecar-vocab-inf", lambda f: ["--data", f.bin("t.bin", SHARD_OK, sidecar='{"dtype": "uint16", '
                                                                                     '"vocab_size": 1e400}')],
      "sidecar 'vocab_size' must be a positive integer"),
    C("bin-sidecar-vocab-below-ids", lambda f: ["--data", f.bin("t.bin", SHARD_OK, sidecar={
        "dtype": "uint16", "vocab_size": 100})], "holds token id 499 but its vocab_size is 100"),
    C("bin-odd-byte-count", lambda f: ["--data", f.bin("t.bin", np.zeros(5, dtype=np.uint8),
                                                       sidecar={"dtype": "uint16"})], "not a whole number"),
    C("bin-empty", lambda f: ["--data", f.bin("t.bin", np.zeros(0, dtype=U16))], "shard is empty"),
    C("bin-valid-runs", lambda f: ["--data", f.bin("t.bin", SHARD_OK)], RUNS),
    C("safetensors-garbage", lambda f: ["--data", f.file("t.safetensors", b"\x01garbage")],
      "unreadable safetensors file"),
    C("safetensors-no-tokens", lambda f: ["--data", f.safetensors("t.safetensors", {"ids": SHARD_OK})],
      "has no 'tokens' tensor (has ['ids'])"),
    C("safetensors-2d-tokens", lambda f: ["--data", f.safetensors("t.safetensors", {"tokens": SHARD_OK.reshape(2, -1)})],
      "'tokens' must be a 1-D integer tensor"),
    C("safetensors-float-tokens", lambda f: ["--data", f.safetensors(
        "t.safetensors", {"tokens": SHARD_OK.astype(np.float32)})], "'tokens' must be a 1-D integer tensor"),
    C("safetensors-negative-ids", lambda f: ["--data", f.safetensors(
        "t.safetensors", {"tokens": SHARD_OK.astype(np.int32) - 3})], "holds negative token id -3"),
    C("safetensors-vocab-metadata-word", lambda f: ["--data", f.safetensors(
        "t.safetensors", {"tokens": SHARD_OK}, {"vocab_size": "lots"})], "metadata 'vocab_size' must be a positive"),
    C("safetensors-tokens-entry-not-object", lambda f: ["--data", f.raw_safetensors("t.safetensors", {"tokens": 5})],
      "malformed safetensors header"),
    C("safetensors-no-data-offsets", lambda f: ["--data", f.raw_safetensors(
        "t.safetensors", {"tokens": {"dtype": "I32", "shape": [10]}})], "malformed safetensors header"),
    C("safetensors-negative-shape", lambda f: ["--data", f.raw_safetensors(
        "t.safetensors", {"tokens": {"dtype": "I32", "shape": [-10], "data_offsets": [0, -40]}})],
      "malformed safetensors header"),
    C("safetensors-offsets-past-file", lambda f: ["--data", f.raw_safetensors(
        "t.safetensors", {"tokens": {"dtype": "I32", "shape": [1000], "data_offsets": [0, 4000]}})],
      "do not match its shape or the file size"),
    C("safetensors-valid-int64-runs", lambda f: ["--data", f.safetensors(
        "t.safetensors", {"tokens": SHARD_OK.astype(np.int64)})], RUNS),
    # ---- fine-tuning data ------------------------------------------------------------------------------------------
    F("ft-no-data", lambda f: ["--data", "default"], "fine-tuning needs --data"),
    F("ft-binary-garbage", lambda f: ["--data", f.file("g.jsonl", b"\xff\xfe\x00garbage")], "g.jsonl:1: not valid UTF-8"),
    F("ft-empty-file", lambda f: ["--data", f.file("e.jsonl", "")], "e.jsonl:1: empty file (no records)"),
    F("ft-text-file", lambda f: ["--data", f.file("x.txt", "hello")], "must be a .jsonl or .json file"),
    F("ft-unknown-layout", lambda f: ["--data", f.jsonl("u.jsonl", [{"foo": "a"}] * 4)],
      "cannot tell the data format"),
    F("ft-completion-number", lambda f: ["--data", f.jsonl("c.jsonl", [{"prompt": "a", "completion": 5}] * 4)],
      "field 'completion' must be a string"),
    F("ft-chat-unknown-role", lambda f: ["--data", f.jsonl("c.jsonl", [
        {"messages": [{"role": "robot", "content": "x"}]}] * 4)], "unknown role 'robot'"),
    F("ft-chat-messages-string", lambda f: ["--data", f.jsonl("c.jsonl", [{"messages": "hello"}] * 4)],
      "field 'messages' must be a list of messages"),
    F("ft-chat-no-assistant", lambda f: ["--data", f.jsonl("c.jsonl", [
        {"messages": [{"role": "user", "content": "x"}]}] * 4)], "has no assistant turn"),
    F("ft-alpaca-no-output", lambda f: ["--data", f.jsonl("a.jsonl", [{"instruction": "x"}] * 4)],
      "missing field 'output' (format alpaca)"),
    F("ft-sharegpt-unknown-from", lambda f: ["--data", f.jsonl("s.jsonl", [
        {"conversations": [{"from": "alien", "value": "x"}]}] * 4)], "unknown role 'alien'"),
    F("ft-format-mismatch", lambda f: ["--data", f.jsonl("p.jsonl", SFT_RECORDS), "--format", "chat"],
      "missing field 'messages' (format chat)"),
    F("ft-unpaired-surrogate", lambda f: ["--data", f.file("s.jsonl", '{"prompt": "a\\udc00", "completion": "b"}\n')],
      "s.jsonl:1: a string holds an unpaired surrogate"),
    F("ft-json-nested-too-deep", lambda f: ["--data", f.file("d.json", "[" * 100000 + "]" * 100000)],
      "nested too deeply"),
    F("ft-answer-list", lambda f: ["--data", f.jsonl("a.jsonl", [{"prompt": "a", "completion": "b", "answer": [1]}])],
      "field 'answer' must be a string or a number"),
    F("ft-single-record", lambda f: ["--data", f.jsonl("one.jsonl", SFT_RECORDS[:1])],
      "at least 2 are needed to hold one out"),
    F("ft-everything-truncated-away", lambda f: ["--data", f.jsonl("p.jsonl", SFT_RECORDS), "--seq-len", "4",
                                                 "--truncation", "skip"], "no example has a loss token"),
    F("ft-chat-template-broken", lambda f: ["--data", f.jsonl("c.jsonl", CHAT_RECORDS), "--chat-template",
                                            f.file("t.jinja", "{% for m in messages %}{{ m.content }{% endfor %}")],
      "chat template does not parse"),
    F("ft-chat-template-missing", lambda f: ["--data", f.jsonl("c.jsonl", CHAT_RECORDS), "--chat-template",
                                             f.path("nope.jinja")], "--chat-template"),
    F("ft-val-data-missing", lambda f: ["--data", f.jsonl("p.jsonl", SFT_RECORDS), "--val-data", f.path("v.jsonl")],
      "--val-data"),
    F("ft-val-fraction-one", lambda f: ["--data", f.jsonl("p.jsonl", SFT_RECORDS), "--val-fraction", "1"],
      "--val-fraction must lie in (0, 1)"),
    F("ft-epochs-and-max-steps", lambda f: ["--data", f.jsonl("p.jsonl", SFT_RECORDS), "--epochs", "1",
                                            "--max-steps", "3"], "give --epochs or --max-steps, not both"),
    F("ft-epochs-negative", lambda f: ["--data", f.jsonl("p.jsonl", SFT_RECORDS), "--epochs", "-1"],
      "--epochs must be a positive number"),
    F("ft-lora-with-qgalore", lambda f: ["--data", f.jsonl("p.jsonl", SFT_RECORDS), "--method", "lora",
                                         "--optimizer", "qgalore"], "--method lora trains small dense adapters"),
    F("ft-lora-r-zero", lambda f: ["--data", f.jsonl("p.jsonl", SFT_RECORDS), "--method", "lora", "--lora-r", "0"],
      "--lora-r must be a positive integer"),
    F("ft-lora-flag-without-lora", lambda f: ["--data", f.jsonl("p.jsonl", SFT_RECORDS), "--lora-r", "4"],
      "apply to --method lora only"),
    F("ft-prompt-completion-runs", lambda f: ["--data", f.jsonl("p.jsonl", SFT_RECORDS)], RUNS),
    F("ft-chat-json-list-runs", lambda f: ["--data", f.json("c.json", CHAT_RECORDS)], RUNS),
    F("ft-alpaca-runs", lambda f: ["--data", f.jsonl("a.jsonl", [{"instruction": f"say {i}", "output": str(i)}
                                                                 for i in range(24)])], RUNS),
    F("ft-sharegpt-lora-runs", lambda f: ["--data", f.jsonl("s.jsonl", [
        {"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"yo {i}"}]}
        for i in range(24)]), "--method", "lora"], RUNS),
    # ---- checkpoints (--resume) ------------------------------------------------------------------------------------
    C("resume-missing-dir", lambda f: ["--resume", f.path("nope")], "checkpoint directory does not exist"),
    C("resume-a-file", lambda f: ["--resume", f.file("ck.txt", "x")], "checkpoint directory does not exist"),
    C("resume-empty-dir", lambda f: ["--resume", f.dir("empty")], "is neither a checkpoint"),
    C("resume-foreign-hf-dir", lambda f: ["--resume", str(Path(f.model("hf/config.json")).parent)],
      "is neither a checkpoint"),
    C("resume-truncated-weights", lambda f: ["--optimizer", "adamw", "--resume",
                                             f.ckpt_copy("ck", _truncate("model.safetensors"))], "is corrupted"),
    C("resume-missing-weights", lambda f: ["--optimizer", "adamw", "--resume",
                                           f.ckpt_copy("ck", _remove("model.safetensors"))], "is missing"),
    C("resume-garbage-optimizer-state", lambda f: ["--optimizer", "adamw", "--resume",
                                                   f.ckpt_copy("ck", _write("optimizer_rank00000.safetensors", b"junk"))],
      "is corrupted"),
    C("resume-malformed-trainer-json", lambda f: ["--optimizer", "adamw", "--resume",
                                                  f.ckpt_copy("ck", _write("trainer.json", b"{"))],
      "trainer.json is unreadable"),
    C("resume-binary-trainer-json", lambda f: ["--optimizer", "adamw", "--resume",
                                               f.ckpt_copy("ck", _write("trainer.json", b"\xff\xfe"))],
      "trainer.json is unreadable"),
    C("resume-trainer-json-array", lambda f: ["--optimizer", "adamw", "--resume",
                                              f.ckpt_copy("ck", _write("trainer.json", b"[]"))],
      "trainer.json is not a checkpoint record"),
    C("resume-other-optimizer", lambda f: ["--optimizer", "qgalore", "--resume", f.ckpt_copy("ck")],
      "was trained with --optimizer adamw"),
    C("resume-other-model", lambda f: ["--optimizer", "adamw", "--model", "llama_20m", "--resume", f.ckpt_copy("ck"),
                                       NO_DRY_RUN], "does not match this model"),
    C("resume-valid-dry-run", lambda f: ["--optimizer", "adamw", "--resume", f.ckpt_copy("ck"), "--max-steps", "4"],
      RUNS, output="checkpoint"),
    C("resume-auto-empty-save-dir", lambda f: ["--resume", "auto", "--save-dir", f.dir("fresh")], RUNS),
    # ---- output paths ---------------------------------------------------------------------------------------------
    C("metrics-is-a-directory", lambda f: ["--metrics-jsonl", f.dir("mdir")], "is a directory"),
    C("metrics-exists-with-overwrite", lambda f: ["--metrics-jsonl", f.file("m.jsonl", '{"step": 1}\n'),
                                                  "--overwrite"], RUNS),
    C("metrics-in-new-nested-dir", lambda f: ["--metrics-jsonl", f.path("a/b/c/m.jsonl")], RUNS),
    C("save-dir-is-a-file", lambda f: ["--save-dir", f.file("s", "x")], "exists and is not a directory"),
    C("save-dir-under-a-file", lambda f: ["--save-dir", f.file("s", "x") + "/sub"], "is not a directory"),
    C("save-dir-unwritable", lambda f: ["--save-dir", "/proc/nope/save"], "cannot write into"),
    C("export-is-a-file", lambda f: ["--export", f.file("e", "x")], "exists and is not a directory"),
    C("export-unwritable", lambda f: ["--export", "/proc/nope/export"], "cannot write into"),
]


@pytest.fixture(scope="module")
def fx_root(ws, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real two-step adamw checkpoint of llama_tiny (step_000002), and the root of the cases' folders."""
    import torch

    root = tmp_path_factory.mktemp("fuzz")
    save = root / "ckpt"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(_base(ws, "pretrain") + ["--optimizer", "adamw", "--max-steps", "2", "--save-dir", str(save),
                                      "--save-every", "2"])
    finally:
        torch.set_num_threads(before)
    return root, save / "step_000002"


def _base(ws: SimpleNamespace, task: str) -> list[str]:
    common = ["--model", "llama_tiny", "--tokenizer", str(ws.tok), "--batch-size", "2", "--rank", "8",
              "--update-proj-gap", "10", "--eval-batches", "1", "--eval-every", "0", "--warmup-steps", "1",
              "--log-every", "1000"]
    if task == "finetune":
        return common + ["--seq-len", "64"]  # --data comes from each case; --max-steps would exclude --epochs
    return common + ["--data", str(ws.corpus), "--seq-len", "32", "--max-steps", "2"]


def outcome(argv: list[str], task: str, capsys) -> tuple[int, list[str], str]:
    """Run ``main`` in-process: (exit status, the ``error:`` lines, all output). Any exception other than SystemExit
    propagates and fails the test with its traceback."""
    capsys.readouterr()
    try:
        main(argv, task=task)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    return code, [ln for ln in text.splitlines() if ln.startswith("error:")], text


def test_table_is_large_and_ids_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 80
    assert sum(c.id.startswith("measured-") for c in CASES) >= 12


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, ws, fx_root, capsys) -> None:
    root, ckpt = fx_root
    fx = Fx(ws, root / case.id, ckpt)
    extra = case.argv(fx)
    argv = _base(ws, case.task)
    if NO_DRY_RUN in extra:
        extra = [a for a in extra if a != NO_DRY_RUN]
    else:
        argv.append("--dry-run")
    code, errors, text = outcome(argv + extra, case.task, capsys)
    assert "Traceback" not in text
    if case.expect is RUNS:
        assert code == 0 and not errors, text[-2000:]
        if case.output is not None:
            assert case.output in text, text[-2000:]
    else:
        assert code == 2, (code, text[-2000:])
        assert len(errors) == 1, errors
        assert case.expect in errors[0], errors[0]


# ---------------------------------------------------------------------------------------------------------------------
# generated command lines
# ---------------------------------------------------------------------------------------------------------------------
INT_VALUES = ["-1", "0", "1", "2", "7", "64", str(2**31), str(2**63), str(10**30), "1.5", "1e3", "", "abc", "nan",
              "-0", " 3"]
FLOAT_VALUES = ["-1", "0", "1e-3", "0.5", "0.9", "1", "2", "inf", "-inf", "nan", "1e309", "1e-320", "", "abc",
                "0x10", "-0.0"]
# flags whose values are paths or names: drawn from these (never the embedded corpus: tokenizing it takes minutes)
PATH_VALUES: dict[str, list[str]] = {
    "--model": ["llama_tiny", "llama_7b", "", "nope_model", "/nonexistent/config.json"],
    "--tokenizer": ["", "/nonexistent/tok"],
    "--data": ["", "/nonexistent/data.txt"],
    "--resume": ["auto", "", "/nonexistent/ckpt"],
    "--device": ["cpu", "", "cuda:7", "nope"],
    "--target-modules": ["", ",", "q_proj", "q_proj,nope", "lm_head"],
    "--config": ["/nonexistent/c.json"],
}
OUTPUT_FLAGS = ("--save-dir", "--metrics-jsonl", "--export")
# launcher / engine flags are not drawn: a distributed engine would start a process group in the test process
SKIPPED = {"--engine", "--ds-config", "--local-rank", "--dry-run", "-h"}


def _flag_values(tmp: Path) -> dict[str, list[str] | None]:
    """Each pre-training flag with its candidate values (None: a store_true flag)."""
    out: dict[str, list[str] | None] = {}
    for action in build_parser("pretrain")._actions:
        if not action.option_strings or action.option_strings[0] in SKIPPED:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:
            out[flag] = None
        elif flag in PATH_VALUES:
            out[flag] = PATH_VALUES[flag]
        elif flag in OUTPUT_FLAGS:
            out[flag] = ["", str(tmp / "out" / flag.strip("-")), "/proc/nope/x", str(tmp)]
        elif action.choices:
            out[flag] = [*action.choices, "bogus", ""]
        elif action.type is int:
            out[flag] = INT_VALUES
        elif action.type is float:
            out[flag] = FLOAT_VALUES
        else:
            out[flag] = ["", "x", "/nonexistent"]
    return out


@st.composite
def command_lines(draw, flags: dict[str, list[str] | None]) -> list[str]:
    chosen = draw(st.lists(st.sampled_from(sorted(flags)), min_size=1, max_size=4))
    argv: list[str] = []
    for flag in chosen:
        argv.append(flag)
        if flags[flag] is not None:
            argv.append(draw(st.sampled_from(flags[flag])))
    return argv


def test_generated_command_lines(ws, tmp_path, capsys) -> None:
    flags = _flag_values(tmp_path)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text(ws.corpus.read_text()[:20000])
    base = _base(ws, "pretrain") + ["--data", str(tiny), "--dry-run"]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(extra=command_lines(flags))
    def check(extra: list[str]) -> None:
        code, errors, text = outcome(base + extra, "pretrain", capsys)
        assert "Traceback" not in text
        assert code in (0, 2), (extra, code, text[-2000:])
        assert len(errors) == (1 if code == 2 else 0), (extra, errors)
        assert not (tmp_path / "out").exists()  # a dry run writes nothing

    check()


def test_model_config_names_the_defaults_it_fills(tmp_path) -> None:
    """A config that omits optional shape fields resolves, and says which transformers defaults it filled (for the
    banner); the shipped configs give every shape field."""
    from qgalore_dist.models import filled_defaults, resolve_model_config

    path = tmp_path / "m.json"
    path.write_text(json.dumps({k: v for k, v in TINY_MODEL.items()
                                if k not in ("num_key_value_heads", "max_position_embeddings")}))
    filled = filled_defaults(resolve_model_config(str(path), vocab_size=512))
    assert "num_key_value_heads=4" in filled and "max_position_embeddings=2048" in filled
    assert not any(f.startswith("head_dim=") for f in filled)  # derived from hidden / heads, not a default
    assert filled_defaults(resolve_model_config("llama_tiny")) == ()
