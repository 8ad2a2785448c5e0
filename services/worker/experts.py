"""The ``moeinf`` experts implementation, registered in transformers' ``ExpertsInterface``.

Every family whose experts module is decorated with ``@use_experts_implementation`` runs through it with no
per-model code: the layer's routed experts are acquired from memd, and transformers' own grouped-matmul
forward runs on zero-copy views into the shared pool. The pool is seen as ``[num_slots, ...]`` tensors (one
strided view per expert parameter), expert ids are remapped to slot ids, so no weight is ever copied.

Each layer also tells memd what it routed: a one-way LAYER_NOTE per layer on the trace socket (leased layer or
not, so memd's predictor follows every layer with no round trip), and batched per step (``tracing.py``). The note
carries guesses of the next MoE layers' experts: the routers of layers l+1..l+k applied to this layer's input in
one matmul (``speculate.py``; k and the confidence threshold are memd's, from its last acquire reply). None of it
touches the computed values: the output stays bit-identical.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

from common import messages as m
from common.checkpoint import experts_per_token
from services.worker import quant
from services.worker.speculate import Speculator
from services.worker.tracing import StepRecorder

IMPLEMENTATION = "moeinf"
NEXT_GATE_FLOAT32_BYTES = 256 << 20  # CPU: routers copied to float32 (bf16 matmuls are slow there) up to this much


class StepContext(threading.local):
    """Who the tokens of the current forward belong to, for exact per-request attribution."""

    requests: list[str] = []
    token_owner: torch.Tensor | None = None  # [num_tokens] request index of every flattened token


STEP = StepContext()
RECORDER = StepRecorder(None)  # replaced by bind(); without a memd client it records nothing


def set_step(requests: list[str], token_owner: torch.Tensor, *, positions=None, phases=None) -> None:
    """Declare the next forward: ``token_owner[t]`` is the index in ``requests`` of flattened token t.

    Call it once per forward step. It ends (flushes to memd and the trace file) the step before. ``positions``
    (each token's position in its sequence) and ``phases`` (per request, "prefill" or "decode") default to: a
    request's first step is its prompt, later steps decode, positions count on from the request's earlier tokens.
    """
    STEP.requests = requests
    STEP.token_owner = token_owner
    if RECORDER.client is not None:
        RECORDER.begin(requests, token_owner, positions, phases)


def end_step() -> None:
    """Flush the current step's trace now (``set_step`` and a request's end do it anyway)."""
    RECORDER.end_step()


class PoolViews:
    """The worker's mapping of memd's pool and one ``[num_slots, *shape]`` view per expert parameter."""

    def __init__(self, hello: m.HelloReply):
        if hello.backend != "shm":
            raise RuntimeError(f"pool backend {hello.backend!r} is not supported by this worker")
        self.num_slots = hello.num_slots
        raw = torch.from_file(f"/dev/shm/{hello.pool_name}", shared=True, size=hello.pool_bytes, dtype=torch.uint8)
        by_slot = raw.view(hello.num_slots, hello.slot_bytes)
        self.hello, self.by_slot = hello, by_slot
        self.quantized = {spec.name for spec in hello.tensors if spec.format}  # dequantized by quant.py
        self.params: dict[str, torch.Tensor] = {}
        for spec in hello.tensors:
            dtype = getattr(torch, spec.dtype)
            nbytes = math.prod(spec.shape) * dtype.itemsize
            flat = by_slot[:, spec.offset:spec.offset + nbytes].view(dtype)
            self.params[spec.name] = flat.unflatten(1, spec.shape)


class SlotExperts:
    """Stands in for an experts module inside transformers' forward: slot views instead of stacked weights."""

    def __init__(self, module, params: dict[str, torch.Tensor], num_slots: int):
        self._module = module
        self._params = params
        self.num_experts = num_slots
        for name, tensor in params.items():
            setattr(self, name, tensor)

    def window(self, lo: int, hi: int) -> "SlotExperts":
        """The same views restricted to slots ``lo..hi-1``: grouped_mm then runs over those slots only
        (its cost grows with the number of groups), still without copying a byte."""
        return SlotExperts(self._module, {n: t[lo:hi] for n, t in self._params.items()}, hi - lo)

    def __getattr__(self, name):  # act_fn, _apply_gate, has_bias, is_transposed, ... come from the real module
        return getattr(self._module, name)


