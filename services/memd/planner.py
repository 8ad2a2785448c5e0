"""Which predicted experts to prefetch now, and which prefetches to cancel.

Priority = predicted need x nearness (the next layer first: ``1 - (d - 1) / (window + 1)`` for ``d`` layers ahead)
orders the candidates; whether one is worth a read and a slot is judged on its need alone (the probability that it
runs at its target), its distance counting as the time it has to load. Only experts whose need reaches
``--prefetch-threshold`` are candidates; resident or loading ones are not loaded twice (they are returned as
*protected*: imminently needed, so no prefetch of a lower priority evicts them). The byte budget is what the reader
can deliver before the window's last layer runs: measured read bandwidth x observed time per layer (compute: stalls
left out) x window (or ``--prefetch-budget``), counting the prefetches still in flight; a candidate is admitted only
if the bytes queued ahead of it can be read before its own layer runs. A prefetch whose target layer has passed (and
that the new plan no longer wants) is stale: the caller cancels it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from services.memd.policy import Key
from services.memd.predictor import Target


@dataclass(slots=True)
class Prefetch:
    key: Key
    worker: object
    step: int  # the target: the step and layer that should use it
    layer: int
    priority: float


@dataclass(slots=True)
class Candidate:
    key: Key
    priority: float  # need x nearness: the order prefetches are planned and protected in
    distance: int
    step: int
    need: float = 1.0  # the probability that it runs at its target: what admission and the benefit weigh


class PrefetchPlanner:
    def __init__(self, expert_bytes: int, window: int, threshold: float, budget_bytes: int | None = None):
        self.expert_bytes, self.window, self.threshold = expert_bytes, window, threshold
        self.budget_bytes = budget_bytes  # None: derived from bandwidth and time per layer
        self.inflight: dict[Key, Prefetch] = {}  # prefetches still loading

    def nearness(self, distance: int) -> float:
        return 1.0 - (distance - 1) / (self.window + 1)

    def candidates(self, targets: list[Target]) -> list[Candidate]:
        """Every (layer, expert) worth having, best first; an expert in several targets keeps its best priority."""
        best: dict[Key, Candidate] = {}
        for t in targets:
            likely = t.likely if t.likely is not None else (t.need >= self.threshold).nonzero()[0].tolist()
            near = self.nearness(t.distance)
            for expert in likely:
                key = (t.layer, expert)
                need = float(t.need[expert])
                if key not in best or need * near > best[key].priority:
                    best[key] = Candidate(key, need * near, t.distance, t.step, need)
        return sorted(best.values(), key=lambda c: (-c.priority, c.distance, c.key))

    def budget(self, bandwidth: float | None, layer_seconds: float | None) -> tuple[float, float | None]:
        """``(bytes for the whole window, bytes readable per layer or None when not yet measured)``."""
        per_layer = bandwidth * layer_seconds if bandwidth and layer_seconds else None
        if self.budget_bytes is not None:
            return float(self.budget_bytes), per_layer
        if per_layer is None:
            return float(self.window * self.expert_bytes), None  # before any measurement: one expert per layer
        return max(per_layer * self.window, float(self.expert_bytes)), per_layer

    def plan(self, worker, candidates: list[Candidate], present: Callable[[Key], bool], bandwidth: float | None,
             layer_seconds: float | None) -> tuple[list[Candidate], dict[Key, float]]:
        """``(prefetches to start, best first; protected keys: present candidates and their priorities)``."""
        protect = {c.key: c.priority for c in candidates if present(c.key)}
        total, per_layer = self.budget(bandwidth, layer_seconds)
        queued = float(len(self.inflight) * self.expert_bytes)
        chosen = []
        for c in candidates:
            if c.key in protect or c.key in self.inflight:
                continue
            if queued + self.expert_bytes > total:
                break
            if per_layer is not None and queued >= per_layer * c.distance:
                continue  # it could not even start before its layer runs; a nearer, cheaper one may still fit
            chosen.append(c)
            queued += self.expert_bytes
        return chosen, protect

    def issued(self, worker, c: Candidate) -> None:
        self.inflight[c.key] = Prefetch(c.key, worker, c.step, c.key[0], c.priority)

    def retarget(self, worker, candidates: list[Candidate]) -> None:
        """Prefetches still loading that the new plan wants again follow its (later) target."""
        for c in candidates:
            p = self.inflight.get(c.key)
            if p is not None and p.worker == worker:
                p.step, p.priority = c.step, c.priority

    def stale(self, worker, step: int, layer: int, acquired: set[Key]) -> list[Key]:
        """Loading prefetches of ``worker`` whose target (step, layer) is at or before the current one and that
        the current acquire did not use: their layer has passed."""
        return [k for k, p in self.inflight.items()
                if p.worker == worker and (p.step, p.layer) <= (step, layer) and k not in acquired]

    def done(self, key: Key) -> Prefetch | None:
        return self.inflight.pop(key, None)
