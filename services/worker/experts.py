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

import logging
from dataclasses import dataclass

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from common.checkpoint import experts_per_token
from services.worker import matvec, moe_token, quant
from services.worker.device import release_ready
from services.worker.host_experts import HostExperts
from services.worker.lockstep import together
from services.worker.moe_norms import moe_input_gains
from services.worker.pool_views import PoolViews
from services.worker.next_gate import find_router, guess_dtype
from services.worker.speculate import Speculator, within
from services.worker.tracing import StepState

log = logging.getLogger("moeinf.worker.experts")
IMPLEMENTATION = "moeinf"
SMALL_ROUTING = 64  # up to this many (token, expert) pairs a layer's routing is read once into Python lists


class SlotExperts:
    """Stands in for an experts module inside transformers' forward: slot views instead of stacked weights."""

    def __init__(self, module, params: dict[str, torch.Tensor], num_slots: int, windows=None):
        self._module = module
        self._params = params
        self._windows = windows  # (lo, hi) -> views of slots lo..hi-1 (PoolViews.window); None: slice ``params``
        self.num_experts = num_slots
        self.sentinels = False  # entries with id num_experts are skipped (host_experts.py), as transformers' EP does
        for name, tensor in params.items():
            setattr(self, name, tensor)

    def window(self, lo: int, hi: int) -> "SlotExperts":
        """The same views restricted to slots ``lo..hi-1``: grouped_mm then runs over those slots only
        (its cost grows with the number of groups), still without copying a byte."""
        params = self._windows(lo, hi) if self._windows else {n: t[lo:hi] for n, t in self._params.items()}
        return SlotExperts(self._module, params, hi - lo)

    @property
    def _is_expert_parallel(self) -> bool:  # transformers' grouped forward masks the sentinel entries when set
        return self.sentinels or getattr(self._module, "_is_expert_parallel", False)

    def __getattr__(self, name):  # act_fn, _apply_gate, has_bias, is_transposed, ... come from the real module
        return getattr(self._module, name)


@dataclass(slots=True)
class Routing:
    """One layer's routing of a step: the sorted routed experts and, per request of the step, how many tokens
    each expert got (``tokens[r][j]`` for ``experts[j]``) and the sum of their router weights."""

    experts: list[int]
    requests: list[str]
    tokens: list[list[int]]
    weights: list[list[float]]
    index: list[list[int]] | None  # top_k_index as lists (small steps only)

    @classmethod
    def of(cls, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, steps: StepState,
           num_experts: int) -> "Routing":
        """Small steps (decode) are read into Python once; larger ones are counted by torch."""
        if top_k_index.numel() <= SMALL_ROUTING:
            return cls.small(top_k_index.tolist(), top_k_weights.float().tolist(), steps.requests, steps.owner)
        experts = torch.unique(top_k_index)
        requests, tokens, weights = attribution(top_k_index, top_k_weights, experts, num_experts, steps.requests,
                                                steps.token_owner)
        return cls(experts.tolist(), requests, tokens, weights, None)

    @classmethod
    def small(cls, index: list[list[int]], weights: list[list[float]], requests: list[str],
              owner: list[int]) -> "Routing":
        experts = sorted({e for row in index for e in row})
        if len(owner) != len(index):  # no step declared for these tokens: nothing to attribute
            return cls(experts, [], [], [], index)
        column = {e: j for j, e in enumerate(experts)}
        tokens = [[0] * len(experts) for _ in requests]
        sums = [[0.0] * len(experts) for _ in requests]
        for r, row, ws in zip(owner, index, weights):
            for e, w in zip(row, ws):
                tokens[r][column[e]] += 1
                sums[r][column[e]] += w
        return cls(experts, requests, tokens, sums, index)


