"""Offline bounds on the expert fetches a routing trace needs at a given pool capacity (pure functions).

The trace is a sequence of *accesses*: one per MoE layer of each forward step, the set of experts that layer
acquires together. While a layer runs, all of its experts are pinned: a fetch for it may not evict another of
its experts. Before the layer, every one of them must be resident; an expert that is not costs one fetch.

- ``lru_fetches``: pure on-demand LRU, as memd's ``lru`` policy with prefetch off: a layer's hits are touched in
  order, then its misses become most recent in expert order (memd: in the order their loads finish, so memd's
  count can differ from this one by a fetch now and then).
- ``belady_fetches``: Belady's MIN with the pinning constraint: on a miss with a full pool, evict the unpinned
  resident whose next use lies furthest ahead (never = infinitely far). No policy, with or without prefetching,
  fetches fewer experts (a prefetch is a fetch too), so this is the floor on bytes any policy must move.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Hashable, Sequence

Access = Sequence[Hashable]  # the experts (keys) one layer acquires together
NEVER = float("inf")


def _check(accesses: Sequence[Access], capacity: int) -> None:
    widest = max((len(set(a)) for a in accesses), default=0)
    if capacity < widest:
        raise ValueError(f"a capacity of {capacity} experts cannot hold one layer's {widest} experts")


def lru_fetches(accesses: Sequence[Access], capacity: int) -> int:
    """Fetches of pure on-demand LRU over ``accesses`` with ``capacity`` slots (cold start)."""
    _check(accesses, capacity)
    order: OrderedDict[Hashable, None] = OrderedDict()  # least recent first
    fetches = 0
    for access in accesses:
        pinned = set(access)
        missing = []
        for key in dict.fromkeys(access):
            if key in order:
                order.move_to_end(key)
            else:
                missing.append(key)
        for key in missing:
            if len(order) >= capacity:
                victim = next(k for k in order if k not in pinned)
                del order[victim]
            order[key] = None
            fetches += 1
    return fetches


def next_uses(accesses: Sequence[Access]) -> list[dict[Hashable, float]]:
    """``next_uses(a)[i][k]``: the index of the next access after ``i`` that uses key ``k`` (of access ``i``)."""
    out: list[dict[Hashable, float]] = [{} for _ in accesses]
    seen: dict[Hashable, float] = {}
    for i in range(len(accesses) - 1, -1, -1):
        for key in accesses[i]:
            out[i][key] = seen.get(key, NEVER)
        for key in accesses[i]:
            seen[key] = i
    return out


def belady_fetches(accesses: Sequence[Access], capacity: int) -> int:
    """Fetches of Belady's MIN (offline optimal) over ``accesses`` with ``capacity`` slots (cold start)."""
    _check(accesses, capacity)
    nxt = next_uses(accesses)
    resident: dict[Hashable, float] = {}  # key -> index of its next use
    heap: list[tuple[float, int, Hashable]] = []  # (-next use, tiebreak, key); stale entries are skipped
    fetches, tiebreak = 0, 0
    for i, access in enumerate(accesses):
        pinned = set(access)
        for key in dict.fromkeys(access):
            if key not in resident:
                if len(resident) >= capacity:
                    _evict_furthest(resident, heap, pinned)
                fetches += 1
            resident[key] = nxt[i][key]
            tiebreak += 1
            heapq.heappush(heap, (-nxt[i][key], tiebreak, key))
    return fetches


def _evict_furthest(resident: dict[Hashable, float], heap: list, pinned: set) -> None:
    kept = []
    while heap:
        entry = heapq.heappop(heap)
        neg_next, _, key = entry
        if resident.get(key) != -neg_next:
            continue  # stale: evicted, or used again since
        if key in pinned:
            kept.append(entry)
            continue
        del resident[key]
        break
    else:
        raise AssertionError("no unpinned resident to evict")
    for entry in kept:
        heapq.heappush(heap, entry)
