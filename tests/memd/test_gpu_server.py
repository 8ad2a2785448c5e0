"""memd's server code on a GPU pool, with the host-memory stand-in for the device: an acquire some of whose experts
the worker computes on its CPU (``--cpu-experts``), and a worker's "done reading" events ordering a rewrite of the
slots it released (write-after-read on the GPU)."""
import asyncio
import mmap
import os
from types import SimpleNamespace

import pytest

from common import messages as m
from common.config import PROTOCOL_VERSION, MemdConfig
from services.memd.core import CacheSettings, ExpertCache
from services.memd.host_compute import HostCompute
from services.memd.pool_memory import PoolMemory
from services.memd.read_jobs import BusyRate
from services.memd.reader import ExpertReader
from services.memd.server import MemdServer
from services.memd.standin import StandInPool, StandInStream
from services.memd.tiers import TieredReader, tier_fields
from tier_helpers import contiguous, fake_store

MS = 1e-3
SLOT, LAYERS, EXPERTS = 64 * 1024, 2, 3
KEYS = [(layer, e) for layer in range(LAYERS) for e in range(EXPERTS)]


@pytest.fixture
def tiers(tmp_path):
    path = tmp_path / "experts.bin"
    path.write_bytes(os.urandom(len(KEYS) * SLOT))
    buf = mmap.mmap(-1, 4 * SLOT)
    reader = ExpertReader(fake_store(path, contiguous(path, KEYS, SLOT)), memoryview(buf), SLOT, False, threads=2)
    device = StandInPool(4 * SLOT, SLOT, 2, StandInStream(auto=True))
    t = TieredReader(reader, TieredReader.host_table(4, LAYERS, EXPERTS), memoryview(buf), device, SLOT)
    yield t
    t.close()


def measured(tiers: TieredReader, copy_ms: float) -> None:
    """Copies measured at ``copy_ms`` per slot (what the stand-in's instant copies would not show)."""
    tiers._copies = BusyRate()
    tiers._copies.bytes, tiers._copies.seconds = 10 * SLOT, 10 * copy_ms * MS


def acquire(layer, experts, counts=(), step=1):
    return m.AcquireRequest(layer, experts, step=step, counts=list(counts))


def server(tiers_reader: TieredReader, tmp_path) -> MemdServer:
    cfg = MemdConfig(model=tmp_path, pool_backend="cuda", cpu_experts="auto", state_dir=tmp_path, prefetch=False)
    store = SimpleNamespace(slot_bytes=SLOT, num_layers=LAYERS, num_experts=EXPERTS, tensors=[])
    slots = tiers_reader.device.num_slots
    core = ExpertCache(slots, LAYERS, EXPERTS, top_k=2, expert_bytes=SLOT, knobs=CacheSettings(policy="lru"))
    host = HostCompute(tiers_reader, "moeinf-test-host", tiers_reader.host.capacity, SLOT)
    return MemdServer(cfg, store, core, tiers_reader, PoolMemory(tiers_reader.device, SLOT), None, host)


def test_an_acquire_reply_names_the_cpus_experts_with_their_host_slots(tiers, tmp_path):
    t = tiers
    srv = server(t, tmp_path)

    async def run():
        me = b"w"
        hello = srv.on_hello(me, m.HelloRequest(PROTOCOL_VERSION, 7, str(tmp_path), "standin"))
        assert (hello.host_pool_name, hello.host_slots) == ("moeinf-test-host", 4)
        srv.on_ready(me, m.ReadyRequest(7, [0.1 * MS, 0.01 * MS]))
        first = srv.begin_acquire(me, acquire(0, [1], [1], step=1))  # nothing measured: loaded to the device
        await asyncio.gather(*first.waits)
        assert srv._acquired(first).host == [] and (0, 1) in srv.table.slot_of
        srv.on_release(me, m.ReleaseRequest(0, [1]))
        srv.table.evict((0, 1))  # the device pool let it go; the host tier still holds it
        measured(t, copy_ms=2.0)
        second = srv.begin_acquire(me, acquire(0, [0, 1], [1, 1], step=2))
        await asyncio.gather(*second.waits)
        reply = srv._acquired(second)
        assert reply.host == [1] and reply.slots[1] == t.host.slot_of[(0, 1)]
        assert (0, 0) in srv.table.slot_of and (0, 1) not in srv.table.slot_of  # the CPU's expert was not loaded
        assert t.host.pins == {(0, 1): 1}
        srv.traces.on_layer_note(None, m.LayerNoteEvent(7, 2, 1, [0]))  # the next layer: done with the host slot
        assert not t.host.pins
        stats = tier_fields(t, srv.host)
        assert stats["cpu_experts"] == 1 and srv.on_stats(me, m.StatsRequest()).cpu_experts == 1
        srv._drop_client(me)
        assert 7 not in srv.host.costs

    asyncio.run(run())


def test_a_released_slot_is_rewritten_only_after_the_workers_read_event(tiers, tmp_path):
    """Leases off on a GPU: the worker releases a layer without waiting for its kernels and names the event it
    recorded after them; memd's copy into that slot waits for the event (here a fence the test signals)."""
    srv = server(tiers, tmp_path)

    async def run():
        me = b"w"
        srv.on_hello(me, m.HelloRequest(PROTOCOL_VERSION, 7, str(tmp_path), "standin", [b"e0", b"e1"]))
        srv.on_ready(me, m.ReadyRequest(7))
        reading = srv.clients[me].read_events[1]
        for layer, experts in ((0, [0, 1, 2]), (1, [0])):  # the pool's 4 slots, pinned
            pending = srv.begin_acquire(me, acquire(layer, experts))
            await asyncio.gather(*pending.waits)
        slot = srv.table.slot_of[(0, 0)]
        srv.on_release(me, m.ReleaseRequest(0, [0], read_done=[1]))  # its kernels may still be queued
        assert tier_fields(srv.reader)["read_events"] == 1
        nxt = srv.begin_acquire(me, acquire(1, [2], step=2))
        assert srv.table.slot_of[(1, 2)] == slot  # the one unpinned slot is taken again
        await asyncio.sleep(0.2)
        assert not all(w.done() for w in nxt.waits)  # the copy waits for the worker's read event
        reading.signal()
        await asyncio.wait_for(asyncio.gather(*nxt.waits), 10)
        srv.on_release(me, m.ReleaseRequest(1, [2], read_done=[5]))  # an entry it never shared: ignored
        srv._drop_client(me)

    asyncio.run(run())
