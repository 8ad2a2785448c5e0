"""memd's side of ``--cpu-experts`` (services/memd/host_compute.py), against the host-memory stand-in for the
device pool: which host-tier experts a worker is told to compute on its CPU (only when its measured cost beats
the measured copy, only experts the device pool neither holds nor loads, never the host tier's last free slots),
the host slots pinned until the worker moves on (the acquire reply through memd's server: test_gpu_server.py)."""
import mmap
import os

import pytest

from common import messages as m
from services.memd.host_compute import HostCompute
from services.memd.read_jobs import BusyRate
from services.memd.reader import ExpertReader
from services.memd.standin import StandInPool, StandInStream
from services.memd.tiers import TieredReader
from tier_helpers import contiguous, fake_store

MS = 1e-3
SLOT, LAYERS, EXPERTS, TIMEOUT = 64 * 1024, 2, 3, 30
KEYS = [(layer, e) for layer in range(LAYERS) for e in range(EXPERTS)]


@pytest.fixture
def tiers(tmp_path):
    path = tmp_path / "experts.bin"
    path.write_bytes(os.urandom(len(KEYS) * SLOT))
    made = []

    def make(host_slots=4, device_slots=4):
        buf = mmap.mmap(-1, host_slots * SLOT)
        reader = ExpertReader(fake_store(path, contiguous(path, KEYS, SLOT)), memoryview(buf), SLOT, False, threads=2)
        device = StandInPool(device_slots * SLOT, SLOT, 2, StandInStream(auto=True))
        made.append(TieredReader(reader, TieredReader.host_table(host_slots, LAYERS, EXPERTS), memoryview(buf),
                                 device, SLOT))
        return made[-1]

    yield make
    for t in made:
        t.close()


def measured(tiers: TieredReader, copy_ms: float) -> None:
    """Copies measured at ``copy_ms`` per slot (what the stand-in's instant copies would not show)."""
    tiers._copies = BusyRate()
    tiers._copies.bytes, tiers._copies.seconds = 10 * SLOT, 10 * copy_ms * MS


def acquire(layer, experts, counts, step=1):
    return m.AcquireRequest(layer, experts, step=step, counts=counts)


def nowhere(key):
    return False


def test_an_expert_only_the_host_tier_holds_goes_to_the_cpu_when_its_cost_beats_the_copy(tiers):
    t = tiers()
    t.submit((0, 1), 0, demand=True).future.result(TIMEOUT)  # now in the host tier (and device slot 0)
    measured(t, copy_ms=2.0)
    host = HostCompute(t, "h", 4, SLOT)
    host.worker_ready(7, [0.5 * MS, 0.1 * MS])  # 0.6 ms for one token, 6.9 ms for 64
    assert host.choose(7, acquire(0, [1, 2], [1, 1]), nowhere) == {0: t.host.slot_of[(0, 1)]}  # (0, 2): not held
    assert t.host.pins == {(0, 1): 1} and host.computed == 1
    assert host.choose(7, acquire(0, [1], [64], step=2), nowhere) == {}  # a prompt's 64 tokens: the copy is cheaper
    assert host.choose(7, acquire(1, [1], [1], step=2), lambda key: True) == {}  # the device holds or loads it


def test_nothing_goes_to_the_cpu_before_both_costs_are_measured_or_without_counts(tiers):
    t = tiers()
    t.submit((0, 1), 0, demand=True).future.result(TIMEOUT)
    t._copies = BusyRate()  # nothing measured
    host = HostCompute(t, "h", 4, SLOT)
    host.worker_ready(7, [0.0, 0.0])
    assert host.choose(7, acquire(0, [1], [1]), nowhere) == {}  # no copy measured yet
    measured(t, copy_ms=2.0)
    assert host.choose(8, acquire(0, [1], [1]), nowhere) == {}  # worker 8 sent no cost (it does not compute here)
    assert host.choose(7, acquire(0, [1], []), nowhere) == {}  # no token counts
    host.worker_ready(7, [])
    assert host.choose(7, acquire(0, [1], [1]), nowhere) == {} and not t.host.pins


