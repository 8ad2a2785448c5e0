"""The ``moeinf`` experts implementation, registered in transformers' ``ExpertsInterface``.

Every family whose experts module is decorated with ``@use_experts_implementation`` runs through it with no
per-model code: the layer's routed experts are acquired from memd, and transformers' own grouped-matmul
forward runs on zero-copy views into the shared pool. The pool is seen as ``[num_slots, ...]`` tensors (one
strided view per expert parameter), expert ids are remapped to slot ids, so no weight is ever copied.
"""
from __future__ import annotations

import threading

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

from common import messages as m

IMPLEMENTATION = "moeinf"


class StepContext(threading.local):
    """Who the tokens of the current forward belong to, for exact per-request attribution."""

    requests: list[str] = []
    token_owner: torch.Tensor | None = None  # [num_tokens] request index of every flattened token


STEP = StepContext()


def set_step(requests: list[str], token_owner: torch.Tensor) -> None:
    STEP.requests = requests
    STEP.token_owner = token_owner


class PoolViews:
    """The worker's mapping of memd's pool and one ``[num_slots, *shape]`` view per expert parameter."""

    def __init__(self, hello: m.HelloReply):
        if hello.backend != "shm":
            raise RuntimeError(f"pool backend {hello.backend!r} is not supported by this worker")
        self.num_slots = hello.num_slots
        raw = torch.from_file(f"/dev/shm/{hello.pool_name}", shared=True, size=hello.pool_bytes, dtype=torch.uint8)
        by_slot = raw.view(hello.num_slots, hello.slot_bytes)
        self.params: dict[str, torch.Tensor] = {}
        for spec in hello.tensors:
            dtype = getattr(torch, spec.dtype)
            nbytes = _numel(spec.shape) * dtype.itemsize
            flat = by_slot[:, spec.offset:spec.offset + nbytes].view(dtype)
            self.params[spec.name] = flat.unflatten(1, spec.shape)


class SlotExperts:
    """Stands in for an experts module inside transformers' forward: slot views instead of stacked weights."""

    def __init__(self, module, views: PoolViews):
        self._module = module
        self.num_experts = views.num_slots
        for name, tensor in views.params.items():
            setattr(self, name, tensor)

    def __getattr__(self, name):  # act_fn, _apply_gate, has_bias, is_transposed, ... come from the real module
        return getattr(self._module, name)


class ExpertBinding:
    """Per MoE layer: acquire the routed experts, compute on their slots, release."""

    def __init__(self, layer: int, module, views: PoolViews, client):
        self.layer = layer
        self.num_experts = module.num_experts
        self.proxy = SlotExperts(module, views)
        self.client = client
        self.check_shapes(module, views)

    def check_shapes(self, module, views: PoolViews) -> None:
        for name, param in module.named_parameters(recurse=False):
            got = tuple(views.params[name].shape[1:]) if name in views.params else None
            if got != tuple(param.shape[1:]):
                raise RuntimeError(f"memd's slot layout has {name} {got}, the model wants {tuple(param.shape[1:])}:"
                                   " memd and the worker must serve the same checkpoint")

    def forward(self, hidden_states, top_k_index, top_k_weights):
        experts = torch.unique(top_k_index)
        ids = experts.tolist()
        requests, tokens = attribution(top_k_index, experts, self.num_experts)
        slots = self.client.acquire(self.layer, ids, requests, tokens)
        try:
            remap = torch.empty(self.num_experts, dtype=top_k_index.dtype)
            remap[experts] = torch.tensor(slots, dtype=top_k_index.dtype)
            return grouped_mm_experts_forward(self.proxy, hidden_states, remap[top_k_index], top_k_weights)
        finally:
            self.client.release(self.layer, ids)


def attribution(top_k_index: torch.Tensor, experts: torch.Tensor, num_experts: int):
    """``tokens[r][j]``: how many tokens of request r were routed to ``experts[j]`` in this layer."""
    owner = STEP.token_owner
    requests = STEP.requests
    if owner is None or owner.numel() != top_k_index.shape[0]:
        return [], []
    flat = owner.unsqueeze(1).expand_as(top_k_index) * num_experts + top_k_index
    counts = torch.bincount(flat.reshape(-1), minlength=len(requests) * num_experts)
    counts = counts.view(len(requests), num_experts)[:, experts]
    return requests, counts.tolist()


def moeinf_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    binding = getattr(self, "_moeinf", None)
    if binding is None:
        raise RuntimeError(f"{type(self).__name__} is not bound to memd: load the model with services.worker")
    return binding.forward(hidden_states, top_k_index, top_k_weights)


def register() -> None:
    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, moeinf_experts_forward)


def bind(model, layers, views: PoolViews, client) -> None:
    for layer in layers:
        module = model.get_submodule(layer.module)
        module._moeinf = ExpertBinding(layer.index, module, views, client)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
