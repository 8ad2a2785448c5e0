"""Slots the reader filled from the checkpoint, written into their slot images behind the read (``--slot-cache``).

A load never waits for its image: the reader settles the load first and hands the slot to this writer, which
writes it in pieces while no on-demand read is queued (a demand read that arrives mid-image waits for at most one
piece). Correctness rests on the slot's generation (``ExpertReader.generation``: bumped before any byte of a new
load lands in the slot, and when the slot's memory is given back): the image counts as written only if every
piece was written whole and the generation is the same after the synced write as when the load ended, so a slot
reused meanwhile never leaves a torn image marked done (it is simply written behind a later read). The slot's
padding and the gaps between rows spread apart hold whatever the slot held before: no kernel reads them.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
import time
from collections import deque
from pathlib import Path

log = logging.getLogger("moeinf.memd.image_writer")
WRITE_QUEUE = 8  # slots waiting to be written behind their reads, at most
WRITE_PIECE = 4 << 20  # bytes per write: on-demand reads are checked for between pieces
DEMAND_POLL_S = 0.002  # the writer's wait while on-demand reads are queued


class ImageWriter:
    """One thread writing the slots the reader loaded from the checkpoint into their images (O_DIRECT from the
    page-aligned slot to the slot-aligned image; through the page cache where the pool is not aligned). At most
    ``WRITE_QUEUE`` slots wait; more are dropped (each is written behind a later read)."""

    def __init__(self, images, reader):
        """``images``: the ``LosslessImages`` written; ``reader``: the ``ExpertReader`` that fills the slots."""
        self.images, self.reader = images, reader
        self.fds = [fd for fd in (_open_write(images.path, os.O_DIRECT), _open_write(images.path, 0)) if fd is not None]
        self.queue: deque = deque()
        self.cv = threading.Condition()
        self.closing = False
        self.written = self.discarded = self.failed = 0
        self.busy = False  # a write in progress
        self.thread = threading.Thread(target=self._run, name="memd-image-writer", daemon=True)
        if self.fds:
            self.thread.start()
        else:
            log.warning("slot cache: %s cannot be opened for writing: experts without an image stay read from the"
                        " checkpoint", images.path)

    def loaded(self, key: tuple[int, int], slot: int, generation: int) -> None:
        """The reader filled ``slot`` with expert ``key`` from the checkpoint (its ``generation``-th load)."""
        with self.cv:
            if not self.fds or self.images.is_done(key) or len(self.queue) >= WRITE_QUEUE \
                    or any(k == key for k, _, _ in self.queue):
                return
            self.queue.append((key, slot, generation))
            self.cv.notify()

    def idle(self) -> bool:
        """Nothing queued, nothing being written."""
        with self.cv:
            return not self.queue and not self.busy

    def close(self) -> None:
        """Stop: the piece being written ends, the rest is dropped."""
        with self.cv:
            self.closing = True
            self.queue.clear()
            self.cv.notify()
        if self.thread.is_alive():
            self.thread.join()
        for fd in self.fds:
            os.close(fd)

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.closing:
                    self.cv.wait()
                if self.closing:
                    return
                key, slot, generation = self.queue.popleft()
                self.busy = True
            try:
                self._write(key, slot, generation)
            except Exception as exc:  # (an OSError, a codec's error: counted and said, the writer goes on)
                self.failed += 1
                (log.warning if self.failed == 1 else log.debug)(
                    "slot cache: could not write expert %s's image (%s); it stays read from the checkpoint (said"
                    " once; the count is in the reader's closing line)", key, exc)
            finally:
                with self.cv:
                    self.busy = False

    def _write(self, key: tuple[int, int], slot: int, generation: int) -> None:
        images, size = self.images, self.images.slot_bytes
        if images.packs:
            return self._write_packed(key, slot, generation)
        at = (key[0] * images.num_experts + key[1]) * size
        for start in range(0, size, WRITE_PIECE):
            self._demand_first()
            if self.closing or self.reader.generation(slot) != generation or images.is_done(key):
                self.discarded += self.reader.generation(slot) != generation
                return
            end = min(start + WRITE_PIECE, size)
            self._put(self.reader.pool[slot * size + start:slot * size + end], at + start)
        os.fdatasync(self.fds[-1])
        os.posix_fadvise(self.fds[-1], at, size, os.POSIX_FADV_DONTNEED)  # (a buffered fallback's pages)
        if self.reader.generation(slot) != generation:  # overwritten while written: the image may be torn
            self.discarded += 1
            return
        with images._lock:
            if not images.is_done(key):
                images._mark_done([key])
                self.written += 1

    def _write_packed(self, key: tuple[int, int], slot: int, generation: int) -> None:
        """A compressed image (``packed_images.py``): the slot copied out once no on-demand read is queued (whole if
        its generation did not move meanwhile), packed, then written as an image is: in pieces, on-demand reads
        first between them, from a page-aligned copy (O_DIRECT); its lengths and ``done`` once synced."""
        images, size = self.images, self.images.slot_bytes
        self._demand_first()
        if self.closing or images.is_done(key):
            return
        image = bytes(self.reader.pool[slot * size:(slot + 1) * size])
        if self.reader.generation(slot) != generation:
            self.discarded += 1
            return
        blob, lengths = images.pack(key, image)
        aligned = mmap.mmap(-1, len(blob))
        aligned[:] = blob
        with images._lock:  # (no other writer of this region meanwhile: ``prepare_many`` of the CLI or a test)
            for start in range(0, len(blob), WRITE_PIECE):
                self._demand_first()
                if self.closing or images.is_done(key):
                    return
                self._put(memoryview(aligned)[start:start + WRITE_PIECE], images.region(key) + start)
            images.store_lengths(key, lengths)
            images.sync([key])
            images._mark_done([key])
            self.written += 1

    def _demand_first(self) -> None:
        while self.reader.demand_pending() and not self.closing:
            time.sleep(DEMAND_POLL_S)  # on-demand reads first

    def _put(self, data: memoryview, offset: int) -> None:
        """Write ``data`` whole at ``offset`` (O_DIRECT where the pool's alignment allows; else buffered)."""
        for i, fd in enumerate(self.fds):
            try:
                n = os.pwrite(fd, data, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or i == len(self.fds) - 1:
                    raise  # EINVAL: an unaligned pool (tests' bytearrays): written through the page cache
                continue
            if n != len(data):  # a full disk: the rest of the image is not there
                raise OSError(errno.ENOSPC, f"short write ({n} of {len(data)} bytes at {offset})")
            return


def _open_write(path: Path, flag: int) -> int | None:
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None