class ExpertBinding:
    """Per MoE layer: acquire the routed experts (leased: usually no message), compute on their slots."""

    def __init__(self, layer: int, module, views: PoolViews, client, steps: StepState,
                 speculator: Speculator | None = None, dequant: quant.Dequantizer | None = None,
                 mv: matvec.Matvec | None = None, host: HostExperts | None = None,
                 token: moe_token.TokenPath | None = None):
        self.layer = layer
        self.host = host  # memd's host tier, when it may have this worker compute experts on its CPU
        self.dequant = dequant
        self.matvec = mv  # --matvec-kernel (None: transformers' grouped matmul only)
        self.num_experts = module.num_experts
        self.proxy = SlotExperts(module, views.params, views.num_slots, views.window)
        self.views = views
        self.client = client
        self.steps = steps
        self.speculator = speculator
        self.remap = torch.empty(module.num_experts, dtype=torch.long)  # expert id -> slot - lo (larger steps)
        self.fallback = views  # .contiguous: the GPU's grouped matmul refused strided views (all layers copy first)
        # a lone token's experts in one kernel call (a CPU pool, --matvec-kernel; None: call by call)
        self.token = moe_token.TokenExperts.of(token, layer, module, views.params) \
            if isinstance(views, PoolViews) and dequant is None else None
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
        lockstep = self.steps.lockstep
        if lockstep is not None:  # one forward per request in threads (lockstep.py): one of them runs it for all
            return lockstep.meet(self, hidden_states, (top_k_index, top_k_weights), {})
        return self.compute(hidden_states, top_k_index, top_k_weights)

    def forward_together(self, inputs: list) -> list[torch.Tensor]:
        return together(lambda hidden, args, _: self.compute(hidden, *args), inputs)

    def compute(self, hidden_states, top_k_index, top_k_weights):
        client = self.client
        span, threshold = self.guess_span()
        launched = None if span is None else self.speculator.launch(self.layer, hidden_states, span)
        routing = Routing.of(top_k_index, top_k_weights, self.steps, self.num_experts)  # the one wait for the GPU
        every = ([], [], []) if launched is None else self.speculator.pick(launched, threshold)
        slots = self.acquire(routing, every, top_k_index, top_k_weights, self.takes_parts(routing))
        try:
            if client.loading:  # memd answered with some experts still loading: the others are computed meanwhile
                return self.in_two_parts(routing, slots, hidden_states, top_k_index, top_k_weights)
            if client.host:  # memd --cpu-experts: some experts computed here on the CPU, from its host tier
                return self.host.forward(self, routing, slots, client.host, hidden_states, top_k_index, top_k_weights,
                                         client.wait_events)
            if client.wait_events:  # copies into these slots still in flight (a GPU pool): the stream waits on them
                self.views.wait(client.wait_events)
            if self.dequant is not None:  # quantized slots: dequantized into a scratch buffer, then the same forward
                return self.dequant.forward(self.proxy._module, self.layer, torch.tensor(routing.experts), slots,
                                            hidden_states, top_k_index, top_k_weights)
            return self.on_slots(routing, slots, hidden_states, top_k_index, top_k_weights)
        finally:
            if not client.leasing:  # a GPU's matmuls on these slots may still be queued: memd waits for them
                client.release(self.layer, routing.experts, self.reads_done(hidden_states))

    def on_slots(self, routing: Routing, slots: list[int], hidden_states, top_k_index, top_k_weights):
        """The experts' forward on their pool slots: a lone token's in one kernel call where the layer takes it
        (``moe_token.py``), else on the window of slots."""
        def windowed():
            window, index = self.slot_window(routing, slots, top_k_index)
            return self.grouped(window, hidden_states, index, top_k_weights)
        if self.token is not None and routing.index is not None and len(routing.index) == 1:
            slot_of = dict(zip(routing.experts, slots))
            out = self.token.forward(hidden_states, [slot_of[e] for e in routing.index[0]], top_k_weights, windowed)
            if out is not None:
                return out
        return windowed()

    def takes_parts(self, routing: Routing) -> bool:
        """Whether memd may answer this layer's acquire before all its experts are loaded: a lone token's layer
        on the one-call path (``moe_token.Staged`` computes its experts in any order, with the same bits), once
        that path has checked the layer's first token (``--early-experts``)."""
        token = self.token
        return token is not None and token.path.early and token.checked and not token.path.off \
            and self.host is None and routing.index is not None and len(routing.index) == 1

    def in_two_parts(self, routing: Routing, slots: list[int], hidden_states, top_k_index, top_k_weights):
        """The token's experts that are resident now, computed while memd loads the others; those once ``rest``
        has their slots; then the layer's output, the one-call path's bits (or the usual forward, if it declines)."""
        client, order = self.client, routing.index[0]
        position = {e: j for j, e in enumerate(routing.experts)}
        now = [i for i, e in enumerate(order) if position[e] not in client.loading]
        staged = self.token.staged(hidden_states, len(order), top_k_weights)
        computed = staged is not None and staged.experts(now, [slots[position[order[i]]] for i in now])
        slots = client.rest(self.layer, routing.experts)
        later = [i for i in range(len(order)) if i not in now]
        if computed and staged.experts(later, [slots[position[order[i]]] for i in later]):
            return staged.out()
        return self.on_slots(routing, slots, hidden_states, top_k_index, top_k_weights)

    def reads_done(self, hidden_states) -> list[int]:
        """The "done reading" event recorded after this layer's kernels (a GPU worker with events), else wait for
        them here (a GPU without; nothing on the CPU)."""
        events = self.views.read_events
        if events is None or not hidden_states.is_cuda:
            release_ready(hidden_states)  # (after a CUDA error the sync is skipped: see device)
            return []
        return events.record(hidden_states.device)

    def grouped(self, window: SlotExperts, hidden_states, index, top_k_weights):
        """The experts' forward on the window; on a GPU whose grouped matmul refuses the strided slot views, on
        contiguous copies of them (a device copy per layer, warned once)."""
        fallback = self.fallback
        if fallback.contiguous:
            sentinels = window.sentinels
            window = SlotExperts(window._module, {n: t.contiguous() for n, t in window._params.items()},
                                 window.num_experts)
            window.sentinels = sentinels
        try:
            return matvec.forward(window, hidden_states, index, top_k_weights, self.matvec)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            if fallback.contiguous or not hidden_states.is_cuda:
                raise
            log.warning("the grouped matmul refused the pool's strided slot views on %s (%s): every layer computes on"
                        " contiguous copies from now on", hidden_states.device, str(exc)[:120])
            fallback.contiguous = True
            return self.grouped(window, hidden_states, index, top_k_weights)

    def guess_span(self) -> tuple[int | None, float]:
        """``(layers ahead to guess, the confidence a guess needs)``, None layers for no guess: memd's word (its
        last acquire reply), or, while ``--record-trace`` writes a trace, every layer the knob allows at any
        confidence (the file keeps every guess; memd still gets only what it asked for: ``acquire``)."""
        client = self.client
        if self.speculator is None or not (client.speculate or self.speculator.always):
            return None, 0.0
        if self.steps.recorder.writer is not None:
            return self.speculator.max_ahead, 0.0
        return client.speculate_layers, client.speculate_threshold

    def acquire(self, routing: Routing, every, top_k_index, top_k_weights, partial: bool = False) -> list[int]:
        """Note the layer to memd (with the next layers' guesses: ``every`` one made, of which memd gets those its
        lookahead and threshold ask for), record it, and get the experts' slots (``partial``: perhaps some still
        loading, ``client.loading``)."""
        client, recorder = self.client, self.steps.recorder
        step = recorder.open
        prefill = step.prefill if step is not None and len(step.prefill) == len(routing.requests) else []
        ids = routing.experts
        guesses = every if recorder.writer is None else within(every, self.layer, client.speculate_layers,
                                                                 client.speculate_threshold, client.speculate)
        client.note(recorder.step, self.layer, ids, routing.requests, routing.tokens, prefill, *guesses)
        counts = None if self.host is None else (  # (only for a message: not on a leased layer)
            lambda: self.host.counts(ids, routing.index, top_k_index, self.num_experts))
        slots = client.acquire(self.layer, ids, [], [], step=recorder.step, prefill=prefill, counts=counts,
                               partial=partial)
        nxt = [e for target, e in zip(guesses[0], guesses[1]) if target == self.layer + 1]
        recorder.layer(self.layer, ids, routing.tokens, routing.weights, nxt, top_k_index, top_k_weights,
                       leased=client.last_leased, guesses=every if self.speculator is not None else None)
        return slots

    def slot_window(self, routing: Routing, slots: list[int], top_k_index: torch.Tensor):
        """The experts to compute on and ``top_k_index`` remapped into them: the slots in use, as a zero-copy window
        from the lowest to the highest, or (their slots in several chunks of a device pool) copied side by side."""
        lo, hi = min(slots), max(slots) + 1
        if not self.views.crosses(lo, hi):
            return self.proxy.window(lo, hi), self.slot_index(routing, slots, lo, top_k_index)
        used = sorted(set(slots))
        place = {s: i for i, s in enumerate(used)}
        window = SlotExperts(self.proxy._module, self.views.gather(used), len(used))
        return window, self.slot_index(routing, [place[s] for s in slots], 0, top_k_index)

    def slot_index(self, routing: Routing, slots: list[int], lo: int, top_k_index: torch.Tensor) -> torch.Tensor:
        """``top_k_index`` with every expert id replaced by its slot's place in the window from ``lo``."""
        if routing.index is not None:
            place = {e: slot - lo for e, slot in zip(routing.experts, slots)}
            return torch.tensor([[place[e] for e in row] for row in routing.index], dtype=top_k_index.dtype,
                                device=top_k_index.device)
        if self.remap.device != top_k_index.device:
            self.remap = torch.empty_like(self.remap, device=top_k_index.device)
        remap = self.remap
        remap[routing.experts] = torch.tensor(slots, dtype=torch.long, device=remap.device) - lo
        return remap[top_k_index].to(top_k_index.dtype)


