"""Targets per architecture: LLaMA, Mistral, Qwen2, Gemma, Gemma-2, Phi-3, Mixtral, Qwen2-MoE, GPT-2 (CPU, tiny).

For each architecture (hidden 64, 2 layers, 4 experts, INT8 groups of 64 so the 96-wide rows end in a short group):
the exact projected matrices; fresh (keyed random) and pretrained (``save_pretrained`` safetensors, MoE experts one
tensor per expert as transformers 5 writes them) materialisation, whose codes equal the nearest rounding of the
original matrix read the way this file spells out on its own (GPT-2 transposed, experts sliced); logits of the INT8
model equal to the float transformers model holding the dequantised weights (both in fp64); one optimizer step
that changes every matrix with a gradient and, for MoE, leaves a routed-away expert's codes and state untouched;
an fp64 export that plain transformers loads with the dequantised weights exactly; the refusals and warnings.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
)

from qgalore_dist import QGaLoreConfig, QGaLoreOptimizer
from qgalore_dist.checkpoint.export import export_model, iter_dequantized, quantized_modules
from qgalore_dist.errors import ModelSpecError, UsageError
from qgalore_dist.models import build_model, load_pretrained, load_quantized_pretrained, streamed_float_model
from qgalore_dist.models.arch import decoder_layer_modules, parameter_counts
from qgalore_dist.nn.convert import find_target_linears, quantize_model
from qgalore_dist.nn.experts import SplitExperts
from qgalore_dist.nn.int8_linear import QGaLoreLinear
from qgalore_dist.nn.materialize import materialize_quantized
from qgalore_dist.quant.int8 import quantize_rows

GROUP = 64
EXPERTS = 4
TOKENS = dict(vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DECODER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, **TOKENS)
MOE = dict(num_experts_per_tok=2, router_jitter_noise=0.0)

CONFIGS = {
    "llama": lambda: LlamaConfig(**DECODER),
    "mistral": lambda: MistralConfig(**DECODER),
    "qwen2": lambda: Qwen2Config(**DECODER),  # q/k/v biases
    "gemma": lambda: GemmaConfig(**DECODER, head_dim=16),
    "gemma2": lambda: Gemma2Config(**DECODER, head_dim=16, sliding_window=8),
    "phi3": lambda: Phi3Config(**DECODER),
    "mixtral": lambda: MixtralConfig(**DECODER, num_local_experts=EXPERTS, **MOE),
    "qwen2_moe": lambda: Qwen2MoeConfig(**{**DECODER, "intermediate_size": 64}, num_experts=EXPERTS,
                                        num_experts_per_tok=2, moe_intermediate_size=96,
                                        shared_expert_intermediate_size=96, decoder_sparse_step=1),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=96, **TOKENS),
}
ARCHS = list(CONFIGS)
MOE_ARCHS = ["mixtral", "qwen2_moe"]

ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
EXPERT_MATS = ([f"mlp.experts.gate_up_proj.{e}" for e in range(EXPERTS)]
               + [f"mlp.experts.down_proj.{e}" for e in range(EXPERTS)])
# the projected matrices of each decoder layer, in model order
PER_LAYER = {
    **{a: ATTN + MLP for a in ("llama", "mistral", "qwen2", "gemma", "gemma2")},
    "phi3": ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    "mixtral": ATTN + EXPERT_MATS,
    "qwen2_moe": ATTN + EXPERT_MATS + ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                       "mlp.shared_expert.down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}


def _layers(arch: str) -> str:
    return "transformer.h" if arch == "gpt2" else "model.layers"


def expected_targets(arch: str) -> list[str]:
    return [f"{_layers(arch)}.{i}.{s}" for i in range(2) for s in PER_LAYER[arch]]


def config_of(arch: str):
    config = CONFIGS[arch]()
    config._experts_implementation = "eager"  # the reference runs transformers' loop, not grouped_mm
    return config


# --- where a projected matrix lives in the transformers model, spelt out here independently of the library -------
def stored(arch: str, module: str) -> tuple[str, bool, int | None]:
    """(state-dict tensor, stored transposed, expert index) of the INT8 matrix ``module``."""
    m = re.fullmatch(r"(.*\.experts\.(?:gate_up_proj|down_proj))\.(\d+)", module)
    if m:
        return m[1], False, int(m[2])
    return f"{module}.weight", arch == "gpt2", None


def float_matrix(state: dict[str, torch.Tensor], arch: str, module: str) -> torch.Tensor:
    """The [out, in] matrix of ``module`` out of a transformers state dict."""
    name, transposed, expert = stored(arch, module)
    w = state[name]
    w = w[expert] if expert is not None else w
    return w.t() if transposed else w


def reference(model: nn.Module, arch: str) -> nn.Module:
    """The float transformers model (fp64, eager experts) holding the INT8 model's dequantised weights and its
    dense tensors."""
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), experts_implementation="eager")
    ref = ref.double().eval()
    target = {k: v.clone() for k, v in ref.state_dict().items()}
    own = model.state_dict()
    filled = set()
    for k in target:
        if k in own:
            target[k] = own[k].double()
            filled.add(k)
    for name, mod in model.named_modules():
        if isinstance(mod, QGaLoreLinear):
            tname, transposed, expert = stored(arch, name)
            w = mod.dequantized_weight(torch.float64)
            if expert is not None:
                target[tname][expert] = w
                filled.add(f"{tname}[{expert}]")
            else:
                target[tname] = w.t() if transposed else w
            filled.add(tname)
    assert set(target) <= filled  # every tensor of the float model came from the INT8 one
    ref.load_state_dict(target, strict=True)
    return ref


def int8_fresh(arch: str, dense_dtype: torch.dtype = torch.float64) -> tuple[nn.Module, list[str]]:
    model = build_model(config_of(arch), meta=True)
    names = materialize_quantized(model, group_size=GROUP, seed=3, dense_dtype=dense_dtype)
    return model.eval(), names


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(model: nn.Module, ref: nn.Module) -> None:
    ids = batch()
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert got.dtype == want.dtype == torch.float64
    # the same fp64 operations on the same values; 1e-12 leaves room only for a kernel's summation order
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ fresh models
@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_targets_and_logits(arch: str) -> None:
    model, names = int8_fresh(arch)
    assert names == expected_targets(arch)
    assert list(find_target_linears(model)) == expected_targets(arch)
    assert sorted(quantized_modules(model)) == sorted(expected_targets(arch))
    assert all(isinstance(model.get_submodule(n), QGaLoreLinear) for n in names)
    if arch in MOE_ARCHS:
        assert all(isinstance(layer.mlp.experts, SplitExperts) for layer in model.model.layers)
        assert all(layer.mlp.gate.weight.dtype == torch.float64 for layer in model.model.layers)  # router: dense
    if arch == "gpt2":  # rows are output features: c_attn [3·64, 64], c_fc [96, 64]
        assert model.transformer.h[0].attn.c_attn.weight_codes.shape == (192, 64)
        assert model.transformer.h[0].mlp.c_fc.weight_codes.shape == (96, 64)
    assert_same_logits(model, reference(model, arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_and_parameter_counts(arch: str) -> None:
    float_model = AutoModelForCausalLM.from_config(config_of(arch))
    model, names = int8_fresh(arch)
    for m in (float_model, model, build_model(config_of(arch), meta=True)):
        want = list(m.transformer.h if arch == "gpt2" else m.model.layers)
        got = decoder_layer_modules(m)
        assert len(got) == 2 and all(a is b for a, b in zip(got, want))
    state = float_model.state_dict()
    projected = sum(float_matrix(state, arch, n).numel() for n in names)
    total = sum(p.numel() for p in float_model.parameters())
    assert parameter_counts(model) == (projected, total - projected)
    assert parameter_counts(float_model) == (0, total)


def test_decoder_layers_outermost_and_nested_declarations() -> None:
    """A no-split class inside a layer is not a layer of its own; a wrapper finds the declaration inside it."""
    model = build_model(config_of("llama"), meta=True)
    model._no_split_modules = ["LlamaDecoderLayer", "LlamaMLP"]
    assert decoder_layer_modules(model) == list(model.model.layers)
    assert decoder_layer_modules(nn.ModuleDict({"lm": model})) == list(model.model.layers)


def test_decoder_layers_refused_without_no_split_modules() -> None:
    with pytest.raises(ModelSpecError, match="_no_split_modules"):
        decoder_layer_modules(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------------------------------------- pretrained models
def _randomised(arch: str) -> nn.Module:
    """A float model with every parameter re-drawn (norms around 1): a tensor read from the wrong place shows."""
    model = AutoModelForCausalLM.from_config(config_of(arch))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if "norm" in name or "ln_" in name else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, nn.Module]]:
    out = {}
    for arch in ARCHS:
        model = _randomised(arch)
        d = tmp_path_factory.mktemp(arch)
        model.save_pretrained(d, safe_serialization=True)
        out[arch] = (d, model)
    return out


def _file_keys(directory: Path) -> list[str]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("arch", ARCHS)
def test_pretrained_codes_logits_and_export(arch: str, saved, tmp_path) -> None:
    directory, original = saved[arch]
    if arch in MOE_ARCHS:  # transformers 5 writes the experts one tensor per expert: the per-expert read is exercised
        assert not any(k.endswith("experts.gate_up_proj") for k in _file_keys(directory))
    model = load_quantized_pretrained(directory, group_size=GROUP, dense_dtype=torch.float64).eval()
    state = original.state_dict()
    names = [n for n, m in model.named_modules() if isinstance(m, QGaLoreLinear)]
    assert names == expected_targets(arch)
    for n in names:
        codes, scales = quantize_rows(float_matrix(state, arch, n).float(), GROUP, 8, None)
        q = model.get_submodule(n)
        assert torch.equal(q.weight_codes, codes), n
        assert torch.equal(q.weight_scales, scales), n
    assert_same_logits(model, reference(model, arch))

    out = export_model(model, tmp_path / "export", dtype=torch.float64)
    back, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64, output_loading_info=True,
                                                      experts_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    back_state, own = back.state_dict(), model.state_dict()
    for n in names:
        assert torch.equal(float_matrix(back_state, arch, n), model.get_submodule(n).dequantized_weight(torch.float64))
    for k, v in own.items():
        if not k.endswith(("weight_codes", "weight_scales")):
            assert torch.equal(back_state[k], v), k
    assert_same_logits(model, back.eval())


@pytest.mark.parametrize("arch", ["gemma", "gpt2", "mixtral"])
def test_float_loads_of_the_original(arch: str, saved) -> None:
    """The float modes read the same files: load_pretrained and the streamed evaluation model (Gemma's
    non-persistent embed_scale set by the model's rule, Mixtral's per-expert files fused) give the original logits."""
    directory, original = saved[arch]
    ref = copy.deepcopy(original).double().eval()
    ids = batch()
    for model in (load_pretrained(directory, dtype=torch.float64).eval(),
                  streamed_float_model(directory, dtype=torch.float64)):
        model.config._experts_implementation = "eager"
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "mixtral", "qwen2_moe"])
def test_pretrained_row_range_of_transposed_and_expert_matrices(arch: str, saved) -> None:
    """A row shard of a Conv1D matrix is a column range of the file's tensor; one of an expert's gate_up matrix
    crosses from its gate tensor into its up tensor: rows [m/2 - 3, m/2 + 5) of every matrix."""
    directory, _ = saved[arch]
    whole = load_quantized_pretrained(directory, group_size=GROUP)
    part = load_quantized_pretrained(directory, group_size=GROUP, rows=lambda q, m: (m // 2 - 3, m // 2 + 5))
    for n in expected_targets(arch):
        a, b = whole.get_submodule(n), part.get_submodule(n)
        r0 = b.row_offset
        assert r0 == a.out_features // 2 - 3
        assert torch.equal(b.weight_codes, a.weight_codes[r0:r0 + 8])
        assert torch.equal(b.weight_scales, a.weight_scales[r0:r0 + 8])


@pytest.mark.parametrize("arch", MOE_ARCHS + ["gpt2"])
def test_export_reloads_as_pretrained(arch: str, saved, tmp_path) -> None:
    """Our export (3-D experts, Conv1D layout) read back by the INT8 loader: the same codes."""
    directory, _ = saved[arch]
    model = load_quantized_pretrained(directory, group_size=GROUP)
    out = export_model(model, tmp_path / "export", dtype=torch.float32)
    if arch in MOE_ARCHS:
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in _file_keys(out))
    again = load_quantized_pretrained(out, group_size=GROUP)
    for n in expected_targets(arch):
        assert torch.equal(again.get_submodule(n).weight_codes, model.get_submodule(n).weight_codes), n


def test_export_of_partly_targeted_gpt2(saved, tmp_path) -> None:
    """Attention only: the INT8 c_attn / attn.c_proj go back to Conv1D's [in, out], the dense MLP Conv1Ds stay."""
    directory, original = saved["gpt2"]
    model = load_quantized_pretrained(directory, target_modules=ATTN_ROLES, group_size=GROUP,
                                      dense_dtype=torch.float64).eval()
    assert list(quantized_modules(model)) == [f"transformer.h.{i}.attn.{p}" for i in range(2)
                                              for p in ("c_attn", "c_proj")]
    back = AutoModelForCausalLM.from_pretrained(export_model(model, tmp_path / "e", dtype=torch.float64),
                                                dtype=torch.float64)
    state, want = back.state_dict(), original.state_dict()
    for i in range(2):
        for p in ("c_attn", "c_proj"):
            n = f"transformer.h.{i}.attn.{p}"
            assert torch.equal(state[f"{n}.weight"].t(), model.get_submodule(n).dequantized_weight(torch.float64))
        for p in ("c_fc", "c_proj"):
            n = f"transformer.h.{i}.mlp.{p}.weight"
            assert torch.equal(state[n], want[n].double())  # [in, out] as it was
    assert_same_logits(model, back.eval())


