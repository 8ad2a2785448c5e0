"""Experts computed on the worker's CPU from memd's host tier (memd ``--cpu-experts auto|always``; docs/gpu.md).

With a GPU pool and a pinned host tier, memd may answer an acquire with some experts' *host-tier* slots
(``AcquireReply.host``): the expert is not on the GPU, and memd judged that computing it here, on the CPU, costs
less than copying it over PCIe first (``services/memd/host_compute.py``). The worker maps the host tier once (a
/dev/shm region memd page-locked for its copies) and, for such a layer:

- launches the GPU's experts as always, the host experts' (token, k) entries made transformers' own "sentinels"
  (the id past the window's experts that its expert-parallel path skips: no matmul rows, output masked to 0);
- meanwhile computes each host expert on the CPU for the tokens routed to it (the activations copied to the host
  first, in the layer's one wait), with transformers' same experts forward on a one-slot view of the host tier,
  weighted by the tokens' router weights, and adds the rows to the GPU's output.

This changes numerics (the CPU's matmul, and the order of the top-k sum beyond two experts), which is why it is
opt-in. Before READY the worker measures what one expert costs it here, the activations' round trip to the GPU
included (``measure``): memd compares that with its measured copy time per expert.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter

import torch

from common import messages as m
from services.worker import matvec
from services.worker.pool_views import PoolViews

MEASURE_TOKENS = (1, 8)  # token counts timed to fit the fixed and per-token cost
MEASURE_REPEATS = 3  # rounds over the slots
MEASURE_SLOTS = 8  # host slots cycled through (more bytes than a CPU's last-level cache, for real experts)


class HostExperts:
    """The host tier's views and the arithmetic of a layer split between the GPU and the CPU."""

    def __init__(self, views: PoolViews):
        self.views = views

    @classmethod
    def open(cls, hello: m.HelloReply) -> "HostExperts | None":
        """The host tier memd shares (``--cpu-experts auto|always`` with a GPU pool), or None."""
        if not hello.host_pool_name or not hello.host_slots:
            return None
        if any(spec.format for spec in hello.tensors):
            raise RuntimeError("--cpu-experts: quantized experts in a CUDA pool are not supported")
        return cls(PoolViews(hello, host_tier=True))

    @staticmethod
    def counts(experts: list[int], index: list[list[int]] | None, top_k_index: torch.Tensor,
               num_experts: int) -> list[int]:
        """Tokens routed to each of ``experts`` in this layer (what memd weighs a CPU expert's cost by)."""
        if index is not None:
            seen = Counter(e for row in index for e in row)
            return [seen[e] for e in experts]
        return torch.bincount(top_k_index.reshape(-1), minlength=num_experts)[experts].tolist()

    def measure(self, module, hidden_size: int, dtype: torch.dtype, device: torch.device) -> list[float]:
        """[fixed seconds, seconds per token] of one expert computed here: the activations to the CPU, the experts
        forward on a host-tier slot, the rows back to ``device``. The slots taken in turn, several of them (an expert
        memd asks for is cold in DRAM, not in this CPU's caches), the median of each count kept."""
        slots = min(self.views.num_slots, MEASURE_SLOTS)

        def once(tokens: int, slot: int) -> float:
            x = torch.zeros(tokens, hidden_size, dtype=dtype, device=device)
            start = time.perf_counter()
            self.expert(module, slot, x.to("cpu"), torch.ones(tokens, dtype=dtype)).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        for slot in range(slots):
            once(MEASURE_TOKENS[0], slot)  # first touch of every slot's pages
        few, many = (statistics.median(once(t, i % slots) for i in range(MEASURE_REPEATS * slots))
                     for t in MEASURE_TOKENS)
        per_token = max(0.0, (many - few) / (MEASURE_TOKENS[1] - MEASURE_TOKENS[0]))
        return [max(0.0, few - per_token * MEASURE_TOKENS[0]), per_token]

    def expert(self, module, slot: int, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Host-tier ``slot``'s expert on the CPU rows ``x``, each row's output times its router weight."""
        from services.worker.experts import SlotExperts

        one = SlotExperts(module, self.views.window(slot, slot + 1), 1)
        index = torch.zeros(x.shape[0], 1, dtype=torch.long)
        return matvec.forward(one, x, index, weights.view(-1, 1), None)

    def forward(self, binding, routing, slots: list[int], host: list[int], hidden_states: torch.Tensor,
                top_k_index: torch.Tensor, top_k_weights: torch.Tensor, wait_events: list[int] = ()) -> torch.Tensor:
        """The layer's experts output: ``host`` positions of ``routing.experts`` on the CPU (``slots`` holds their
        host-tier slots there), the others on the binding's device pool, once memd's copies into them at
        ``wait_events`` are done (the GPU waits; the activations are on the host before it)."""
        on_host = {routing.experts[j]: slots[j] for j in host}
        device = [(e, s) for e, s in zip(routing.experts, slots) if e not in on_host]
        x, index, weights = hidden_states.to("cpu"), top_k_index.to("cpu"), top_k_weights.to("cpu")  # (one wait)
        if wait_events:
            binding.views.wait(wait_events)
        picked = torch.zeros(binding.num_experts, dtype=torch.bool, device=top_k_index.device)
        picked[list(on_host)] = True
        hit = picked[top_k_index]  # [tokens, k]: entries the CPU computes
        out = self.launch(binding, routing, device, on_host, hidden_states, top_k_index, top_k_weights, hit)
        extra = torch.zeros_like(x)  # the CPU's rows, computed while the GPU runs its experts
        for expert, slot in on_host.items():
            tokens, ks = (index == expert).nonzero(as_tuple=True)
            extra.index_add_(0, tokens, self.expert(binding.proxy._module, slot, x[tokens], weights[tokens, ks]))
        return out + extra.to(out.device)

    @staticmethod
    def launch(binding, routing, device: list[tuple[int, int]], on_host: dict[int, int], hidden_states,
               top_k_index, top_k_weights, hit) -> torch.Tensor:
        """The device experts' part: the CPU's entries are transformers' "sentinels" (an id past the window's
        experts, ``_is_expert_parallel``): no matmul rows, and their output is masked to 0 before the sum."""
        if not device:
            return torch.zeros_like(hidden_states)
        filler = device[0][0]  # (a valid id for the remap; replaced by the sentinel after it)
        rows = None if routing.index is None else [[filler if e in on_host else e for e in row]
                                                   for row in routing.index]
        sub = type(routing)([e for e, _ in device], [], [], [], rows)
        window, index = binding.slot_window(sub, [s for _, s in device], top_k_index.masked_fill(hit, filler))
        window.sentinels = True
        return binding.grouped(window, hidden_states, index.masked_fill(hit, window.num_experts),
                               top_k_weights.masked_fill(hit, 0))
