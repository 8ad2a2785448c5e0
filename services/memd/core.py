"""memd's decisions, without I/O: what an acquire loads, what to prefetch or cancel, what the traces teach.

``ExpertCache`` owns the slot table (with its policy), the live EAMs, the EAMC, the predictor and the prefetch
planner. It never reads a file or awaits anything: the server (real reads in reader threads) and the simulator
(``services/memd/simulate.py``, a clock and a bandwidth) drive it the same way:

1. ``note`` (a worker's per-layer LAYER_NOTE, leased layer or not) or an ``acquire`` that carries its layer's
   routing feeds the predictor, the policy (``on_step``, ``on_layer``) and the scores, once per (worker, step, layer);
2. ``acquire``: pin and count; hits, already-loading joins and on-demand loads (reserved slots);
3. the caller starts the loads, replies, then calls ``plan`` (off the acquire path): the next layers' predictions,
   prefetches to start (slots reserved; none while demand reads are queued; only those worth their cost), stale ones;
4. ``load_done`` / ``load_cancelled`` / ``load_failed`` as reads end; ``stall`` with the time an acquire waited.
Correctness never depends on a prediction: a prefetch only takes a free or evictable slot, and an on-demand load
that finds every slot pinned or loading gets one by cancelling a prefetch (``steal_candidate``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from common import messages as m
from common.config import MemdConfig
from common.sizes import parse_size
from services.memd.eam import EamTable, step_entries
from services.memd.eamc import Eamc
from services.memd.metrics import Metrics
from services.memd.planner import PrefetchPlanner
from services.memd.policy import Key, make_policy
from services.memd.predictor import Predictor
from services.memd.slots import PoolExhausted, SlotTable

log = logging.getLogger("moeinf.memd.core")
WASTE_COST = 0.25  # a wrong prefetch's read, in stalls saved: the bandwidth it took from the window's other reads


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The part of ``MemdConfig`` the decisions use (the simulator builds it without a checkpoint)."""

    policy: str = "activation"
    prefetch: bool = True
    window: int = 4
    threshold: float = 0.3
    budget_bytes: int | None = None
    eamc_capacity: int = 256
    eamc_top: int = 4
    max_requests: int = 1024

    @classmethod
    def from_config(cls, cfg: MemdConfig, pool_bytes: int | None = None) -> CacheSettings:
        """``--prefetch-budget 25%`` is a share of the pool (``pool_bytes``); without the pool size it is refused."""
        spec = None if cfg.prefetch_budget == "auto" else parse_size(cfg.prefetch_budget, what="--prefetch-budget")
        if spec is not None and spec.fraction is not None and not pool_bytes:
            raise ValueError(f"--prefetch-budget {cfg.prefetch_budget}: a percentage is a share of the pool, whose"
                             " size is not known here; give bytes (64MiB)")
        budget = None if spec is None else max(1, spec.resolve(pool_bytes or 0))
        return cls(cfg.policy, cfg.prefetch, cfg.prefetch_window, cfg.prefetch_threshold, budget, cfg.eamc_capacity,
                   cfg.eamc_top, cfg.max_traced_requests)


@dataclass(slots=True)
class AcquirePlan:
    hits: int = 0  # resident
    loads: list[tuple[Key, int]] = field(default_factory=list)  # on-demand loads to start: (key, slot)
    already_loading: list[Key] = field(default_factory=list)  # already loading: wait for them (promote a prefetch)
    no_slot: list[Key] = field(default_factory=list)  # no slot now: steal one from a prefetch, then reserve_demand
    transient: bool = False  # prompt-only acquire: its loads are admitted as transient
    fed: bool = False  # it carried its layer's routing, new to the predictor: plan after replying


@dataclass(slots=True)
class PrefetchPlan:
    start: list[tuple[Key, int, float]] = field(default_factory=list)  # (key, slot, priority), best first
    cancel: list[Key] = field(default_factory=list)


