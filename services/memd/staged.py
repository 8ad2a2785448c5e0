"""Acquires answered in two parts (``AcquireRequest.partial``): a lone decode token's layer whose experts are not
all resident is answered as soon as some are, with the positions still loading in ``AcquireReply.loading``. The
worker computes the resident experts while memd reads the others, then sends AWAIT, answered once every load of
that acquire is done (or with the error that ended one). The pins or leases are taken at the acquire, as for any
other, so the resident experts cannot be evicted meanwhile; the worker records the loading experts' leases only from
AWAIT's reply. Each worker has at most one acquire in flight, so at most one awaited acquire per attached worker.
The worker's stall is what it waited: until the first answer, and from its AWAIT to the last load's end (the loads'
time while it computed is not a stall: memd's estimate of a layer's compute time stays right)."""
from __future__ import annotations

import asyncio
import time
from typing import NamedTuple

from common import messages as m
from common.protocol import Op
from services.memd.replies import CodedError, answer


class Pending(NamedTuple):
    """An acquire between ``begin_acquire`` and its reply."""

    req: m.AcquireRequest
    keys: list[tuple[int, int]]
    loading: dict  # key -> the task of its load (those the acquire waits for)
    hits: int
    revoked: list[tuple[int, int]]  # leases taken back
    epoch: int  # the revoke epoch when they were (a reclaim while the loads run makes the worker come back)
    fed: bool  # it carried its layer's routing: plan prefetches once it is answered
    host: dict[int, int]  # positions the worker computes on its CPU -> host-tier slots (--cpu-experts auto|always)

    @property
    def waits(self) -> list:
        """The loads to wait for."""
        return list(self.loading.values())


class StagedAcquires:
    def __init__(self, server):
        self.server = server
        self.awaiting: dict[bytes, tuple[int, asyncio.Task]] = {}  # worker -> (layer, its acquire's loads)
        self.answered_early = 0  # acquires answered while some of their loads were still in flight
        self.answering: set[asyncio.Task] = set()  # the first answers being prepared (held: a task nobody holds
        # may be collected mid-way)

    def start(self, identity: bytes, rid: int, pending) -> asyncio.Task:
        """Wait for ``pending``'s loads in a task and answer the acquire once some of its experts are resident. The
        task returned ends once the loads are done and the acquire answered (in one part, or in the first of two):
        its end lets the prefetcher go, so no plan runs between the last load and a one-part reply. (An AWAIT is
        answered in the loop turn the loads end, ahead of the plan that ``let_go`` schedules.)"""
        full = asyncio.create_task(self.server.on_acquire(identity, pending, stall=False))
        full.add_done_callback(_retrieve)  # (its error goes to AWAIT, or to nobody when the worker died)
        self.awaiting[identity] = (pending.req.layer, full)
        first = asyncio.create_task(self._first(identity, rid, pending, full, time.perf_counter()))
        self.answering.add(first)
        first.add_done_callback(self.answering.discard)
        return first

    async def _first(self, identity: bytes, rid: int, pending, full: asyncio.Task, start: float) -> None:
        loading = pending.loading
        while not full.done() and not any(_loaded(loading.get(key)) for key in pending.keys):
            await asyncio.wait([full, *(t for t in loading.values() if not t.done())],
                               return_when=asyncio.FIRST_COMPLETED)
        self._stalled(identity, pending.req.layer, time.perf_counter() - start)
        still = [j for j, key in enumerate(pending.keys) if not _loaded(loading.get(key))]
        if full.done() or not still:  # everything came (or failed) before an expert could be handed out: one reply
            self._forget(identity, full)
            await answer(self.server.rpc, identity, Op.ACQUIRE, rid, lambda: _result(full))
            return
        self.answered_early += 1
        await answer(self.server.rpc, identity, Op.ACQUIRE, rid, lambda: self.server._acquired(pending, still))
        await asyncio.wait([full])  # the rest loads: the prefetcher is held until then

    async def on_await(self, identity: bytes, req: m.AwaitRequest) -> m.AcquireReply:
        layer, full = self.awaiting.get(identity, (None, None))
        if full is None or layer != req.layer:
            client = self.server.clients.get(identity)
            if client is not None:  # an error ends a leasing worker's leases: on both sides (it forgets them)
                client.return_leases(self.server.table)
            raise CodedError("bad_request", f"AWAIT of layer {req.layer}: this worker has no partly answered"
                                            " acquire of it")
        self._forget(identity, full)
        start = time.perf_counter()
        try:
            return await full
        finally:
            self._stalled(identity, layer, time.perf_counter() - start)

    def _stalled(self, identity: bytes, layer: int, seconds: float) -> None:
        client = self.server.clients.get(identity)
        if client is not None:
            self.server.core.stall(client.pid, layer, seconds)

    def _forget(self, identity: bytes, full: asyncio.Task) -> None:
        if self.awaiting.get(identity, (None, None))[1] is full:
            del self.awaiting[identity]

    def forget_worker(self, identity: bytes) -> None:
        self.awaiting.pop(identity, None)  # (its loads run on; their slots go with the worker's pins and leases)


def _loaded(task: asyncio.Task | None) -> bool:
    """No load needed, or its load finished well."""
    return task is None or (task.done() and not task.cancelled() and task.exception() is None)


async def _result(task: asyncio.Task):
    try:
        return await task
    except asyncio.CancelledError:  # its loads were cancelled (not this answer): an error reply, never silence
        if asyncio.current_task().cancelling():
            raise
        raise CodedError("internal", "the acquire's loads were cancelled in memd") from None


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
