"""The slot table: which expert lives in which pool slot, which are pinned, which are loading.

Pure bookkeeping (no I/O, no asyncio), so every rule is unit-testable: pinned or loading experts are never
evicted; the policy only ever sees evictable residents. A prefetch takes a free slot, or evicts a victim that is not
protected (imminently needed) and that the policy lets it replace; an on-demand load spares protected experts when
it can, and evicts one when nothing else is left.

The live capacity (``resize``) can be lower than the slots the region was created with: slots at or above it are
retired. Their residents leave as soon as nothing pins or loads them (at once, or when the last pin goes), and a
retired slot that becomes free is handed to ``on_retire`` (memd gives its memory back) instead of the free list.
``drop`` marks every resident to leave the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping

from services.memd.policy import EvictionPolicy, Key


class PoolExhausted(RuntimeError):
    pass


@dataclass(slots=True)
class Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    cancelled_bytes: int = 0  # of them, read by loads cancelled before they finished
    read_seconds: float = 0.0
    stall_seconds: float = 0.0
    per_layer_hits: list[int] = field(default_factory=list)
    per_layer_misses: list[int] = field(default_factory=list)


class SlotTable:
    def __init__(self, num_slots: int, num_layers: int, policy: EvictionPolicy, num_experts: int = 0, *,
                 on_evict: Callable[[Key], None] | None = None, on_retire: Callable[[int], None] | None = None):
        self.num_slots = num_slots  # the region's slots: the layout never changes
        self.num_experts = num_experts  # > 0: a free slot is taken at the expert's home when it can (``_free_slot``)
        self.capacity = num_slots  # live: slots >= capacity are retired (admin resize)
        self.policy = policy
        self.slot_of: dict[Key, int] = {}  # resident or loading
        self.owner: list[Key | None] = [None] * num_slots
        self.free: list[int] = list(range(num_slots - 1, -1, -1))
        self.pins: dict[Key, int] = {}
        self.loading: set[Key] = set()
        self.dropped: set[Key] = set()  # residents that leave once nothing pins or loads them (admin drop)
        self.counters = Counters(per_layer_hits=[0] * num_layers, per_layer_misses=[0] * num_layers)
        self.on_evict = on_evict  # told of every eviction (prefetch accounting)
        self.on_retire = on_retire  # told of every retired slot that became free (its memory goes back)

    # ---- queries
    def is_resident(self, key: Key) -> bool:
        return key in self.slot_of and key not in self.loading

    def evictable(self, key: Key) -> bool:
        return key in self.slot_of and key not in self.loading and not self.pins.get(key)

    @property
    def num_pinned(self) -> int:
        return len(self.pins)

    def must_leave(self, key: Key) -> bool:
        """``key`` sits in a retired slot or was dropped: it leaves once nothing pins or loads it."""
        return key in self.dropped or self.slot_of.get(key, -1) >= self.capacity

    def resident_per_layer(self, num_layers: int) -> list[int]:
        counts = [0] * num_layers
        for key, slot in self.slot_of.items():
            if key not in self.loading and slot < self.capacity:  # (as ``live_resident`` counts)
                counts[key[0]] += 1
        return counts

    def live_resident(self) -> int:
        """Experts read in full into live slots (not those leaving retired slots after a shrink: a count of the
        live pool's occupants, so resident / capacity stays <= 1)."""
        return sum(1 for key, slot in self.slot_of.items() if slot < self.capacity and key not in self.loading)

    # ---- transitions
    def pin(self, key: Key) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, key: Key) -> None:
        n = self.pins.get(key, 0)
        if n <= 1:
            self.pins.pop(key, None)
            self._leave_if_due(key)
        else:
            self.pins[key] = n - 1

    def record_access(self, key: Key, *, decode: bool = True) -> bool:
        """Count a hit or a miss for ``key``; True when it is resident (or already loading)."""
        layer = key[0]
        hit = key in self.slot_of
        if hit:
            self.counters.hits += 1
            self.counters.per_layer_hits[layer] += 1
        else:
            self.counters.misses += 1
            self.counters.per_layer_misses[layer] += 1
        self.policy.on_access(key, decode=decode)
        return hit

    def reserve(self, key: Key, protect: Collection[Key] = ()) -> int:
        """Give ``key`` a slot (free, or evicting the policy's victim, sparing ``protect`` if it can) and mark it
        loading. Raises PoolExhausted when every slot is pinned or loading."""
        if self.free:
            return self._take(key, self._free_slot(key))
        victim = None
        if protect:
            victim = self.policy.victim(lambda k: self.evictable(k) and k not in protect)
        if victim is None:
            victim = self.policy.victim(self.evictable)
        if victim is None:
            raise PoolExhausted(f"all {self.capacity} pool slots are pinned or loading; raise --expert-memory")
        return self._take(key, self._evict_for(victim))

    def reserve_prefetch(self, key: Key, priority: float, protect: Mapping[Key, float] | None = None, *,
                         need: float | None = None) -> int | None:
        """A slot for a prefetch of ``key``: free, or a victim that is not protected at this priority or above
        (``protect``: imminently needed experts and their prefetch priorities) and that the policy lets a prefetch
        replace, given the probability ``need`` (default: ``priority``) that ``key`` runs at its target. None when
        there is none (a prefetch never fails, it is just not done)."""
        if self.free:
            return self._take(key, self._free_slot(key))
        protect = protect or {}
        victim = self.policy.victim(lambda k: self.evictable(k) and protect.get(k, -1.0) < priority)
        if victim is None or not self.policy.admits(key, victim, priority if need is None else need):
            return None
        return self._take(key, self._evict_for(victim))

    def _free_slot(self, key: Key) -> int:
        """A free slot for ``key``: its home (``layer * experts + expert``, modulo the capacity) when that is free,
        so while the pool has room a layer's experts sit side by side and the worker's matmul runs over a window of
        about one layer's slots; otherwise the last freed one."""
        if self.num_experts:
            home = (key[0] * self.num_experts + key[1]) % self.capacity
            if self.owner[home] is None and home in self.free:
                self.free.remove(home)
                return home
        return self.free.pop()

    def _evict_for(self, victim: Key) -> int:
        slot = self.evict(victim)
        self.free.remove(slot)
        return slot

    def _take(self, key: Key, slot: int) -> int:
        self.slot_of[key] = slot
        self.owner[slot] = key
        self.loading.add(key)
        return slot

    def loaded(self, key: Key, *, transient: bool = False) -> None:
        self.loading.discard(key)
        self.policy.on_insert(key, transient=transient)
        self._leave_if_due(key)

    def set_policy(self, policy: EvictionPolicy) -> None:
        """Switch policies live: the new one learns the residents (it starts without their history)."""
        self.policy = policy
        for key in self.slot_of:
            if key not in self.loading:
                policy.on_insert(key)

    def abort(self, key: Key) -> None:
        """A load failed: give its slot back."""
        self.loading.discard(key)
        self.dropped.discard(key)
        slot = self.slot_of.pop(key)
        self.owner[slot] = None
        self._free(slot)

    def evict(self, key: Key) -> int:
        if not self.evictable(key):
            raise AssertionError(f"evicting {key}, which is pinned or loading")
        self.dropped.discard(key)
        slot = self.slot_of.pop(key)
        self.owner[slot] = None
        self._free(slot)
        self.policy.on_remove(key)
        self.counters.evictions += 1
        if self.on_evict is not None:
            self.on_evict(key)
        return slot

    def _free(self, slot: int) -> None:
        if slot < self.capacity:
            self.free.append(slot)
        elif self.on_retire is not None:
            self.on_retire(slot)

    def _leave_if_due(self, key: Key) -> None:
        if self.must_leave(key) and self.evictable(key):
            self.evict(key)

    # ---- live size (admin)
    def shrink(self, capacity: int) -> tuple[int, list[Key]]:
        """Retire the slots from ``capacity`` on: free ones leave the free list, evictable residents are evicted
        now. Returns ``(evicted, pending)``: the pinned or loading residents there leave when released."""
        if not 0 < capacity <= self.capacity:
            raise ValueError(f"cannot shrink {self.capacity} slots to {capacity}")
        self.capacity = capacity
        retired = [s for s in self.free if s >= capacity]
        self.free = [s for s in self.free if s < capacity]
        for slot in retired:
            if self.on_retire is not None:
                self.on_retire(slot)
        return self._evict_all(self.owner[capacity:])

    def grow(self, capacity: int) -> list[int]:
        """Give back the slots up to ``capacity`` (at most the region's); returns those now free."""
        if not self.capacity <= capacity <= self.num_slots:
            raise ValueError(f"cannot grow {self.capacity} slots to {capacity} (the region has {self.num_slots})")
        back = [s for s in range(self.capacity, capacity) if self.owner[s] is None]
        self.capacity = capacity
        self.free[:0] = back[::-1]  # taken after the slots already free, lowest first
        return back

    def drop(self, keep: Collection[Key] = ()) -> tuple[int, list[Key]]:
        """Evict every resident but ``keep``: evictable ones now, pinned or loading ones when released.
        Returns ``(evicted, pending)``."""
        keys = [k for k in self.slot_of if k not in keep]
        self.dropped.update(keys)
        return self._evict_all(keys)

    def _evict_all(self, keys) -> tuple[int, list[Key]]:
        evicted, pending = 0, []
        for key in list(keys):
            if key is None:
                continue
            if self.evictable(key):
                self.evict(key)
                evicted += 1
            else:
                pending.append(key)
        return evicted, pending
