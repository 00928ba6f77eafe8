"""Checkpoint save / load / verify / export, in-process on a tiny INT8 LLaMA (CPU, a few seconds)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama, token_batches

import qgalore_dist.checkpoint.pieces as pieces
import qgalore_dist.checkpoint.save_load as save_load
from qgalore_dist import QGaLoreConfig, QGaLoreOptimizer, quantize_model
from qgalore_dist.checkpoint import (
    CheckpointError,
    capture_rng_state,
    dequantized_state_dict,
    export_model,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    quantized_modules,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from qgalore_dist.checkpoint.export import main as export_main
from qgalore_dist.checkpoint.save_load import flatten_state, unflatten_state
from qgalore_dist.nn import QGaLoreLinear


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared machine
    yield
    torch.set_num_threads(before)


def _int8_model_and_optimizer(steps: int = 2):
    model = tiny_llama(seed=0)
    quantize_model(model, seed=0)
    opt = QGaLoreOptimizer(model, QGaLoreConfig(rank=8, update_proj_gap=1, lr=1e-2), dense_state_bits=8,
                           stagger_refresh=True)
    for ids in token_batches(steps):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.fixture(scope="module")
def trained():
    return _int8_model_and_optimizer()


def _save(root: Path, step: int, model, opt, **extra) -> Path:
    trainer = {"tokens_seen": 123, "rng": capture_rng_state(), "model_config": model.config.to_dict(),
               "quantized_modules": quantized_modules(model), **extra}
    return save_checkpoint(root, step, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                           trainer_state=json.loads(json.dumps(trainer, default=str)))


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------- codec
def test_flatten_roundtrip_keeps_keys_types_and_values() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": base.t()}, 1: {"exp_avg": base[1]}},
             "param_groups": [{"betas": (0.9, 0.99), "lr": 1e-3, "params": [0, 1], "foreach": None, "amsgrad": False}],
             "__weird__": {"x": [1, "a", None]}, "codes": torch.tensor([1, -2], dtype=torch.int8)}
    tree, tensors = flatten_state(state)
    json.dumps(tree)  # the tree is plain JSON
    assert all(t.is_contiguous() for t in tensors.values())
    ptrs = [t.untyped_storage().data_ptr() for t in tensors.values()]
    assert len(set(ptrs)) == len(ptrs)  # views of one storage were copied apart
    back = unflatten_state(json.loads(json.dumps(tree)), tensors)
    assert set(back["state"]) == {0, 1}  # int keys survive
    assert back["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(back["state"][0]["exp_avg"], base.t()) and torch.equal(back["state"][1]["exp_avg"], base[1])
    assert back["state"][0]["step"].shape == () and back["codes"].dtype == torch.int8
    assert back["__weird__"] == {"x": [1, "a", None]}


def test_flatten_rejects_unstorable_values() -> None:
    with pytest.raises(TypeError, match="unsupported type"):
        flatten_state({"dtype": torch.float32})


# --------------------------------------------------------------------------------------- save and load
def test_save_load_roundtrip_restores_optimizer_exactly(tmp_path: Path, trained) -> None:
    model, opt = trained
    path = _save(tmp_path, 2, model, opt)
    assert path == tmp_path / "step_000002"
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer_rank00000.json",
                                                      "optimizer_rank00000.safetensors", "trainer.json"]
    ckpt = load_checkpoint(path)
    assert ckpt.step == 2 and ckpt.trainer["tokens_seen"] == 123
    assert set(ckpt.model_state) == set(model.state_dict())
    assert ckpt.model_state["model.layers.0.self_attn.q_proj.weight_codes"].dtype == torch.int8
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model_state[k], v), k

    fresh_model = tiny_llama(seed=1)
    quantize_model(fresh_model, seed=1)
    fresh_model.load_state_dict(ckpt.model_state)
    fresh = QGaLoreOptimizer(fresh_model, QGaLoreConfig(rank=8, update_proj_gap=1, lr=1e-2), dense_state_bits=8,
                             stagger_refresh=True)
    fresh.load_state_dict(ckpt.optimizer_state)
    _, a = flatten_state(opt.state_dict())
    tree_b, b = flatten_state(fresh.state_dict())
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert tree_b == flatten_state(opt.state_dict())[0]


def test_checkpoint_of_the_layout_before_pieces_still_loads(tmp_path: Path, trained) -> None:
    """A checkpoint written before per-rank pieces — one ``optimizer.safetensors`` / ``.json`` (a bare tree), no
    ``optimizer_shards`` in trainer.json — loads to the same optimizer state through the same reader."""
    model, opt = trained
    tmp = tmp_path / "step_000002.tmp"
    tmp.mkdir()
    save_load.write_state(tmp, {k: v.detach() for k, v in model.state_dict().items()}, "model.safetensors")
    save_load.write_state(tmp, opt.state_dict(), "optimizer.safetensors", "optimizer.json")
    save_load.finalize_checkpoint(tmp, 2, {"tokens_seen": 1})
    save_load.publish_checkpoint(tmp, tmp_path / "step_000002")
    ckpt = load_checkpoint(tmp_path / "step_000002")
    _, a = flatten_state(opt.state_dict())
    tree_b, b = flatten_state(ckpt.optimizer_state)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert tree_b == flatten_state(opt.state_dict())[0]


def test_verify_detects_corruption(tmp_path: Path, trained) -> None:
    model, opt = trained
    good = _save(tmp_path / "good", 1, model, opt)
    verify_checkpoint(good)

    def variant(name: str) -> Path:
        dst = tmp_path / name / "step_000001"
        shutil.copytree(good, dst)
        return dst

    flipped = variant("flipped")
    raw = bytearray((flipped / "optimizer_rank00000.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (flipped / "optimizer_rank00000.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError,
                       match="corrupted: optimizer_rank00000.safetensors does not match its sha256"):
        verify_checkpoint(flipped)

    truncated = variant("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="corrupted: model.safetensors has"):
        verify_checkpoint(truncated)

    missing = variant("missing")
    (missing / "optimizer_rank00000.json").unlink()
    with pytest.raises(CheckpointError, match="optimizer_rank00000.json is missing"):
        verify_checkpoint(missing)

    garbage = variant("garbage")
    (garbage / "trainer.json").write_text("{ nope")
    with pytest.raises(CheckpointError, match="trainer.json is unreadable"):
        verify_checkpoint(garbage)

    future = variant("future")
    rec = json.loads((future / "trainer.json").read_text())
    rec["version"] = 99
    (future / "trainer.json").write_text(json.dumps(rec))
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        verify_checkpoint(future)

    with pytest.raises(CheckpointError, match="does not exist"):
        verify_checkpoint(tmp_path / "nowhere")


def test_failed_save_leaves_existing_checkpoint_untouched(tmp_path: Path, trained, monkeypatch) -> None:
    model, opt = trained
    path = _save(tmp_path, 5, model, opt)
    before = _digest(tmp_path)
    real = pieces.save_file

    def failing(tensors, filename, metadata=None):
        if filename.endswith("optimizer_rank00000.safetensors"):
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(pieces, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 5, model, opt)  # same step: would replace the existing checkpoint
    assert _digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000005"]  # no temp directory left behind
    monkeypatch.setattr(pieces, "save_file", real)

    # a successful save of the same step replaces it atomically and leaves no side directories
    _save(tmp_path, 5, model, opt, note="second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000005"]
    assert load_checkpoint(path).trainer["note"] == "second"


def test_list_and_latest_ignore_incomplete_directories(tmp_path: Path, trained) -> None:
    model, opt = trained
    assert latest_checkpoint(tmp_path / "absent") is None
    _save(tmp_path, 3, model, opt)
    _save(tmp_path, 12, model, opt)
    (tmp_path / "step_000099.tmp-4242").mkdir()  # an interrupted save of another process
    (tmp_path / "step_000050").mkdir()  # no trainer.json: never published
    (tmp_path / "notes").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 12]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000012"


def test_rng_state_roundtrip() -> None:
    state = json.loads(json.dumps(capture_rng_state()))  # must survive JSON
    a = (torch.rand(5), random.random())
    restore_rng_state(state)
    b = (torch.rand(5), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


# ------------------------------------------------------------------------------------------------ export
def test_export_model_matches_int8_logits(tmp_path: Path, trained) -> None:
    from transformers import AutoModelForCausalLM

    model, _ = trained
    out = export_model(model, tmp_path / "plain", dtype=torch.float32)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QGaLoreLinear)  # the live model is unchanged
    plain = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert isinstance(plain.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    ids = token_batches(1, batch=2, seq=12, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=2e-5, rtol=1e-5)
    q = model.model.layers[1].mlp.down_proj
    assert torch.equal(plain.model.layers[1].mlp.down_proj.weight, q.dequantized_weight(torch.float32))


def test_export_cli_from_checkpoint_and_its_errors(tmp_path: Path, trained, capsys) -> None:
    from transformers import AutoModelForCausalLM

    model, opt = trained
    ckpt = _save(tmp_path / "ck", 2, model, opt)
    export_main([str(ckpt), str(tmp_path / "out"), "--dtype", "bfloat16"])
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    w = plain.model.layers[0].mlp.up_proj.weight
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, model.model.layers[0].mlp.up_proj.dequantized_weight(torch.bfloat16))

    (ckpt / "model.safetensors").write_bytes(b"\0" * 16)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        export_main([str(ckpt), str(tmp_path / "out2")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "corrupted" in err[0]
    assert not (tmp_path / "out2").exists()


def test_dequantized_state_dict_requires_both_int8_tensors(trained) -> None:
    model, _ = trained
    state = dict(model.state_dict())
    quant = quantized_modules(model)
    sd = dequantized_state_dict(state, quant)
    assert not any(k.endswith(("weight_codes", "weight_scales")) for k in sd)
    del state["model.layers.0.self_attn.k_proj.weight_scales"]
    with pytest.raises(CheckpointError, match="no INT8 weight"):
        dequantized_state_dict(state, quant)
    with pytest.raises(CheckpointError, match="not listed as quantised"):
        dequantized_state_dict(model.state_dict(), {})


def test_sharded_bf16_export_loads_in_transformers(tmp_path: Path, trained) -> None:
    """Shards of at most max_shard_bytes with an index, bf16 by default, normal file modes; transformers loads it
    and computes the INT8 model's logits within bf16's rounding of every weight."""
    import os

    from transformers import AutoModelForCausalLM

    model, _ = trained
    out = export_model(model, tmp_path / "bf16", max_shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert all(p.stat().st_size <= 40_000 + 4096 for p in out.glob("model-*.safetensors"))  # + header
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}
    plain = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.bfloat16)
    q = model.model.layers[1].mlp.down_proj
    assert torch.equal(plain.model.layers[1].mlp.down_proj.weight, q.dequantized_weight(torch.bfloat16))
    ids = token_batches(1, batch=2, seq=12, seed=7)[0]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = plain.float()(input_ids=ids).logits
    # bf16 keeps 8 significant bits: every weight moves by <= 2^-9 relative; on this 2-layer model the logits
    # move by a few 1e-3 of their spread
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_export_never_deletes_what_it_did_not_write(tmp_path: Path, trained) -> None:
    from qgalore_dist.checkpoint.export import EXPORT_MARKER, check_export_target
    from qgalore_dist.errors import UsageError

    model, opt = trained
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not empty and is not an earlier export.*notes.txt"):
        export_model(model, target)
    assert (target / "notes.txt").read_text() == "keep me"
    # an earlier export is replaced file by file: what it wrote goes, a file the user added stays
    out = export_model(model, tmp_path / "exp", max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()
    (out / "README.md").write_text("my notes")
    export_model(model, out, dtype=torch.float32)  # one shard now: the old shards and index go
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors", EXPORT_MARKER]
    ckpt = _save(tmp_path / "ck", 1, model, opt)
    for bad, kw, fragment in [(ckpt, {}, "is a checkpoint"), (ckpt / "sub", {}, "is a checkpoint"),
                              (tmp_path / "ck", {"save_dir": tmp_path / "ck"}, "--save-dir"),
                              (tmp_path, {"save_dir": tmp_path / "ck"}, "--save-dir")]:
        with pytest.raises(UsageError, match=fragment):
            check_export_target(bad, **kw)
