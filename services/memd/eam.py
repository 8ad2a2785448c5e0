"""Expert activation matrices (EAMs) of live requests.

A request's EAM is a ``[MoE layers, experts]`` matrix: how many of its tokens each expert of each layer served,
accumulated over its prompt (prefill) and every decode step. memd keeps one per live request, split into the
prefill and decode parts (decode reuse is what the cache keeps and the prediction leans on), and hands the total
to the EAMC when the request finishes. The table is bounded: past ``--max-traced-requests`` the request seen
longest ago is dropped (a worker that never sends REQUEST_END cannot grow memd).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("moeinf.memd.eam")


@dataclass(slots=True)
class Eam:
    prefill: np.ndarray  # [L, E] tokens routed while the request was in its prompt
    decode: np.ndarray  # [L, E] tokens routed while it generated
    prompt_tokens: int = 0
    decode_tokens: int = 0
    steps: set = field(default_factory=set)  # (worker, step) pairs already counted: a trace is never added twice
    worker: int | None = None  # the worker whose steps traced it (its pid): a dead worker's requests go with it

    @property
    def total(self) -> np.ndarray:
        return self.prefill + self.decode


class EamTable:
    def __init__(self, num_layers: int, num_experts: int, capacity: int):
        self.shape = (num_layers, num_experts)
        self.capacity = capacity
        self.live: OrderedDict[str, Eam] = OrderedDict()
        self.dropped = 0  # requests forgotten because the table was full

    def __len__(self) -> int:
        return len(self.live)

    def get(self, request: str) -> Eam | None:
        return self.live.get(request)

    def start(self, request: str) -> Eam:
        eam = self.live.get(request)
        if eam is None:
            if len(self.live) >= self.capacity:
                old, _ = self.live.popitem(last=False)
                self.dropped += 1
                log.warning("tracking %d live requests: forgot %s (raise --max-traced-requests if this many are"
                            " really running)", self.capacity, old)
            eam = self.live[request] = Eam(np.zeros(self.shape, np.float32), np.zeros(self.shape, np.float32))
        self.live.move_to_end(request)
        return eam

    def add_step(self, step_id, request: str, tokens: int, prefill: bool, layers) -> None:
        """Add one step's routing of ``request``: ``layers`` yields ``(layer, experts, counts)``, a layer and its
        experts' counts, or equal-length arrays of layers, experts and counts (``step_entries``)."""
        eam = self.start(request)
        eam.worker = step_id[0]
        if step_id in eam.steps:
            return
        eam.steps.add(step_id)
        if len(eam.steps) > 4:  # only recent steps can be replayed; keep the set small
            eam.steps.discard(min(eam.steps))
        target = eam.prefill if prefill else eam.decode
        for layer, experts, counts in layers:
            np.add.at(target, (layer, experts), counts)
        if prefill:
            eam.prompt_tokens += tokens
        else:
            eam.decode_tokens += tokens

    def forget_worker(self, worker: int) -> int:
        """Drop the requests ``worker`` traced (it left without their REQUEST_END: killed); how many."""
        gone = [request for request, eam in self.live.items() if eam.worker == worker]
        for request in gone:
            del self.live[request]
        return len(gone)

    def finish(self, request: str) -> Eam | None:
        """Forget ``request`` and return its EAM (None if it was never traced)."""
        return self.live.pop(request, None)


def step_entries(ev) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A ``StepTraceEvent``'s flat arrays as one entry per (layer, expert): its layer, its expert, and where request
    r's count of it lies in ``routed`` (``at + r * width``). The lengths are checked first (``layout_problem``)."""
    counts = np.asarray(ev.expert_counts, np.intp)
    starts = np.cumsum(counts) - counts
    experts = np.asarray(ev.experts, np.intp)
    within = np.arange(len(experts)) - np.repeat(starts, counts)
    return (np.repeat(np.asarray(ev.layers, np.intp), counts), experts,
            np.repeat(starts * len(ev.requests), counts) + within, np.repeat(counts, counts))
