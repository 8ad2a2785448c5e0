"""The raw read bandwidth of the disk the checkpoint lies on: a sequential O_DIRECT read of its files.

The buffer is an anonymous mmap (page-aligned, as O_DIRECT wants) and every read starts at a multiple of the
chunk size, so offsets and lengths stay aligned; only the last read of a file comes back short. No page cache is
involved, so the number is what the device gives, the same path memd reads experts through. Where the file system
refuses O_DIRECT (tmpfs), the files are read through the page cache instead, and ``direct`` says so.
"""
from __future__ import annotations

import errno
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

CHUNK = 8 << 20


@dataclass(frozen=True, slots=True)
class Bandwidth:
    bytes_read: int
    seconds: float
    direct: bool  # O_DIRECT (False: the file system refused it, so the page cache was used)

    @property
    def gbps(self) -> float:
        """GB/s (10^9 bytes per second)."""
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0


def read_bandwidth(paths: list[Path], max_bytes: int = 2 << 30, chunk: int = CHUNK) -> Bandwidth:
    """Read ``paths`` in order, from the start, until ``max_bytes`` (whole chunks) or their end."""
    if chunk % mmap.PAGESIZE:
        raise ValueError(f"the chunk ({chunk} bytes) must be a multiple of the page size ({mmap.PAGESIZE})")
    buf = mmap.mmap(-1, chunk)
    total, seconds, direct = 0, 0.0, True
    try:
        for path in paths:
            fd, file_direct = _open(path)
            direct = direct and file_direct
            try:
                start = time.perf_counter()
                total += _read_file(fd, buf, max_bytes - total)
                seconds += time.perf_counter() - start
            finally:
                os.close(fd)
            if total >= max_bytes:
                break
    finally:
        buf.close()
    return Bandwidth(total, seconds, direct)


def _read_file(fd: int, buf: mmap.mmap, limit: int) -> int:
    offset = 0
    while offset < limit:
        n = os.preadv(fd, [buf], offset)
        offset += n
        if n < len(buf):  # end of file
            break
    return offset


def _open(path: Path) -> tuple[int, bool]:
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY), False
