"""MoE experts as one linear per expert matrix, so each expert's matrix can be an INT8 projected matrix.

transformers >= 5 stores the experts of Mixtral / Qwen2-MoE as two 3-D parameters, ``gate_up_proj`` [E, 2·I, H]
and ``down_proj`` [E, H, I], and its experts forward reads them as tensors — ``F.linear(x, self.gate_up_proj[e])``
in the eager loop, or the whole 3-D tensor in the ``grouped_mm`` / ``batched_mm`` kernels chosen by
``config._experts_implementation`` (``transformers.integrations.moe.use_experts_implementation``). There is no
``nn.Linear`` to swap for an INT8 one (the same problem transformers' own FP8 path met,
https://github.com/huggingface/transformers/pull/42654), so :class:`SplitExperts` *replaces the experts module*:
``gate_up_proj`` and ``down_proj`` become ``nn.ModuleList`` s of E linears (each later a
:class:`~.int8_linear.QGaLoreLinear`), and its forward is transformers' eager loop calling them.

**One projected matrix per expert.** ``experts.gate_up_proj.<e>`` ([2·I, H]) and ``experts.down_proj.<e>``
([H, I]) are ordinary projected matrices, named ``<module>.weight`` like every other (rounding streams, optimizer
state and ownership plans are keyed by these names). Sharded engines shard each of them **by rows, per expert
matrix** (FSDP2 / ZeRO-3 shard every ``QGaLoreLinear`` by rows), not by expert. Exports and pretrained
checkpoints use transformers' 3-D layout (:mod:`.layout` maps ``<experts>.gate_up_proj.<e>.weight`` to slice
``e`` of ``<experts>.gate_up_proj``).

**Routed-away experts.** The loop runs only the experts some token was routed to; an expert without tokens is
never called, its layer never reaches backward, so it has no weight gradient (``weight_grad is None``) and the
optimizer neither steps nor refreshes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SUPPORTED_EXPERTS", "SplitExperts", "expert_params", "supports"]

#: experts classes whose eager forward :meth:`SplitExperts.forward` reproduces (concatenated [gate; up] rows, no
#: bias, not transposed, act(gate) · up, routing weights applied after down_proj)
SUPPORTED_EXPERTS = frozenset({"MixtralExperts", "Qwen2MoeExperts"})
#: the 3-D parameters of a supported experts module, in state-dict order
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def supports(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module :class:`SplitExperts` can replace."""
    if type(module).__name__ not in SUPPORTED_EXPERTS:
        return False
    flags = dict(has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True, has_post_expert_norm=False)
    return all(getattr(module, k, v) == v for k, v in flags.items())


def expert_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """The 3-D expert parameters of a supported experts module (``{"gate_up_proj": [E, 2·I, H], "down_proj":
    [E, H, I]}``)."""
    return {n: getattr(module, n) for n in EXPERT_PARAMS}


class SplitExperts(nn.Module):
    """Drop-in for a supported transformers experts module, with one linear per expert matrix.

    ``gate_up_proj[e]``: linear H -> 2·I (weight [2·I, H], gate rows first); ``down_proj[e]``: linear I -> H.
    ``forward(hidden_states [T, H], top_k_index [T, k] int64, top_k_weights [T, k]) -> [T, H]`` is transformers'
    eager experts loop (``MixtralExperts.forward``) with each ``F.linear(x, W[e])`` replaced by the module call.
    """

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: nn.Module,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.act_fn = act_fn
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_up_proj = nn.ModuleList(nn.Linear(hidden_dim, 2 * intermediate_dim, **kw) for _ in range(num_experts))
        self.down_proj = nn.ModuleList(nn.Linear(intermediate_dim, hidden_dim, **kw) for _ in range(num_experts))

    @classmethod
    def from_experts(cls, experts: nn.Module) -> "SplitExperts":
        """The split form of a supported experts module: on the meta device when it is, else with its weights
        copied expert by expert (``gate_up_proj[e].weight = experts.gate_up_proj[e]``)."""
        gate_up, down = experts.gate_up_proj, experts.down_proj  # [E, 2·I, H], [E, H, I]
        e, two_i, h = gate_up.shape
        # built on the meta device either way: nn.Linear's own init would draw from the global RNG for nothing
        new = cls(e, h, two_i // 2, experts.act_fn, device="meta", dtype=gate_up.dtype)
        if not gate_up.is_meta:
            for i in range(e):
                new.gate_up_proj[i].weight = nn.Parameter(gate_up[i].detach().clone(), gate_up.requires_grad)
                new.down_proj[i].weight = nn.Parameter(down[i].detach().clone(), down.requires_grad)
        return new

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # num_experts + 1 classes as upstream: index num_experts marks "not on this rank" under expert parallelism
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            e = int(expert_idx[0])
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            gate, up = self.gate_up_proj[e](hidden_states[token_idx]).chunk(2, dim=-1)
            current = self.down_proj[e](self.act_fn(gate) * up)
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}"
