"""O_DIRECT alignment rules of one file: what memory address and file offset a direct read needs.

Asked of the kernel with ``statx(STATX_DIOALIGN)`` (Linux >= 6.1: ``stx_dio_mem_align`` and
``stx_dio_offset_align``); where the kernel or file system does not answer, found by probing: small direct reads
at decreasing alignments until one is refused. Either way the answer is checked with one real read at exactly
that alignment. ``None``: the file system refuses O_DIRECT (tmpfs), so reads go through the page cache.

A direct read needs its file offset and length to be multiples of ``offset`` and its buffer address a multiple
of ``mem``. On NVMe with a recent kernel ``mem`` is 4 bytes; behind virtio or older kernels it is 512 (the
logical block size), so a read straight into a pool slot only works where the slot destination and the file
offset agree modulo ``mem`` (``services/memd/reader.py`` checks, and stages the others).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from dataclasses import dataclass

STATX_DIOALIGN = 0x2000
AT_FDCWD = -100
_STATX_SIZE = 256
_MASK_AT, _DIOALIGN_AT = 0, 152  # offsets of stx_mask and (stx_dio_mem_align, stx_dio_offset_align)
PAGE = mmap.PAGESIZE
_PROBE_BYTES = 4 * PAGE  # probe with reads that span pages: a kernel may accept a small misaligned read in one page


@dataclass(frozen=True, slots=True)
class DioAlign:
    mem: int  # buffer addresses: multiples of this
    offset: int  # file offsets and lengths: multiples of this
    source: str  # "statx" or "probe"

    def describe(self) -> str:
        return f"memory {self.mem} B, file offset {self.offset} B (from {self.source})"


def dio_alignment(path) -> DioAlign | None:
    """The O_DIRECT alignment of ``path``, or None when O_DIRECT is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    try:
        found = _statx(path)
        if found is not None and found.offset == 0:
            return None  # the kernel says: no direct I/O on this file
        if found is None or not _reads(fd, found.mem, _PROBE_BYTES):
            found = _probe(fd)
        return found
    finally:
        os.close(fd)


def _statx(path) -> DioAlign | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        statx = libc.statx
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if statx(AT_FDCWD, os.fsencode(path), 0, STATX_DIOALIGN, buf) != 0:
        return None
    (mask,) = struct.unpack_from("I", buf, _MASK_AT)
    if not mask & STATX_DIOALIGN:
        return None
    mem, offset = struct.unpack_from("II", buf, _DIOALIGN_AT)
    return DioAlign(mem, offset, "statx")


def _probe(fd: int) -> DioAlign | None:
    offset = next((a for a in (512, 1024, 2048, 4096, 8192, 16384, 65536) if _reads(fd, PAGE, a, at=a)), None)
    if offset is None:
        return None
    length = -(-_PROBE_BYTES // offset) * offset
    mem = next(a for a in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, PAGE) if _reads(fd, a, length))
    return DioAlign(mem, offset, "probe")


def _reads(fd: int, mem: int, length: int, at: int = 0) -> bool:
    """Whether a direct read of ``length`` bytes at file offset ``at`` into a buffer at an address that is a
    multiple of ``mem`` but not of ``2 * mem`` (below a page) succeeds."""
    buf = mmap.mmap(-1, 2 * PAGE + length)
    try:
        shift = mem if mem < PAGE else 0
        view = memoryview(buf)[shift:shift + length]
        try:
            os.preadv(fd, [view], at)
            return True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return False
        finally:
            view.release()
    finally:
        buf.close()


def buffer_address(view: memoryview) -> int:
    """The address of a writable buffer's first byte (for alignment checks)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))
