"""Replay a routing trace through memd's decisions with a simulated clock, reader and worker: no model, no processes.

The same ``ExpertCache`` the server uses decides hits, loads, evictions, predictions and prefetches; the same
``leases.ConnectedWorker`` holds the worker's pins and leases; the reader is ``sim_reader.SimReader`` (memd's
reader rules: on-demand chunks before prefetch chunks on every thread, preemption at chunk granularity,
``read_threads`` threads sharing the disk's bandwidth). Only time and I/O are simulated.
Per step and MoE layer, as the worker does:

* every layer, leased or not, first sends its LAYER_NOTE (``ExpertCache.note``: the routing and the guesses), which
  feeds the predictor and the policy (none to a pool of every expert, as memd's replies tell the worker). The
  guesses are the trace's ``guesses`` those memd asks for (its lookahead and confidence threshold,
  ``ExpertCache.speculation``; a worker's defaults until memd has measured them), as the worker picks them; else its
  ``speculated`` at distance 1 with confidence 1.0. With ``guesses="oracle"`` they are the step's real routing of
  the layers memd asks for, at confidence 1.0: perfect speculation, what the planner (its admission rules unchanged)
  would hide if every guess were right;
* with leases (the default, as serving): a layer whose experts are all leased sends nothing more (memd counts
  its hits from the step trace, its recency arrives as ``leased_uses`` with the next acquire); any other layer is a
  lease acquire without routing, which revokes the shortfall of the worker's other leases in victim order when
  it needs more slots than are free or evictable (memd's pressure rule, ``leases.shortfall``); when a step ends
  every request it ran, the idle worker returns its leases;
* without: an acquire pins the layer's experts and the release after the compute unpins them.

After the note (and the acquire, which starts its on-demand loads) prefetch planning runs, as memd's planner
does after the reply: while on-demand reads are queued it only cancels and protects, and it plans again when the
last on-demand read ends (``prefetching.Prefetcher``). The layer waits until its experts are resident (the
stall), then computes for ``layer_seconds`` while reads proceed. An on-demand load that finds every slot pinned or
loading cancels the lowest-priority prefetch and waits for its slot (``loads.Loads.load_without_free_slot``). A
step's trace is learned when the step ends, and a request's EAM goes to the EAMC after its last step, as in memd.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common import messages as m
from common.traces import Step, TraceHeader
from services.memd.core import ExpertCache, CacheSettings
from services.memd.eamc import Eamc
from services.memd.leases import ConnectedWorker, room, shortfall
from services.memd.policy import Key
from services.memd.sim_reader import SimReader

WORKER = "sim"
WORKER_AHEAD = 4  # the worker's --speculate-layers default: the most layers ahead it guesses, whatever memd asks


@dataclass(frozen=True, slots=True)
class SimConfig:
    capacity: int  # pool slots
    knobs: CacheSettings = CacheSettings()
    read_seconds: float = 2e-3  # one expert's read, alone on the disk (bandwidth = expert_bytes / read_seconds)
    layer_seconds: float = 1e-3  # one MoE layer's compute
    expert_bytes: int = 1 << 20
    leases: bool = True  # the worker's lease mode (its default)
    read_threads: int = 4  # memd's --read-threads
    read_chunk: int = 1 << 20  # memd's --read-chunk
    guesses: str = "trace"  # the trace's guesses, or "oracle": the real routing of the layers ahead

    def __post_init__(self) -> None:
        if self.guesses not in ("trace", "oracle"):
            raise ValueError(f"SimConfig.guesses {self.guesses!r}: 'trace' or 'oracle'")


@dataclass(slots=True)
class SimResult:
    tokens: int = 0
    decode_tokens: int = 0
    hits: int = 0
    misses: int = 0
    decode_misses: int = 0  # in steps without prompt tokens (per decode token: decode_misses / decode_tokens)
    stall_seconds: float = 0.0
    seconds: float = 0.0
    acquires: int = 0  # layers that sent memd an acquire (the others were served from leases)
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    prefetch_late: int = 0
    lookahead: list[tuple[int, float, float]] = field(default_factory=list)  # (distance, precision, recall)

    @property
    def fetches(self) -> int:
        """Experts read: on-demand loads and prefetches issued (as ``bench replay`` counts them)."""
        return self.misses + self.prefetch_issued

    @property
    def misses_per_token(self) -> float:
        return self.misses / max(1, self.tokens)

    @property
    def decode_misses_per_token(self) -> float:
        return self.decode_misses / max(1, self.decode_tokens)


class Simulator:
    def __init__(self, header: TraceHeader, cfg: SimConfig, eamc: Eamc | None = None):
        self.header, self.cfg = header, cfg
        self.core = ExpertCache(cfg.capacity, header.num_layers, header.num_experts, header.top_k,
                                  cfg.expert_bytes, cfg.knobs, eamc)
        self.core.ahead_limit = max(1, min(header.num_layers - 1, WORKER_AHEAD))  # (the worker's READY says so)
        self.bandwidth = cfg.expert_bytes / cfg.read_seconds
        self.reader = SimReader(self.bandwidth, cfg.expert_bytes, threads=cfg.read_threads, chunk=cfg.read_chunk,
                                done=self._done, cancelled=self._cancelled)
        self.client = ConnectedWorker(0, ready=True)  # memd's record of the simulated worker: its pins and leases
        self.leased_uses: list[list[int]] = []  # leased uses since the last acquire (the worker's recency hints)
        self.deferred = False  # planned while on-demand reads ran: plan again when the last one ends
        self.result = SimResult()

    @property
    def now(self) -> float:
        return self.reader.now

    def run(self, steps: list[Step]) -> SimResult:
        last = {}
        for i, step in enumerate(steps):
            for request in step.requests:
                last[request] = i
        started = set()
        for i, step in enumerate(steps):
            for request in step.requests:
                if request not in started:
                    started.add(request)
                    self.core.request_start(request)
            self.step(i + 1, step)
            ended = [r for r in step.requests if last[r] == i]
            for request in ended:
                self.core.request_end(request)
            if self.cfg.leases and len(ended) == len(step.requests):  # the idle worker returns its leases
                self.client.return_leases(self.core.table)
        return self.finish()

    def step(self, number: int, step: Step) -> None:
        prefill = [step.phase[r] == "prefill" for r in step.requests]
        tokens = [len(step.tokens[r]) for r in step.requests]
        layers = []
        for layer in sorted(step.layers):
            experts, counts = self._routing(step, layer)
            targets, guessed, confidence = self._guesses(step, layer)
            if not self.core.holds_every_expert():  # (a pool of every expert takes none, as memd replies)
                self.core.note(m.LayerNoteEvent(WORKER, number, layer, experts, step.requests,
                                                [c for row in counts for c in row], prefill, targets, guessed,
                                                confidence), self.now)
            guessed = sorted({e for t, e in zip(targets, guessed) if t == layer + 1})
            keys = [(layer, e) for e in experts]
            leased = self.cfg.leases and all(k in self.client.leases for k in keys)
            if leased:
                self.leased_uses.extend([layer, e] for e in experts)
                self._plan()
                self.reader.advance(self.now + self.cfg.layer_seconds)
            else:
                req = m.AcquireRequest(layer, experts, [], [], number, prefill, lease=self.cfg.leases,
                                       leased_uses=self.leased_uses)
                self.leased_uses = []
                decode_misses = self.acquire(req)
                if not any(prefill):
                    self.result.decode_misses += decode_misses
            layers.append(m.LayerTrace(layer, experts, counts, [[0.0] * len(experts) for _ in counts], guessed,
                                       leased))
        self.core.step_trace(m.step_trace(0, number, step.requests, tokens, prefill, layers))
        self.result.tokens += sum(tokens)
        self.result.decode_tokens += 0 if any(prefill) else sum(tokens)

    def _guesses(self, step: Step, layer: int) -> tuple[list[int], list[int], list[float]]:
        """The note's guesses ``(target layers, experts, confidences)``, as the worker would send them."""
        if not self.core.wants_guesses():
            return [], [], []
        ahead, threshold = self.core.speculation(self.bandwidth)
        # the worker guesses within its knob (default), whatever memd asks
        ahead = min(ahead or WORKER_AHEAD, WORKER_AHEAD)
        last = min(self.header.num_layers - 1, layer + ahead)
        if self.cfg.guesses == "oracle":
            picks = [(t, e, 1.0) for t in range(layer + 1, last + 1) if t in step.layers
                     for e in step.routing(t).experts]
        else:
            routing = step.routing(layer)
            picks = [(layer + d, e, c) for d, e, c in routing.guesses if layer + d <= last and c >= threshold]
            if not routing.guesses and layer < last:
                picks = [(layer + 1, e, 1.0) for e in routing.speculated]
        return [t for t, _, _ in picks], [e for _, e, _ in picks], [c for _, _, c in picks]

    def _routing(self, step: Step, layer: int) -> tuple[list[int], list[list[int]]]:
        routed = step.routing(layer)
        return routed.experts, routed.tokens

    def _pin_or_lease(self, keys: list[Key]) -> None:
        """memd's ``Server._pin_or_lease`` for one worker: pin, or lease (revoking the shortfall of the others, in the
        policy's victim order)."""
        table = self.core.table
        if not self.cfg.leases:
            self.client.pin(table, keys)
            return
        reserve, spare = self.core.prefetch_reserve(), self.core.unused
        self.client.lease(table, keys, shortfall=shortfall(table, keys, reserve, spare),
                          room=room(table, keys, reserve), spare=spare)

    def acquire(self, req: m.AcquireRequest) -> int:
        """One layer: acquire, prefetch, wait, compute, release. Returns its on-demand misses."""
        core, table = self.core, self.core.table
        keys = [(req.layer, e) for e in req.experts]
        self._pin_or_lease(keys)
        misses = table.counters.misses
        self.result.acquires += 1
        plan = core.acquire(WORKER, req, self.now)
        for key, _slot in plan.loads:
            self.reader.submit(key, demand=True)
        for key in plan.already_loading:
            self.reader.promote(key)
        start = self.now  # as in the server, waiting for a slot counts as stall
        for key in plan.no_slot:
            self._demand(key, plan.transient)
        self._plan()
        while any(key in table.loading for key in keys):
            if not self.reader.jobs:
                raise AssertionError(f"layer {req.layer}: experts loading without a read")
            self.reader.advance(None)
        core.stall(WORKER, req.layer, self.now - start)
        self.reader.advance(self.now + self.cfg.layer_seconds)
        if not self.cfg.leases:
            self.client.unpin(table, keys)
        return table.counters.misses - misses

    def _plan(self) -> None:
        """memd's planner after a note or an acquire: cancel and protect only while on-demand reads are queued."""
        busy = self.reader.queued_demand()
        self.deferred = busy
        prefetch = self.core.plan_prefetch(WORKER, None, self.bandwidth, demand_busy=busy)
        for key in prefetch.cancel:
            self.reader.cancel(key)
        for key, _slot, priority in prefetch.start:
            self.reader.submit(key, demand=False, priority=priority)

    def _demand(self, key: Key, transient: bool) -> None:
        """``loads.Loads.load_without_free_slot``: cancel the lowest prefetch and wait for its slot."""
        while True:
            if key in self.reader.jobs:
                self.reader.promote(key)
                return
            if self.core.table.is_resident(key):
                return
            slot = self.core.reserve_demand(key, transient, raise_full=False)
            if slot is not None:
                self.reader.submit(key, demand=True)
                return
            victim = self.core.steal_candidate()
            if victim is None or victim not in self.reader.jobs:
                raise RuntimeError(f"{self.cfg.capacity} slots cannot hold one layer's experts and the pins")
            self.reader.cancel(victim)
            while victim in self.reader.jobs:
                self.reader.advance(None)

    def _done(self, key: Key) -> None:
        self.core.load_done(key, self.cfg.expert_bytes, self.cfg.read_seconds)
        if self.deferred and not self.reader.queued_demand():
            self._plan()

    def _cancelled(self, key: Key) -> None:
        if self.core.table.pins.get(key):  # an acquire came for it after the cancel: read it after all
            self.reader.submit(key, demand=True)
        else:
            self.core.load_cancelled(key)

    def finish(self) -> SimResult:
        r, c, mt = self.result, self.core.table.counters, self.core.metrics
        r.hits, r.misses, r.stall_seconds, r.seconds = c.hits, c.misses, c.stall_seconds, self.now
        r.prefetch_issued, r.prefetch_used = sum(mt.prefetch_issued), sum(mt.prefetch_used)
        r.prefetch_wasted, r.prefetch_late = sum(mt.prefetch_wasted), mt.prefetch_late
        r.lookahead = [(d, s.correct / max(1, s.predicted), s.correct / max(1, s.routed))
                       for d, s in self.core.predictor.lookahead_stats()]
        return r


def simulate(header: TraceHeader, steps: list[Step], cfg: SimConfig, eamc: Eamc | None = None) -> SimResult:
    return Simulator(header, cfg, eamc).run(steps)
