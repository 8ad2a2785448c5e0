"""What each attached worker holds: explicit pins (acquire ... release) and leases (acquire ... revoke).

A lease is one pin per (worker, expert), however often the worker acquires it. The worker keeps using a leased
expert's slot with no message at all (an all-leased layer costs it no round trip); memd takes leases back only
while that worker is blocked in an acquire, so a revoked slot is never in use:

* an acquire that needs more slots than are free or evictable revokes just the shortfall of that worker's other
  leases, picked in the eviction policy's victim order (never one of the current layer's experts, never one still
  loading or pinned by anyone else): pressure evicts by policy, as it would without leases. The shortfall counts
  a small reserve of slots kept free or evictable (one lookahead's worth of experts, ``prefetch_reserve``): a
  prefetch may only take a slot nobody holds, and without it every resident would be leased;
* ``reclaim`` (the admin's drop and resize, another worker under pressure) flags a worker and bumps the revoke
  epoch on the control page; the worker reads the epoch before each layer and, when it moved, asks memd instead of
  using its leases, and that acquire revokes everything but the current layer;
* an error reply to a lease acquire ends all of that worker's leases (it forgets them too), and so does
  RETURN_LEASES (a worker going idle) or the worker's death: a dead worker's pins and leases go, nobody else's.

Several workers share the pool. An acquire that finds no slot while other workers hold experts waits for them
(``others_hold``: their leases are asked back) instead of failing; for every worker's current layer to fit at
once, the pool should hold one MoE layer's experts per attached worker (``room_error``: memd warns when not).
"""
from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field

from common.procs import pid_alive
from services.memd.loads import SLOT_WAIT_S
from services.memd.policy import Key
from services.memd.pool import SharedPool
from services.memd.slots import SlotTable

CONTROL_BYTES = 4096
EPOCH = struct.Struct("<q")  # offset 0 of the control page


def shortfall(table: SlotTable, keys: list[Key], reserve: int = 0, spare: Collection[Key] = ()) -> int:
    """The leases a lease acquire must revoke: the slots ``keys`` need, plus ``reserve`` slots kept free or evictable
    for prefetches (``ExpertCache.prefetch_reserve``), beyond the free and the evictable ones. Without the reserve
    a worker would lease every resident and a prefetch would find no slot it may take. ``spare``: residents not to
    count as room (prefetches not used yet: evicting them for this layer would throw away the next one's reads)."""
    need = room(table, keys, reserve)
    if need <= 0:
        return 0
    wanted = set(keys)
    for key in table.slot_of:  # stops as soon as enough are evictable
        if table.evictable(key) and key not in wanted and key not in spare:
            need -= 1
            if need == 0:
                return 0
    return need


def room(table: SlotTable, keys: list[Key], reserve: int = 0) -> int:
    """The slots a lease acquire of ``keys`` wants evictable: its misses and ``reserve``, beyond the free ones."""
    return max(0, sum(k not in table.slot_of for k in keys) + reserve - len(table.free))


class ControlPage:
    """A page of shared memory memd writes and workers read: the revoke epoch (int64 at offset 0)."""

    def __init__(self, name: str):
        self.region = SharedPool(name, CONTROL_BYTES)
        self.name = name
        self.epoch = 0
        EPOCH.pack_into(self.region.view, 0, 0)

    def bump(self) -> int:
        self.epoch += 1
        EPOCH.pack_into(self.region.view, 0, self.epoch)
        return self.epoch

    def close(self) -> None:
        self.region.close()


