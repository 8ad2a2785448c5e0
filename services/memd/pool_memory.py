"""The pool's memory as admin resizes it: retired slots give their memory back, a grow allocates it again.

Resizing never moves a slot or changes the region's size. Each retired slot that becomes free (``SlotTable`` calls
``retired``, its ``on_retire``) has its memory released (``Pool.release``: a hole punched in the /dev/shm file; a
device pool frees a chunk once all its slots are released), and a grow allocates the range again first
(``Pool.ensure``). All of it runs on one thread, in order, off the event loop; a slot that a grow in flight is
about to allocate again is kept instead of released.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from services.memd.pools import Pool

log = logging.getLogger("moeinf.memd.pool_memory")


class PoolMemory:
    def __init__(self, pool: Pool, slot_bytes: int, settle=None):
        """``settle(slot)``: returns once nothing still reads or writes the slot (a device pool: the workers' read
        events and memd's last copy into it, ``TieredReader.settle``); None: nothing to wait for (shm)."""
        self.pool, self.slot_bytes, self.settle = pool, slot_bytes, settle
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="memd-pool-memory")  # one thread: ordered
        self.growing_to, self.deferred = 0, []  # a grow in flight keeps the retired slots below it allocated

    def retired(self, slot: int) -> None:
        """A retired slot became free: give its memory back, off the event loop."""
        if slot < self.growing_to:
            self.deferred.append(slot)  # the grow in flight allocates it again: keep it
        else:
            self.thread.submit(self._release, slot)

    async def grow(self, old: int, new: int) -> None:
        """Allocate slots ``old..new`` again; raises RuntimeError when the memory is not there."""
        s = self.slot_bytes
        self.growing_to = new
        try:
            await asyncio.get_running_loop().run_in_executor(self.thread, self.pool.ensure, old * s, (new - old) * s)
        except RuntimeError:
            for slot in self.deferred:
                self.thread.submit(self._release, slot)
            raise
        finally:
            self.growing_to, self.deferred = 0, []

    async def settled(self) -> None:
        """Returns once every release queued so far is done."""
        await asyncio.get_running_loop().run_in_executor(self.thread, _nothing)

    def close(self) -> None:
        self.thread.shutdown(wait=False, cancel_futures=True)

    def _release(self, slot: int) -> None:
        try:
            if self.settle is not None:
                self.settle(slot)
            self.pool.release(slot * self.slot_bytes, self.slot_bytes)
        except OSError as exc:
            log.warning("could not give slot %d's memory back: %s", slot, exc)


def _nothing() -> None:
    pass
