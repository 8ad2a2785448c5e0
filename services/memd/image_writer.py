"""Slots the reader filled from the checkpoint, written into their slot images behind the read (``--slot-cache``).

A load never waits for its image: the reader settles the load first and hands the slot to this writer, which
writes it while no on-demand read is queued. Correctness rests on the slot's generation (``ExpertReader.generation``:
bumped before any byte of a new load lands in the slot, and when the slot's memory is given back): the image counts
as written only if the generation is the same after the synced write as when the load ended, so a slot reused
meanwhile never leaves a torn image marked done (it is simply written behind a later read).
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

log = logging.getLogger("moeinf.memd.image_writer")
WRITE_QUEUE = 8  # slots waiting to be written behind their reads, at most
DEMAND_POLL_S = 0.002  # the writer's wait while on-demand reads are queued


class ImageWriter:
    """Writes each slot the reader has just filled from the checkpoint into its image, behind the read: the load
    itself waits for nothing. One thread; a write starts only while no on-demand read is queued or being read; it
    goes with O_DIRECT from the slot (page-aligned) to the image (slot-aligned) and is synced before the expert
    counts as written. A slot loaded again or given back meanwhile (its generation moved) is not kept. At most
    ``WRITE_QUEUE`` slots wait; more are dropped (each is written behind a later read)."""

    def __init__(self, images, reader):
        """``images``: the ``LosslessImages`` written; ``reader``: the ``ExpertReader`` that fills the slots."""
        self.images, self.reader = images, reader
        self.fds = [fd for fd in (_open_write(images.path, os.O_DIRECT), _open_write(images.path, 0)) if fd is not None]
        self.queue: deque = deque()
        self.cv = threading.Condition()
        self.closing = False
        self.written = self.discarded = 0
        self.busy = False  # a write in progress
        self.thread = threading.Thread(target=self._run, name="memd-image-writer", daemon=True)
        self.thread.start()

    def loaded(self, key: tuple[int, int], slot: int, generation: int) -> None:
        """The reader filled ``slot`` with expert ``key`` from the checkpoint (its ``generation``-th load)."""
        with self.cv:
            if self.images.is_done(key) or len(self.queue) >= WRITE_QUEUE or any(k == key for k, _, _ in self.queue):
                return
            self.queue.append((key, slot, generation))
            self.cv.notify()

    def close(self) -> None:
        """Stop: the write in progress ends, the queued ones are dropped."""
        with self.cv:
            self.closing = True
            self.queue.clear()
            self.cv.notify()
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
            while self.reader.demand_pending() and not self.closing:
                time.sleep(DEMAND_POLL_S)  # on-demand reads first
            try:
                self._write(key, slot, generation)
            except OSError as exc:
                log.warning("slot cache: could not write expert %s's image (%s); it is read from the checkpoint",
                            key, exc)
            finally:
                self.busy = False

    def idle(self) -> bool:
        """Nothing queued, nothing being written."""
        with self.cv:
            return not self.queue and not self.busy

    def _write(self, key: tuple[int, int], slot: int, generation: int) -> None:
        images, size = self.images, self.images.slot_bytes
        index = key[0] * images.num_experts + key[1]
        if self.reader.generation(slot) != generation or images.is_done(key):
            self.discarded += self.reader.generation(slot) != generation
            return
        data = self.reader.pool[slot * size:(slot + 1) * size]
        for i, fd in enumerate(self.fds):
            try:
                os.pwrite(fd, data, index * size)
                break
            except OSError as exc:
                if exc.errno != errno.EINVAL or i == len(self.fds) - 1:
                    raise  # EINVAL: an unaligned pool (tests' bytearrays): written through the page cache
        os.fdatasync(self.fds[-1])
        if self.reader.generation(slot) != generation:  # overwritten while written: the image may be torn
            self.discarded += 1
            return
        with images._lock:
            if not images.is_done(key):
                images._mark_done([key])
        self.written += 1


def _open_write(path: Path, flag: int) -> int | None:
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None
