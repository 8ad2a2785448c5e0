"""Reading experts from the checkpoint's safetensors into pool slots with ``os.preadv``, in preemptible chunks.

With O_DIRECT (the default where the file system allows it) the page cache is bypassed, so memd's memory
budget is the whole truth: reads go in aligned chunks through a per-thread aligned staging buffer and are
copied into the slot. Without it, ``preadv`` writes straight into the slot (zero copy, page cache used).

Every read is a job of ``--read-chunk`` sized steps. Reader threads take one chunk at a time from the best job:
on-demand loads first (oldest first), then prefetches by priority. So an on-demand load waits for at most one
chunk of a prefetch, a prefetch promoted to on-demand (an acquire now waits for it) jumps the queue, and a
cancelled prefetch stops at its next chunk boundary. Reads that overlap in time give the measured bandwidth.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass, field

from services.memd.store import ALIGN, ExpertStore, Segment

log = logging.getLogger("moeinf.memd.reader")
CHUNK = 1024 * 1024
DECAY = 0.9  # bandwidth: exponentially weighted over the recent busy periods


class ReadCancelled(Exception):
    """The prefetch was cancelled before it finished; its slot holds partial data and must be given back."""


@dataclass(eq=False, slots=True)
class ReadJob:
    key: tuple[int, int]
    slot: int
    demand: bool
    priority: float
    seq: int
    segments: list[Segment]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    segment: int = 0  # progress: segment index and bytes done in it
    offset: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    running: bool = False
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.segment >= len(self.segments)

    def rank(self) -> tuple:
        return (0, self.seq) if self.demand else (1, -self.priority, self.seq)


class ExpertReader:
    def __init__(self, store: ExpertStore, pool_view: memoryview, slot_bytes: int, direct_io: bool, *,
                 threads: int = 4, chunk: int | None = None):
        self.store = store
        self.pool = pool_view
        self.slot_bytes = slot_bytes
        chunk = chunk or CHUNK
        self.chunk = max(ALIGN, chunk - chunk % ALIGN)
        self.direct_io = direct_io and _direct_io_works(store.checkpoint.files[0])
        if direct_io and not self.direct_io:
            log.warning("O_DIRECT is not available on this file system; reading through the page cache")
        flags = os.O_RDONLY | (os.O_DIRECT if self.direct_io else 0)
        self.fds = {str(f): os.open(f, flags) for f in store.checkpoint.files}
        self._local = threading.local()
        self._cv = threading.Condition()
        self._jobs: list[ReadJob] = []
        self._seq = itertools.count()
        self._closing = False
        self._active = 0  # chunks being read right now
        self._busy_since = 0.0
        self._bytes = self._busy = 0.0  # decayed sums: bandwidth = bytes / busy seconds
        self._threads = [threading.Thread(target=self._work, name=f"memd-read-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    # ---------------------------------------------------------------- API (any thread)
    def submit(self, key: tuple[int, int], slot: int, *, demand: bool, priority: float = 0.0) -> ReadJob:
        job = ReadJob(key, slot, demand, priority, next(self._seq), self.store.segments[key])
        with self._cv:
            if self._closing:
                raise RuntimeError("the reader is closed")
            self._jobs.append(job)
            self._cv.notify()
        return job

    def promote(self, job: ReadJob) -> None:
        """An acquire waits for this prefetch now: read it like an on-demand load (it keeps its progress)."""
        with self._cv:
            job.demand, job.cancelled = True, False
            job.seq = next(self._seq)

    def cancel(self, job: ReadJob) -> None:
        """Stop a prefetch: at once if no thread is reading it, else after its current chunk."""
        with self._cv:
            if job.demand or job.future.done():
                return
            job.cancelled = True
            if not job.running and job in self._jobs:
                self._jobs.remove(job)
                job.future.set_exception(ReadCancelled())

    def read(self, key: tuple[int, int], slot: int) -> tuple[int, float]:
        """Fill ``slot`` with expert ``key`` now (an on-demand job); returns (bytes read, seconds)."""
        return self.submit(key, slot, demand=True).future.result()

    @property
    def bandwidth(self) -> float | None:
        """Bytes per second while reading, measured over recent reads (None before the first)."""
        return self._bytes / self._busy if self._busy > 0 else None

    def queued(self) -> int:
        with self._cv:
            return len(self._jobs)

    def close(self) -> None:
        with self._cv:
            self._closing = True
            for job in self._jobs:
                if not job.running and not job.future.done():
                    job.future.set_exception(ReadCancelled())
            self._cv.notify_all()
        for t in self._threads:
            t.join()
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    # ---------------------------------------------------------------- reader threads
    def _work(self) -> None:
        while True:
            job = self._take()
            if job is None:
                return
            start = time.perf_counter()
            try:
                n = self._read_chunk(job)
            except Exception as exc:  # an I/O error fails this job only
                self._finish(job, start, 0, exc)
                continue
            self._finish(job, start, n, None)

    def _take(self) -> ReadJob | None:
        with self._cv:
            while True:
                if self._closing:
                    return None
                ready = [j for j in self._jobs if not j.running]
                if ready:
                    job = min(ready, key=ReadJob.rank)
                    job.running = True
                    if self._active == 0:
                        self._busy_since = time.perf_counter()
                    self._active += 1
                    return job
                self._cv.wait()

    def _finish(self, job: ReadJob, start: float, n: int, error: Exception | None) -> None:
        now = time.perf_counter()
        with self._cv:
            job.running = False
            job.nbytes += n
            job.seconds += now - start
            self._active -= 1
            if self._active == 0:
                self._bytes = self._bytes * DECAY + n
                self._busy = self._busy * DECAY + (now - self._busy_since)
            else:
                self._bytes += n
            if error is None and not job.done and not job.cancelled and not self._closing:
                self._cv.notify()
                return
            self._jobs.remove(job)
        if error is not None:
            job.future.set_exception(error)
        elif job.done:
            job.future.set_result((job.nbytes, job.seconds))
        else:
            job.future.set_exception(ReadCancelled())

    def _read_chunk(self, job: ReadJob) -> int:
        seg = job.segments[job.segment]
        base = job.slot * self.slot_bytes
        n = self._chunk_direct(seg, base, job.offset) if self.direct_io else self._chunk_buffered(seg, base, job.offset)
        job.offset += n
        if job.offset >= seg.nbytes:
            job.segment, job.offset = job.segment + 1, 0
        return n

    def _chunk_buffered(self, seg: Segment, base: int, done: int) -> int:
        start = base + seg.slot_offset + done
        dest = self.pool[start:start + min(self.chunk, seg.nbytes - done)]
        n = os.preadv(self.fds[seg.file], [dest], seg.file_offset + done)
        if n <= 0:
            raise OSError(f"{seg.file}: unexpected end of file at byte {seg.file_offset + done}")
        return n

    def _chunk_direct(self, seg: Segment, base: int, done: int) -> int:
        staging = self._staging()
        pos, end = seg.file_offset + done, seg.file_offset + seg.nbytes
        aligned = pos - pos % ALIGN
        want = min(self.chunk, _align_up(end - aligned))
        n = os.preadv(self.fds[seg.file], [staging[:want]], aligned)
        skip = pos - aligned
        take = min(n - skip, end - pos)
        if take <= 0:
            raise OSError(f"{seg.file}: unexpected end of file at byte {pos}")
        dest = base + seg.slot_offset + done
        self.pool[dest:dest + take] = staging[skip:skip + take]
        return take

    def _staging(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(mmap.mmap(-1, self.chunk))  # page-aligned, as O_DIRECT needs
        return buf


def _align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _direct_io_works(path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        os.preadv(fd, [memoryview(mmap.mmap(-1, ALIGN))], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