@dataclass(frozen=True, slots=True)
class NextGate:
    """The next MoE layer's router, to guess its experts from this layer's input."""

    weight: torch.Tensor  # [experts, hidden]
    bias: torch.Tensor | None
    correction: torch.Tensor | None  # DeepSeek-V3's e_score_correction_bias (added to sigmoid scores)
    top_k: int

    def guess(self, hidden_states: torch.Tensor, num_experts: int) -> tuple[list[int], list[int]]:
        """Experts of the next layer and how many tokens' top-k picked each."""
        hidden = hidden_states.reshape(-1, self.weight.shape[1]).to(self.weight.dtype)
        logits = F.linear(hidden, self.weight, self.bias)
        if self.correction is not None:
            logits = logits.float().sigmoid() + self.correction
        top = torch.topk(logits, self.top_k, dim=-1).indices
        counts = torch.bincount(top.reshape(-1), minlength=num_experts)
        experts = torch.nonzero(counts).squeeze(1)
        return experts.tolist(), counts[experts].tolist()


def find_router(module, num_experts: int, top_k: int, dtype: torch.dtype | None = None) -> NextGate | None:
    """The router next to an experts module: a sibling with a ``[num_experts, hidden]`` weight (a detached copy in
    ``dtype`` when given, so the guess never touches the model's own tensors)."""
    for child in module.children():
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
            return NextGate(weight, bias, correction if isinstance(correction, torch.Tensor) else None, int(k))
    return None


def _guess_dtype(model, layers) -> torch.dtype | None:
    """float32 for the guess on CPU when the model is in a half type and the copies stay small, else its own."""
    hidden = model.config.get_text_config().hidden_size
    copies = sum(layer.num_experts for layer in layers) * hidden * 4
    param = next((p for p in model.parameters() if not p.is_meta), None)
    if param is None or param.device.type != "cpu":
        return None
    if param.dtype in (torch.bfloat16, torch.float16) and copies <= NEXT_GATE_FLOAT32_BYTES:
        return torch.float32
    return None


class ExpertBinding:
    """Per MoE layer: acquire the routed experts (leased: usually no message), compute on their slots."""

    def __init__(self, layer: int, module, views: PoolViews, client, speculator: Speculator | None = None,
                 dequant: quant.Dequantizer | None = None):
        self.layer = layer
        self.dequant = dequant
        self.num_experts = module.num_experts
        self.proxy = SlotExperts(module, views.params, views.num_slots)
        self.client = client
        self.speculator = speculator
        self.check_shapes(module, views)

    def check_shapes(self, module, views: PoolViews) -> None:
        for name, param in module.named_parameters(recurse=False):
            if name in views.quantized:
                continue  # quant.QuantParam checks the quantized layout against the parameter
            got = tuple(views.params[name].shape[1:]) if name in views.params else None
            if got != tuple(param.shape[1:]):
                raise RuntimeError(f"memd's slot layout has {name} {got}, the model wants {tuple(param.shape[1:])}:"
                                   " memd and the worker must serve the same checkpoint")

    def forward(self, hidden_states, top_k_index, top_k_weights):
        experts = torch.unique(top_k_index)
        ids = experts.tolist()
        requests, tokens, weights = attribution(top_k_index, top_k_weights, experts, self.num_experts)
        client = self.client
        guesses = ([], [], []) if self.speculator is None else self.speculator.guess(
            self.layer, hidden_states, client.speculate_layers, client.speculate_threshold)
        step = RECORDER.open
        prefill = step.prefill if step is not None and len(step.prefill) == len(requests) else []
        client.note(RECORDER.step, self.layer, ids, requests, tokens, prefill, *guesses)
        slots = client.acquire(self.layer, ids, [], [], step=RECORDER.step, prefill=prefill)
        nxt = [e for target, e in zip(guesses[0], guesses[1]) if target == self.layer + 1]
        RECORDER.layer(self.layer, ids, tokens, weights, nxt, top_k_index, top_k_weights, leased=client.last_leased)
        try:
            if self.dequant is not None:  # quantized slots: dequantized into a scratch buffer, then the same forward
                return self.dequant.forward(self.proxy._module, self.layer, experts, slots, hidden_states,
                                            top_k_index, top_k_weights)
            lo, hi = min(slots), max(slots) + 1  # compute over the slots in use only: a zero-copy window
            remap = torch.empty(self.num_experts, dtype=top_k_index.dtype)
            remap[experts] = torch.tensor(slots, dtype=top_k_index.dtype) - lo
            window = self.proxy.window(lo, hi)
            return grouped_mm_experts_forward(window, hidden_states, remap[top_k_index], top_k_weights)
        finally:
            if not self.client.leasing:
                self.client.release(self.layer, ids)