def attribution(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, experts: torch.Tensor, num_experts: int,
                requests: list[str], owner: torch.Tensor | None):
    """``tokens[r][j]``: how many tokens of request r (``owner[t]``: token t's request) were routed to
    ``experts[j]`` in this layer, and ``weights[r][j]`` the sum of their router weights."""
    if owner is None or owner.numel() != top_k_index.shape[0]:
        return [], [], []
    owner = owner.to(top_k_index.device)
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


def bind(model, layers, views: PoolViews, client, steps: StepState, *, next_gate: bool = True,
         speculate_layers: int = 4, dequant_cache_mb: int = 0, scratch_experts: int = 0, kernels=None,
         mv: matvec.Matvec | None = None, always_guess: bool = False, host: HostExperts | None = None,
         early_experts: bool = True) -> int:
    """Bind every experts module to memd; ``steps`` is the step the engine declares and its recorder (step
    traces); ``next_gate``: guess up to ``speculate_layers`` MoE layers ahead from each layer's hidden state, while
    memd wants the guesses (``AcquireReply.speculate``) or always (``always_guess``: a recorded trace keeps them);
    ``scratch_experts``: experts the dequantization scratch holds (0: a layer's, up to the pool's slots);
    ``kernels``: the compiled dequantization kernels (``dequant_kernel.load``; None: torch's ops); ``mv``: the
    matrix-vector kernel for decode steps' expert products (``--matvec-kernel``; None: the grouped matmul);
    ``host``: memd's host tier, from which it may have experts computed on this CPU (``host_experts.py``);
    ``early_experts``: a lone token's resident experts are computed while memd loads its layer's others. Returns
    the most layers ahead it guesses (0: none), which READY tells memd."""
    top_k = experts_per_token(model.config)
    modules = [model.get_submodule(layer.module) for layer in layers]
    dtype = guess_dtype(model, layers) if next_gate else None
    routers = [find_router(model.get_submodule(layer.module.rpartition(".")[0]), layer.num_experts, top_k, dtype,
                           deep=layer.keyed) for layer in layers] if next_gate else [None] * len(layers)
    gains = moe_input_gains(model, [layer.module.rpartition(".")[0] for layer in layers]) if next_gate else None
    speculator = Speculator(routers, layers[0].num_experts, speculate_layers, always_guess, gains) \
        if next_gate and layers else None
    if speculator is not None and speculator.use_kernels(mv.kernels if mv is not None else kernels):
        log.info("hidden-state guesses: one call per layer (guess.c)")
    client.speculate_layers = client.speculate_layers or speculate_layers
    dequant = None
    if views.quantized:  # one scratch for all layers: the most experts a layer can hold at once, or the knob's
        capacity = min(layers[0].num_experts, views.num_slots)
        if scratch_experts:  # a step that routes more runs its experts in groups that fit (expert_groups.py)
            if scratch_experts < top_k:
                raise ValueError(f"--dequant-scratch-experts {scratch_experts} cannot hold one token's {top_k} experts")
            capacity = min(capacity, scratch_experts)
        dequant = quant.Dequantizer.build(views.hello, views.by_slot, views.params, modules[0], capacity,
                                          dequant_cache_mb << 20, kernels)
        dequant.use(mv, modules[0])
    from services.worker.keyed import KeyedBinding  # (it builds on ExpertBinding)

    token = moe_token.TokenPath(mv, early=early_experts) if mv is not None else None

    for layer, module in zip(layers, modules):
        if layer.keyed:  # one module per expert: the dict's own forward, rebound (keyed.py)
            module._moeinf = KeyedBinding(layer.index, module, views, client, steps, speculator)
            continue
        module._moeinf = ExpertBinding(layer.index, module, views, client, steps, speculator, dequant, mv, host,
                                       token)
    return speculator.max_ahead if speculator is not None and speculator.weight is not None else 0