def test_iter_dequantized_keeps_the_int8_layout() -> None:
    model, names = int8_fresh("mixtral")
    pairs = iter_dequantized(model.state_dict(), quantized_modules(model))
    assert pairs.int8_modules == frozenset(names)
    got = dict(pairs)
    assert got["model.layers.0.mlp.experts.gate_up_proj.1.weight"].shape == (192, 64)
    assert "model.layers.0.mlp.experts.gate_up_proj" not in got


def test_quantize_model_converts_a_live_model() -> None:
    """quantize_model on a live float GPT-2 / Mixtral: Conv1D transposed, experts split with their weights."""
    for arch in ("gpt2", "mixtral"):
        model = _randomised(arch).double()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        names = quantize_model(model, group_size=GROUP)
        assert names == expected_targets(arch)
        for n in names:  # keyed stochastic rounding: within one step of the original value
            w = model.get_submodule(n).dequantized_weight(torch.float64)
            step = model.get_submodule(n).weight_scales.double().repeat_interleave(GROUP, 1)[:, :w.shape[1]]
            assert ((w - float_matrix(state, arch, n)).abs() <= step * (1 + 1e-6)).all(), n


# --------------------------------------------------------------------------------------------- optimizer step
def _route_away(model: nn.Module, banned: int) -> None:
    """Every router sends no token to expert ``banned``: its slot goes to an expert the token does not use yet."""
    def hook(module, args, out):
        logits, scores, idx = out
        partner = idx.flip(-1)  # top-2: the other expert of the token
        spare = torch.where(partner == 0, 1, 0)
        return logits, scores, torch.where(idx == banned, spare, idx)

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(hook)


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("arch", ARCHS)
def test_one_optimizer_step(arch: str) -> None:
    model, names = int8_fresh(arch, dense_dtype=torch.float32)
    model.train()
    banned = EXPERTS - 1
    if arch in MOE_ARCHS:
        _route_away(model, banned)
    opt = QGaLoreOptimizer(model, QGaLoreConfig(rank=4, update_proj_gap=1, lr=1e-2))
    assert [pm.name for pm in opt.matrices] == [f"{n}.weight" for n in names]
    before = {n: model.get_submodule(n).weight_codes.clone() for n in names}
    state_before = copy.deepcopy(opt.state_dict()["projected"])
    ids = batch(1)
    model(ids, labels=ids).loss.backward()
    away = {n for n in names if n.endswith(f"experts.gate_up_proj.{banned}") or n.endswith(f"down_proj.{banned}")}
    assert len(away) == (4 if arch in MOE_ARCHS else 0)
    for n in names:
        assert (model.get_submodule(n).weight_grad is None) == (n in away), n
    opt.step()
    state_after = opt.state_dict()["projected"]
    for n in names:
        changed = not torch.equal(before[n], model.get_submodule(n).weight_codes)
        assert changed == (n not in away), n
        assert _state_equal(state_before[f"{n}.weight"], state_after[f"{n}.weight"]) == (n in away), n
    assert opt.svd_count == len(names) - len(away)  # no refresh for an expert without a gradient


