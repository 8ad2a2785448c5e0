"""Reads in flight, on the event loop side: one asyncio task per loading expert, over the reader's jobs.

A task ends by telling the core how the read went (done, cancelled or failed). The on-demand loads (started as
demand, promoted, or waiting for a slot) are counted: while any runs or waits, no prefetch is planned, and
``demand_idle`` (an event) is set when the last one ends. A cancelled prefetch that an
acquire has meanwhile pinned is read again, as an on-demand load, into the same slot. An on-demand load that
finds every slot pinned or loading cancels the lowest-priority prefetch and takes its slot; when there is none, it
waits for loads nobody pins to end (another acquire's, or one whose acquire failed: each leaves an evictable
expert), and while other workers hold experts (their current layer, or leases memd has asked back) for them to let
go, up to ``SLOT_WAIT_S``.
"""
from __future__ import annotations

import asyncio
import logging
import time

from services.memd.core import ExpertCache
from services.memd.policy import Key
from services.memd.read_jobs import ReadCancelled, ReadJob
from services.memd.reader import ExpertReader
from services.memd.slots import PoolExhausted

log = logging.getLogger("moeinf.memd.loads")
SLOT_WAIT_S = 10.0  # an on-demand load waits this long for other workers' experts to leave (below the worker's
SLOT_POLL_S = 0.005  # --memd-timeout-s of 120 s); it looks again this often, asking them again each time


class LoadError(RuntimeError):
    """Reading an expert from the checkpoint failed; the message says which and why."""


class Loads:
    def __init__(self, core: ExpertCache, reader: ExpertReader):
        self.core, self.reader = core, reader
        self.tasks: dict[Key, asyncio.Task] = {}
        self.jobs: dict[Key, ReadJob] = {}
        self.demand_keys: set[Key] = set()  # on-demand loads running or queued
        self.waiting = 0  # on-demand loads still looking for a slot
        self.demand_idle = asyncio.Event()  # set while no on-demand load runs or waits (the planner awaits it)
        self.demand_idle.set()
        self._busy_seconds = 0.0  # wall seconds with at least one load in flight, up to ``_busy_since``
        self._busy_since: float | None = None  # when the current run of loads began (None: no load in flight)

    def busy_seconds(self) -> float:
        """Wall seconds during which some expert was loading (queued or reading): the disk's busy time, as memd
        keeps it busy. Against the run's wall time it says how much of it the reader had work."""
        running = time.perf_counter() - self._busy_since if self._busy_since is not None else 0.0
        return self._busy_seconds + running

    @property
    def demand_busy(self) -> bool:
        return bool(self.demand_keys) or self.waiting > 0

    def _demand_started(self, key: Key | None) -> None:
        if key is None:
            self.waiting += 1
        else:
            self.demand_keys.add(key)
        self.demand_idle.clear()

    def _demand_ended(self, key: Key | None) -> None:
        if key is None:
            self.waiting -= 1
        else:
            self.demand_keys.discard(key)
        if not self.demand_busy:
            self.demand_idle.set()

    def start(self, key: Key, slot: int, *, demand: bool, priority: float = 0.0) -> asyncio.Task:
        if not self.tasks:
            self._busy_since = time.perf_counter()
        self.jobs[key] = self.reader.submit(key, slot, demand=demand, priority=priority)
        if demand:
            self._demand_started(key)
        task = asyncio.create_task(self._run(key, slot))
        task.add_done_callback(_retrieve)
        self.tasks[key] = task
        return task

    def promote(self, key: Key) -> asyncio.Task:
        """An acquire waits for ``key``, which is loading: read it ahead of every prefetch."""
        job = self.jobs.get(key)
        if job is not None:
            self.reader.promote(job)
            self._demand_started(key)
        return self.tasks[key]

    def cancel(self, key: Key) -> None:
        job = self.jobs.get(key)
        if job is not None:
            self.reader.cancel(job)

    async def load_without_free_slot(self, key: Key, transient: bool, others_hold=None) -> None:
        """Load ``key`` on demand when no slot was free: steal one from a prefetch (or join a load of ``key``), or
        wait while ``others_hold()`` (other workers hold experts; it asks them for their leases)."""
        self._demand_started(None)
        try:
            await self._demand(key, transient, others_hold)
        finally:
            self._demand_ended(None)

    async def _demand(self, key: Key, transient: bool, others_hold) -> None:
        deadline = asyncio.get_running_loop().time() + SLOT_WAIT_S
        while True:
            if key in self.tasks:
                await self.promote(key)
                return
            if self.core.table.is_resident(key):
                return
            try:
                slot = self.core.reserve_demand(key, transient)
            except PoolExhausted:
                victim = self.core.steal_candidate()
                if victim is None or victim not in self.tasks:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    ending = [t for k, t in self.tasks.items() if not self.core.table.pins.get(k)]
                    if ending:  # a load nobody pins (another acquire's, one that failed) frees a slot when it ends
                        await asyncio.wait(ending, timeout=SLOT_POLL_S * 20, return_when=asyncio.FIRST_COMPLETED)
                        continue
                    if others_hold is None or not others_hold():
                        raise
                    await asyncio.sleep(SLOT_POLL_S)
                    continue
                self.cancel(victim)
                await asyncio.wait({self.tasks[victim]})
                continue
            if slot is not None:
                await self.start(key, slot, demand=True)
                return
            await asyncio.sleep(0)  # reserved by a load that is being started: look again

    async def _run(self, key: Key, slot: int) -> None:
        try:
            while True:
                try:
                    nbytes, seconds = await asyncio.wrap_future(self.jobs[key].future)
                except ReadCancelled as exc:
                    self.core.partial_read(key, exc.nbytes)
                    if self.core.table.pins.get(key):  # an acquire came for it after the cancel: read it after all
                        self.jobs[key] = self.reader.submit(key, slot, demand=True)
                        self._demand_started(key)
                        continue
                    self.core.load_cancelled(key)
                    return
                except Exception as exc:
                    self.core.load_failed(key)
                    log.error("reading expert %s failed: %s", key, exc)
                    raise LoadError(f"reading expert {key[1]} of MoE layer {key[0]} failed: {exc}") from None
                self.core.load_done(key, nbytes, seconds)
                return
        finally:
            self.tasks.pop(key, None)
            self.jobs.pop(key, None)
            self._demand_ended(key)
            if not self.tasks and self._busy_since is not None:
                self._busy_seconds += time.perf_counter() - self._busy_since
                self._busy_since = None


def _retrieve(task: asyncio.Task) -> None:
    """A prefetch nobody waits for may fail: its error is logged by ``_run``, not left unretrieved."""
    if not task.cancelled():
        task.exception()
