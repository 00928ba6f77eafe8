"""Streaming load of a local Hugging Face directory (safetensors) straight into INT8 (CPU, a few seconds).

Tiny LLaMA / Qwen2 models (hidden 64, intermediate 320 so ``down_proj`` rows end in a short group, 2 layers,
vocabulary 300) with every parameter re-drawn (biases and norms included, so a tensor loaded from the wrong place
or left at its default shows), saved as one file, sharded (an index), and with tied embeddings.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import qgalore_dist.models.pretrained as pretrained_mod
from qgalore_dist.errors import ModelSpecError
from qgalore_dist.models import (
    SafetensorsCheckpoint,
    build_model,
    load_quantized_pretrained,
    pretrained_eval_loss,
    safetensors_files,
    streamed_float_model,
)
from qgalore_dist.nn.convert import DEFAULT_TARGET_MODULES, find_target_linears
from qgalore_dist.nn.int8_linear import QGaLoreLinear
from qgalore_dist.nn.materialize import materialize_quantized
from qgalore_dist.quant.int8 import dequantize_rows, quantize_rows

GROUP = 256
VOCAB = 300
SMALL = dict(hidden_size=64, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)


def _original(kind: str) -> torch.nn.Module:
    if kind == "llama":
        config = LlamaConfig(**SMALL)
    else:  # Qwen2: q/k/v biases, tied embeddings
        config = Qwen2Config(**SMALL, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms around 1, everything else N(0, 0.05²)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if "norm" in name else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """{'llama': single file, 'llama_sharded': index + shards (same weights), 'qwen_tied': tied + biases}."""
    root = tmp_path_factory.mktemp("hf")
    llama, qwen = _original("llama"), _original("qwen")
    out = {}
    for key, model, shard in (("llama", llama, None), ("llama_sharded", llama, "40KB"), ("qwen_tied", qwen, None)):
        d = root / key
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(d, safe_serialization=True, **kwargs)
        out[key] = (d, model)
    assert (root / "llama_sharded" / "model.safetensors.index.json").is_file()
    assert len(safetensors_files(root / "llama_sharded")) > 2
    assert "lm_head.weight" not in load_file(root / "qwen_tied" / "model.safetensors")
    return out


def _ids(seed: int, batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# exact contents
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("key", ["llama", "llama_sharded", "qwen_tied"])
def test_int8_codes_and_dense_tensors_exact(saved, key: str, dense_dtype: torch.dtype) -> None:
    directory, original = saved[key]
    model = load_quantized_pretrained(directory, group_size=GROUP, dense_dtype=dense_dtype)
    ref = dict(original.named_parameters(remove_duplicate=False))
    targets = find_target_linears(model, DEFAULT_TARGET_MODULES)
    assert len(targets) == 2 * 7
    for name, lin in targets.items():
        assert isinstance(lin, QGaLoreLinear) and lin.qname == f"{name}.weight"
        # round to nearest: key=None, not the stochastic init stream
        codes, scales = quantize_rows(ref[f"{name}.weight"].detach(), GROUP, 8, None)
        assert torch.equal(lin.weight_codes, codes), name
        assert torch.equal(lin.weight_scales, scales), name
        if lin.bias is not None:
            assert torch.equal(lin.bias, ref[f"{name}.bias"].detach().to(dense_dtype)), name
    has_bias = [n for n, m in targets.items() if m.bias is not None]
    assert bool(has_bias) == (key == "qwen_tied")  # Qwen2's q/k/v biases really are exercised
    dense = dict(model.named_parameters(remove_duplicate=False))
    assert set(dense) == {n for n in ref if n.rsplit(".", 2)[-2] not in DEFAULT_TARGET_MODULES or
                          n.endswith(".bias")}
    for name, p in dense.items():
        assert p.dtype == dense_dtype and torch.equal(p, ref[name].detach().to(dense_dtype)), name
    assert model.config.vocab_size == VOCAB and model.lm_head.weight.shape[0] == VOCAB
    tied = key == "qwen_tied"
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    rope = model.model.rotary_emb
    assert torch.equal(rope.inv_freq, original.model.rotary_emb.inv_freq)


def test_sharded_equals_single_file(saved) -> None:
    a = load_quantized_pretrained(saved["llama"][0]).state_dict()
    b = load_quantized_pretrained(saved["llama_sharded"][0]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_row_range_reads_equal_rows_of_whole(saved) -> None:
    directory, _ = saved["llama_sharded"]
    ckpt = SafetensorsCheckpoint(directory)
    name = "model.layers.1.mlp.down_proj.weight"
    whole = ckpt.read(name)
    assert torch.equal(ckpt.read(name, rows=(5, 17)), whole[5:17])
    assert ckpt.read(name, rows=(9, 9)).shape == (0, whole.shape[1])
    with pytest.raises(ValueError, match="outside"):
        ckpt.read(name, rows=(0, whole.shape[0] + 1))

    def rows(qname: str, m: int) -> tuple[int, int]:  # an uneven middle slice, different per matrix
        return m // 3, m // 3 + m // 2

    full = load_quantized_pretrained(directory)
    part = load_quantized_pretrained(directory, rows=rows)
    for name, lin in find_target_linears(full).items():
        shard = part.get_submodule(name)
        r0, r1 = rows(lin.qname, lin.out_features)
        assert shard.row_offset == r0 and shard.weight_codes.shape[0] == r1 - r0
        assert torch.equal(shard.weight_codes, lin.weight_codes[r0:r1]), name
        assert torch.equal(shard.weight_scales, lin.weight_scales[r0:r1]), name


def test_keyed_random_rows_equal_rows_of_whole() -> None:
    # the same seam for a fresh model: a row shard of the keyed init equals the whole matrix's rows
    # (global row indices in the stochastic-rounding stream)
    config = LlamaConfig(**SMALL)
    whole = build_model(config, meta=True)
    materialize_quantized(whole, seed=3)
    from qgalore_dist.nn.materialize import KeyedRandomInit, materialize

    part = build_model(config, meta=True)
    materialize(part, KeyedRandomInit(part, seed=3), rows=lambda q, m: (1, m - 2))
    for name, lin in find_target_linears(whole).items():
        shard = part.get_submodule(name)
        assert torch.equal(shard.weight_codes, lin.weight_codes[1:-2]), name
        assert torch.equal(shard.weight_scales, lin.weight_scales[1:-2]), name


def test_float_mode_loads_every_tensor_without_from_pretrained(saved, monkeypatch) -> None:
    directory, original = saved["qwen_tied"]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64).eval()

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained called")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    model = load_quantized_pretrained(directory, quantize=False, dense_dtype=torch.float64).eval()
    assert not any(isinstance(m, QGaLoreLinear) for m in model.modules())
    theirs = dict(original.named_parameters())
    for name, p in model.named_parameters():
        assert p.dtype == torch.float64 and torch.equal(p, theirs[name].detach().double()), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = _ids(1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_files_are_opened_one_at_a_time(saved, monkeypatch) -> None:
    directory, _ = saved["llama_sharded"]
    real = pretrained_mod.safe_open
    state = {"open": 0, "max": 0, "total": 0}

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            state["open"] += 1
            state["total"] += 1
            state["max"] = max(state["max"], state["open"])
            return self.inner.__enter__()

        def __exit__(self, *exc):
            state["open"] -= 1
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(pretrained_mod, "safe_open", Counting)
    load_quantized_pretrained(directory)
    assert state["total"] > len(safetensors_files(directory)) and state["max"] == 1 and state["open"] == 0


# --------------------------------------------------------------------------------------------------
# the loaded model computes what the original does
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["llama", "qwen_tied"])
def test_int8_logits_close_to_original(saved, key: str) -> None:
    directory, original = saved[key]
    model = load_quantized_pretrained(directory, group_size=GROUP).eval()
    # (a) exactly the original with each targeted weight replaced by its dequantised INT8 (fp32 rounding only)
    deq = copy.deepcopy(original)
    steps = []
    with torch.no_grad():
        for name, lin in find_target_linears(deq).items():
            codes, scales = quantize_rows(lin.weight, GROUP, 8, None)
            lin.weight.copy_(dequantize_rows(codes, scales, GROUP))
            # relative RMS rounding error of this matrix: uniform in ±s/2 -> RMS s/√12, over the weights' RMS
            s = scales.repeat_interleave(GROUP, dim=1)[:, :lin.weight.shape[1]]
            steps.append(float((s.square().mean() / 12).sqrt() / lin.weight.square().mean().sqrt()))
    ids = _ids(2)
    with torch.no_grad():
        got, want_deq, want = model(ids).logits, deq(ids).logits, original(ids).logits
    torch.testing.assert_close(got, want_deq, rtol=1e-5, atol=1e-5)
    # (b) against the original: each quantised linear perturbs its output by a relative RMS of about `step`
    # (independent round-to-nearest errors); 4 quantised linears in series per layer × 2 layers, worst case
    # adding linearly: tolerance = 8 × the largest step (≈ 8 × 0.7% here); a wrong tensor gives O(1).
    tol = 8 * max(steps)
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < tol, (rel, tol)
    assert tol < 0.1


# --------------------------------------------------------------------------------------------------
# the original model's loss, streamed
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["llama_sharded", "qwen_tied"])
def test_pretrained_eval_loss_equals_from_pretrained(saved, key: str) -> None:
    directory, _ = saved[key]
    labels = _ids(4)
    labels[:, :5] = -100  # ignored positions count as transformers counts them
    batches = [(_ids(3), _ids(3)), (_ids(4), labels)]
    # fp64 on both sides, the same modules and kernels: equal up to the loss's own fp32 rounding
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64).eval()
    with torch.no_grad():
        want = sum(float(ref(i, labels=lab).loss) for i, lab in batches) / len(batches)
    got = pretrained_eval_loss(directory, batches, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-7, atol=0)


def test_streamed_model_holds_one_module_at_a_time(saved) -> None:
    directory, _ = saved["qwen_tied"]
    model = streamed_float_model(directory, dtype=torch.float64)
    seen: list[tuple[str, int, int]] = []

    def count_live():
        return sum(p.numel() for m in model.modules() for p in m._parameters.values()
                   if p is not None and not p.is_meta)

    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            own = sum(p.numel() for p in module.parameters(recurse=False))
            # registered after the loader's pre-hook, so it runs with this module's weights loaded
            module.register_forward_pre_hook(lambda m, a, n=name, k=own: seen.append((n, k, count_live())))
    with torch.no_grad():
        model(_ids(5), use_cache=False)
    assert len(seen) == 1 + 2 * 9 + 1 + 1  # embedding, 2 × (7 linears + 2 norms), final norm, lm_head
    assert all(live == own for _, own, live in seen), seen
    assert count_live() == 0


# --------------------------------------------------------------------------------------------------
# refusals: one line each, naming the file (and tensor)
# --------------------------------------------------------------------------------------------------
def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _refused(directory: Path, match: str) -> str:
    for load in (load_quantized_pretrained, lambda d: pretrained_eval_loss(d, [(_ids(0), _ids(0))])):
        with pytest.raises(ModelSpecError, match=match) as info:
            load(directory)
        assert "\n" not in str(info.value)
    return str(info.value)


def test_pickle_only_directory_is_refused_with_conversion_hint(saved, tmp_path) -> None:
    d = tmp_path / "bin_only"
    d.mkdir()
    (d / "config.json").write_text((saved["llama"][0] / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not a pickle: opening it would fail differently")
    msg = _refused(d, "pytorch_model.bin")
    assert "safe_serialization=True" in msg and "from_pretrained" in msg
    with pytest.raises(ModelSpecError, match="pytorch_model.bin"):
        safetensors_files(d)


def test_no_weights_is_refused(saved, tmp_path) -> None:
    d = tmp_path / "config_only"
    d.mkdir()
    (d / "config.json").write_text((saved["llama"][0] / "config.json").read_text())
    _refused(d, "no weights.*model.safetensors")


def test_missing_config_is_refused(saved, tmp_path) -> None:
    d = _copy_dir(saved["llama"][0], tmp_path / "no_config")
    (d / "config.json").unlink()
    _refused(d, "config.json")


def test_missing_shard_is_refused(saved, tmp_path) -> None:
    d = _copy_dir(saved["llama_sharded"][0], tmp_path / "no_shard")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    gone = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (d / gone).unlink()
    _refused(d, f"{gone}.*missing")


def test_missing_tensor_is_refused(saved, tmp_path) -> None:
    d = _copy_dir(saved["llama"][0], tmp_path / "no_tensor")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    _refused(d, r"'model\.layers\.0\.self_attn\.k_proj\.weight' is missing from .*model\.safetensors")


def test_tensor_missing_from_its_shard_is_refused(saved, tmp_path) -> None:
    d = _copy_dir(saved["llama_sharded"][0], tmp_path / "index_lies")
    name = "model.norm.weight"
    shard = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(d / shard)
    del tensors[name]
    save_file(tensors, d / shard, metadata={"format": "pt"})
    _refused(d, rf"'model\.norm\.weight' is missing from shard .*{shard}")


def test_wrong_shape_is_refused(saved, tmp_path) -> None:
    d = _copy_dir(saved["llama"][0], tmp_path / "bad_shape")
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.gate_proj.weight"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    _refused(d, r"'model\.layers\.1\.mlp\.gate_proj\.weight' in .*model\.safetensors has shape \[319, 64\].*"
                r"\[320, 64\]")


def test_given_config_must_keep_the_checkpoint_vocabulary(saved) -> None:
    directory, _ = saved["llama"]
    config = LlamaConfig(**{**SMALL, "vocab_size": 512})
    with pytest.raises(ModelSpecError, match="vocab_size 512 .* 300"):
        load_quantized_pretrained(directory, config)
