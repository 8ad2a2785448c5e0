"""Two tiers on a GPU host: the device pool the worker computes from, and a pinned host tier behind it.

The device tier is memd's usual slot table (``core.table``, ``--expert-memory``, ``--policy``); the host tier is
a second ``SlotTable`` over pinned host memory (``--host-memory``) with its own LFU policy: it caches experts read
from the SSD. ``TieredReader`` has the reader's interface (``submit``/``promote``/``cancel``/...), so ``Loads``
and the decision core do not change; a load of expert ``key`` into device slot ``d`` is:

- host hit: one copy, host slot -> ``d`` (``Pool.write``);
- host miss: a read from the checkpoint into a host slot (the ``ExpertReader`` over pinned memory, whose
  aligned O_DIRECT reads land in the host tier: that is the pinned staging), then the copy.

The host slot is pinned in the host table until its copy completes, so the host tier never evicts bytes a copy
still reads; a load that finds every host slot pinned or loading waits (``waiting``, on-demand loads first) until
a copy completes or a read fails, instead of failing the acquire.

Ordering (``SlotFences``): a write into ``d`` first waits for every "done reading" completion registered for
``d`` (write-after-read: the worker's GPU work on the old expert may still be queued) and for ``d``'s previous
write (write-after-write: on-demand and prefetch copies run on separate streams, ``Pool.write(demand=)``), and the
write's own completion is kept as ``d``'s "written" (read-after-write): when it carries an entry of the pool's
event ring (``--copy-events ipc``), the job is done as soon as the copy is queued, and ``pending_events`` names
the entries an acquire reply hands the worker, whose stream waits on them; otherwise the job is done when the copy
is (a host wait on a waiter thread). Copies end on two waiter threads, one per
kind, so a demand copy's end is not noticed behind a prefetch copy's. 
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from services.memd.policy import Key, LfuPolicy
from services.memd.pools import DONE, Completion, Pool
from services.memd.read_jobs import BusyRate, ReadCancelled, ReadJob, settle
from services.memd.reader import ExpertReader
from services.memd.slots import PoolExhausted, SlotTable

log = logging.getLogger("moeinf.memd.tiers")


class SlotFences:
    """Per device slot: the completions a write must wait for (readers) and the last write's completion."""

    def __init__(self) -> None:
        self.readers: dict[int, list[Completion]] = {}
        self.written: dict[int, Completion] = {}
        self.registered = 0  # readers' completions registered (a worker's read events)
        self._lock = threading.Lock()

    def read_done(self, slot: int, completion: Completion) -> None:
        """A reader of ``slot`` (the worker's layer compute) ends at ``completion``."""
        with self._lock:
            self.registered += 1
            pending = [c for c in self.readers.get(slot, ()) if not c.done()]
            self.readers[slot] = pending + [completion]

    def before_write(self, slot: int) -> tuple[Completion, ...]:
        """What a write into ``slot`` must wait for (its readers, its last write); forgets the readers (the write
        is ordered after them)."""
        with self._lock:
            pending = [c for c in self.readers.pop(slot, ()) if not c.done()]
            last = self.written.get(slot)
            if last is not None and not last.done():
                pending.append(last)
            return tuple(pending)

    def wrote(self, slot: int, completion: Completion) -> None:
        with self._lock:
            self.written[slot] = completion

    def ready(self, slot: int) -> Completion:
        """What a reader of ``slot`` must wait for before it reads (read-after-write)."""
        with self._lock:
            return self.written.get(slot, DONE)


@dataclass(eq=False, slots=True)
class TierJob:
    """One expert into one device slot; ``future`` gets ``(bytes read from disk, seconds)`` as ReadJob's does (with
    the event ring, the seconds end when the copy is queued)."""

    key: Key
    slot: int
    demand: bool
    priority: float = 0.0
    host_slot: int = -1
    inner: ReadJob | None = None  # the disk read (None: a host hit)
    started: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass(slots=True)
class TierStats:
    host_hits: int = 0
    host_misses: int = 0
    copies: int = 0
    copy_bytes: int = 0
    copy_seconds: float = 0.0


