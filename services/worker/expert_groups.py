"""A layer's routed experts in groups, when they are more than the dequantization scratch holds (a prefill: the
scratch is sized for a decode step), with the bits of one call.

Each expert runs once, on all of its tokens: a matmul's rows can round differently at another row count (oneDNN
picks its kernel by the shape), so splitting an expert's tokens across calls, as grouping the tokens did, changed
the last bits of a prompt's hidden states and, on a close greedy choice, a token. Each group's call takes every
(token, k) pair routed to its experts as a token of its own with one expert and weight 1; the routing weights and
the sum over a token's experts are applied at the end, as transformers' ``grouped_mm_experts_forward`` applies them.
"""
from __future__ import annotations

from typing import Callable

import torch

GroupForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def in_expert_groups(forward: GroupForward, experts: torch.Tensor, size: int, hidden_states: torch.Tensor,
                     top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """``forward(group, hidden, index, weights)`` runs the experts forward with the experts of ``group`` (at most
    ``size`` of ``experts``, the sorted routed ids) in place; returns the layer's output for all tokens."""
    num_tokens, k = top_k_index.shape
    flat_index, flat_weights = top_k_index.reshape(-1), top_k_weights.reshape(-1)  # pair s: token s // k
    out = hidden_states.new_empty(num_tokens * k, hidden_states.shape[-1])
    ones = torch.ones_like(flat_weights).unsqueeze(-1)
    for group in experts.to(flat_index.dtype).split(size):
        picked = torch.isin(flat_index, group).nonzero().squeeze(1)
        out[picked] = forward(group, hidden_states[picked // k], flat_index[picked].unsqueeze(-1), ones[picked])
    weighted = out * flat_weights.unsqueeze(-1)  # the dtype transformers weights in (float32 weights: float32)
    return weighted.view(num_tokens, k, -1).sum(dim=1).to(hidden_states.dtype)
