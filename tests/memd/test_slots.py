"""SlotTable + LruPolicy: pure bookkeeping, so every eviction rule is checked without processes."""
import pytest

from services.memd.policy import LruPolicy, make_policy
from services.memd.slots import PoolExhausted, SlotTable


def table(num_slots=4, num_layers=3) -> SlotTable:
    return SlotTable(num_slots, num_layers, LruPolicy())


def load(t: SlotTable, key) -> int:
    """What memd does for a miss: reserve a slot, then mark it loaded."""
    assert not t.record_access(key)
    slot = t.reserve(key)
    t.loaded(key)
    return slot


def test_fills_free_slots_in_order_without_evicting():
    t = table(4)
    slots = [load(t, (0, e)) for e in range(4)]
    assert slots == [0, 1, 2, 3]
    assert t.counters.evictions == 0 and not t.free
    assert all(t.is_resident((0, e)) for e in range(4))
    assert t.owner == [(0, 0), (0, 1), (0, 2), (0, 3)]


def test_a_layers_experts_sit_side_by_side_while_their_homes_are_free():
    t = SlotTable(8, 2, LruPolicy(), num_experts=4)
    assert [load(t, key) for key in [(1, 2), (0, 3), (1, 0), (0, 0)]] == [6, 3, 4, 0]  # home: layer * 4 + expert
    t.shrink(6)  # resize: homes wrap at the live capacity, and a taken home falls back to any free slot
    assert load(t, (1, 1)) == 5 and load(t, (0, 1)) == 1
    assert load(t, (1, 3)) == 2  # home 7 % 6 = 1 is taken


def test_lru_evicts_least_recently_used_first():
    t = table(3)
    a, b, c = (0, 0), (0, 1), (1, 0)
    slot = {k: load(t, k) for k in (a, b, c)}
    assert t.record_access(a)  # a is now the most recent: order b, c, a
    assert t.reserve((2, 0)) == slot[b]
    t.loaded((2, 0))
    assert not t.is_resident(b) and t.owner[slot[b]] == (2, 0)
    assert t.reserve((2, 1)) == slot[c]
    t.loaded((2, 1))
    assert not t.is_resident(c)
    assert t.reserve((2, 2)) == slot[a]  # a goes last
    assert t.counters.evictions == 3


def test_record_access_counts_hits_and_misses_per_layer():
    t = table(4, num_layers=3)
    load(t, (0, 1))
    load(t, (2, 5))
    assert t.record_access((0, 1))
    assert t.record_access((0, 1))
    assert t.record_access((2, 5))
    assert not t.record_access((1, 3))  # a miss does not reserve anything
    assert (1, 3) not in t.slot_of
    c = t.counters
    assert (c.hits, c.misses) == (3, 3)
    assert c.per_layer_hits == [2, 0, 1]
    assert c.per_layer_misses == [1, 1, 1]


def test_loading_key_counts_as_hit_for_the_table():
    t = table(2)
    t.reserve((0, 0))
    assert t.record_access((0, 0))  # already loading: a second requester waits, no second slot
    assert not t.is_resident((0, 0))
    assert len(t.slot_of) == 1


def test_pinned_experts_are_never_evicted():
    t = table(4)
    slot = {(0, e): load(t, (0, e)) for e in range(4)}
    pinned = [(0, 0), (0, 2)]  # the two least recently used
    for key in pinned:
        t.pin(key)
    for e in range(10):  # far more loads than free slots
        load(t, (1, e))
        for key in pinned:
            assert t.is_resident(key) and t.slot_of[key] == slot[key] and t.owner[slot[key]] == key
    assert t.counters.evictions == 10
    # only the two unpinned slots were recycled
    assert {t.slot_of[k] for k in t.slot_of if k[0] == 1} == {slot[(0, 1)], slot[(0, 3)]}


def test_pin_counts_nest_and_unpin_makes_evictable():
    t = table(2)
    a = (0, 0)
    load(t, a)
    load(t, (0, 1))
    t.pin(a)
    t.pin(a)
    t.unpin(a)
    assert not t.evictable(a) and t.num_pinned == 1
    load(t, (1, 0))  # evicts (0, 1), a is still pinned once
    assert t.is_resident(a)
    t.unpin(a)
    assert t.evictable(a) and t.num_pinned == 0
    t.unpin(a)  # unpinning an unpinned key is harmless
    assert t.pins == {}
    t.record_access((1, 0))  # a is now the LRU and evictable
    load(t, (1, 1))
    assert not t.is_resident(a)


