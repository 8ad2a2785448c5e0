"""Lease pressure in-process: memd revokes only the shortfall, in the policy's victim order, and never a slot the
worker is using (the current layer's experts, one still loading, one it also pinned explicitly)."""
from services.memd.leases import ConnectedWorker
from services.memd.policy import LruPolicy
from services.memd.slots import SlotTable


def leased_table(keys):
    table = SlotTable(len(keys), 4, LruPolicy())
    client = ConnectedWorker(pid=1, ready=True)
    for key in keys:
        table.reserve(key)
        table.loaded(key)
        table.record_access(key)
    client.lease(table, list(keys))
    return table, client


def test_pressure_revokes_the_shortfall_in_victim_order():
    keys = [(0, e) for e in range(6)]
    table, client = leased_table(keys)
    for key in [(0, 3), (0, 1), (0, 5), (0, 0), (0, 4), (0, 2)]:  # recency: (0, 3) least recent
        table.policy.on_access(key)
    revoked = client.lease(table, [(1, 0), (1, 1)], shortfall=2)
    assert revoked == [(0, 3), (0, 1)]
    assert client.leases == {(0, 5), (0, 0), (0, 4), (0, 2), (1, 0), (1, 1)}
    assert all(table.evictable(k) for k in revoked) and not any(table.evictable(k) for k in client.leases)


def test_the_current_layer_and_slots_in_use_are_never_revoked():
    keys = [(0, e) for e in range(4)] + [(1, 0)]
    table, client = leased_table(keys)
    client.pin(table, [(0, 1)])  # also pinned explicitly: in use
    table.loading.add((0, 2))  # still loading
    revoked = client.lease(table, [(0, 0), (1, 1)], shortfall=10)  # (0, 0) is acquired again now
    assert set(revoked) == {(0, 3), (1, 0)}
    assert {(0, 0), (0, 1), (0, 2)} <= client.leases


def test_a_reclaim_takes_back_all_but_the_current_layer():
    table, client = leased_table([(0, 0), (0, 1), (1, 0)])
    client.reclaim = True
    assert set(client.lease(table, [(1, 0)], shortfall=0)) == {(0, 0), (0, 1)}
    assert client.leases == {(1, 0)} and not client.reclaim


def test_no_shortfall_revokes_nothing():
    table, client = leased_table([(0, 0), (0, 1)])
    assert client.lease(table, [(2, 0)], shortfall=0) == []


def test_leases_in_retired_slots_go_but_do_not_count_against_the_shortfall():
    """After a shrink, a lease kept through the reclaim (it was the current layer) sits in a retired slot: revoking
    it frees no live slot, so pressure revokes it (it is leaving anyway) and still the whole shortfall of live ones."""
    keys = [(0, 0), (0, 1), (1, 0), (1, 1)]
    table, client = leased_table(keys)
    retired_keys = [k for k in keys if table.slot_of[k] >= 2]
    assert table.shrink(2) == (0, retired_keys)  # all leased: they leave when released
    live = [k for k in keys if k not in retired_keys]
    for key in retired_keys + live:  # the retired ones are the policy's first victims
        table.policy.on_access(key)
    revoked = client.lease(table, [(2, 0), (2, 1)], shortfall=2)
    assert set(revoked) == set(keys)
    assert all(k not in table.slot_of for k in retired_keys)  # gone with their slots
    assert all(table.evictable(k) for k in live)
    assert table.reserve((2, 0)) in (0, 1) and table.reserve((2, 1)) in (0, 1)


def test_the_shortfall_keeps_a_reserve_for_prefetches_and_does_not_count_unused_prefetches_as_room():
    from services.memd.leases import shortfall

    keys = [(0, e) for e in range(6)]
    table, client = leased_table(keys)
    assert shortfall(table, [(0, 0)]) == 0 and shortfall(table, [(1, 0)]) == 1  # full, every resident leased
    assert shortfall(table, [(1, 0)], reserve=2) == 3  # and two more kept unleased, for prefetches
    client.lease(table, [(0, 0)], shortfall=3)  # three revoked: evictable now
    assert shortfall(table, [(1, 0)], reserve=2) == 0
    evictable = [k for k in keys if table.evictable(k)]
    assert len(evictable) == 3
    assert shortfall(table, [(1, 0)], reserve=2, spare=evictable[:1]) == 1  # a prefetch not used yet is no room


def test_room_ranks_the_workers_leases_with_the_unleased_residents():
    """An acquire's misses evict the policy's best victims now: a lease that ranks before the residents left
    unleased by earlier acquires is revoked for them, and the unleased ones the policy ranks later stay."""
    from services.memd.leases import room

    keys = [(0, e) for e in range(6)]
    table, client = leased_table(keys)
    client.lease(table, [(0, 5)], shortfall=2)  # (0, 0) and (0, 1) unleased: evictable
    for key in [(0, 3), (0, 0), (0, 1), (0, 2), (0, 4), (0, 5)]:  # now (0, 3), a lease, is least recent
        table.policy.on_access(key)
    wanted = [(1, 0)]
    assert room(table, wanted) == 1 and shortfall_of(table, wanted) == 0  # enough room without revoking
    assert client.lease(table, wanted, shortfall=0, room=1) == [(0, 3)]
    assert table.policy.victim(table.evictable) == (0, 3)  # the miss evicts it, not (0, 0)
    assert client.lease(table, [(1, 1)], shortfall=0, room=1, spare={(0, 3)}) == []  # (0, 0) next: not leased


def shortfall_of(table, keys):
    from services.memd.leases import shortfall

    return shortfall(table, keys)
