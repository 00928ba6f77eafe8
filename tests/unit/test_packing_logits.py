"""Packed rows compute exactly what their examples compute alone, for every architecture this repository trains.

A packed row (several examples back to back, position ids restarting at 0 for each, padding at the end with its own
restarting positions, as `SFTBatcher` builds them) is run with no attention mask and ``use_cache=False``;
transformers then derives a block-diagonal causal mask from the position ids (``find_packed_sequence_indices``). The
logits of each example's slice must equal the logits of the example run alone, in float64, for the ``sdpa`` and
``eager`` attention implementations. `PACKING_UNSUPPORTED` lists the architectures for which this does not hold
(none at present; the test fails if one starts or stops failing without the list changing).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
)

from qgalore_dist.data.sft import PACKING_UNSUPPORTED

TOKENS = dict(vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DECODER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, **TOKENS)
EXPERTS = dict(num_experts_per_tok=2, router_jitter_noise=0.0)
CONFIGS = {
    "llama": lambda: LlamaConfig(**DECODER),
    "mistral": lambda: MistralConfig(**DECODER),  # sliding window 4096: wider than any row here
    "qwen2": lambda: Qwen2Config(**DECODER),
    "gemma": lambda: GemmaConfig(**DECODER, head_dim=8),
    # A window of 4 is narrower than the examples: the window applies inside each example alone as it does packed.
    "gemma2": lambda: Gemma2Config(**DECODER, head_dim=8, sliding_window=4),
    "phi3": lambda: Phi3Config(**DECODER),
    "mixtral": lambda: MixtralConfig(**DECODER, num_local_experts=4, **EXPERTS),
    "qwen2_moe": lambda: Qwen2MoeConfig(**DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                        shared_expert_intermediate_size=48, decoder_sparse_step=1),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=48, **TOKENS),
}
# rows of three examples, of a one-token example and another, of one example alone; each row ends in padding
LENGTHS = [(7, 5, 9), (1, 6), (11,)]
ROW = 24


def _model(arch: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[arch]()
    config._experts_implementation = "eager"  # transformers' per-expert loop: grouped_mm has no float64 CPU kernel
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float64)
    return model.eval()


def _packed_row(examples: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, position_ids)`` ``[1, ROW]`` laid out as `SFTBatcher` lays out a packed row."""
    ids = torch.full((1, ROW), pad_id, dtype=torch.long)
    pos = torch.zeros((1, ROW), dtype=torch.long)
    at = 0
    for ex in examples:
        ids[0, at : at + len(ex)] = ex
        pos[0, at : at + len(ex)] = torch.arange(len(ex))
        at += len(ex)
    pos[0, at:] = torch.arange(ROW - at)
    return ids, pos


@pytest.fixture
def float64_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' eager attention takes its softmax in float32 (``softmax(w, dim=-1, dtype=torch.float32)``) even
    for float64 weights. A float32 reduction over a row of 24 keys and one over a row of 7 round differently (about
    1e-8 here), which would hide a real masking error of that size; keep float64 inputs in float64 so eager is exact
    too. The masked keys are exactly zero after the softmax either way."""
    softmax = torch.nn.functional.softmax

    def exact(input: torch.Tensor, *args, dtype: torch.dtype | None = None, **kwargs) -> torch.Tensor:
        if input.dtype == torch.float64 and dtype == torch.float32:
            dtype = torch.float64
        return softmax(input, *args, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "softmax", exact)


# Gemma-2 has no sdpa path in transformers (its attention logits are soft-capped); it runs eager by default.
CASES = [pytest.param(arch, attn, marks=pytest.mark.skip("transformers: Gemma-2 supports no sdpa attention"))
         if (arch, attn) == ("gemma2", "sdpa") else (arch, attn)
         for arch in CONFIGS for attn in ("sdpa", "eager")]


@pytest.mark.parametrize(("arch", "attn"), CASES)
def test_packed_logits_equal_unpacked(arch: str, attn: str, float64_softmax: None) -> None:
    model = _model(arch, attn)
    assert model.config._attn_implementation == attn
    gen = torch.Generator().manual_seed(1)
    mismatch = []
    with torch.no_grad():
        for lengths in LENGTHS:
            examples = [torch.randint(3, 96, (n,), generator=gen) for n in lengths]
            ids, pos = _packed_row(examples)
            packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
            at = 0
            for ex in examples:
                alone = model(input_ids=ex[None], position_ids=torch.arange(len(ex))[None], use_cache=False).logits[0]
                mismatch.append(float((packed[at : at + len(ex)] - alone).abs().max()))
                at += len(ex)
    worst = max(mismatch)
    if arch in PACKING_UNSUPPORTED:
        assert worst > 1e-6, f"{arch} packs correctly now: remove it from PACKING_UNSUPPORTED"
    else:
        assert worst <= 1e-10, f"{arch}/{attn}: packed logits differ from unpacked by {worst:.3e}"


def test_position_ids_are_what_separates_examples() -> None:
    """Control: the same packed row with plain positions 0..ROW-1 lets examples attend to each other (the test above
    would pass vacuously if the examples never interacted)."""
    model = _model("llama", "sdpa")
    gen = torch.Generator().manual_seed(2)
    examples = [torch.randint(3, 96, (n,), generator=gen) for n in (6, 6)]
    ids, pos = _packed_row(examples)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, 6:12]
        flat = model(input_ids=ids, position_ids=torch.arange(ROW)[None], use_cache=False).logits[0, 6:12]
        alone = model(input_ids=examples[1][None], use_cache=False).logits[0]
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-10)
    assert (flat - alone).abs().max() > 1e-3
