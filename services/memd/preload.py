"""``--preload auto``: a pool that holds every expert reads them all at start, in the background.

A runtime that has the memory for every weight loads them before it serves (vLLM reads them at start; llama.cpp maps
its file with ``MAP_POPULATE``, or asks the kernel to read it ahead, all but tensors over 4 GiB). memd otherwise
reads an expert on its first use: at full residency each cold expert then stalls a step for one read (bench e2e at a
6 GiB total, 2 requests: ~1 miss per decode token). So, where the pool's capacity covers every expert, memd starts a
read of each one that is neither resident nor loading into a free slot, at the lowest prefetch priority: every
on-demand read (an acquire promotes a queued one) and every planned prefetch goes ahead of them, piece by piece.
They are not prefetches of the planner (not counted as issued, used or wasted); their bytes count in ``bytes_read``.
Preloading stops where the pool no longer holds every expert (``moeinf admin resize``) or has no free slot; an
expert whose first read converts it (``--expert-format``) is left to that read.
"""
from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("moeinf.memd.preload")
PRIORITY = -1.0  # below every planned prefetch's (need x nearness, >= 0)


def wanted(core, mode: str) -> bool:
    return mode == "auto" and core.table.capacity >= core.L * core.E


async def preload(core, loads) -> int:
    """Start the reads (one event-loop turn each), then wait for them; returns how many loaded."""
    table, started, start = core.table, [], time.perf_counter()
    for key in ((layer, expert) for layer in range(core.L) for expert in range(core.E)):
        if core.wants_notes() or not table.free:  # (shrunk below every expert, or full: nothing to fill)
            break
        if table.is_resident(key) or key in loads.tasks or not core.fetchable(key):
            continue
        slot = table.reserve_prefetch(key, PRIORITY)
        if slot is not None:
            started.append((key, loads.start(key, slot, demand=False, priority=PRIORITY)))
        await asyncio.sleep(0)  # (an acquire received meanwhile is answered first)
    if started:
        log.info("preloading %d experts into the pool (--preload auto: it holds every expert)", len(started))
    await asyncio.gather(*(task for _, task in started), return_exceptions=True)  # (a failed read logs its error)
    loaded = sum(table.is_resident(key) for key, _ in started)
    if started:
        log.info("preloaded %d of %d experts in %.1f s", loaded, len(started), time.perf_counter() - start)
    return loaded
