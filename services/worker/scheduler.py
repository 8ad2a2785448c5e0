"""Continuous batching: which tokens of which requests go into the next forward pass.

Requests wait in arrival order and join the running set at a step boundary while a slot is free
(``--max-running``). Every step, each running request that decodes gets its one token, oldest first; the
remaining token budget (``--max-step-tokens``) goes to prompt chunks, oldest request first. A prompt is
prefilled in chunks of ``--max-prefill-chunk`` tokens, so a long prompt costs running requests at most one
chunk of latency per step. Chunk boundaries depend only on the prompt (multiples of the chunk size), never on
what else runs, so a request computes the same chunks whether it runs alone or in a crowd.

Pure bookkeeping: no torch, no sockets.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol


class CapacityError(RuntimeError):
    """The waiting queue is full; the message names the knob to raise."""


class Schedulable(Protocol):
    """What the scheduler reads of a sequence (``services.worker.engine.Sequence``)."""

    request_id: str

    @property
    def prompt_left(self) -> int: ...  # prompt tokens not yet in the cache (0: decoding)

    def next_tokens(self, limit: int) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class Chunk:
    """One request's tokens in a step: a prompt chunk, or the last generated token."""

    seq: Schedulable
    tokens: list[int]


@dataclass(frozen=True, slots=True)
class Limits:
    """The knobs (validated by ``common.config.WorkerConfig``)."""

    max_running: int  # requests with a KV cache, decoding or prefilling
    max_step_tokens: int  # tokens in one forward: >= max_prefill_chunk + max_running
    max_prefill_chunk: int
    max_waiting: int  # requests waiting for a running slot

    @classmethod
    def from_config(cls, cfg) -> Limits:
        return cls(cfg.max_running, cfg.max_step_tokens, cfg.max_prefill_chunk, cfg.max_queued)


class Scheduler:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.waiting: deque = deque()
        self.running: list = []  # in the order they joined: the oldest first

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Schedulable) -> None:
        self._join()
        if len(self.waiting) >= self.limits.max_waiting:
            raise CapacityError(f"{len(self.waiting)} requests are waiting for a running slot; raise --max-queued"
                                f" (or --max-running, now {self.limits.max_running})")
        self.waiting.append(seq)

    def remove(self, seq: Schedulable) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> list[Chunk]:
        """The next step: decode tokens of every decoding request, then prompt chunks while the budget lasts."""
        self._join()
        budget = self.limits.max_step_tokens
        decoding = [seq for seq in self.running if not seq.prompt_left]
        step = [Chunk(seq, seq.next_tokens(1)) for seq in decoding]
        budget -= len(step)
        for seq in self.running:
            size = min(seq.prompt_left, self.limits.max_prefill_chunk)
            if 0 < size <= budget:
                step.append(Chunk(seq, seq.next_tokens(size)))
                budget -= size
        return step

    def _join(self) -> None:
        while self.waiting and len(self.running) < self.limits.max_running:
            self.running.append(self.waiting.popleft())
