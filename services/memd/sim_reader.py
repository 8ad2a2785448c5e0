"""memd's reader, simulated: ``threads`` readers share the disk's bandwidth, one chunk at a time (``reader.py``).

The rules are the real reader's: every load is a job of ``chunk``-byte steps; a reader thread that is free takes
one chunk from the best job no other thread is reading (on-demand loads first, oldest first; then prefetches by
priority), so an on-demand load waits for at most one chunk of a prefetch on a busy thread, a promoted prefetch
jumps the queue, and a cancelled prefetch stops at its next chunk boundary (at once when no thread is on it).
While ``n`` chunks are being read, each moves at ``bandwidth / n`` (the disk's bandwidth is shared).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

from services.memd.policy import Key


@dataclass(slots=True)
class SimJob:
    key: Key
    remaining: float  # bytes of the expert still to read
    demand: bool
    priority: float
    seq: int
    cancelled: bool = False
    chunk_left: float = 0.0  # bytes left of the chunk a thread is reading (0: no thread is on it)

    @property
    def running(self) -> bool:
        return self.chunk_left > 0

    def rank(self) -> tuple:
        return (0, self.seq) if self.demand else (1, -self.priority, self.seq)


class SimReader:
    def __init__(self, bandwidth: float, expert_bytes: int, *, threads: int = 4, chunk: int = 1 << 20,
                 done: Callable[[Key], None], cancelled: Callable[[Key], None]):
        if threads < 1 or bandwidth <= 0 or chunk < 1:
            raise ValueError("the simulated reader needs >= 1 thread, a positive bandwidth and chunk")
        self.bandwidth, self.expert_bytes, self.threads, self.chunk = bandwidth, expert_bytes, threads, chunk
        self.done, self.cancelled = done, cancelled  # told when a job ends (at the simulated time ``now``)
        self.jobs: dict[Key, SimJob] = {}
        self.now = 0.0
        self._seq = itertools.count()

    def submit(self, key: Key, *, demand: bool, priority: float = 0.0) -> None:
        self.jobs[key] = SimJob(key, float(self.expert_bytes), demand, priority, next(self._seq))
        self._dispatch()

    def promote(self, key: Key) -> None:
        job = self.jobs[key]
        job.demand, job.cancelled, job.seq = True, False, next(self._seq)

    def cancel(self, key: Key) -> None:
        job = self.jobs.get(key)
        if job is None or job.demand:
            return
        job.cancelled = True
        if not job.running:
            del self.jobs[key]
            self.cancelled(key)

    def queued_demand(self) -> bool:
        return any(j.demand for j in self.jobs.values())

    def advance(self, until: float | None) -> None:
        """Read until ``until``, or with None until the next job ends (done or cancelled)."""
        while True:
            running = [j for j in self.jobs.values() if j.running]
            if not running:
                if until is not None:
                    self.now = max(self.now, until)
                return
            rate = self.bandwidth / len(running)
            first = min(running, key=lambda j: j.chunk_left)
            finish = self.now + first.chunk_left / rate
            if until is not None and finish > until:
                for j in running:
                    j.chunk_left -= (until - self.now) * rate
                self.now = until
                return
            for j in running:
                j.chunk_left -= (finish - self.now) * rate
            first.chunk_left = 0.0  # it ends now by definition (a few bytes left can be below the clock's resolution)
            self.now = finish
            ended = False
            for j in [j for j in running if j.chunk_left <= 1e-6]:
                # an earlier job's end may have cancelled (removed) this one, or handed it its next chunk
                if self.jobs.get(j.key) is j and j.chunk_left <= 1e-6:
                    ended |= self._chunk_done(j)
            self._dispatch()
            if ended and until is None:
                return

    def _chunk_done(self, job: SimJob) -> bool:
        job.chunk_left = 0.0
        if job.remaining <= 1e-6:
            del self.jobs[job.key]
            self.done(job.key)
            return True
        if job.cancelled and not job.demand:
            del self.jobs[job.key]
            self.cancelled(job.key)
            return True
        return False

    def _dispatch(self) -> None:
        busy = sum(j.running for j in self.jobs.values())
        while busy < self.threads:
            ready = [j for j in self.jobs.values() if not j.running]
            if not ready:
                return
            job = min(ready, key=SimJob.rank)
            step = min(float(self.chunk), job.remaining)
            job.remaining -= step
            job.chunk_left = step
            busy += 1
