"""``--eval-generate N``: greedy answers to N held-out prompts, scored by exact match of the final answer.

Every engine runs this the same way. The prompts are dealt to ranks round-robin; a rank with fewer prompts repeats
its last one (the repeat is not scored), so every rank generates for the same number of prompts. Each new token is
one forward of the whole sequence on every rank, and a rank stops only when *every* rank's current answer has ended
(a one-number all-reduce per token): under fsdp and ZeRO-3 a forward is a collective, and answers of different
lengths must not leave one rank waiting in a forward the others never enter. No KV cache: it keeps the forward the
training forward (packed-row rules, INT8 linears, engine hooks) at the price of recomputing the prefix — fine for
the short answers an exact-match evaluation reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..data.sft import extract_answer

__all__ = ["GenerationScore", "exact_match", "normalize_answer"]

def normalize_answer(text: str) -> str:
    """Comparison form of an answer: outer whitespace and a trailing full stop removed, inner whitespace single,
    thousands separators in numbers dropped (``1,024`` = ``1024``)."""
    text = " ".join(text.split()).rstrip(".").strip()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)


@dataclass
class GenerationScore:
    """Exact match over the prompts (every rank holds the same numbers) and a few samples for the log."""

    correct: int = 0
    total: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exact_match(self) -> float:
        return self.correct / self.total if self.total else float("nan")


@torch.no_grad()
def exact_match(model: nn.Module, prompts: Sequence[Any], tokenizer, engine, device: torch.device, *,
                max_new_tokens: int, n_samples: int = 3) -> GenerationScore:
    """Greedy generation for ``prompts`` (objects with ``ids`` [n] int, ``prompt_len`` and ``answer``: the tokens
    of the prompt are ``ids[:prompt_len]``), in lockstep over the engine's ranks (module docstring).

    An answer ends at the tokenizer's EOS (the shipped chat template ends every assistant turn with it) or after
    ``max_new_tokens`` tokens; it is correct when its final answer (:func:`~qgalore_dist.data.sft.extract_answer`,
    the rule the references were read with) equals the reference after :func:`normalize_answer`."""
    rank, world = engine.rank, engine.world_size
    mine = list(prompts[rank::world])
    slots = -(-len(prompts) // world)
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    correct = total = 0
    samples: list[dict[str, Any]] = []
    try:
        for i in range(slots):
            real = i < len(mine)
            ex = mine[i] if real else (mine[-1] if mine else prompts[0])
            ids = torch.as_tensor(ex.ids[:ex.prompt_len], dtype=torch.long, device=device)[None]
            new: list[int] = []
            done = False
            for _ in range(max_new_tokens):
                if not done:
                    logits = model(input_ids=ids, use_cache=False).logits
                    nxt = int(logits[0, -1].float().argmax())
                    new.append(nxt)
                    ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
                    done = eos is not None and nxt == eos
                elif world > 1:
                    # keep the lockstep: a forward the others are in (sharded engines gather weights inside it)
                    model(input_ids=ids, use_cache=False)
                if engine.sum_over_ranks([0.0 if done else 1.0])[0] == 0:
                    break
            if real:
                text = tokenizer.decode(new, skip_special_tokens=True)
                got = extract_answer(text)
                ok = got is not None and ex.answer is not None and \
                    normalize_answer(got) == normalize_answer(ex.answer)
                correct += int(ok)
                total += 1
                if len(samples) < n_samples:
                    samples.append({"source": getattr(ex, "source", ""), "answer": ex.answer, "generated": text,
                                    "correct": ok})
    finally:
        model.train(was_training)
    correct, total = (int(v) for v in engine.sum_over_ranks([float(correct), float(total)]))
    return GenerationScore(correct, total, samples)
