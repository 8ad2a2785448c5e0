"""The raw read bandwidth of the disk the checkpoint lies on: O_DIRECT reads of its files at memd's queue depth.

``streams`` threads (memd's ``--read-threads``, 4 by default) take the next ``chunk``-sized piece (memd's
``--read-chunk``, 1 MiB) of the files from one shared cursor and read it with ``preadv``, so ``streams`` reads are in
flight at once, adjacent in the file: what memd does when it reads one expert split over its threads. ``streams=1``
is the old single-stream sequential read. Every read starts at a multiple of the chunk size, so offsets and lengths
stay aligned; only the last read of a file comes back short. No page cache is involved, so the number is what the
device gives at that queue depth. Where the file system refuses O_DIRECT (tmpfs), the files are read through the
page cache instead, and ``direct`` says so.

Where the bytes land matters as much as the disk on a VM, whose virtual disk is the host copying into the guest's
memory: into one reused buffer per stream (``into="buffer"``, what fio and this probe measured until December 2026),
the copies hit the CPU's cache; into memory the size of an expert pool they go to DRAM. Measured on the 2-core EPYC
VM (32 MiB L3), 4 streams of 1 MiB reads: 4.2 GB/s into 4 reused buffers, 4.0 into a ring of 8 MiB, 2.8 into rings
of 32 and 128 MiB and into a 272 MiB pool. An expert lands in its own slot (tens of MiB, away from the cache), so
memd's reads are judged against ``into="memory"`` (the default): the streams fill a ring of ``ring_bytes`` (at least
``RING_MIN`` and four times the last-level cache) in turn, its pages touched before the clock starts as a running
memd's pool is. Nothing else differs, so memd's expert reads, which go through the same path into their slots,
cannot beat it.
"""
from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from common.config import MemdConfig
from common.sizes import parse_size

_DEFAULTS = {f.name: f.default for f in fields(MemdConfig)}
STREAMS = _DEFAULTS["read_threads"]  # memd's queue depth (its default)
READ_CHUNK = _DEFAULTS["read_chunk"]
CHUNK = parse_size(READ_CHUNK).resolve(0)  # memd's piece size
RING_MIN = 256 << 20  # the smallest destination ring of ``into="memory"``
INTO = ("memory", "buffer")


@dataclass(frozen=True, slots=True)
class Bandwidth:
    bytes_read: int
    seconds: float
    direct: bool  # O_DIRECT (False: the file system refused it, so the page cache was used)
    streams: int = 1
    chunk: int = CHUNK
    into: str = "memory"  # where the bytes landed: a ring larger than the cache ("memory"), or a reused buffer

    @property
    def gbps(self) -> float:
        """GB/s (10^9 bytes per second)."""
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def describe(self) -> str:
        how = "O_DIRECT" if self.direct else "page cache: O_DIRECT refused"
        into = "into memory" if self.into == "memory" else "into a reused buffer"
        return (f"{self.gbps:.2f} GB/s ({self.streams} stream{'s' * (self.streams > 1)} of {self.chunk >> 10} KiB"
                f" reads {into}, {self.bytes_read / 2**30:.2f} GiB, {how})")


def read_bandwidth(paths: list[Path], max_bytes: int = 2 << 30, chunk: int = CHUNK,
                   streams: int = STREAMS, into: str = "memory") -> Bandwidth:
    """Read ``paths`` in order, from the start, until ``max_bytes`` (whole chunks) or their end, with ``streams``
    reads in flight, into memory (a ring larger than the cache) or into one reused buffer per stream."""
    if chunk % mmap.PAGESIZE:
        raise ValueError(f"the chunk ({chunk} bytes) must be a multiple of the page size ({mmap.PAGESIZE})")
    if streams < 1:
        raise ValueError("streams must be >= 1")
    if into not in INTO:
        raise ValueError(f"into must be one of {INTO}, not {into!r}")
    ring = _ring(chunk, streams) if into == "memory" else None
    opened = [_open(p) for p in paths]
    try:
        work = _Cursor([(fd, os.fstat(fd).st_size) for fd, _ in opened], chunk, max_bytes, ring)
        threads = [threading.Thread(target=work.run, name=f"diskbw-{i}") for i in range(streams)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
    finally:
        for fd, _ in opened:
            os.close(fd)
        if ring is not None:
            ring.close()
    if work.error is not None:
        raise work.error
    return Bandwidth(work.total, seconds, all(d for _, d in opened), streams, chunk, into)


def last_level_cache() -> int:
    """The CPU's largest cache in bytes (0 when the system does not say)."""
    sizes = [0]
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            sizes.append(parse_size((index / "size").read_text().strip() + "iB").resolve(0))
        except (OSError, ValueError):
            continue
    return max(sizes)


def _ring(chunk: int, streams: int) -> mmap.mmap:
    """The destination of ``into="memory"``: whole chunks, at least ``RING_MIN``, four times the last-level cache and
    two chunks per stream; every page touched, as a running memd's pool is."""
    size = max(RING_MIN, 4 * last_level_cache(), 2 * streams * chunk)
    size -= size % chunk
    ring = mmap.mmap(-1, size)
    ring.write(bytes(size))  # faulted in (and its pages zeroed) before the clock starts
    return ring


class _Cursor:
    """The next chunk of the files to read; every stream takes from it until ``limit`` bytes are taken."""

    def __init__(self, files: list[tuple[int, int]], chunk: int, limit: int, ring: mmap.mmap | None = None):
        self.files, self.chunk, self.limit, self.ring = files, chunk, limit, ring
        self.index = self.offset = self.taken = self.total = self.reads = 0
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def take(self) -> tuple[int, int, int, int] | None:
        """(fd, offset, bytes wanted, the read's number); the read itself is rounded up to whole pages (O_DIRECT
        lengths)."""
        with self.lock:
            while self.index < len(self.files) and self.taken < self.limit and self.error is None:
                fd, size = self.files[self.index]
                if self.offset < size:
                    offset = self.offset
                    want = min(self.chunk, self.limit - self.taken, size - offset)
                    self.offset += want
                    self.taken += want
                    self.reads += 1
                    return fd, offset, want, self.reads - 1
                self.index, self.offset = self.index + 1, 0
            return None

    def run(self) -> None:
        buf = self.ring if self.ring is not None else mmap.mmap(-1, self.chunk)
        view = memoryview(buf)
        slots = len(buf) // self.chunk
        try:
            while (job := self.take()) is not None:
                fd, offset, want, number = job
                at = (number % slots) * self.chunk  # the ring's next chunk (a reused buffer: always 0)
                got = os.preadv(fd, [view[at:at - (-want // mmap.PAGESIZE) * mmap.PAGESIZE]], offset)
                with self.lock:
                    self.total += min(got, want)
        except BaseException as exc:  # reported by read_bandwidth
            self.error = exc
        finally:
            view.release()
            if buf is not self.ring:
                buf.close()


def _open(path: Path) -> tuple[int, bool]:
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY), False
