"""The two-tier load path (services/memd/tiers.py) against the host-memory stand-in for the device pool: host
miss = disk read into the host tier + one copy, host hit = one copy, eviction in both tiers, nothing evicted
from the host tier while its copy is in flight, cancellation, resize by chunks, and the event ordering
contract (write-after-read: a write waits for the slot's readers; read-after-write: the slot's write event)."""
import mmap
import os
import time

import pytest

from services.memd.policy import LruPolicy
from services.memd.read_jobs import ReadCancelled
from services.memd.reader import ExpertReader
from services.memd.slots import SlotTable
from services.memd.standin import Fence, StandInPool, StandInStream
from services.memd.tiers import TieredReader
from tier_helpers import contiguous, fake_store

SLOT = 64 * 1024


LAYERS, EXPERTS = 2, 3
KEYS = [(layer, e) for layer in range(LAYERS) for e in range(EXPERTS)]
TIMEOUT = 30


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "experts.bin"
    payload = os.urandom(len(KEYS) * SLOT)
    path.write_bytes(payload)
    return path, payload


def expert(payload: bytes, key) -> bytes:
    i = KEYS.index(key)
    return payload[i * SLOT:(i + 1) * SLOT]


class Rig:
    def __init__(self, path, host_slots: int, device_slots: int, *, auto: bool = True, chunk_slots: int = 2,
                 ring: int = 0):
        self.buf = mmap.mmap(-1, host_slots * SLOT)
        self.reader = ExpertReader(fake_store(path, contiguous(path, KEYS, SLOT)), memoryview(self.buf), SLOT, False,
                                   threads=2)
        self.host = TieredReader.host_table(host_slots, LAYERS, EXPERTS)
        self.device = StandInPool(device_slots * SLOT, SLOT, chunk_slots, StandInStream(auto=auto), ring)
        self.tiers = TieredReader(self.reader, self.host, memoryview(self.buf), self.device, SLOT)

    def load(self, key, slot, **kw):
        return self.tiers.submit(key, slot, demand=kw.pop("demand", True), **kw)

    def close(self):
        self.tiers.close()


@pytest.fixture
def rig_factory(data):
    rigs = []

    def make(*args, **kw):
        rigs.append(Rig(data[0], *args, **kw))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def test_host_miss_reads_then_copies_and_host_hit_only_copies(rig_factory, data):
    payload = data[1]
    rig = rig_factory(host_slots=4, device_slots=4)
    nbytes, _ = rig.load((1, 2), 0).future.result(TIMEOUT)
    assert nbytes == SLOT and rig.device.read(0, SLOT) == expert(payload, (1, 2))
    assert rig.host.is_resident((1, 2)) and not rig.host.pins  # cached, and no longer pinned by the copy
    nbytes, _ = rig.load((1, 2), 3).future.result(TIMEOUT)  # the device evicted it; the host tier still holds it
    assert nbytes == 0 and rig.device.read(3 * SLOT, SLOT) == expert(payload, (1, 2))
    s = rig.tiers.stats
    assert (s.host_misses, s.host_hits, s.copies, s.copy_bytes) == (1, 1, 2, 2 * SLOT)
    assert rig.device.demand_stream.log == ["write 0", "write 3"] and rig.device.stream.log == []


def test_host_tier_evicts_by_its_own_policy_and_never_a_slot_being_copied(rig_factory, data):
    payload = data[1]
    rig = rig_factory(host_slots=2, device_slots=4, auto=False)
    a = rig.load((0, 0), 0)
    _wait_ops(rig, 1)  # (its copy queued first: copies end, and unpin their host slots, in that order)
    b = rig.load((0, 1), 1)
    _wait_ops(rig, 2)  # both reads landed and queued their copies
    first = rig.load((0, 2), 2)  # both host slots are read into or copied from: neither may go, so it waits
    assert not a.future.done() and rig.device.read(0, 8) == bytes(8)  # copy queued, not run: the device is untouched
    assert rig.tiers.waiting == [first] and rig.tiers.queued() >= 1
    rig.device.run()
    a.future.result(TIMEOUT), b.future.result(TIMEOUT)
    _wait_ops(rig, 1)  # a copy done, its host slot unpinned: the waiting job took it and read
    rig.device.run()
    first.future.result(TIMEOUT)
    assert rig.host.counters.evictions == 1 and not rig.tiers.waiting
    again = rig.load((0, 1), 3)  # a host hit: (0, 1) is now used more than (0, 0)
    _wait_ops(rig, 1)
    rig.device.run()
    assert again.future.result(TIMEOUT)[0] == 0
    c = rig.load((1, 0), 0)  # the host tier is full: LFU evicts the less used of (0, 2) and (0, 1): (0, 2)
    _wait_ops(rig, 1)
    rig.device.run()
    c.future.result(TIMEOUT)
    assert rig.host.is_resident((0, 1)) and rig.host.is_resident((1, 0)) and not rig.host.is_resident((0, 2))
    assert rig.host.counters.evictions == 2 and rig.device.read(0, SLOT) == expert(payload, (1, 0))


