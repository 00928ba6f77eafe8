"""Small builders shared by the tests (no fixtures: importable from spawned processes too)."""

from __future__ import annotations

import torch


def tiny_llama_config(vocab: int = 128, hidden: int = 64, inter: int = 176, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**kw)).to(dtype)


def token_batches(n: int, batch: int = 2, seq: int = 16, vocab: int = 128, seed: int = 1) -> list[torch.Tensor]:
    """A learnable synthetic stream: each sequence counts upward mod ``vocab`` from a random start."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        out.append((start + torch.arange(seq)) % vocab)
    return out


def train(model, opt, batches: list[torch.Tensor], accum: int = 1) -> list[float]:
    """Optimizer steps over ``batches`` (``accum`` micro-batches per step); returns each step's mean loss."""
    losses = []
    for i in range(0, len(batches), accum):
        total = 0.0
        for x in batches[i:i + accum]:
            loss = model(input_ids=x, labels=x).loss
            (loss / accum).backward()
            total += loss.item() / accum
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def join_within(procs, seconds: float) -> int:
    """Start ``procs``, wait for all of them up to ``seconds`` in total, kill stragglers; 1 if any hung, else 0."""
    import time

    for p in procs:
        p.start()
    deadline = time.monotonic() + seconds
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    stuck = [p for p in procs if p.is_alive()]
    for p in stuck:
        p.kill()
    return 1 if stuck else 0