def test_loading_experts_are_never_evicted():
    t = table(3)
    loaded = load(t, (0, 0))
    loading = [t.reserve((0, 1)), t.reserve((0, 2))]  # not yet loaded
    assert t.reserve((1, 0)) == loaded  # the only evictable one
    with pytest.raises(PoolExhausted, match="pinned or loading"):
        t.reserve((1, 1))
    assert t.slot_of[(0, 1)] == loading[0] and t.slot_of[(0, 2)] == loading[1]
    assert not t.evictable((0, 1))
    with pytest.raises(AssertionError):
        t.evict((0, 1))


def test_pool_exhausted_when_everything_is_pinned():
    t = table(3)
    for e in range(3):
        load(t, (0, e))
        t.pin((0, e))
    with pytest.raises(PoolExhausted, match="all 3 pool slots are pinned or loading; raise --expert-memory"):
        t.reserve((1, 0))
    assert (1, 0) not in t.slot_of  # a failed reserve leaves no trace
    assert t.counters.evictions == 0 and all(t.is_resident((0, e)) for e in range(3))
    t.unpin((0, 1))
    assert t.reserve((1, 0)) == t.owner.index((1, 0)) == 1


def test_abort_returns_the_slot():
    t = table(2)
    load(t, (0, 0))
    slot = t.reserve((0, 1))
    t.abort((0, 1))
    assert (0, 1) not in t.slot_of and t.owner[slot] is None and slot in t.free
    assert not t.is_resident((0, 1)) and (0, 1) not in t.loading
    assert t.reserve((1, 0)) == slot  # reused without evicting
    assert t.counters.evictions == 0 and t.is_resident((0, 0))


def test_resident_per_layer_and_num_pinned():
    t = table(5, num_layers=3)
    for key in [(0, 0), (0, 1), (2, 3)]:
        load(t, key)
    t.pin((2, 3))
    assert t.resident_per_layer(3) == [2, 0, 1]
    assert t.num_pinned == 1
    t.reserve((1, 4))  # a slot being read is not resident yet (as the pool's ``resident`` counts)
    assert t.resident_per_layer(3) == [2, 0, 1]


def test_make_policy():
    assert isinstance(make_policy("lru"), LruPolicy)
    with pytest.raises(ValueError, match="unknown policy 'mru'; choose one of lru"):
        make_policy("mru")


def test_lru_policy_victim_skips_unevictable():
    p = LruPolicy()
    for k in [(0, 0), (0, 1), (0, 2)]:
        p.on_insert(k)
    p.on_access((0, 0))
    assert p.victim(lambda k: True) == (0, 1)
    assert p.victim(lambda k: k != (0, 1)) == (0, 2)
    p.on_remove((0, 2))
    assert p.victim(lambda k: k != (0, 1)) == (0, 0)
    assert p.victim(lambda k: False) is None


def test_only_the_acquire_being_answered_gives_its_workers_leases_back_while_it_waits():
    """An acquire that failed leaves its other loads' waits behind for a while; the worker was told the error and
    leased anew since: those waits must not take its new leases back (nobody would tell it)."""
    from types import SimpleNamespace

    from services.memd.leases import ConnectedWorker
    from services.memd.server import MemdServer

    t = table(4, num_layers=2)
    client = ConnectedWorker(pid=1)
    for key in [(0, 0), (0, 1)]:
        load(t, key)
    client.lease(t, [(0, 0), (0, 1)])
    server = SimpleNamespace(table=t, clients={b"w": client}, reclaim_leases=lambda but=None: None)
    failed, current = SimpleNamespace(lease=True), SimpleNamespace(lease=True)
    client.acquiring = current
    revoked: list = []
    assert not MemdServer._wait_for_slots(server, client, failed, [(1, 0)], revoked)
    assert revoked == [] and client.leases == {(0, 0), (0, 1)}
    assert MemdServer._wait_for_slots(server, client, current, [(1, 0)], revoked)
    assert sorted(revoked) == [(0, 0), (0, 1)] and not client.leases and t.num_pinned == 0
