"""Prefetch planning off the acquire path: a coalescing planner woken by layer notes and acquires.

A note (or an acquire that carried its layer's routing) wakes the planner for its worker; the plan runs on a later
turn of the event loop, once per worker however many notes arrived meanwhile (it plans from the latest position).
Demand first, in time as on the disk: no plan runs while an acquire waits for its loads or for its reply to go
out (``hold`` / ``let_go``: planning costs memd's only loop a fraction of a millisecond, which would otherwise
land between a demand read's end and the reply the worker waits for), nor while an RPC frame is waiting to be
handled (an acquire that came with the note starts its demand reads first). The workers woken meanwhile are
planned once the last such acquire is answered. And while on-demand reads are in flight or queued (a failed
acquire's loads go on) the plan only cancels stale prefetches and protects what is needed soon; the worker is
planned again as soon as the last demand read ends.
"""
from __future__ import annotations

import asyncio
import logging

from services.memd.core import ExpertCache
from services.memd.loads import Loads

log = logging.getLogger("moeinf.memd.prefetching")
RPC_TURNS = 8  # loop turns a plan waits for a received RPC frame to be handled (then plans anyway)


class Prefetcher:
    def __init__(self, core: ExpertCache, loads: Loads, bandwidth, rpc_waiting=lambda: False):
        self.core, self.loads = core, loads
        self.bandwidth = bandwidth  # () -> measured read bandwidth (bytes/s) or None
        self.rpc_waiting = rpc_waiting  # () -> an RPC frame was received and is not handled yet
        self.answering = 0  # acquires waiting for their loads or their reply: nothing is planned meanwhile
        self.yielded = 0  # turns the next plan has waited for received RPC frames
        self.waiting: dict[object, None] = {}  # workers to plan for, in order (a bounded set: one per worker)
        self.deferred: dict[object, None] = {}  # workers planned while demand reads ran: plan again after them
        self.scheduled = False
        self.after_demand: asyncio.Task | None = None  # waits for the demand reads to end, then plans ``deferred``

    def wake(self, worker) -> None:
        self.waiting[worker] = None
        if not self.answering:
            self._schedule()

    def hold(self) -> None:
        """An acquire waits for loads: no plan until it is answered (``let_go``)."""
        self.answering += 1

    def let_go(self) -> None:
        self.answering -= 1
        if not self.answering and self.waiting:
            self._schedule()

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def forget(self, worker) -> None:
        self.waiting.pop(worker, None)
        self.deferred.pop(worker, None)

    async def _after_demand(self) -> None:
        await self.loads.demand_idle.wait()
        self.after_demand = None
        for worker in list(self.deferred):
            self.wake(worker)
        self.deferred.clear()

    def _run(self) -> None:
        self.scheduled = False
        if self.answering:
            return  # ``let_go`` plans the waiting workers once the last acquire is answered
        if self.rpc_waiting() and self.yielded < RPC_TURNS:
            self.yielded += 1
            self._schedule()  # a received request goes first: an acquire starts its demand reads before any plan
            return
        self.yielded = 0
        workers = list(self.waiting)
        self.waiting.clear()
        for worker in workers:
            self.plan(worker)

    def plan(self, worker) -> None:
        """Predict, cancel stale prefetches, start new ones. A failure here never fails an acquire."""
        try:
            busy = self.loads.demand_busy
            plan = self.core.plan_prefetch(worker, None, self.bandwidth(), demand_busy=busy)
            if busy:
                self.deferred[worker] = None
                if self.after_demand is None:
                    self.after_demand = asyncio.create_task(self._after_demand())
            for key in plan.cancel:
                self.loads.cancel(key)
            for key, slot, priority in plan.start:
                self._start(key, slot, priority)
        except Exception:
            log.exception("prefetch planning failed (the acquires go on)")

    def _start(self, key, slot: int, priority: float) -> None:
        """One planned prefetch; one that cannot start gives back the slot the plan reserved for it (else that slot
        would stay loading with no read behind it, and an acquire of the expert would wait for nothing)."""
        try:
            self.loads.start(key, slot, demand=False, priority=priority)
        except Exception:
            log.exception("prefetch of expert %s could not start", key)
            self.loads.jobs.pop(key, None)
            self.core.load_failed(key)
