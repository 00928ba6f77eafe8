"""Model specs, builds and parameter counts (CPU, a few seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from qgalore_dist.models import (
    ModelSpecError,
    build_model,
    load_pretrained,
    param_count,
    rebuild_rotary_buffers,
    resolve_model_config,
    shipped_config_names,
)

SHIPPED = ["llama_tiny", "llama_20m", "llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b"]
# (hidden, intermediate, layers, heads, kv heads, max positions) promised for each shipped config.
EXPECTED_SHAPES = {
    "llama_tiny": (64, 176, 2, 4, 2, 1024),
    "llama_20m": (256, 688, 4, 4, 4, 1024),
    "llama_60m": (512, 1376, 8, 8, 8, 1024),
    "llama_130m": (768, 2048, 12, 12, 12, 1024),
    "llama_350m": (1024, 2736, 24, 16, 16, 1024),
    "llama_1b": (2048, 5461, 24, 32, 32, 2048),
    "llama_7b": (4096, 11008, 32, 32, 32, 2048),
}


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def test_shipped_names_listed() -> None:
    assert shipped_config_names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_resolves_and_counts(name: str) -> None:
    config = resolve_model_config(name)
    hidden, inter, layers, heads, kv_heads, positions = EXPECTED_SHAPES[name]
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (hidden, inter, layers)
    assert (config.num_attention_heads, config.num_key_value_heads) == (heads, kv_heads)
    assert config.max_position_embeddings == positions
    assert config.vocab_size == 32000 and config.rms_norm_eps == 1e-6
    assert not config.tie_word_embeddings and not config.attention_bias and not config.mlp_bias
    # The closed form must agree with what transformers actually builds (on meta: no memory).
    model = build_model(config, meta=True)
    assert param_count(config) == sum(p.numel() for p in model.parameters())


def test_param_count_published_sizes() -> None:
    # LLaMA-7B with a 32000 vocabulary is the well-known 6,738,415,616 parameters.
    assert param_count(resolve_model_config("llama_7b")) == 6_738_415_616
    assert 55e6 < param_count(resolve_model_config("llama_60m")) < 60e6


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True}, {"head_dim": 8}],
    ids=["plain", "tied", "biases", "head_dim"],
)
def test_param_count_matches_built_tiny(overrides: dict) -> None:
    config = resolve_model_config("llama_tiny", vocab_size=512)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = build_model(config)
    assert param_count(config) == sum(p.numel() for p in model.parameters())


def test_param_count_fallback_other_model_type() -> None:
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64)
    model = build_model(config)
    assert param_count(config) == sum(p.numel() for p in model.parameters())


def test_vocab_override_and_tiny_forward() -> None:
    config = resolve_model_config("llama_tiny", vocab_size=512)
    assert config.vocab_size == 512
    model = build_model(config, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.shape == (512, 64)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    logits = model(torch.randint(0, 512, (2, 8))).logits
    assert logits.shape == (2, 8, 512)


def test_resolve_json_path_and_directory(tmp_path: Path) -> None:
    config = resolve_model_config("llama_tiny")
    config.save_pretrained(tmp_path / "model")  # a directory with config.json, as a checkpoint has
    from_dir = resolve_model_config(tmp_path / "model")
    from_file = resolve_model_config(str(tmp_path / "model" / "config.json"), vocab_size=1000)
    assert from_dir.hidden_size == from_file.hidden_size == 64
    assert from_dir.vocab_size == 32000 and from_file.vocab_size == 1000


@pytest.mark.parametrize("case", ["unknown", "missing", "malformed", "no_config", "no_type", "bad_type", "array"])
def test_bad_specs_raise(case: str, tmp_path: Path) -> None:
    spec: str
    if case == "unknown":
        spec = "llama_3t"
    elif case == "missing":
        spec = str(tmp_path / "nope" / "config.json")
    elif case == "no_config":
        spec = str(tmp_path)
    else:
        content = {
            "malformed": '{"model_type": "llama",',
            "no_type": '{"hidden_size": 8}',
            "bad_type": '{"model_type": "not_a_model"}',
            "array": "[1, 2]",
        }[case]
        (tmp_path / "cfg.json").write_text(content)
        spec = str(tmp_path / "cfg.json")
    with pytest.raises(ModelSpecError) as info:
        resolve_model_config(spec)
    message = str(info.value)
    assert "\n" not in message
    assert spec in message and "llama_60m" in message  # names the problem spec and lists shipped names
    assert isinstance(info.value, ValueError)


def test_meta_build_allocates_nothing() -> None:
    config = resolve_model_config("llama_7b")
    before = _rss_bytes()
    model = build_model(config, meta=True)
    after = _rss_bytes()
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert sum(p.numel() for p in model.parameters()) == param_count(config)
    if before is not None and after is not None:
        # fp32 7B would be 27 GB; the module objects themselves take a few MB.
        assert after - before < 256 * 2**20


def test_meta_materialise_and_rotary_rebuild() -> None:
    config = resolve_model_config("llama_tiny", vocab_size=512)
    reference = build_model(config)
    model = build_model(config, meta=True)
    model.to_empty(device="cpu")
    assert rebuild_rotary_buffers(model, "cpu") >= 1
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 512, (1, 6))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_load_pretrained_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(resolve_model_config("llama_tiny", vocab_size=512))
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 5))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="no config.json"):
        load_pretrained(tmp_path / "empty")


def test_shipped_json_is_plain_llama_config() -> None:
    # Same format GaLore/Q-GaLore ship: loadable by any transformers version without this package.
    from qgalore_dist.models.build import _config_root

    for path in _config_root().glob("*.json"):
        data = json.loads(path.read_text())
        assert data["model_type"] == "llama" and data["architectures"] == ["LlamaForCausalLM"]
