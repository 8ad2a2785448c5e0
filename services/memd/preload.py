"""``--preload auto``: a pool that holds every expert reads them all at start, in the background.

A runtime that has the memory for every weight loads them before it serves (vLLM reads them at start; llama.cpp maps
its file with ``MAP_POPULATE``, or asks the kernel to read it ahead, all but tensors over 4 GiB). memd otherwise
reads an expert on its first use: at full residency each cold expert then stalls a step for one read (bench e2e at a
6 GiB total, 2 requests: ~1 miss per decode token). So, where the pool's capacity covers every expert, memd starts a
read of each one that is neither resident nor loading into a free slot, at the lowest prefetch priority: every
on-demand read (an acquire promotes a queued one) and every planned prefetch goes ahead of them, piece by piece.
They are not prefetches of the planner (not counted as issued, used or wasted); their bytes count in ``bytes_read``.
At most ``2 x --read-threads`` preloads are queued at a time (the reader scans its queue for every piece, and a
cancelled wait's future must stay few at shutdown). Preloading stops, cancelling its reads in flight, where the pool no
longer holds every expert (``moeinf admin resize``: an on-demand load could not take a preload's slot), or has no free
slot; an expert whose first read converts it (``--expert-format``) is left to that read.
"""
from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("moeinf.memd.preload")
PRIORITY = -1.0  # below every planned prefetch's (need x nearness, >= 0)


async def preload(core, loads, cfg) -> int:
    """Read the missing experts (``--preload auto`` and a pool of every expert; else none); returns how many loaded."""
    if cfg.preload != "auto" or not core.holds_every_expert():
        return 0
    table, started, inflight, start = core.table, [], {}, time.perf_counter()
    queued = 2 * cfg.read_threads
    log.info("preloading the experts not yet in the pool (--preload auto: it holds every expert)")
    for key in ((layer, expert) for layer in range(core.L) for expert in range(core.E)):
        while len(inflight) >= queued:
            done, _ = await asyncio.wait(inflight.values(), return_when=asyncio.FIRST_COMPLETED)
            inflight = {k: t for k, t in inflight.items() if t not in done}
        if not (core.holds_every_expert() and table.free):  # (shrunk below every expert, or full: nothing to fill)
            for k in inflight:
                loads.cancel(k)
            break
        if table.is_resident(key) or key in loads.tasks or not core.fetchable(key):
            continue
        slot = table.reserve_prefetch(key, PRIORITY)
        if slot is not None:
            inflight[key] = loads.start(key, slot, demand=False, priority=PRIORITY)
            started.append(key)
        await asyncio.sleep(0)  # (an acquire received meanwhile is answered first)
    await asyncio.gather(*inflight.values(), return_exceptions=True)  # (a failed read logs its error)
    loaded = sum(table.is_resident(key) for key in started)
    log.info("preloaded %d of %d experts in %.1f s", loaded, len(started), time.perf_counter() - start)
    return loaded