class TieredReader:
    def __init__(self, reader: ExpertReader, host: SlotTable, host_view: memoryview, device: Pool,
                 slot_bytes: int, fences: SlotFences | None = None, on_fatal=None):
        """``on_fatal(message)``: a copy failed after its acquire was answered (the event ring), so a slot memd
        calls resident holds unknown bytes and the device is in doubt; by default memd stops (SIGTERM to itself)
        and its workers, who notice, are restarted with it by the supervisor."""
        self.reader, self.host, self.host_view, self.device = reader, host, host_view, device
        self.slot_bytes = slot_bytes
        self.fences = fences or SlotFences()
        self.on_fatal = on_fatal or _stop_memd
        self.broken = ""  # why no load is taken any more (a copy failed after its answer)
        self.stats = TierStats()
        self._rate = BusyRate()  # device loads: bytes into the pool over the seconds some load was under way
        self._copies = BusyRate()  # the copies alone: bytes over the seconds some copy was in flight
        self.loading: dict[Key, ReadJob] = {}  # disk reads into the host tier, by expert
        self.waiting: list[TierJob] = []  # jobs that found every host slot pinned or loading
        self._lock = threading.Lock()  # the host table: touched from the loop and the reader's callbacks
        self._waiters = {d: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"memd-copy-wait-{n}")
                         for d, n in ((True, "demand"), (False, "prefetch"))}

    @staticmethod
    def host_table(host_slots: int, num_layers: int, num_experts: int) -> SlotTable:
        return SlotTable(host_slots, num_layers, LfuPolicy(num_layers, num_experts), num_experts)

    # ---------------------------------------------------------------- the reader's interface
    def submit(self, key: Key, slot: int, *, demand: bool, priority: float = 0.0) -> TierJob:
        if not 0 <= slot < self.device.num_slots:
            raise ValueError(f"slot {slot} is outside the device pool ({self.device.num_slots} slots)")
        if self.broken:
            raise RuntimeError(self.broken)
        job = TierJob(key, slot, demand, priority=priority)
        with self._lock:
            self.host.record_access(key, decode=demand)
            placed = self._place(job)
            self._rate.begin(time.perf_counter())
            if not placed:
                self.waiting.append(job)  # every host slot is read into or copied from: wait for one
                return job
        self._go(job)
        return job

    def _place(self, job: TierJob) -> bool:
        """Under the lock: find ``job``'s expert a host slot (hit, joined read or new read) and pin it there."""
        key = job.key
        if self.host.is_resident(key):
            self.stats.host_hits += 1
        elif (inner := self.loading.get(key)) is not None:
            job.inner = inner
        else:
            try:
                h = self.host.reserve(key)
            except PoolExhausted:
                return False
            job.inner = self.loading[key] = self.reader.submit(key, h, demand=job.demand, priority=job.priority)
            self.stats.host_misses += 1
        job.host_slot = self.host.slot_of[key]
        self.host.pin(key)  # until its copy is complete: the host tier does not evict it meanwhile
        return True

    def _go(self, job: TierJob) -> None:
        if job.inner is None:
            self._copy(job, 0)
            return
        if job.demand:
            self.reader.promote(job.inner)
        job.inner.future.add_done_callback(lambda f: self._read_done(job, f))

    def _drain(self) -> None:
        """A host slot may be free: start the waiting jobs that now find one, on-demand ones first."""
        started = []
        failed: list[tuple[TierJob, Exception]] = []
        with self._lock:
            self.waiting.sort(key=lambda j: not j.demand)
            while self.waiting:
                try:
                    if not self._place(self.waiting[0]):
                        break
                except Exception as exc:  # (the reader closed meanwhile): this job fails, the others go on
                    failed.append((self.waiting.pop(0), exc))
                    self._rate.end(time.perf_counter(), 0)
                    continue
                started.append(self.waiting.pop(0))
        for job, exc in failed:
            settle(job.future, exc)
        for job in started:
            self._go(job)

    def _read_done(self, job: TierJob, f: concurrent.futures.Future) -> None:
        exc = f.exception()
        with self._lock:
            if self.loading.get(job.key) is job.inner:
                del self.loading[job.key]
                if exc is None:
                    self.host.loaded(job.key)
                else:
                    self.host.abort(job.key)  # partial bytes: the host slot is free again
        if exc is not None:
            self._ended(0)
            self._unpin_host(job.key)
            settle(job.future, exc)
            return
        self._copy(job, f.result()[0])

    def _copy(self, job: TierJob, disk_bytes: int) -> None:
        s, h, d = self.slot_bytes, job.host_slot, job.slot
        src = self.host_view[h * s:(h + 1) * s]
        t0 = time.monotonic()
        try:
            done = self.device.write(d * s, src, after=self.fences.before_write(d), demand=job.demand)
        except Exception as exc:
            self._ended(0)
            self._unpin_host(job.key)
            settle(job.future, exc)
            return
        self.fences.wrote(d, done)
        with self._lock:
            self._copies.begin(time.perf_counter())
        if done.ring >= 0:  # the worker's stream waits on the copy's event (pending_events): done for memd now
            settle(job.future, result=(disk_bytes, time.monotonic() - job.started))
        self._waiters[job.demand].submit(self._finish, job, done, disk_bytes, t0)

    def _finish(self, job: TierJob, done: Completion, disk_bytes: int, t0: float) -> None:
        """The copy's end (a host wait): its host slot may go, and a job not yet done is."""
        try:
            done.wait()
        except Exception as exc:
            with self._lock:
                self._copies.end(time.perf_counter(), 0)
            self._ended(0)
            self._unpin_host(job.key)
            if not job.future.done():
                settle(job.future, exc)
                return
            self.broken = (f"a copy of expert {job.key} into device slot {job.slot} failed after its acquire was"
                           f" answered ({exc}): restart memd")
            log.critical("%s", self.broken)
            self.on_fatal(self.broken)
            return
        with self._lock:
            self._copies.end(time.perf_counter(), self.slot_bytes)
            self.stats.copies += 1
            self.stats.copy_bytes += self.slot_bytes
            self.stats.copy_seconds += time.monotonic() - t0
        self._ended(self.slot_bytes)
        self._unpin_host(job.key)
        if not job.future.done():
            settle(job.future, result=(disk_bytes, time.monotonic() - job.started))

    def _ended(self, nbytes: int) -> None:
        with self._lock:
            self._rate.end(time.perf_counter(), nbytes)

    def _unpin_host(self, key: Key) -> None:
        with self._lock:
            if self.host.pins.get(key):
                self.host.unpin(key)
            waiting = bool(self.waiting)
        if waiting:
            self._drain()

    def promote(self, job: TierJob) -> None:
        with self._lock:
            job.demand = True  # a waiting job starts among the first
        if job.inner is not None:
            self.reader.promote(job.inner)

    def cancel(self, job: TierJob) -> None:
        """Stops a prefetch's disk read (its future raises ReadCancelled, and so does the job's) or its wait for
        a host slot; a copy under way is not stopped."""
        with self._lock:
            if job in self.waiting and not job.demand:
                self.waiting.remove(job)
                self._rate.end(time.perf_counter(), 0)
                settle(job.future, ReadCancelled())
                return
        if job.inner is not None:
            self.reader.cancel(job.inner)

    def read(self, key: Key, slot: int) -> tuple[int, float]:
        return self.submit(key, slot, demand=True).future.result()

    # ---------------------------------------------------------------- the worker's CPU (host_compute.py)
    def hold_host(self, key: Key, spare: int) -> int | None:
        """Pin ``key``'s host slot while the worker computes it on its CPU, if the host tier holds it (read, not
        loading) and keeps ``spare`` other slots unpinned for loads; its host slot, else None."""
        with self._lock:
            if not self.host.is_resident(key):
                return None
            if not self.host.pins.get(key) and self.host.num_pinned + spare >= self.host.capacity:
                return None
            self.host.record_access(key, decode=True)
            self.host.pin(key)
            return self.host.slot_of[key]

    def drop_host(self, key: Key) -> None:
        """The worker is done with ``key``'s host slot (``hold_host``)."""
        self._unpin_host(key)

    @property
    def copy_rate(self) -> float | None:
        """Host-to-device bytes per second while some copy is in flight (overlapping copies counted once, recent ones
        weighted most); None before one ended."""
        with self._lock:
            return self._copies.rate

    def demand_pending(self) -> bool:
        return self.reader.demand_pending() or any(j.demand for j in self.waiting)

    def settle(self, slot: int) -> None:
        """Returns once nothing reads or writes device ``slot`` any more (before its memory is freed)."""
        for c in self.fences.before_write(slot):
            c.wait()

    def pending_events(self, slots: list[int]) -> list[int]:
        """Event-ring entries of the copies into ``slots`` still in flight (the worker's stream waits on them)."""
        ready = (self.fences.ready(s) for s in slots)
        return sorted({c.ring for c in ready if c.ring >= 0 and not c.done()})

    @property
    def bandwidth(self) -> float | None:
        """Bytes per second into the device pool, host hits and disk reads together (what a load costs here, for
        the planner and the guesses' lookahead); the disk's until a load has ended."""
        return self._rate.rate or self.reader.bandwidth

    @property
    def expert_rate(self) -> float | None:
        return self._rate.rate or self.reader.expert_rate  # (slots filled: expert bytes already)

    @property
    def direct_io(self) -> bool:
        return self.reader.direct_io

    def queued(self) -> int:
        return self.reader.queued() + len(self.waiting)

    def close(self) -> None:
        with self._lock:
            waiting, self.waiting = self.waiting, []
            for _ in waiting:
                self._rate.end(time.perf_counter(), 0)
        for job in waiting:
            settle(job.future, ReadCancelled())
        self.reader.close()
        for waiter in self._waiters.values():
            waiter.shutdown(wait=True)


def tier_fields(reader, host=None) -> dict[str, int | float]:
    """The two-tier counters for memd's StatsReply (none for a one-tier reader); ``host``: the HostCompute of
    ``--cpu-experts auto|always``."""
    if not isinstance(reader, TieredReader):
        return {}
    s = reader.stats
    waits = getattr(getattr(reader.device, "ring", None), "reuse_waits", 0)  # (CudaPool's EventRing)
    return {"host_hits": s.host_hits, "host_misses": s.host_misses, "copy_bytes": s.copy_bytes,
            "copy_seconds": s.copy_seconds, "ring_reuse_waits": waits, "cpu_experts": getattr(host, "computed", 0),
            "read_events": reader.fences.registered}


def _stop_memd(message: str) -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # memd's orderly stop; the supervisor restarts it and its workers


__all__ = ["SlotFences", "TierJob", "TierStats", "TieredReader", "ReadCancelled", "tier_fields"]
