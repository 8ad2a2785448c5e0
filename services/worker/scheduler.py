"""Continuous batching: which tokens of which requests go into the next forward pass.

Requests wait in arrival order and join the running set at a step boundary while a slot is free
(``--max-running``) and their KV caches' reservations fit the budget (``--kv-cache-memory``: each request counted
at its bound, prompt + ``max_tokens``, at bytes per token measured on the running caches, ``kv_budget.py``). Every
step, each running request that decodes gets its one token, oldest first; the remaining token budget
(``--max-step-tokens``) goes to prompt chunks, oldest request first. A prompt is prefilled in chunks of
``--max-prefill-chunk`` tokens, so a long prompt costs running requests at most one chunk of latency per step.
Chunk boundaries depend only on the prompt (multiples of the chunk size), never on what else runs, so a request
computes the same chunks whether it runs alone or in a crowd.

Pure bookkeeping: no torch, no sockets (the KV cache reservations come from ``reserve``).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from common.sizes import format_bytes


class CapacityError(RuntimeError):
    """The waiting queue is full; the message names the knob to raise."""


class Schedulable(Protocol):
    """What the scheduler reads of a sequence (``services.worker.engine.Sequence``)."""

    request_id: str

    @property
    def kv_tokens(self) -> int: ...  # the most tokens its KV cache can hold: prompt + max_tokens

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
    kv_bytes: int = 0  # KV cache the running requests may hold together (--kv-cache-memory; 0: no bound)
    whole_prompts: bool = False  # a prompt is prefilled in one forward (a model whose result depends on the split)

    @classmethod
    def from_config(cls, cfg, kv_bytes: int = 0) -> Limits:
        return cls(cfg.max_running, cfg.max_step_tokens, cfg.max_prefill_chunk, cfg.max_queued, kv_bytes)


class Scheduler:
    def __init__(self, limits: Limits, reserve=lambda seq: None):
        """``reserve(seq)``: the KV cache bytes ``seq`` may come to, or None when not known yet (``kv_budget.
        KvMeter.reserve``); with ``limits.kv_bytes`` the running requests' reservations stay within it."""
        self.limits, self.reserve = limits, reserve
        self.waiting: deque = deque()
        self.running: list = []  # in the order they joined: the oldest first

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Schedulable) -> None:
        self._join()
        if len(self.waiting) >= self.limits.max_waiting:
            kv = f", or --kv-cache-memory, now {format_bytes(self.limits.kv_bytes)}" if self.limits.kv_bytes else ""
            raise CapacityError(f"{len(self.waiting)} requests are waiting for a running slot; raise --max-queued"
                                f" (or --max-running, now {self.limits.max_running}{kv})")
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
        whole, first = self.limits.whole_prompts, True
        for seq in self.running:
            size = seq.prompt_left if whole else min(seq.prompt_left, self.limits.max_prefill_chunk)
            if 0 < size and (size <= budget or (whole and first)):  # (a whole prompt: its step's first, any size)
                step.append(Chunk(seq, seq.next_tokens(size)))
                budget -= size
                first = False
        return step

    def _join(self) -> None:
        """Waiting requests run, oldest first, while a slot is free and their KV caches' reservations fit; one that
        does not fit waits for the running ones to finish (never overtaken, so never starved), and runs alone even
        if it alone is above the budget (a bound reserved at the largest growth seen errs high: sliding-window
        layers stop growing at their window)."""
        held = self._held()
        while self.waiting and len(self.running) < self.limits.max_running:
            need = self.reserve(self.waiting[0]) if held is not None else None
            if need is not None and self.running and held + need > self.limits.kv_bytes:
                break
            held = None if need is None else held + need
            self.running.append(self.waiting.popleft())

    def _held(self) -> int | None:
        """The running requests' reservations (None: no budget, or nothing weighed yet)."""
        if not self.limits.kv_bytes:
            return None
        held = [self.reserve(seq) for seq in self.running]
        return None if any(r is None for r in held) else sum(held)
