"""The slot table: which expert lives in which pool slot, which are pinned, which are loading.

Pure bookkeeping (no I/O, no asyncio), so every rule is unit-testable: pinned or loading experts are never
evicted; the policy only ever sees evictable residents.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from services.memd.policy import EvictionPolicy, Key


class PoolExhausted(RuntimeError):
    pass


@dataclass(slots=True)
class Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    stall_seconds: float = 0.0
    per_layer_hits: list[int] = field(default_factory=list)
    per_layer_misses: list[int] = field(default_factory=list)


class SlotTable:
    def __init__(self, num_slots: int, num_layers: int, policy: EvictionPolicy):
        self.num_slots = num_slots
        self.policy = policy
        self.slot_of: dict[Key, int] = {}  # resident or loading
        self.owner: list[Key | None] = [None] * num_slots
        self.free: list[int] = list(range(num_slots - 1, -1, -1))
        self.pins: dict[Key, int] = {}
        self.loading: set[Key] = set()
        self.counters = Counters(per_layer_hits=[0] * num_layers, per_layer_misses=[0] * num_layers)

    # ---- queries
    def is_resident(self, key: Key) -> bool:
        return key in self.slot_of and key not in self.loading

    def evictable(self, key: Key) -> bool:
        return key in self.slot_of and key not in self.loading and not self.pins.get(key)

    @property
    def num_pinned(self) -> int:
        return len(self.pins)

    def resident_per_layer(self, num_layers: int) -> list[int]:
        counts = [0] * num_layers
        for (layer, _), _slot in self.slot_of.items():
            counts[layer] += 1
        return counts

    # ---- transitions
    def pin(self, key: Key) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, key: Key) -> None:
        n = self.pins.get(key, 0)
        if n <= 1:
            self.pins.pop(key, None)
        else:
            self.pins[key] = n - 1

    def record_access(self, key: Key) -> bool:
        """Count a hit or a miss for ``key``; True when it is resident (or already loading)."""
        layer = key[0]
        hit = key in self.slot_of
        if hit:
            self.counters.hits += 1
            self.counters.per_layer_hits[layer] += 1
            self.policy.on_access(key)
        else:
            self.counters.misses += 1
            self.counters.per_layer_misses[layer] += 1
        return hit

    def reserve(self, key: Key) -> int:
        """Give ``key`` a slot (free, or evicting the policy's victim) and mark it loading."""
        if self.free:
            slot = self.free.pop()
        else:
            victim = self.policy.victim(self.evictable)
            if victim is None:
                raise PoolExhausted(f"all {self.num_slots} pool slots are pinned or loading; raise --expert-memory")
            slot = self.evict(victim)
            self.free.remove(slot)
        self.slot_of[key] = slot
        self.owner[slot] = key
        self.loading.add(key)
        return slot

    def loaded(self, key: Key) -> None:
        self.loading.discard(key)
        self.policy.on_insert(key)

    def abort(self, key: Key) -> None:
        """A load failed: give its slot back."""
        self.loading.discard(key)
        slot = self.slot_of.pop(key)
        self.owner[slot] = None
        self.free.append(slot)

    def evict(self, key: Key) -> int:
        if not self.evictable(key):
            raise AssertionError(f"evicting {key}, which is pinned or loading")
        slot = self.slot_of.pop(key)
        self.owner[slot] = None
        self.free.append(slot)
        self.policy.on_remove(key)
        self.counters.evictions += 1
        return slot