def _wait_ops(rig, n):
    deadline = time.monotonic() + TIMEOUT
    while rig.device.queued() < n:
        assert time.monotonic() < deadline, "the copy was never queued"
        time.sleep(0.01)


def test_write_after_read_waits_for_the_slots_readers_and_read_after_write_is_the_write_event(rig_factory, data):
    payload = data[1]
    rig = rig_factory(host_slots=4, device_slots=2)
    rig.load((0, 0), 0).future.result(TIMEOUT)
    reading = Fence()  # the worker's layer that reads slot 0 is still queued on its stream
    rig.tiers.fences.read_done(0, reading)
    job = rig.load((1, 1), 0)  # the device tier evicted (0, 0) for (1, 1): same slot
    _wait_ops(rig, 1)  # (read first: a copy queued ahead of it would run at once)
    later = rig.load((1, 0), 1)
    _wait_ops(rig, 2)  # both read from disk; their copies queue behind the reader's fence
    assert not job.future.done() and not later.future.done()  # in-order stream: the later write waits too
    assert rig.device.read(0, SLOT) == expert(payload, (0, 0))  # the reader still sees the old expert
    assert not rig.tiers.fences.ready(0).done()  # a reader of slot 0 now must wait for the write
    reading.signal()
    job.future.result(TIMEOUT), later.future.result(TIMEOUT)
    assert rig.device.read(0, SLOT) == expert(payload, (1, 1)) and rig.tiers.fences.ready(0).done()
    assert rig.device.demand_stream.log == ["write 0", "write 0", "write 1"]
    assert rig.tiers.fences.before_write(0) == ()  # the fence was consumed by the write it ordered


def test_device_eviction_and_shrink_free_whole_chunks(rig_factory):
    rig = rig_factory(host_slots=4, device_slots=4, chunk_slots=2)
    table = SlotTable(4, LAYERS, LruPolicy(), EXPERTS, on_retire=lambda slot: rig.device.release(slot * SLOT, SLOT))
    for key in KEYS[:4]:
        slot = table.reserve(key)
        rig.load(key, slot).future.result(TIMEOUT)
        table.loaded(key)
    evicted, pending = table.shrink(3)
    assert (evicted, pending) == (1, []) and rig.device.frees == 0  # chunk 1 still holds slot 2
    table.shrink(2)
    assert rig.device.frees == 1 and rig.device.resident_bytes() == 2 * SLOT
    key = KEYS[4]
    slot = table.reserve(key)  # the device tier evicts within the two slots left
    assert slot < 2
    rig.load(key, slot).future.result(TIMEOUT)
    with pytest.raises(RuntimeError, match="restart memd"):
        rig.device.ensure(2 * SLOT, 2 * SLOT)


def test_cancelled_read_frees_its_host_slot(rig_factory):
    rig = rig_factory(host_slots=2, device_slots=2)
    rig.reader.close()  # queued jobs are cancelled from now on: a prefetch that never reads
    rig.reader._closing = False
    job = rig.load((0, 0), 0, demand=False)
    rig.tiers.cancel(job)
    with pytest.raises((ReadCancelled, RuntimeError)):
        job.future.result(TIMEOUT)
    assert not rig.host.slot_of and not rig.host.pins and not rig.tiers.loading


def test_submit_refuses_a_slot_outside_the_device_pool(rig_factory):
    rig = rig_factory(host_slots=2, device_slots=2)
    with pytest.raises(ValueError, match="slot 2 is outside the device pool"):
        rig.load((0, 0), 2)


def test_loads_and_the_core_drive_the_tiers_unchanged(rig_factory, data):
    """The decision core's on-demand loads through ``Loads``, with the tiers in the reader's place: the device
    tier evicts by its policy, every slot holds its expert's bytes, the host tier serves the second round."""
    import asyncio

    from services.memd.core import ExpertCache, CacheSettings
    from services.memd.loads import Loads

    payload = data[1]
    rig = rig_factory(host_slots=len(KEYS), device_slots=4)
    core = ExpertCache(4, LAYERS, EXPERTS, top_k=2, expert_bytes=SLOT, knobs=CacheSettings(policy="lru"))
    loads = Loads(core, rig.tiers)

    async def load_all():
        for key in KEYS + KEYS[:2]:  # 8 loads into 4 device slots: evictions in the device tier
            await loads.start(key, core.reserve_demand(key, False), demand=True)

    asyncio.run(load_all())
    table = core.table
    assert table.counters.evictions == 4 and len(table.slot_of) == 4
    for key, slot in table.slot_of.items():
        assert rig.device.read(slot * SLOT, SLOT) == expert(payload, key)
    assert (rig.tiers.stats.host_misses, rig.tiers.stats.host_hits) == (len(KEYS), 2)