@dataclass(slots=True)
class ConnectedWorker:
    pid: int
    ready: bool = False
    pins: Counter = field(default_factory=Counter)  # explicit pins: key -> acquires not yet released
    leases: set[Key] = field(default_factory=set)
    reclaim: bool = False  # give back every lease at the next acquire
    acquiring: object = None  # the acquire being answered: only its waits for slots may give leases back
    read_events: list = field(default_factory=list)  # its "done reading" events, opened (Pool.open_events)
    speculate_max: int = 0  # the most MoE layers ahead it guesses (READY)

    @property
    def held(self) -> int:
        return sum(self.pins.values()) + len(self.leases)

    def pin(self, table: SlotTable, keys: list[Key]) -> None:
        for key in keys:
            table.pin(key)
            self.pins[key] += 1

    def release(self, table: SlotTable, keys: list[Key], read_done: list[int], fences) -> None:
        """A RELEASE: unpin ``keys``, whose slots the worker's GPU reads until its event ``read_done[0]`` (a rewrite
        waits for it; ``fences``: the tiers' SlotFences, None for a pool the worker reads synchronously)."""
        try:
            if fences is not None and read_done and 0 <= read_done[0] < len(self.read_events):
                event = self.read_events[read_done[0]]
                for key in keys:
                    if (slot := table.slot_of.get(key)) is not None:
                        fences.read_done(slot, event)
        finally:
            self.unpin(table, keys)

    def unpin(self, table: SlotTable, keys) -> None:
        for key in keys:
            if self.pins[key] > 0:
                self.pins[key] -= 1
                if not self.pins[key]:
                    del self.pins[key]
                table.unpin(key)

    def lease(self, table: SlotTable, keys: list[Key], *, shortfall: int = 0, room: int = 0,
              spare: Collection[Key] = ()) -> list[Key]:
        """Lease ``keys``; first take back other leases: those among the policy's first ``room`` victims (the slots
        this acquire wants evictable: its misses and the prefetch reserve, beyond the free ones), counting this
        worker's leases and the unleased residents alike, but not ``spare``; then, if still fewer than
        ``shortfall``, the policy's next victims among its leases. Or every other lease when a reclaim is pending.
        Returns the revoked keys (already unpinned: the worker is waiting for this reply and uses none of them)."""
        wanted = set(keys)
        if self.reclaim:
            revoked = [k for k in self.leases if k not in wanted]
            self._unlease(table, revoked)
            self.reclaim = False
        else:
            revoked = self.revoke_victims(table, wanted, shortfall, room=room, spare=spare)
        for key in keys:
            if key not in self.leases:
                self.leases.add(key)
                table.pin(key)
        return revoked

    def revoke_victims(self, table: SlotTable, wanted: set[Key], count: int, *, room: int = 0,
                       spare: Collection[Key] = ()) -> list[Key]:
        """Unlease this worker's leases outside ``wanted`` that are among the policy's first ``room`` victims (its
        leases and the evictable residents outside ``spare`` ranked together), then up to ``count`` in all, in the
        policy's victim order; only leases whose slot this lease alone holds (once unleased they are evictable) are
        candidates. Ranking both together matters: the unleased residents were left so by earlier acquires, when the
        policy ranked the experts from another layer, so a lease may now be the better victim (the activation
        policy's ranking follows the running layer). Leases of experts that are leaving (a retired slot after a
        shrink, or dropped) go first and do not count: unleased, they leave and free no live slot, so counting them
        would leave the acquire short."""
        def candidate(key: Key) -> bool:
            return (key in self.leases and key not in wanted and key not in table.loading
                    and not self.pins.get(key) and table.pins.get(key, 0) == 1)

        leaving = [k for k in self.leases if table.must_leave(k) and candidate(k)]
        self._unlease(table, leaving)
        first = table.policy.victims(lambda k: k not in wanted and k not in spare
                                     and (candidate(k) or table.evictable(k)), room)
        revoked = [k for k in first if k in self.leases]
        self._unlease(table, revoked)
        while len(revoked) < count:
            victim = table.policy.victim(candidate)
            if victim is None:
                break
            self._unlease(table, [victim])
            revoked.append(victim)
        return leaving + revoked

    def give_back_unwanted(self, table: SlotTable, wanted: Collection[Key]) -> list[Key]:
        """This worker waits for an acquire of ``wanted`` that finds no slot: its other leases go back (it uses none
        of them until the reply, which lists them). Those it shared with another worker were no candidates when the
        acquire began; once the other let go, they alone may be what keeps the slots it waits for."""
        keep = set(wanted)
        extra = [k for k in self.leases if k not in keep]
        self._unlease(table, extra)
        return extra

    def return_leases(self, table: SlotTable) -> int:
        count = len(self.leases)
        self._unlease(table, list(self.leases))
        self.reclaim = False
        return count

    def release_all(self, table: SlotTable) -> None:
        """The worker is gone: everything it held is free."""
        self.return_leases(table)
        for key, n in list(self.pins.items()):
            for _ in range(n):
                table.unpin(key)
        self.pins.clear()

    def _unlease(self, table: SlotTable, keys: list[Key]) -> None:
        for key in keys:
            self.leases.discard(key)
            table.unpin(key)


def others_hold(clients, client: ConnectedWorker, reclaim) -> bool:
    """Do workers other than ``client`` hold experts? ``reclaim()`` asks for leases not asked back yet."""
    others = [c for c in clients if c is not client and c.held]
    if any(c.leases and not c.reclaim for c in others):
        reclaim()
    return bool(others)


def ahead_limit(clients, num_layers: int) -> int:
    """The most MoE layers ahead any ready worker guesses (READY's ``speculate_max``): memd's lookahead k stays
    within it, so its prefetch reserve and the guesses it waits for are ones a worker sends (all the layers but one
    while none has said)."""
    said = [c.speculate_max for c in clients if c.ready and c.speculate_max]
    return max(1, min(num_layers - 1, max(said))) if said else max(1, num_layers - 1)


def room_error(clients, table: SlotTable, store) -> str | None:
    """Why one more worker does not fit (each needs one MoE layer's experts at once), or None."""
    capacity, per_layer = table.capacity, store.num_experts
    live = sum(1 for c in clients if pid_alive(c.pid))
    if (live + 1) * per_layer <= capacity:
        return None
    return (f"{live + 1} workers are attached but the pool's {capacity} slots hold the {per_layer} experts of one MoE"
            f" layer for only {capacity // per_layer} of them at once: busy workers will wait for each other, and an"
            f" acquire that waits over {SLOT_WAIT_S:g}s fails; raise --expert-memory or run fewer workers")