def attribution(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, experts: torch.Tensor, num_experts: int):
    """``tokens[r][j]``: how many tokens of request r were routed to ``experts[j]`` in this layer, and
    ``weights[r][j]`` the sum of their router weights."""
    owner = STEP.token_owner
    requests = STEP.requests
    if owner is None or owner.numel() != top_k_index.shape[0]:
        return [], [], []
    flat = (owner.unsqueeze(1).expand_as(top_k_index) * num_experts + top_k_index).reshape(-1)
    size = len(requests) * num_experts
    counts = torch.bincount(flat, minlength=size).view(len(requests), num_experts)[:, experts]
    weights = torch.bincount(flat, weights=top_k_weights.reshape(-1).float(), minlength=size)
    weights = weights.view(len(requests), num_experts)[:, experts]
    return requests, counts.tolist(), weights.tolist()


def moeinf_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    binding = getattr(self, "_moeinf", None)
    if binding is None:
        raise RuntimeError(f"{type(self).__name__} is not bound to memd: load the model with services.worker")
    return binding.forward(hidden_states, top_k_index, top_k_weights)


def register() -> None:
    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, moeinf_experts_forward)


def bind(model, layers, views: PoolViews, client, *, recorder: StepRecorder | None = None,
         next_gate: bool = True, speculate_layers: int = 4, dequant_cache_mb: int = 0) -> None:
    """Bind every experts module to memd; ``recorder`` buffers the step traces (default: to memd only);
    ``next_gate``: guess up to ``speculate_layers`` MoE layers ahead from each layer's hidden state."""
    global RECORDER
    RECORDER = recorder if recorder is not None else StepRecorder(client)
    top_k = experts_per_token(model.config)
    modules = [model.get_submodule(layer.module) for layer in layers]
    dtype = _guess_dtype(model, layers) if next_gate else None
    routers = [find_router(model.get_submodule(layer.module.rpartition(".")[0]), layer.num_experts, top_k, dtype)
               for layer in layers] if next_gate else [None] * len(layers)
    speculator = Speculator(routers, layers[0].num_experts, speculate_layers) if next_gate and layers else None
    client.speculate_layers = client.speculate_layers or speculate_layers
    dequant = None
    if views.quantized:  # one scratch for all layers, for the most experts a layer can hold at once
        capacity = min(layers[0].num_experts, views.num_slots)
        dequant = quant.Dequantizer.build(views.hello, views.by_slot, views.params, modules[0], capacity,
                                          dequant_cache_mb << 20)
    for layer, module in zip(layers, modules):
        module._moeinf = ExpertBinding(layer.index, module, views, client, speculator, dequant)