def test_a_demand_copy_never_queues_behind_a_held_back_prefetch_copy():
    """Two copy streams: a prefetch write held back by a reader's fence leaves a demand write to another slot
    free to run; a demand write into the prefetch's own slot waits for it (write-after-write across streams)."""
    from services.memd.tiers import SlotFences

    pool, fences = StandInPool(4 * SLOT, SLOT, 2), SlotFences()
    reading = Fence()
    fences.read_done(1, reading)  # the worker still reads slot 1's old expert
    prefetch = pool.write(SLOT, memoryview(b"\x01" * SLOT), after=fences.before_write(1))
    fences.wrote(1, prefetch)
    demand = pool.write(2 * SLOT, memoryview(b"\x02" * SLOT), after=fences.before_write(2), demand=True)
    assert demand.done() and not prefetch.done() and pool.read(2 * SLOT, 1) == b"\x02"
    same_slot = pool.write(SLOT, memoryview(b"\x03" * SLOT), after=fences.before_write(1), demand=True)
    assert not same_slot.done() and pool.read(SLOT, 1) == b"\x00"
    reading.signal()
    same_slot.wait()
    assert prefetch.done() and pool.read(SLOT, 1) == b"\x03"
    assert pool.stream.log == ["write 1"] and pool.demand_stream.log == ["write 2", "write 1"]


def test_demand_loads_copy_on_the_demand_stream_and_prefetches_on_the_other(rig_factory, data):
    rig = rig_factory(host_slots=4, device_slots=4)
    rig.load((0, 1), 1, demand=False).future.result(TIMEOUT)
    rig.load((1, 0), 2).future.result(TIMEOUT)
    assert rig.device.stream.log == ["write 1"] and rig.device.demand_stream.log == ["write 2"]
    assert rig.device.read(2 * SLOT, SLOT) == expert(data[1], (1, 0))


def test_with_an_event_ring_a_load_is_done_once_its_copy_is_queued_and_the_reply_names_the_event(rig_factory, data):
    """``--copy-events ipc``: memd answers without waiting for the copy; the worker's stream waits on the ring
    entries ``pending_events`` names for the slots, which are gone once the copies ran."""
    rig = rig_factory(host_slots=4, device_slots=4, auto=False, ring=3)
    first, second = rig.load((0, 1), 2), rig.load((1, 2), 3, demand=False)
    first.future.result(TIMEOUT), second.future.result(TIMEOUT)  # done: the copies are queued, not run
    assert rig.device.read(2 * SLOT, SLOT) == bytes(SLOT) and rig.device.queued() == 2
    assert rig.tiers.pending_events([2, 3]) == sorted({rig.tiers.fences.ready(2).ring, rig.tiers.fences.ready(3).ring})
    assert len(rig.tiers.pending_events([2, 3])) == 2 and rig.tiers.pending_events([0, 1]) == []
    assert rig.host.pins  # the host slots stay pinned until the copies have read them
    rig.device.run()
    deadline = time.monotonic() + TIMEOUT
    while rig.host.pins:
        assert time.monotonic() < deadline, "the copies' ends were not noticed"
        time.sleep(0.01)
    assert rig.tiers.pending_events([2, 3]) == [] and rig.device.read(2 * SLOT, SLOT) == expert(data[1], (0, 1))
    assert rig.tiers.stats.copies == 2


def test_without_an_event_ring_a_load_is_done_when_its_copy_is(rig_factory):
    rig = rig_factory(host_slots=4, device_slots=4, auto=False)
    job = rig.load((0, 1), 2)
    _wait_ops(rig, 1)
    assert not job.future.done() and rig.tiers.pending_events([2]) == []
    rig.device.run()
    job.future.result(TIMEOUT)


def test_busy_rate_counts_overlapping_loads_once():
    from services.memd.read_jobs import BusyRate

    rate = BusyRate()
    assert rate.rate is None
    rate.begin(0.0), rate.begin(1.0)
    rate.end(2.0, 10)
    assert rate.rate is None  # a load is still under way: the period is open
    rate.end(4.0, 10)
    assert rate.rate == 20 / 4
    rate.begin(10.0), rate.end(11.0, 3)
    assert rate.rate == pytest.approx((20 * 0.9 + 3) / (4 * 0.9 + 1))


