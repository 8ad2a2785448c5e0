"""The next MoE layers' routers, copied to guess their experts from an earlier layer's hidden state
(``speculate.py`` applies them several layers ahead; ``experts.bind`` finds them)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.worker.speculate import limit_to_groups

NEXT_GATE_FLOAT32_BYTES = 256 << 20  # CPU: routers copied to float32 (bf16 matmuls are slow there) up to this much


@dataclass(frozen=True, slots=True)
class NextGate:
    """The next MoE layer's router, to guess its experts from this layer's input."""

    weight: torch.Tensor  # [experts, hidden]
    bias: torch.Tensor | None
    correction: torch.Tensor | None  # DeepSeek-V3's e_score_correction_bias (added to sigmoid scores)
    top_k: int
    groups: tuple[int, int, str] | None = None  # group-limited routing: (groups, groups kept, "top2" | "max")

    def guess(self, hidden_states: torch.Tensor, num_experts: int) -> tuple[list[int], list[int]]:
        """Experts of the next layer and how many tokens' top-k picked each."""
        hidden = hidden_states.reshape(-1, self.weight.shape[1]).to(self.weight.dtype)
        logits = F.linear(hidden, self.weight, self.bias)
        if self.correction is not None:
            logits = logits.float().sigmoid() + self.correction
        if self.groups is not None:
            logits = limit_to_groups(logits, *self.groups)
        top = torch.topk(logits, self.top_k, dim=-1).indices
        counts = torch.bincount(top.reshape(-1), minlength=num_experts)
        experts = torch.nonzero(counts).squeeze(1)
        return experts.tolist(), counts[experts].tolist()


def find_router(module, num_experts: int, top_k: int, dtype: torch.dtype | None = None,
                deep: bool = False) -> NextGate | None:
    """The router next to an experts module: a sibling with a ``[num_experts, hidden]`` weight (a detached copy in
    ``dtype`` when given, so the guess never touches the model's own tensors). ``deep``: also a sibling's child, the
    plain linear classifier of a router module (Switch Transformers, NLLB-MoE: experts kept one module per expert)."""
    children = list(module.children())
    if deep:
        children += [grandchild for child in module.children() for grandchild in child.children()]
    for child in children:
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == num_experts:
            if weight.is_meta:
                return None
            bias = getattr(child, "bias", None)
            bias = bias if isinstance(bias, torch.Tensor) else None
            correction = getattr(child, "e_score_correction_bias", None)
            k = getattr(child, "top_k", None) or top_k
            if dtype is not None:
                weight = weight.detach().to(dtype, copy=True)
                bias = None if bias is None else bias.detach().to(dtype, copy=True)
            return NextGate(weight, bias, correction if isinstance(correction, torch.Tensor) else None, int(k),
                            router_groups(child, num_experts))
    return None


def router_groups(router, num_experts: int) -> tuple[int, int, str] | None:
    """Group-limited routing of a router module (DeepSeek-V2/V3 and their kin): its experts split into ``num_group``
    groups, a token keeps the ``topk_group`` best groups, scored by the sum of each group's two best scores, or by
    the best one where the router's ``topk_method`` is ``group_limited_greedy`` (DeepSeek-V2); None without."""
    groups, kept = getattr(router, "num_group", None), getattr(router, "topk_group", None)
    method = getattr(router, "topk_method", None)
    if not isinstance(groups, int) or not isinstance(kept, int) or method == "greedy":
        return None
    if groups <= 1 or kept >= groups or num_experts % groups:
        return None
    return groups, kept, "max" if method == "group_limited_greedy" else "top2"


def guess_dtype(model, layers) -> torch.dtype | None:
    """float32 for the guess on CPU when the model is in a half type and the copies stay small, else its own."""
    hidden = model.config.get_text_config().hidden_size
    copies = sum(layer.num_experts for layer in layers) * hidden * 4
    param = next((p for p in model.parameters() if not p.is_meta), None)
    if param is None or param.device.type != "cpu":
        return None
    if param.dtype in (torch.bfloat16, torch.float16) and copies <= NEXT_GATE_FLOAT32_BYTES:
        return torch.float32
    return None
