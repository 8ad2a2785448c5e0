"""A host-memory stand-in for the CUDA device pool, so the CPU suite runs every decision of the tier logic.

``StandInPool`` keeps ``CudaPool``'s shape: chunks of whole slots (``chunks.Chunks``, the same bookkeeping), two
in-order copy streams (on-demand writes on ``demand_stream``, prefetches on ``stream``), writes that wait on given
completions and end in an event. The stream is explicit:
``StandInStream`` queues operations and runs them in order when asked (``run``) or when someone waits for one of
its events, and an operation never starts before the completions it waits on are done, as
``cudaStreamWaitEvent`` orders a CUDA stream. ``Fence`` is a completion the test (or a stand-in worker) signals
by hand: "done reading this slot". ``stream.log`` records what ran, in order, so tests can check the ordering
contract (docs/gpu.md, Ordering).
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from services.memd.chunks import Chunks
from services.memd.pools import Completion, Pool, PoolExport


class Fence(Completion):
    """A completion signalled from the host (the stand-in for a worker's "done reading" event)."""

    def __init__(self) -> None:
        self._set = threading.Event()

    def signal(self) -> None:
        self._set.set()

    def done(self) -> bool:
        return self._set.is_set()

    def wait(self, timeout: float | None = None) -> None:
        if not self._set.wait(timeout):
            raise TimeoutError("a fence was not signalled in time")


class StandInEvent(Completion):
    """Recorded on a ``StandInStream`` after an operation: done once the stream ran it."""

    def __init__(self, stream: "StandInStream"):
        self.stream, self.fired = stream, False

    def done(self) -> bool:
        if self.stream.auto:
            self.stream.run()
        return self.fired

    def wait(self, timeout: float | None = 10.0) -> None:
        """Auto stream: run it, waiting on what blocks it. Manual: wait until someone runs this far."""
        if not self.stream.auto:
            with self.stream.ran:
                if not self.stream.ran.wait_for(lambda: self.fired, timeout):
                    raise TimeoutError(f"the stand-in stream did not run this far in {timeout} s")
            return
        while not self.done():
            self.stream.blocker().wait(timeout)


@dataclass(slots=True)
class _Op:
    label: str
    after: tuple[Completion, ...]
    fn: Callable[[], None]
    event: StandInEvent


class StandInStream:
    """An in-order queue of operations; each starts only after its ``after`` completions are done."""

    def __init__(self, auto: bool = True):
        self.auto = auto  # run what can run at each enqueue (False: only on run() or a wait)
        self.ops: deque[_Op] = deque()
        self.log: list[str] = []
        self._lock = threading.RLock()
        self.ran = threading.Condition(self._lock)  # notified after each run()

    def enqueue(self, label: str, fn: Callable[[], None], after: tuple[Completion, ...] = ()) -> StandInEvent:
        with self._lock:
            op = _Op(label, tuple(after), fn, StandInEvent(self))
            self.ops.append(op)
        if self.auto:
            self.run()
        return op.event

    def run(self) -> int:
        """Run queued operations in order until one must wait; returns how many ran."""
        ran = 0
        with self._lock:
            while self.ops and all(_ready(c) for c in self.ops[0].after):
                op = self.ops.popleft()
                op.fn()
                op.event.fired = True
                self.log.append(op.label)
                ran += 1
            self.ran.notify_all()
        return ran

    def blocker(self) -> Completion:
        """What the head operation waits for (a completion not done yet)."""
        with self._lock:
            if not self.ops:
                return _DONE_NOW
            return next((c for c in self.ops[0].after if not _ready(c)), _DONE_NOW)


class _DoneNow(Completion):
    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> None:
        return None


_DONE_NOW = _DoneNow()


def _ready(c: Completion) -> bool:
    return c.fired if isinstance(c, StandInEvent) else c.done()


class StandInPool(Pool):
    """Device memory stand-in: bytearray chunks, two stand-in copy streams, the CUDA pool's export shape."""

    backend = "standin"

    def __init__(self, nbytes: int, slot_bytes: int, chunk_slots: int, stream: StandInStream | None = None,
                 ring: int = 0):
        """``ring``: entries of a stand-in copy-event ring (``CudaPool``'s ``--copy-events ipc``); 0: none."""
        self.nbytes, self.slot_bytes = nbytes, slot_bytes
        self.ring, self._next = ring, 0
        self._ring_last: list[Completion | None] = [None] * ring  # what each ring entry was last recorded after
        self.stream = stream or StandInStream()  # prefetches' writes
        self.demand_stream = StandInStream(auto=self.stream.auto)  # on-demand loads' writes
        self.frees = 0
        self.chunks = Chunks(nbytes, slot_bytes, chunk_slots, bytearray, self._free)

    def _free(self, mem: bytearray) -> None:
        self.frees += 1

    def open_events(self, handles: list[bytes]) -> list[Completion]:
        """A stand-in worker's "done reading" events: fences the test signals."""
        return [Fence() for _ in handles]

    def export(self) -> PoolExport:
        """One made-up handle per chunk, empty for a chunk a shrink freed (as ``CudaPool.export``)."""
        return PoolExport(self.backend, "", self.nbytes, "standin", self.chunks.chunk_bytes,
                          [i.to_bytes(8, "little") if m is not None else b"" for i, m in enumerate(self.chunks.mem)],
                          [i.to_bytes(8, "little") for i in range(self.ring)])

    def write(self, offset: int, src: memoryview, after: tuple[Completion, ...] = (), *,
              demand: bool = False) -> Completion:
        mem, within = self.chunks.locate(offset, len(src))

        def copy() -> None:
            mem[within:within + len(src)] = src

        stream = self.demand_stream if demand else self.stream
        event = stream.enqueue(f"write {offset // self.slot_bytes}", copy, after)
        if self.ring:
            event.ring, self._next = self._next, (self._next + 1) % self.ring
            last, self._ring_last[event.ring] = self._ring_last[event.ring], event
            if last is not None and not last.done():
                last.wait()  # as ``EventRing``: an entry is reused once its last copy is done
        return event

    def run(self) -> int:
        """Run both streams as far as they can go (a manual stand-in); returns how many operations ran."""
        total = 0
        while ran := self.demand_stream.run() + self.stream.run():
            total += ran
        return total

    def queued(self) -> int:
        return len(self.stream.ops) + len(self.demand_stream.ops)

    def read(self, offset: int, length: int) -> bytes:
        """What a worker would see at ``offset`` now (tests)."""
        mem, within = self.chunks.locate(offset, length)
        return bytes(mem[within:within + length])

    def ensure(self, offset: int, length: int) -> None:
        self.chunks.ensure(offset, length)

    def release(self, offset: int, length: int) -> None:
        self.chunks.release(offset, length, before_free=self.run)

    def resident_bytes(self) -> int:
        return self.chunks.resident_bytes()

    def close(self) -> None:
        self.chunks.close()