def test_the_tiers_bandwidth_is_what_device_loads_take_host_hits_included(rig_factory):
    """The planner and the guesses' lookahead read ``bandwidth``: on a GPU host most loads are host hits, an H2D
    copy, far faster than the disk; every load ends its clock, a cancelled one too."""
    rig = rig_factory(host_slots=4, device_slots=2)
    assert rig.tiers.bandwidth is None
    rig.load((0, 1), 0).future.result(TIMEOUT)
    rig.load((0, 1), 1).future.result(TIMEOUT)  # a host hit
    deadline = time.monotonic() + TIMEOUT
    while rig.tiers._rate.active:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert rig.tiers.bandwidth == rig.tiers._rate.rate > 0  # two periods: the first one decayed once
    assert rig.tiers._rate.bytes == pytest.approx(SLOT * 0.9 + SLOT)
    rig.reader.close()
    rig.reader._closing = False
    job = rig.load((1, 1), 0, demand=False)
    rig.tiers.cancel(job)
    with pytest.raises((ReadCancelled, RuntimeError)):
        job.future.result(TIMEOUT)
    assert rig.tiers._rate.active == 0


def test_a_copy_that_fails_after_its_answer_stops_memd_and_refuses_new_loads(rig_factory):
    """With the event ring the acquire was answered before the copy ran: a slot memd calls resident would hold
    unknown bytes, so memd stops (``on_fatal``; by default SIGTERM to itself) and takes no new load meanwhile."""
    from services.memd.pools import Completion

    class Failed(Completion):
        ring = 0

        def done(self):
            return False

        def wait(self):
            raise RuntimeError("cudaErrorIllegalAddress")

    rig = rig_factory(host_slots=4, device_slots=4, ring=2)
    told = []
    rig.tiers.on_fatal = told.append
    rig.device.write = lambda *a, **kw: Failed()
    rig.load((0, 1), 2).future.result(TIMEOUT)  # answered: the copy was queued
    deadline = time.monotonic() + TIMEOUT
    while not told:
        assert time.monotonic() < deadline, "the failed copy was not reported"
        time.sleep(0.01)
    assert "device slot 2" in told[0] and "cudaErrorIllegalAddress" in told[0] and "restart memd" in told[0]
    assert not rig.host.pins and rig.tiers._rate.active == 0
    with pytest.raises(RuntimeError, match="restart memd"):
        rig.load((1, 1), 3)


def test_a_ring_entry_is_reused_only_once_its_last_copy_is_done():
    """As ``EventRing``: a worker told an entry waits for that copy or a later one, never less."""
    import threading

    pool, reading = StandInPool(4 * SLOT, SLOT, 2, ring=1), Fence()
    first = pool.write(0, memoryview(b"\x01" * SLOT), after=(reading,))
    assert first.ring == 0 and not first.done()
    threading.Timer(0.2, reading.signal).start()
    start = time.monotonic()
    second = pool.write(SLOT, memoryview(b"\x02" * SLOT), demand=True)  # the ring's only entry: waits for first
    assert time.monotonic() - start >= 0.15 and first.done() and second.ring == 0


def test_the_host_tier_and_copies_reach_memds_stats_and_admin_stats(rig_factory):
    from common import messages as m
    from services.admin_format import _tiers
    from services.memd.tiers import tier_fields

    rig = rig_factory(host_slots=4, device_slots=4)
    rig.load((0, 1), 0).future.result(TIMEOUT)
    rig.load((0, 1), 1).future.result(TIMEOUT)  # a host hit
    fields = tier_fields(rig.tiers)
    assert (fields["host_hits"], fields["host_misses"], fields["copy_bytes"]) == (1, 1, 2 * SLOT)
    assert fields["copy_seconds"] > 0 and fields["ring_reuse_waits"] == 0
    assert tier_fields(rig.reader) == {}  # one tier (a pool in host memory): nothing to add
    stats = m.StatsReply(1, 4 * SLOT, 4, 2, 0, 0, 2, 0, SLOT, 0.1, 0.0, False, [1, 0], **fields)
    line = _tiers(stats)[0]
    assert "1 hits, 1 read from disk first (hit rate 0.50)" in line and "copies 128.0 KiB" in line
    assert _tiers(m.StatsReply(1, 4 * SLOT, 4, 2, 0, 0, 2, 0, SLOT, 0.1, 0.0, False, [1, 0])) == []
