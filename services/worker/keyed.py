"""Experts kept one module per expert in an ``nn.ModuleDict`` (Switch Transformers, NLLB-MoE), bound to memd.

These families are not on transformers' ExpertsInterface: the dict's own forward loops over the routed experts and
calls ``self[f"expert_{i}"](tokens)`` for each. The binding replaces that forward and runs it twice, with no
per-model code:

1. **Routing.** The dict's forward runs on a ``[tokens, 1 + experts]`` tag (row t starts with t) with stand-ins that
   compute nothing and note which rows each expert was given: that is the layer's routing, exactly as the forward
   decides it (capacity drops included), and the forward's own weighting leaves each token's weight of each expert
   in the tag's other columns. It costs a few tiny tensor ops per routed expert.
2. **Compute.** The routed experts are acquired from memd in one call (leased: usually no message), and the dict's
   forward runs on the real hidden states, each expert called as itself with its parameters swapped for zero-copy
   views of its pool slot (``torch.func.functional_call``): the same operations on the same values, so the output
   is bit-identical to the model's own.
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from common.checkpoint import EXPERT_KEY
from services.worker.experts import ExpertBinding, Routing
from services.worker.lockstep import together
from services.worker.pool_views import PoolViews
from services.worker.speculate import Speculator
from services.worker.tracing import StepState


class _Delegate:
    """Stands in for the dict inside its own forward: ``self[key]`` is ``pick(expert number)``; every other
    attribute (``num_experts``, ``training``, a dropout, ...) is the real module's."""

    def __init__(self, module, pick):
        self._module, self._pick = module, pick

    def __getitem__(self, key: str):
        match = EXPERT_KEY.fullmatch(key)
        if match is None:
            return self._module[key]
        return self._pick(int(match.group(1)))

    def __getattr__(self, name):
        return getattr(self._module, name)


class Ragged:
    """Per-token routed experts of unequal count (a token the capacity dropped has none), shaped for the trace
    writer (``tolist()``; weights ``float().tolist()``)."""

    def __init__(self, rows: list[list]):
        self.rows = rows

    def tolist(self) -> list[list]:
        return self.rows

    def float(self) -> "Ragged":
        return self


class KeyedBinding(ExpertBinding):
    """Per MoE layer of one-module-per-expert experts: route (pass 1), acquire, compute on slot views (pass 2)."""

    def __init__(self, layer: int, module, views: PoolViews, client, steps: StepState,
                 speculator: Speculator | None = None):
        self.layer = layer
        self.module = module
        self.forward_of = type(module).forward
        self.num_experts = module.num_experts
        self.views = views
        self.client = client
        self.steps = steps
        self.speculator = speculator
        self.dequant = None
        self.host = None  # (memd --cpu-experts is for a GPU pool: this family runs on the CPU)
        self.experts = {int(EXPERT_KEY.fullmatch(k).group(1)): m for k, m in module.items() if EXPERT_KEY.fullmatch(k)}
        self.check_shapes(module, views)
        module.forward = self.forward  # the instance's forward: nn.Module.__call__ reaches it

    def check_shapes(self, module, views: PoolViews) -> None:
        expert = module[next(k for k in module.keys() if EXPERT_KEY.fullmatch(k))]
        for name, param in expert.named_parameters():
            got = tuple(views.params[name].shape[1:]) if name in views.params else None
            if got != tuple(param.shape):
                raise RuntimeError(f"memd's slot layout has {name} {got}, the model wants {tuple(param.shape)}:"
                                   " memd and the worker must serve the same checkpoint")

    def forward(self, hidden_states, *args, **kwargs):
        lockstep = self.steps.lockstep
        if lockstep is not None:  # several decoder forwards in threads: one of them runs this layer for all
            return lockstep.meet(self, hidden_states, args, kwargs)
        return self.compute(hidden_states, args, kwargs)

    def forward_together(self, inputs: list) -> list[torch.Tensor]:
        """The layer for several forwards at once (``lockstep.together``: one acquire, one pass of each expert)."""
        return together(self.compute, inputs)

    def compute(self, hidden_states, args, kwargs):
        index, weights = self.route(hidden_states, args, kwargs)
        routing = Routing.small(index, weights, self.steps.requests, self.steps.owner)
        span, threshold = self.guess_span()
        every = ([], [], []) if span is None else self.speculator.guess(self.layer, hidden_states, span, threshold)
        slots = self.acquire(routing, every, Ragged(index), Ragged(weights))
        try:
            if self.client.wait_events:  # (a GPU pool, which these families are refused on today)
                self.views.wait(self.client.wait_events)
            slot_of = dict(zip(routing.experts, slots))
            return self.forward_of(_Delegate(self.module, lambda e: self._on_slot(e, slot_of[e])), hidden_states,
                                   *args, **kwargs)
        finally:
            if not self.client.leasing:
                self.client.release(self.layer, routing.experts)

    def route(self, hidden_states, args, kwargs) -> tuple[list[list[int]], list[list[float]]]:
        """``index[t]``: the experts token t is routed to, in the order the dict's forward calls them, and
        ``weights[t]`` the weight the forward gives each. The tag's row t is ``[t, 0 x experts]``; expert e's
        stand-in returns 1 in column 1 + e of its rows, so the forward's own weighted sum leaves each token's
        weight of expert e there."""
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
        tag = torch.zeros(tokens, 1 + self.num_experts)
        tag[:, 0] = torch.arange(tokens, dtype=torch.float32)
        index: list[list[int]] = [[] for _ in range(tokens)]

        def note(expert: int):
            def given(rows: torch.Tensor) -> torch.Tensor:
                for t in rows[:, 0].long().tolist():
                    index[t].append(expert)
                out = torch.zeros_like(rows)
                out[:, 1 + expert] = 1.0
                return out
            return given

        with torch.inference_mode():
            summed = self.forward_of(_Delegate(self.module, note), tag, *args, **kwargs)
        weights = summed[:, 1:].tolist()
        return index, [[weights[t][e] for e in row] for t, row in enumerate(index)]

    def _on_slot(self, expert: int, slot: int):
        params = {name: view[0] for name, view in self.views.window(slot, slot + 1).items()}
        return lambda x: functional_call(self.experts[expert], params, (x,))

