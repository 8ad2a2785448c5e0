"""The raw read bandwidth of the disk the checkpoint lies on: O_DIRECT reads of its files at memd's queue depth.

``streams`` threads (memd's ``--read-threads``, 4 by default) take the next ``chunk``-sized piece (memd's
``--read-chunk``, 1 MiB) of the files from one shared cursor and read it with ``preadv`` into their own buffer, so
``streams`` reads are in flight at once, adjacent in the file: what memd does when it reads one expert split over
its threads. ``streams=1`` is the old single-stream sequential read. Each buffer is an anonymous mmap
(page-aligned, as O_DIRECT wants) and every read starts at a page boundary (a chunk's, or a data extent's after
a hole) and is a whole number of pages long, so offsets and lengths stay aligned; only the last read of a file
comes back short. No page cache of this machine's is involved; but a virtual disk's host may cache what was read
lately (this VM's reads the same 512 MiB at ~1.0 GB/s and then again at ~2.0), and memd's decode loads re-read the
hot experts: so a probe takes the best of ``passes`` reads of the same bytes, and memd's expert reads, which go
through the same path, do not beat it where the host caches what they re-read. Where the
file system refuses O_DIRECT (tmpfs), the files are read through the page cache instead, and ``direct`` says so.
The holes of a sparse file (memd's slot images: only the experts read so far, a compressed image short of its
slot) are skipped (``SEEK_DATA``): they read as zeros without the disk, and would count as the disk's speed.
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
PROBE_PASSES = 2  # the benchmarks' probes: the best of two reads of the same bytes (a host that caches, above)


@dataclass(frozen=True, slots=True)
class Bandwidth:
    bytes_read: int
    seconds: float
    direct: bool  # O_DIRECT (False: the file system refused it, so the page cache was used)
    streams: int = 1
    chunk: int = CHUNK
    passes: int = 1  # the best of this many reads of the same bytes

    @property
    def gbps(self) -> float:
        """GB/s (10^9 bytes per second)."""
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def describe(self) -> str:
        how = "O_DIRECT" if self.direct else "page cache: O_DIRECT refused"
        best = f", the best of {self.passes} passes" if self.passes > 1 else ""
        return (f"{self.gbps:.2f} GB/s ({self.streams} stream{'s' * (self.streams > 1)} of {self.chunk >> 10} KiB"
                f" reads, {self.bytes_read / 2**30:.2f} GiB{best}, {how})")


def read_bandwidth(paths: list[Path], max_bytes: int = 2 << 30, chunk: int = CHUNK, streams: int = STREAMS,
                   passes: int = 1) -> Bandwidth:
    """Read ``paths`` in order, from the start, until ``max_bytes`` (whole chunks) or their end, with ``streams``
    reads in flight; ``passes`` times, the fastest pass kept."""
    if chunk % mmap.PAGESIZE:
        raise ValueError(f"the chunk ({chunk} bytes) must be a multiple of the page size ({mmap.PAGESIZE})")
    if streams < 1 or passes < 1:
        raise ValueError("streams and passes must be >= 1")
    runs = [_one_pass(paths, max_bytes, chunk, streams) for _ in range(passes)]
    best = max(runs, key=lambda run: run.gbps)
    return Bandwidth(best.bytes_read, best.seconds, best.direct, streams, chunk, passes)


def _one_pass(paths: list[Path], max_bytes: int, chunk: int, streams: int) -> Bandwidth:
    opened = [_open(p) for p in paths]
    try:
        work = _Cursor([(fd, os.fstat(fd).st_size) for fd, _ in opened], chunk, max_bytes)
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
    if work.error is not None:
        raise work.error
    return Bandwidth(work.total, seconds, all(d for _, d in opened), streams, chunk)


class _Cursor:
    """The next chunk of the files to read; every stream takes from it until ``limit`` bytes are taken."""

    def __init__(self, files: list[tuple[int, int]], chunk: int, limit: int):
        self.files, self.chunk, self.limit = files, chunk, limit
        self.index = self.offset = self.taken = self.total = 0
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def take(self) -> tuple[int, int, int] | None:
        """(fd, offset, bytes wanted); the read itself is rounded up to whole pages (O_DIRECT lengths)."""
        with self.lock:
            while self.index < len(self.files) and self.taken < self.limit and self.error is None:
                fd, size = self.files[self.index]
                offset, data_end = _data(fd, self.offset, size) if self.offset < size else (size, size)
                if offset < size:
                    want = min(self.chunk, self.limit - self.taken, data_end - offset)
                    self.offset = offset + want
                    self.taken += want
                    return fd, offset, want
                self.index, self.offset = self.index + 1, 0
            return None

    def run(self) -> None:
        buf = mmap.mmap(-1, self.chunk)
        view = memoryview(buf)
        try:
            while (job := self.take()) is not None:
                fd, offset, want = job
                got = os.preadv(fd, [view[:-(-want // mmap.PAGESIZE) * mmap.PAGESIZE]], offset)
                with self.lock:
                    self.total += min(got, want)
        except BaseException as exc:  # reported by read_bandwidth
            self.error = exc
        finally:
            view.release()
            buf.close()


def _data(fd: int, offset: int, size: int) -> tuple[int, int]:
    """Where the file's data resumes from ``offset`` (``size`` when only holes are left) and where it stops next."""
    try:
        start = os.lseek(fd, offset, os.SEEK_DATA)
        return start, min(size, os.lseek(fd, start, os.SEEK_HOLE))
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # holes to the end
            return size, size
        return offset, size  # (a file system without SEEK_DATA: data everywhere)


def _open(path: Path) -> tuple[int, bool]:
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY), False
