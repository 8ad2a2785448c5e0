"""Reading experts from the checkpoint's safetensors into pool slots with ``os.preadv``.

With O_DIRECT (the default where the file system allows it) the page cache is bypassed, so memd's memory
budget is the whole truth: reads go in aligned chunks through a per-thread aligned staging buffer and are
copied into the slot. Without it, ``preadv`` writes straight into the slot (zero copy, page cache used).
"""
from __future__ import annotations

import logging
import mmap
import os
import threading
import time

from services.memd.store import ALIGN, ExpertStore, Segment

log = logging.getLogger("moeinf.memd.reader")
CHUNK = 8 * 1024 * 1024


class ExpertReader:
    def __init__(self, store: ExpertStore, pool_view: memoryview, slot_bytes: int, direct_io: bool):
        self.store = store
        self.pool = pool_view
        self.slot_bytes = slot_bytes
        self.direct_io = direct_io and _direct_io_works(store.checkpoint.files[0])
        if direct_io and not self.direct_io:
            log.warning("O_DIRECT is not available on this file system; reading through the page cache")
        flags = os.O_RDONLY | (os.O_DIRECT if self.direct_io else 0)
        self.fds = {str(f): os.open(f, flags) for f in store.checkpoint.files}
        self._local = threading.local()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def read(self, key: tuple[int, int], slot: int) -> tuple[int, float]:
        """Fill ``slot`` with expert ``key``; returns (bytes read, seconds). Runs in a reader thread."""
        start = time.perf_counter()
        base = slot * self.slot_bytes
        total = 0
        for seg in self.store.segments[key]:
            total += self._read_direct(seg, base) if self.direct_io else self._read_buffered(seg, base)
        return total, time.perf_counter() - start

    def _read_buffered(self, seg: Segment, base: int) -> int:
        fd, done = self.fds[seg.file], 0
        while done < seg.nbytes:
            dest = self.pool[base + seg.slot_offset + done: base + seg.slot_offset + seg.nbytes]
            n = os.preadv(fd, [dest[:CHUNK]], seg.file_offset + done)
            if n <= 0:
                raise OSError(f"{seg.file}: unexpected end of file at byte {seg.file_offset + done}")
            done += n
        return seg.nbytes

    def _read_direct(self, seg: Segment, base: int) -> int:
        fd, staging = self.fds[seg.file], self._staging()
        pos, end = seg.file_offset, seg.file_offset + seg.nbytes
        while pos < end:
            aligned = pos - pos % ALIGN
            want = min(CHUNK, _align_up(end - aligned))
            n = os.preadv(fd, [staging[:want]], aligned)
            skip = pos - aligned
            take = min(n - skip, end - pos)
            if take <= 0:
                raise OSError(f"{seg.file}: unexpected end of file at byte {pos}")
            dest = base + seg.slot_offset + (pos - seg.file_offset)
            self.pool[dest:dest + take] = staging[skip:skip + take]
            pos += take
        return seg.nbytes

    def _staging(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(mmap.mmap(-1, CHUNK))  # page-aligned, as O_DIRECT needs
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
