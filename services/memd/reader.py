"""Reading experts from the checkpoint's safetensors into pool slots with ``os.preadv``, in preemptible pieces.

With O_DIRECT (the default where the file system allows it) the page cache is bypassed, so memd's memory budget is
the whole truth. The pool is page-aligned shared memory and slot offsets are multiples of 4 KiB, so the aligned
middle of each segment (one parameter of one expert, or a part of one) is read straight into its slot: no staging
buffer, no copy; only its unaligned head and tail go through a small per-thread bounce buffer. Where the kernel
wants the buffer address aligned more finely than the file offset and the slot agree (``dio.py``: 512 B behind
virtio, 4 B on NVMe with Linux >= 6.0), the segment goes through the bounce buffer (``stats()`` counts those; memd
logs it once), as does a segment whose rows memd spreads apart in the slot (``spread.py``: one strided NumPy copy
per piece, without the GIL). Without O_DIRECT, ``preadv`` writes straight into the slot. From slot images
(``--slot-cache``, ``slot_images.py``) an expert is one page-aligned segment read straight into its slot; one
whose image is not written yet is read from the checkpoint and handed, once loaded, to the store's writer
(``image_writer.py``), which writes it behind the load; each slot's generation (loads begun into it, and
``settle`` when its memory is given back) tells the writer whether the slot still holds what was loaded. A
compressed cache (``--expert-format``) converts an expert at its first demand read; a prefetch never waits for a
conversion (the planner skips such experts, ``ExpertCache.fetchable``, and the reader drops one that reaches it:
seconds on a reader thread would hold up the demand reads behind it).

A job (one expert into one slot) is split into pieces of at most ``--read-chunk`` bytes, small enough to spread one
expert over every reader thread. One queue: threads take the next piece of the best job: on-demand loads first
(oldest first), then prefetches by priority. While an on-demand load is queued or being read, no thread starts a
prefetch piece, so an on-demand load waits for at most one piece per thread. A prefetch promoted to on-demand (an
acquire waits for it now) jumps the queue; a cancelled one stops at its pieces in flight. ``demand_pending()``
tells the planner whether the disk queue holds on-demand reads.

Reads are threads + ``preadv`` (which releases the GIL): ``--read-threads`` reads in flight, no more (a semaphore
held from taking a piece to the end of its ``preadv``, so the queue's order decides at the moment of the read).
Staged pieces are copied out of the bounce buffer with ``ctypes.memmove`` (without the GIL) after the semaphore is
released, by twice as many threads as reads in flight, so the disk keeps ``--read-threads`` reads queued, as the
probe and fio of ``moeinf bench disk`` do. io_uring (PyPI's ``liburing``, ``pyuring``) was not evaluated.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import mmap
import os
import threading
import time

import numpy as np

from services.memd.dio import DioAlign, buffer_address, dio_alignment
from services.memd.read_jobs import BusyRate, Piece, ReadCancelled, ReadJob, ReaderStats, settle, split_pieces
from services.memd.spread import place_rows
from common.expert_index import ALIGN, ExpertIndex, Segment, align_up

log = logging.getLogger("moeinf.memd.reader")
CHUNK = 1024 * 1024
MIN_PIECE = 64 * 1024  # an expert is split over the threads, but not into pieces smaller than this


class ExpertReader:
    def __init__(self, store: ExpertIndex, pool_view: memoryview, slot_bytes: int, direct_io: bool, *,
                 threads: int = 4, chunk: int | None = None):
        self.store, self.pool, self.slot_bytes, self.threads = store, pool_view, slot_bytes, threads
        self.segments = store.segments  # (layer, expert) -> segments
        self.align: DioAlign | None = dio_alignment(store.files[0]) if direct_io else None
        self.direct_io = self.align is not None
        if direct_io and not self.direct_io:
            log.warning("O_DIRECT is not available on this file system; reading through the page cache")
        step = max(ALIGN, self.align.offset if self.align else 0)
        chunk = chunk or CHUNK
        self.chunk = max(step, chunk - chunk % step)
        self._step = step
        self.packed = getattr(store, "packed_pieces", None)  # --slot-compression: an image's units
        self._bounce_bytes = max(self.chunk, getattr(store, "unit", 0) + step)  # (a unit off the device's blocks)
        self._base = buffer_address(pool_view) if len(pool_view) else 0
        flags = os.O_RDONLY | (os.O_DIRECT if self.direct_io else 0)
        self.fds = {str(f): os.open(f, flags) for f in store.files}
        self.stats = ReaderStats()
        self._staged_logged = False
        self._np_pool: np.ndarray | None = None
        self._local = threading.local()
        self._cv = threading.Condition()
        self._jobs: list[ReadJob] = []
        self._demand = 0  # on-demand jobs queued or being read
        self._seq = itertools.count()
        self._closing = False
        self._rate = BusyRate()  # bandwidth: bytes over the seconds some read was in flight
        self._placed = BusyRate()  # the same for the expert bytes placed (more where compressed images are read)
        if self.align:
            log.info("O_DIRECT alignment: %s", self.align.describe())
        self._inflight = threading.BoundedSemaphore(threads)  # reads at the disk: at most ``threads``
        self._generations = [0] * (len(pool_view) // slot_bytes if slot_bytes else 0)  # loads begun per slot
        self._threads = [threading.Thread(target=self._work, name=f"memd-read-{i}", daemon=True)
                         for i in range(2 * threads)]  # half of them can copy while the others read
        for t in self._threads:
            t.start()
        write_behind = getattr(store, "write_behind", None)  # slot images: the slots read from the checkpoint
        self.writer = write_behind(self) if write_behind is not None else None

    # ---------------------------------------------------------------- API (any thread)
    def submit(self, key: tuple[int, int], slot: int, *, demand: bool, priority: float = 0.0) -> ReadJob:
        if not 0 <= slot < len(self.pool) // self.slot_bytes:
            raise ValueError(f"slot {slot} is outside the pool ({len(self.pool) // self.slot_bytes} slots)")
        with self._cv:
            if self._closing:
                raise RuntimeError("the reader is closed")
            job = ReadJob(key, slot, demand, priority, next(self._seq), self.plan(key, slot))
            self._generations[slot] += 1  # before any byte of this load lands in the slot
            job.generation = self._generations[slot]
            self._jobs.append(job)
            self._demand += demand
            if demand or not self._demand:  # a thread per piece, not every waiter (a prefetch behind demand: _finish)
                self._cv.notify(len(job.pieces))
        return job

    def promote(self, job: ReadJob) -> None:
        """An acquire waits for this prefetch now: read it like an on-demand load (it keeps its progress)."""
        with self._cv:
            if job.removed or job.dropped:  # (a dropped one ends cancelled: memd reads the pinned key again)
                return
            if not job.demand:
                self._demand += 1
            job.demand, job.cancelled = True, False
            job.seq = next(self._seq)
            self._cv.notify(len(job.pieces) - job.next)

    def cancel(self, job: ReadJob) -> None:
        """Stop a prefetch: at once if no piece of it is being read, else when those pieces end. Its future is
        settled outside the lock, as ``_finish`` does: a callback that takes another lock (the host tier's, whose
        holder may be submitting here) must not wait while this one is held."""
        with self._cv:
            if job.demand or job.removed:
                return
            job.cancelled = True
            if job.inflight:
                return
            self._remove(job)  # marks it removed: a second cancel (stale, then stolen) is a no-op
        settle(job.future, ReadCancelled(job.nbytes))

    def read(self, key: tuple[int, int], slot: int) -> tuple[int, float]:
        """Fill ``slot`` with expert ``key`` now (an on-demand job); returns (bytes read, seconds)."""
        return self.submit(key, slot, demand=True).future.result()

    def generation(self, slot: int) -> int:
        """How many loads into ``slot`` have begun, or its memory been given back (``settle``)."""
        return self._generations[slot]

    def settle(self, slot: int) -> None:
        """``slot``'s memory is about to be given back (an admin shrink): whatever it holds is not an expert."""
        with self._cv:
            self._generations[slot] += 1

    def demand_pending(self) -> bool:
        """Whether an on-demand read is queued or being read (cheap: no lock)."""
        return self._demand > 0

    @property
    def bandwidth(self) -> float | None:
        """Bytes per second while reading, measured over recent reads (None before the first)."""
        return self._rate.rate

    @property
    def expert_rate(self) -> float | None:  # expert bytes placed per second (the planner's): compressed, > bandwidth
        return self._placed.rate

    def queued(self) -> int:
        with self._cv:
            return len(self._jobs)

    def pending_events(self, slots: list[int]) -> list[int]:  # (the ring entries to wait on: none, the pool is ours)
        return []

    def close(self) -> None:
        with self._cv:
            self._closing = True
            for job in list(self._jobs):
                if job.inflight == 0:
                    self._remove(job)
                    settle(job.future, ReadCancelled(job.nbytes))
            self._cv.notify_all()
        for t in self._threads:
            t.join()
        if self.writer is not None:
            self.writer.close()
            log.info("slot cache: %d images written behind reads, %d not kept (their slot reused first), %d failed",
                     self.writer.written, self.writer.discarded, self.writer.failed)
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        if self.stats.staged_segments:
            log.info("reader: %d of %d segments staged through the bounce buffer (%s copied, %s read straight into"
                     " slots)", self.stats.staged_segments, self.stats.segments, self.stats.bounce_bytes,
                     self.stats.direct_bytes)

    # ---------------------------------------------------------------- planning a job's pieces
    def piece_bytes(self, key: tuple[int, int]) -> int:
        """Pieces of one expert: at most ``chunk``, and small enough that the expert spreads over every thread."""
        total = sum(s.nbytes for s in self.segments[key])
        spread = align_up(-(-total // self.threads), self._step)
        return min(self.chunk, max(MIN_PIECE, spread))

    def plan(self, key: tuple[int, int], slot: int) -> list[Piece]:
        base = slot * self.slot_bytes
        if self.packed is not None and (pieces := self.packed(key, base, self._step, self.direct_io)) is not None:
            return pieces  # a compressed slot image (packed_images.py)
        size = self.piece_bytes(key)
        pieces: list[Piece] = []
        for seg in self.segments[key]:
            dest = base + seg.slot_offset
            if seg.placed:  # rows spread apart or reordered in the slot: placed from the bounce buffer
                pieces += self._plan_staged(seg, dest, size, seg.rows(dest))
            elif not self.direct_io:
                pieces += split_pieces(seg.file, seg.file_offset, seg.nbytes, dest, size)
            else:
                pieces += self._plan_direct(seg, dest, size)
        return pieces

    def _plan_direct(self, seg: Segment, dest: int, size: int) -> list[Piece]:
        a = self._step  # whole pages, even where the device takes 512-byte blocks: misaligned reads are slower
        pos, end = seg.file_offset, seg.file_offset + seg.nbytes
        first, last = align_up(pos, a), end - end % a  # the aligned middle: [first, last)
        self.stats.segments += 1
        congruent = (self._base + dest + first - pos) % self.align.mem == 0
        if first < last and congruent:
            out = []
            if pos < first:
                out.append(Piece(seg.file, first - a, a, dest, pos - (first - a), first - pos, True))
            out += split_pieces(seg.file, first, last - first, dest + first - pos, size)
            if last < end:
                out.append(Piece(seg.file, last, a, dest + last - pos, 0, end - last, True))
            return out
        self.stats.staged_segments += first < last  # too small for a direct middle is not counted
        if first < last and not self._staged_logged:
            self._staged_logged = True
            log.info("O_DIRECT: %s at file offset %d cannot be read straight into its slot (slot address and file"
                     " offset differ modulo the %d-byte memory alignment): such segments are staged through a"
                     " bounce buffer and copied; counted in the reader's stats", seg.file, pos, self.align.mem)
        return self._plan_staged(seg, dest, size)

    def _plan_staged(self, seg: Segment, dest: int, size: int, rows: tuple | None = None) -> list[Piece]:
        """Pieces read whole (aligned) into the bounce buffer, then copied into the slot."""
        a = self._step
        pos, end = seg.file_offset, seg.file_offset + seg.nbytes
        out, start = [], pos - pos % a
        while start < end:
            length = min(size, align_up(end - start, a))
            skip = max(pos - start, 0)
            keep = min(start + length, end) - start - skip
            out.append(Piece(seg.file, start, length, dest + start + skip - pos, skip, keep, True, rows))
            start += length
        return out

    # ---------------------------------------------------------------- reader threads
    def _work(self) -> None:
        while True:
            self._inflight.acquire()  # released once this thread's preadv returns (``_read``), or on close
            taken = self._take()
            if taken is None:
                self._inflight.release()
                return
            job, piece = taken
            try:  # the compressed cache converts an expert at its first demand read (a prefetch: dropped)
                dropped = self._unconverted_prefetch(job) or self.store.prepare(job.key)
            except Exception as exc:  # (a full cache disk, an EIO): this job fails, and the permit _read would
                self._inflight.release()  # have given back is given back here, or the readers run out of them
                self._finish(job, piece, 0, exc)
                continue
            if dropped:
                self._inflight.release()
                self._finish(job, piece, 0, None)
                continue
            try:
                n = self._read(piece)
            except Exception as exc:  # an I/O error fails this job only
                self._finish(job, piece, 0, exc)
                continue
            self._finish(job, piece, n, None)

    def _unconverted_prefetch(self, job: ReadJob) -> bool:
        """A prefetch of an expert not converted yet is dropped (cancelled, 0 bytes; the module docstring)."""
        if job.demand or self.store.ready(job.key):
            return False
        with self._cv:  # (a prefetch promoted meanwhile is demand: an acquire waits for it)
            if not job.demand:
                job.cancelled = job.dropped = True
            return job.dropped

    def _best(self) -> ReadJob | None:
        """The job to read a piece of: the oldest on-demand load; else, when no on-demand load is being read, the
        best prefetch."""
        ready = [j for j in self._jobs if j.waiting]
        demand = [j for j in ready if j.demand]
        if demand:
            return min(demand, key=ReadJob.rank)
        if self._demand > 0 or not ready:
            return None  # on-demand pieces in flight: no prefetch piece starts meanwhile
        return min(ready, key=ReadJob.rank)

    def _take(self) -> tuple[ReadJob, Piece] | None:
        with self._cv:
            while True:
                if self._closing:
                    return None
                job = self._best()
                if job is not None:
                    piece = job.pieces[job.next]
                    job.next += 1
                    job.inflight += 1
                    now = time.perf_counter()
                    if job.started is None:
                        job.started = now
                    self._rate.begin(now)
                    self._placed.begin(now)
                    return job, piece
                self._cv.wait()

    def _finish(self, job: ReadJob, piece: Piece, n: int, error: Exception | None) -> None:
        now = time.perf_counter()
        with self._cv:
            job.inflight -= 1
            job.nbytes += n
            job.ended = now
            self._count(piece, n)
            self._rate.end(now, n)
            self._placed.end(now, piece.keep if piece.codec and n else n)
            if error is not None and job.error is None:
                job.error = error
            if not job.over and not self._closing:
                return
            if job.inflight:
                return  # closing: the last piece in flight ends the job
            self._remove(job)
            ended_demand = job.demand and not self._demand  # the last on-demand load ended: prefetches may start
            waiting = sum(len(j.pieces) - j.next for j in self._jobs if j.waiting) if ended_demand else 0
            if waiting:
                self._cv.notify(waiting)
        if job.error is not None:
            settle(job.future, job.error)
        elif job.next >= len(job.pieces) and not job.cancelled:
            if self.writer is not None and any(p.file != self.writer.images.path_str for p in job.pieces):
                self.writer.loaded(job.key, job.slot, job.generation)  # read from the checkpoint
            settle(job.future, result=(job.nbytes, job.ended - job.started))
        else:
            settle(job.future, ReadCancelled(job.nbytes))

    def _remove(self, job: ReadJob) -> None:
        self._jobs.remove(job)
        job.removed = True
        self._demand -= job.demand

    def _count(self, piece: Piece, n: int) -> None:
        self.stats.pieces += n > 0
        if piece.bounce:
            self.stats.bounce_bytes += n
        else:
            self.stats.direct_bytes += n

    def _read(self, piece: Piece) -> int:
        """Read ``piece`` (holding one of the ``threads`` read permits until its ``preadv`` returns), then copy it
        into its slot if it was staged."""
        fd = self.fds[piece.file]
        if not piece.bounce:
            try:
                n = os.preadv(fd, [self.pool[piece.dest:piece.dest + piece.length]], piece.file_offset)
            finally:
                self._inflight.release()
            if n != piece.length:
                raise OSError(f"{piece.file}: unexpected end of file at byte {piece.file_offset + max(n, 0)}")
            return n
        try:
            bounce, address = self._bounce()
            n = os.preadv(fd, [bounce[:piece.length]], piece.file_offset)
        finally:
            self._inflight.release()  # the copy below runs while another thread's read is at the disk
        if n < piece.skip + (piece.codec + piece.keep // 2 if piece.codec else piece.keep):
            raise OSError(f"{piece.file}: unexpected end of file at byte {piece.file_offset + max(n, 0)}")
        if piece.codec:  # a packed unit: decoded into the slot (NumPy and zstd run without the GIL)
            unit = bounce[piece.skip:n]
            self.store.codec.decode_into(unit, piece.codec, self._rows_view()[piece.dest:piece.dest + piece.keep])
            return n  # the disk's bytes (the packed unit to its blocks' ends)
        if piece.rows is not None:
            place_rows(self._rows_view(), bounce[piece.skip:piece.skip + piece.keep], piece.dest, piece.rows)
        elif self._base:  # ctypes.memmove runs without the GIL: the other threads' reads go on meanwhile
            ctypes.memmove(self._base + piece.dest, address + piece.skip, piece.keep)
        else:
            self.pool[piece.dest:piece.dest + piece.keep] = bounce[piece.skip:piece.skip + piece.keep]
        return piece.keep

    def _rows_view(self) -> np.ndarray:
        """The pool as bytes for NumPy's strided copies (which run without the GIL)."""
        if self._np_pool is None:
            self._np_pool = np.frombuffer(self.pool, dtype=np.uint8)
        return self._np_pool

    def _bounce(self) -> tuple[memoryview, int]:
        """This thread's bounce buffer (page-aligned, as O_DIRECT needs) and its address."""
        got = getattr(self._local, "buf", None)
        if got is None:
            view = memoryview(mmap.mmap(-1, self._bounce_bytes))
            got = self._local.buf = (view, buffer_address(view))
        return got


def _direct_io_works(path) -> bool:
    return dio_alignment(path) is not None