# ----------------------------------------------------------------------------------------- refusals, warnings
@pytest.mark.parametrize("arch, listed", [
    ("llama", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"),
    ("phi3", "o_proj, qkv_proj, gate_up_proj, down_proj, lm_head"),
    ("mixtral", "q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj, lm_head"),
    ("gpt2", "c_attn, c_proj, c_fc, lm_head"),
])
def test_unmatched_targets_list_the_linear_layers(arch: str, listed: str) -> None:
    model = build_model(config_of(arch), meta=True)
    with pytest.raises(UsageError, match=f"its linear layers are: {re.escape(listed)}$"):
        materialize_quantized(model, ("query_key_value",), group_size=GROUP)


def test_fused_matrix_named_in_part_is_refused() -> None:
    with pytest.raises(UsageError, match=r"names q_proj, v_proj but not k_proj: model\.layers\.\*\.self_attn\.qkv_proj"):
        materialize_quantized(build_model(config_of("phi3"), meta=True), ("q_proj", "v_proj"), group_size=GROUP)
    with pytest.raises(UsageError, match=r"attn\.c_attn computes q_proj, k_proj, v_proj"):
        materialize_quantized(build_model(config_of("gpt2"), meta=True), ("q_proj",), group_size=GROUP)


def test_experts_targeted_in_part_are_refused() -> None:
    with pytest.raises(UsageError, match=r"names down_proj but not gate_up_proj of model\.layers\.\*\.mlp\.experts"):
        materialize_quantized(build_model(config_of("mixtral"), meta=True), ("q_proj", "down_proj"), group_size=GROUP)


def test_roles_pick_the_fused_and_renamed_layers() -> None:
    """Attention only (LLaMA names) on Phi-3, GPT-2 and Mixtral: qkv_proj / c_attn + c_proj; experts stay dense."""
    for arch, want in (("phi3", ["self_attn.o_proj", "self_attn.qkv_proj"]), ("gpt2", ["attn.c_attn", "attn.c_proj"]),
                       ("mixtral", ATTN)):
        model = build_model(config_of(arch), meta=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a deliberate choice: no warning
            names = materialize_quantized(model, ATTN_ROLES, group_size=GROUP)
        assert names == [f"{_layers(arch)}.{i}.{s}" for i in range(2) for s in want]
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (EXPERTS, 192, 64)  # dense, as transformers has it


ATTN_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")


def test_float_mode_warns_about_layers_it_leaves_dense() -> None:
    """The float reference mode converts nothing: targeted Conv1D and 3-D experts are named as left dense."""
    gpt2 = AutoModelForCausalLM.from_config(config_of("gpt2"))
    with pytest.warns(UserWarning, match=r"left dense.*transformer\.h\.\*\.attn\.c_attn \(Conv1D\)"):
        with pytest.raises(ValueError, match="matched no linear"):
            QGaLoreOptimizer(gpt2, QGaLoreConfig(rank=4, quantize=False))
    mixtral = AutoModelForCausalLM.from_config(config_of("mixtral"))
    with pytest.warns(UserWarning, match=r"model\.layers\.\*\.mlp\.experts\.gate_up_proj \(3-D experts of "
                                         r"MixtralExperts\)"):
        opt = QGaLoreOptimizer(mixtral, QGaLoreConfig(rank=4, quantize=False))
    assert len(opt.matrices) == 8  # attention only


def test_unknown_architecture_warns_or_is_refused() -> None:
    opt_config = OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, max_position_embeddings=64, **TOKENS)
    with pytest.warns(UserWarning, match=r"model_type 'opt' is not one of.*these stay dense: "
                                         r"model\.decoder\.layers\.\*\.self_attn\.out_proj, model\.decoder\.layers\.\*"
                                         r"\.fc1, model\.decoder\.layers\.\*\.fc2$"):
        names = materialize_quantized(build_model(opt_config, meta=True), group_size=GROUP)
    assert names == [f"model.decoder.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj",
                                                                                           "q_proj")]
    neox = GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, **TOKENS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refusal alone: no warning about what would have stayed dense
        with pytest.raises(UsageError, match="its linear layers are: query_key_value, dense, dense_h_to_4h, "
                                             "dense_4h_to_h, lm_head$"):
            materialize_quantized(build_model(neox, meta=True), group_size=GROUP)
