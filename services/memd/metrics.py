"""memd's prefetch and stall counters, per MoE layer and in total (hits and misses live in the slot table).

A prefetch is *used* when an acquire asks for it before it is evicted (*late* if it was still loading: the
worker waited, but less than for an on-demand load), and *wasted* when it is evicted or cancelled first.
Prefetch precision = used / (used + wasted); recall = used / (used + on-demand misses): the share of the loads
the worker needed that a prefetch had started.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Metrics:
    num_layers: int
    prefetch_issued: list[int] = field(default_factory=list)
    prefetch_used: list[int] = field(default_factory=list)
    prefetch_wasted: list[int] = field(default_factory=list)
    stall_seconds: list[float] = field(default_factory=list)
    bytes_read: list[int] = field(default_factory=list)
    prefetch_cancelled: int = 0
    prefetch_late: int = 0
    tokens: int = 0
    decode_tokens: int = 0
    trace_steps: int = 0
    trace_lost: int = 0
    acquires: int = 0  # ACQUIRE messages
    leased_layers: int = 0  # layers a worker served from its leases (no message; learnt from the step trace)
    layer_notes: int = 0  # LAYER_NOTE events received
    notes_dropped: int = 0  # of those, already fed by the layer's acquire, or late (ignored)
    notes_unattached: int = 0  # layer notes of a worker not attached (a dead one's, still queued: ignored)
    layers_fed: int = 0  # (worker, step, layer) positions the predictor learnt (from a note or an acquire)
    speculate_layers: int = 0  # the lookahead workers were last told to guess
    prefetch_deferred: int = 0  # plans made without prefetching: on-demand reads were in flight or queued
    prefetch_declined: int = 0  # candidates whose expected benefit did not beat their cost
    last_step: dict = field(default_factory=dict)  # worker pid -> last step number seen

    def __post_init__(self):
        for name in ("prefetch_issued", "prefetch_used", "prefetch_wasted", "bytes_read"):
            setattr(self, name, [0] * self.num_layers)
        self.stall_seconds = [0.0] * self.num_layers

    def step_traced(self, worker: int, step: int, tokens: int, decode_tokens: int, attached: bool = True) -> None:
        """Count a step trace; ``last_step`` (lost traces: gaps in a worker's steps) holds attached workers only."""
        last = self.last_step.get(worker)
        if last is not None and step > last + 1:
            self.trace_lost += step - last - 1
        if attached and (last is None or step > last):
            self.last_step[worker] = step
        self.trace_steps += 1
        self.tokens += tokens
        self.decode_tokens += decode_tokens

    def forget_worker(self, worker: int) -> None:
        """``worker`` detached: ``last_step`` holds attached workers only (at most ``--max-clients``)."""
        self.last_step.pop(worker, None)

    @staticmethod
    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    def prefetch_precision(self) -> float:
        used, wasted = sum(self.prefetch_used), sum(self.prefetch_wasted)
        return self.ratio(used, used + wasted)

    def prefetch_recall(self, misses: int) -> float:
        used = sum(self.prefetch_used)
        return self.ratio(used, used + misses)