def test_the_host_slot_stays_pinned_until_the_worker_moves_on(tiers):
    t = tiers()
    for slot, key in enumerate([(0, 0), (0, 1)]):
        t.submit(key, slot, demand=True).future.result(TIMEOUT)
    measured(t, copy_ms=2.0)
    host = HostCompute(t, "h", 4, SLOT)
    host.worker_ready(7, [0.1 * MS, 0.0])
    assert len(host.choose(7, acquire(1, [0, 1], [1, 1], step=5), lambda key: key[0] == 1)) == 0  # (not layer 0's)
    assert len(host.choose(7, acquire(0, [0, 1], [1, 1], step=5), nowhere)) == 2
    host.moved_on(7, 5, 0)  # its own note for that layer (arrived after the acquire): still computing
    host.moved_on(7, 4, 1)  # a stale one
    assert t.host.pins == {(0, 0): 1, (0, 1): 1}
    host.moved_on(7, 5, 1)  # the next layer: done with layer 0
    assert not t.host.pins and 7 in host.costs
    host.choose(7, acquire(0, [0], [1], step=6), nowhere)
    host.released(7, 1)  # another layer's release
    assert t.host.pins == {(0, 0): 1}
    host.released(7, 0)
    assert not t.host.pins
    host.choose(7, acquire(0, [0], [1], step=7), nowhere)
    host.forget(7)  # the worker is gone: pins and its cost go
    assert not t.host.pins and 7 not in host.costs


def test_always_skips_the_cost_comparison_but_not_the_workers_consent(tiers):
    t = tiers()
    t.submit((0, 1), 0, demand=True).future.result(TIMEOUT)
    t._copies = BusyRate()  # no copy measured: auto would not decide
    host = HostCompute(t, "h", 4, SLOT, always=True)
    host.worker_ready(7, [1.0, 1.0])  # a second per expert: auto would always copy
    assert host.choose(7, acquire(0, [1], [64]), nowhere) == {0: t.host.slot_of[(0, 1)]}
    assert host.choose(8, acquire(0, [1], [1], step=2), nowhere) == {}  # worker 8 does not compute here


def test_the_host_tiers_last_free_slots_are_never_pinned_for_the_cpu(tiers):
    t = tiers(host_slots=3, device_slots=4)
    for slot, key in enumerate([(0, 0), (0, 1), (0, 2)]):
        t.submit(key, slot, demand=True).future.result(TIMEOUT)
    measured(t, copy_ms=2.0)
    host = HostCompute(t, "h", 3, SLOT, spare=2)
    host.worker_ready(7, [0.1 * MS, 0.0])
    assert len(host.choose(7, acquire(0, [0, 1, 2], [1, 1, 1]), nowhere)) == 1  # 3 slots, 2 kept for loads
    assert t.host.num_pinned == 1


def test_a_host_slot_the_cpu_computes_from_is_not_evicted_by_host_loads(tiers):
    t = tiers(host_slots=3, device_slots=4)
    t.submit((0, 0), 0, demand=True).future.result(TIMEOUT)
    measured(t, copy_ms=2.0)
    host = HostCompute(t, "h", 3, SLOT, spare=1)
    host.worker_ready(7, [0.1 * MS, 0.0])
    (slot,) = host.choose(7, acquire(0, [0], [1]), nowhere).values()
    for i, key in enumerate([(1, 0), (1, 1), (1, 2), (0, 1)]):  # more experts than the other two host slots
        t.submit(key, 1 + i % 3, demand=True).future.result(TIMEOUT)
    assert t.host.slot_of[(0, 0)] == slot and t.host.is_resident((0, 0))


def test_a_failed_acquire_or_a_retry_of_its_layer_lets_its_host_slots_go(tiers):
    t = tiers()
    t.submit((0, 1), 0, demand=True).future.result(TIMEOUT)
    measured(t, copy_ms=2.0)
    host = HostCompute(t, "h", 4, SLOT, spare=1)
    host.worker_ready(7, [0.1 * MS, 0.0])
    req = acquire(0, [1], [1], step=3)
    assert host.choose(7, req, nowhere) and host.choose(7, req, nowhere)  # a retry: the same pin, not two
    assert t.host.pins == {(0, 1): 1} and host.computed == 2  # (told twice: a counter never goes down)
    host.failed(7, acquire(1, [1], [1], step=3))  # another layer's failure: not this one's
    assert t.host.pins == {(0, 1): 1}
    host.failed(7, req)
    assert not t.host.pins and host.computed == 2 and 7 in host.costs


def test_the_copy_rate_is_measured_from_real_copies(tiers):
    t = tiers()
    assert t.copy_rate is None
    t.submit((0, 1), 0, demand=True).future.result(TIMEOUT)
    t.submit((0, 2), 1, demand=True).future.result(TIMEOUT)
    assert t.copy_rate is not None and t.copy_rate > 0