class ExpertCache:
    def __init__(self, num_slots: int, num_layers: int, num_experts: int, top_k: int, expert_bytes: int,
                 knobs: CacheSettings = CacheSettings(), eamc: Eamc | None = None, on_retire=None):
        self.L, self.E, self.knobs, self.expert_bytes = num_layers, num_experts, knobs, expert_bytes
        self.table = SlotTable(num_slots, num_layers, make_policy(knobs.policy, num_layers, num_experts), num_experts,
                               on_evict=self._evicted, on_retire=on_retire)  # on_retire: the memory goes back
        self.eams = EamTable(num_layers, num_experts, knobs.max_requests)
        self.eamc = eamc if eamc is not None else Eamc(num_layers, num_experts, knobs.eamc_capacity)
        self.predictor = Predictor(num_layers, num_experts, top_k, self.eamc, self.eams, window=knobs.window,
                                   threshold=knobs.threshold, top=knobs.eamc_top)
        self.planner = PrefetchPlanner(expert_bytes, self.predictor.window, knobs.threshold, knobs.budget_bytes)
        self.metrics = Metrics(num_layers)
        self.prefetching = knobs.prefetch
        self.unused: dict[Key, tuple] = {}  # prefetched, not used yet -> (its worker, target step, layer, priority)
        self.transient: dict[Key, bool] = {}  # loading key -> admit as transient when loaded
        self.protect: dict[Key, float] = {}  # imminently needed (last plan) -> priority: evictions spare them
        self.bad_traces = 0
        self.need = None  # the last plan's need[L, E] (a victim's expected need)
        self.ahead_limit = num_layers - 1  # the most layers ahead any attached worker guesses (their READY)
        self.fetchable = lambda key: True  # the store reads it without converting first (else: no prefetch)

    @property
    def policy_name(self) -> str:
        return self.table.policy.name

    def set_policy(self, name: str) -> None:
        self.table.set_policy(make_policy(name, self.L, self.E))

    # ---------------------------------------------------------------- acquire
    def acquire(self, worker, req: m.AcquireRequest, now: float, experts: list[int] | None = None) -> AcquirePlan:
        """Account for an acquire of ``experts`` (``req.experts``, less those the worker's CPU computes), pinned by
        the caller, and reserve their loads. One that carries its layer's routing also feeds the predictor."""
        plan = AcquirePlan(transient=bool(req.prefill) and all(req.prefill))
        self.metrics.acquires += 1
        self._refresh(req.leased_uses, decode=not plan.transient)
        if req.requests or req.speculated:
            plan.fed = self.layer(worker, req.step, req.layer, req.experts, req.requests, req.tokens, req.prefill, now)
            if plan.fed:
                self.predictor.guess(worker, [req.layer + 1] * len(req.speculated), req.speculated, (),
                                     self.table.slot_of.__contains__)
        for expert in req.experts if experts is None else experts:
            key = (req.layer, expert)
            if self.table.record_access(key, decode=not plan.transient):
                loading = key in self.table.loading
                self._used(key, loading)
                if loading:
                    plan.already_loading.append(key)
                else:
                    plan.hits += 1
                continue
            slot = self.reserve_demand(key, plan.transient, raise_full=False)
            if slot is None:
                plan.no_slot.append(key)
            else:
                plan.loads.append((key, slot))
        return plan

    def reserve_demand(self, key: Key, transient: bool, *, raise_full: bool = True) -> int | None:
        """A slot for an on-demand load of ``key``. None when ``key`` got one meanwhile (join its load instead) or,
        with ``raise_full=False``, when every slot is pinned or loading (PoolExhausted otherwise)."""
        if key in self.table.slot_of:
            return None
        try:
            slot = self.table.reserve(key, self.protect if self.table.policy.spares_predicted else ())
        except PoolExhausted:
            if raise_full:
                raise
            return None
        self.transient[key] = transient
        return slot

    def steal_candidate(self) -> Key | None:
        """The loading prefetch to cancel so that an on-demand load gets its slot (lowest priority, unpinned; one in
        a retired slot frees no live slot: it is never the candidate)."""
        t = self.table
        free = [p for p in self.planner.inflight.values()
                if not t.pins.get(p.key) and t.slot_of.get(p.key, t.capacity) < t.capacity]
        return min(free, key=lambda p: p.priority).key if free else None

    def _used(self, key: Key, loading: bool) -> None:
        if key in self.unused:
            del self.unused[key]
            self.metrics.prefetch_used[key[0]] += 1
            self.metrics.prefetch_late += loading
        self.planner.done(key)  # a loading prefetch an acquire waits for is an on-demand load now

    # ---------------------------------------------------------------- per-layer notes
    def note(self, ev: m.LayerNoteEvent, now: float) -> bool:
        """A worker's LAYER_NOTE: feed the layer and its guesses; False when it is malformed or already fed."""
        self.metrics.layer_notes += 1
        problem = self._check_note(ev)
        if problem:
            self._bad_trace(problem, "layer note")
            return False
        width = len(ev.experts)
        tokens = [ev.tokens[r * width:(r + 1) * width] for r in range(len(ev.requests))] if ev.tokens else []
        if not self.layer(ev.worker, ev.step, ev.layer, ev.experts, ev.requests, tokens, ev.prefill, now):
            self.metrics.notes_dropped += 1
            return False
        self.predictor.guess(ev.worker, ev.guess_layers, ev.guess_experts, ev.guess_confidence,
                             self.table.slot_of.__contains__)
        return True

    def layer(self, worker, step: int, layer: int, experts: list[int], requests: list[str],
              tokens: list[list[int]], prefill: list[bool], now: float) -> bool:
        """Place ``worker`` at (step, layer) and learn what it routed there; False when already fed (or late)."""
        if self.predictor.duplicate(worker, step, layer):
            return False
        if self.predictor.advance(worker, step, layer, requests, tokens, prefill, now):
            self.table.policy.on_step()
        self.table.policy.on_layer(layer)
        self.predictor.score(worker, step, layer, experts)
        self.predictor.observe(worker, layer, experts, tokens)
        self.metrics.layers_fed += 1
        return True

    def _check_note(self, ev: m.LayerNoteEvent) -> str | None:
        if not 0 <= ev.layer < self.L or any(not 0 <= e < self.E for e in ev.experts):
            return f"note step {ev.step}: layer {ev.layer} or experts {ev.experts} out of range"
        if ev.tokens and len(ev.tokens) != len(ev.requests) * len(ev.experts):
            return f"note step {ev.step} layer {ev.layer}: {len(ev.tokens)} token counts, not requests x experts"
        if ev.prefill and len(ev.prefill) != len(ev.requests):
            return f"note step {ev.step} layer {ev.layer}: {len(ev.prefill)} phases for {len(ev.requests)} requests"
        if not len(ev.guess_layers) == len(ev.guess_experts) == len(ev.guess_confidence):
            return f"note step {ev.step} layer {ev.layer}: guess arrays of different lengths"
        if any(not 0 <= e < self.E for e in ev.guess_experts) or any(not 0 <= g < self.L for g in ev.guess_layers):
            return f"note step {ev.step} layer {ev.layer}: a guess out of range"
        return None

    # ---------------------------------------------------------------- prediction and prefetch
    def plan_prefetch(self, worker, req: m.AcquireRequest | None = None, bandwidth: float | None = None, *,
                      demand_busy: bool = False) -> PrefetchPlan:
        """Predict from ``worker``'s position, cancel its stale prefetches, and (unless ``demand_busy``: on-demand
        reads are in flight or queued) pick prefetches worth their cost. ``req`` is not read (the position is
        the predictor's, from the last note or acquire); it stays for the simulator's call."""
        plan = PrefetchPlan()
        state = self.predictor.workers.get(worker)
        if state is None or state.partial is None or not (self.prefetching or self.table.policy.spares_predicted):
            return plan  # (prefetch off under a policy that reads no prediction, the baselines': nothing to plan)
        targets, need = self.predictor.predict(worker)
        self.need = need
        self.table.policy.observe_need(need)
        candidates = self.planner.candidates(targets)
        self.planner.retarget(worker, candidates)
        acquired = {(state.layer, e) for e in state.routed}
        plan.cancel = self.planner.stale(worker, state.step, state.layer, acquired)
        self.protect = self._protected(candidates, worker, state.step, state.layer)
        if not self.prefetching or demand_busy:
            self.metrics.prefetch_deferred += demand_busy and self.prefetching
            return plan
        near = [c for c in candidates if c.distance <= max(1, self.metrics.speculate_layers) and self.fetchable(c.key)]
        if self.predictor.next_gate.predicted:  # the workers guess from the hidden state: prefetch acts on the guesses
            near = [c for c in near if c.key[1] in state.guesses.get(c.key[0], ())]  # (history predicts little)
        chosen, _ = self.planner.plan(worker, near, self.table.slot_of.__contains__, bandwidth,
                                      self.predictor.layer_seconds)
        for c in chosen:
            if not self._worth(state.layer, c, self._hidden(c.distance, bandwidth)):
                self.metrics.prefetch_declined += 1
                continue
            slot = self.table.reserve_prefetch(c.key, c.priority, self.protect, need=c.need)
            if slot is None:
                continue
            self.planner.issued(worker, c)
            self.unused[c.key] = (worker, c.step, c.key[0], c.priority)
            self.protect[c.key] = c.priority
            self.transient[c.key] = False
            self.metrics.prefetch_issued[c.key[0]] += 1
            plan.start.append((c.key, slot, c.priority))
        return plan

    def _protected(self, candidates, worker, step: int, layer: int) -> dict[Key, float]:
        """Experts evictions spare while they can, with their priorities: the plan's resident candidates, unused
        prefetches whose target (step, layer) is ahead (no later, lesser prefetch evicts one before its layer ran;
        a demand load takes them last), and another worker's unused prefetches (its steps are counted apart)."""
        protect = {c.key: c.priority for c in candidates if c.key in self.table.slot_of}
        for key, (owner, t_step, t_layer, priority) in self.unused.items():
            if (owner != worker or (t_step, t_layer) > (step, layer)) and priority > protect.get(key, -1.0):
                protect[key] = priority
        return protect

    def _worth(self, layer: int, c, hidden: float) -> bool:
        """Expected benefit (the candidate's need ``p``, the probability that it runs at its target, times the share
        of a read a right guess hides, ``hidden``, which counts its distance) against expected cost (a wrong guess's
        bandwidth, and the slot: the chance the evicted expert runs at its layer's next run, the policy's estimate,
        since it must then be read again; policies without one: need x nearness from the current ``layer``), both in
        units of one read. At a pool of one token's experts every victim is live, so a prefetch pays only when
        compute can hide much of its read."""
        p = c.need
        benefit = p * hidden
        if self.table.free or self.need is None:
            return benefit > (1 - p) * WASTE_COST
        victim = self.table.policy.victim(lambda k: self.table.evictable(k) and self.protect.get(k, -1.0) < c.priority)
        if victim is None:
            return benefit > (1 - p) * WASTE_COST
        reuse = self.table.policy.reuse(victim)
        if reuse is None:
            distance = (victim[0] - layer - 1) % self.L + 1
            reuse = float(self.need[victim]) * max(0.0, self.planner.nearness(distance))
        return benefit > reuse + (1 - p) * WASTE_COST

    def _hidden(self, distance: int, bandwidth: float | None) -> float:
        """The share of one read a prefetch ``distance`` layers ahead hides: the layers' compute until its use over
        the read's time (1 until both are measured)."""
        layer_s = self.predictor.layer_seconds
        return min(1.0, distance * layer_s * bandwidth / self.expert_bytes) if bandwidth and layer_s else 1.0

    def prefetch_reserve(self) -> int:
        """Slots a lease acquire keeps free or unleased for prefetches to land in: one lookahead of experts (top-k x
        the layers speculation looks ahead), at most a quarter of the pool; none without prefetch or room for all."""
        if not self.prefetching or self.holds_every_expert():
            return 0
        return min(self.table.capacity // 4, self.predictor.top_k * max(1, self.metrics.speculate_layers))

    def holds_every_expert(self) -> bool:  # never evicts: nothing to decide from notes or guesses, nothing to plan
        return self.table.capacity >= self.L * self.E  # (capacity, not residency: a leased worker never hears it fill)

    def wants_guesses(self) -> bool:
        return self.prefetching and not self.holds_every_expert()

    def speculation(self, bandwidth: float | None) -> tuple[int, float]:
        """(layers ahead to guess, the router probability a guess needs): k = ceil(read time per expert x experts
        fetched per layer / layer time), within what the workers guess (``ahead_limit``); reads long against a layer
        ask more confidence. (0, 0.0) until measured."""
        layer_s = self.predictor.layer_seconds
        if not bandwidth or not layer_s:
            return 0, 0.0
        read_s = self.expert_bytes / bandwidth
        fetched = (self.table.counters.misses + sum(self.metrics.prefetch_issued)) / max(1, self.metrics.layers_fed)
        k = max(1, min(self.ahead_limit, math.ceil(read_s * max(1.0, fetched) / layer_s)))
        threshold = min(0.5, max(0.02, 0.5 * read_s / (read_s + layer_s)))
        self.metrics.speculate_layers = k
        return k, threshold

    # ---------------------------------------------------------------- load outcomes
    def load_done(self, key: Key, nbytes: int, seconds: float) -> None:
        self.planner.done(key)
        self.table.loaded(key, transient=self.transient.pop(key, False))
        self.table.counters.read_seconds += seconds
        self.partial_read(key, nbytes, cancelled=False)

    def partial_read(self, key: Key, nbytes: int, cancelled: bool = True) -> None:  # (a cancelled load's too)
        self.table.counters.cancelled_bytes += nbytes if cancelled else 0
        self.table.counters.bytes_read += nbytes
        self.metrics.bytes_read[key[0]] += nbytes

    def load_cancelled(self, key: Key) -> None:
        """A prefetch stopped before it finished (stale, or its slot went to an on-demand load)."""
        self.metrics.prefetch_cancelled += key in self.unused
        self.load_failed(key)

    def load_failed(self, key: Key) -> None:  # (and the end of a cancelled one: dropped alike)
        self.planner.done(key)
        self.transient.pop(key, None)
        self._evicted(key)  # (an unused prefetch that never landed: wasted alike)
        self.table.abort(key)

    def _evicted(self, key: Key) -> None:
        if key in self.unused:
            del self.unused[key]
            self.metrics.prefetch_wasted[key[0]] += 1

    def stall(self, worker, layer: int, seconds: float) -> None:
        self.predictor.stalled(worker, seconds)
        self.metrics.stall_seconds[layer] += seconds
        self.table.counters.stall_seconds += seconds

    def forget_worker(self, worker) -> None:
        self.predictor.forget(worker)
        self.unused = {k: v for k, v in self.unused.items() if v[0] != worker}
        self.metrics.forget_worker(worker)

    # ---------------------------------------------------------------- traces
    def request_start(self, request: str) -> None:
        self.eams.start(request)

    def request_end(self, request: str) -> None:
        eam = self.eams.finish(request)
        if eam is not None:
            self.eamc.add(eam.total)

    def step_trace(self, ev: m.StepTraceEvent, attached: bool = True) -> None:
        if problem := self._check_trace(ev):
            self._bad_trace(problem)
            return
        decode_tokens = sum(t for t, p in zip(ev.tokens, ev.prefill) if not p)
        self.metrics.step_traced(ev.worker, ev.step, sum(ev.tokens), decode_tokens, attached)
        starts = np.cumsum([0, *ev.expert_counts]).tolist()
        for layer, leased, start, end in zip(ev.layers, ev.leased, starts, starts[1:]):
            if leased:
                self._leased_hits(layer, ev.experts[start:end])
        layers, experts, at, width = step_entries(ev)
        routed = np.asarray(ev.routed, np.float32)
        for r, request in enumerate(ev.requests):
            rows = [(layers, experts, routed[at + r * width])]
            self.eams.add_step((ev.worker, ev.step), request, ev.tokens[r], ev.prefill[r], rows)

    def _bad_trace(self, problem: str, what: str = "step trace") -> None:
        self.bad_traces += 1
        if self.bad_traces <= 10:
            log.warning("ignored a %s: %s", what, problem)

    def _leased_hits(self, layer: int, experts: list[int]) -> None:
        """A layer the worker served from its leases (no acquire told memd): count its hits. Their recency came
        with the worker's next acquire (``leased_uses``), in the order they ran."""
        self.metrics.leased_layers += 1
        self.table.counters.hits += len(experts)
        self.table.counters.per_layer_hits[layer] += len(experts)

    def _refresh(self, leased_uses: list[list[int]], *, decode: bool) -> None:
        for layer, expert in leased_uses:
            if self.table.is_resident((layer, expert)):
                self.table.policy.on_access((layer, expert), decode=decode)

    def _check_trace(self, ev: m.StepTraceEvent) -> str | None:
        problem = ev.layout_problem()
        if problem:
            return f"step {ev.step}: {problem}"
        if any(layer >= self.L for layer in ev.layers) or any(e >= self.E for e in ev.experts):
            return f"step {ev.step}: layers {ev.layers} or experts {ev.experts} out of range"
        return None
