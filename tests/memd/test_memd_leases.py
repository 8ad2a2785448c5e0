"""Leases between a real memd and MemdClient: a layer whose experts are all leased costs no message; an acquire
that needs more slots than are free or evictable revokes just that many of the worker's other leases (the policy's
victims; and those of its leases the policy ranks before the evictable residents for the slots it wants), and
another worker short of slots bumps the revoke epoch so the holder comes back, and waits for it (not for itself); an
error and RETURN_LEASES end every lease."""
import threading
import time

import pytest
from helpers import spawn, stop, wait_for_log

from services.cli import main as admin_main
from services.worker.memd_client import MemdClient, MemdError


def running_memd(mixtral, tmp_path_factory, share: str):
    """A memd at ``share`` expert memory (prefetch off) in a state directory of its own, until the module ends."""
    state_dir = tmp_path_factory.mktemp("leases") / "state"
    state_dir.mkdir()
    log = state_dir / "memd.log"
    proc = spawn(["memd", "--model", str(mixtral), "--state-dir", str(state_dir), "--expert-memory", share,
                  "--prefetch", "off"], log)
    try:
        wait_for_log(proc, log, "memd ready", timeout=60)
        yield state_dir
    finally:
        assert stop(proc) == 0


def attach_to(state_dir, mixtral, leases: bool = True) -> MemdClient:
    client = MemdClient(f"ipc://{state_dir.resolve()}/memd.sock", f"ipc://{state_dir.resolve()}/memd-trace.sock",
                        timeout_s=30, leases=leases)
    client.handshake(str(mixtral.resolve()), 30, "x")
    client.ready()
    return client


@pytest.fixture(scope="module")
def memd(mixtral, tmp_path_factory):
    """memd at 25%: 8 slots for 4 layers x 8 experts."""
    yield from running_memd(mixtral, tmp_path_factory, "25%")


@pytest.fixture
def connect(memd, mixtral):
    clients = []

    def attach(*, leases: bool = True) -> MemdClient:
        clients.append(attach_to(memd, mixtral, leases))
        return clients[-1]

    yield attach
    for client in clients:
        client.return_leases()
        client.stats()  # ordered after RETURN_LEASES on the same socket: memd has applied it
    assert clients[0].stats().pinned == 0, "a test left experts pinned"
    for client in clients:
        client.close()


def acquire(client: MemdClient, layer: int, experts: list[int]) -> list[int]:
    return client.acquire(layer, experts, ["r"], [[1] * len(experts)])


def test_an_all_leased_layer_needs_no_message(connect):
    client = connect()
    assert client.leasing
    slots = acquire(client, 0, [0, 1])
    assert not client.last_leased
    before = client.stats()
    assert before.pinned == 2
    again = acquire(client, 0, [1, 0])
    assert client.last_leased and again == [slots[1], slots[0]]
    after = client.stats()
    assert (after.hits, after.misses, after.pinned) == (before.hits, before.misses, 2)  # memd heard nothing


def test_pressure_revokes_only_the_slots_it_needs(connect):
    client = connect()
    acquire(client, 0, list(range(8)))  # the whole pool, leased
    assert len(client.leases) == 8
    acquire(client, 1, [0, 1, 2, 3])  # needs 4 slots, none free: 4 of layer 0's leases come back to memd
    assert {(1, 0), (1, 1), (1, 2), (1, 3)} <= set(client.leases)
    assert len([k for k in client.leases if k[0] == 0]) == 4
    assert client.stats().pinned == 8


def test_evictable_residents_let_leases_accumulate_up_to_the_room_an_acquire_needs(connect):
    client = connect()
    acquire(client, 0, list(range(8)))
    client.return_leases()
    client.stats()
    acquire(client, 1, [0, 1])  # two slots taken from layer 0's (evictable) experts: no lease to revoke ...
    assert set(client.leases) == {(1, 0), (1, 1)}
    acquire(client, 2, [0])  # ... here one miss: at most one lease comes back (if the policy ranks it first)
    assert (2, 0) in client.leases and len(client.leases) >= 2
    assert client.stats().pinned == len(client.leases)


def test_an_all_resident_acquire_keeps_the_leases(connect):
    explicit, client = connect(leases=False), connect()
    acquire(client, 3, [6])
    acquire(explicit, 2, [4, 5])  # resident, then unpinned: evictable but there
    explicit.release(2, [4, 5])
    acquire(client, 2, [4, 5])  # resident, only not leased yet: a message, but no miss, so no revocation
    assert not client.last_leased
    assert set(client.leases) == {(3, 6), (2, 4), (2, 5)}
    acquire(client, 3, [6])
    assert client.last_leased


def in_thread(call) -> tuple[threading.Thread, dict]:
    got: dict = {}

    def run():
        try:
            got["value"] = call()
        except Exception as exc:  # noqa: BLE001 (handed to the test)
            got["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, got


def test_another_workers_miss_waits_for_the_holder_to_come_back(connect):
    holder, other = connect(), connect()
    acquire(holder, 0, list(range(8)))
    acquire(holder, 1, [4])  # no free slot: one of layer 0's leases goes back (the policy's victim)
    acquire(holder, 1, [4])
    assert holder.last_leased and len(holder.leases) == 8
    thread, got = in_thread(lambda: acquire(other, 2, list(range(7))))  # every slot is the holder's
    time.sleep(0.5)
    assert thread.is_alive() and not got, "the other worker waits (memd asked the holder back), it does not fail"
    acquire(holder, 1, [4])
    assert not holder.last_leased, "the moved epoch must send the holder to memd"
    assert set(holder.leases) == {(1, 4)}  # a reclaim takes back everything but the current layer
    thread.join(10)
    assert len(got.get("value", [])) == 7, got
    acquire(holder, 1, [4])
    assert holder.last_leased


def test_a_worker_short_of_slots_beside_another_holder_gives_back_only_its_shortfall(connect):
    """The pool is all leases, half each; a worker one slot short asks the other back, and itself gives back just
    the one slot it lacks (its other leases stay: a reclaim of its own would send every later layer to memd)."""
    first, second = connect(), connect()
    acquire(first, 0, [0, 1, 2, 3])
    acquire(second, 0, [4, 5, 6, 7])
    acquire(first, 1, [0])
    assert (1, 0) in first.leases and len([k for k in first.leases if k[0] == 0]) == 3, sorted(first.leases)
    acquire(second, 0, [4, 5])
    assert not second.last_leased, "the other worker was asked back (its epoch moved)"


def test_an_acquire_waits_for_another_workers_pins_but_not_for_its_own(connect):
    explicit, client = connect(leases=False), connect()
    acquire(explicit, 0, list(range(8)))  # pinned until released: the whole pool
    started = time.monotonic()
    with pytest.raises(MemdError, match="expert-memory"):  # nobody else holds anything: at once
        acquire(explicit, 1, [0])
    assert time.monotonic() - started < 5
    thread, got = in_thread(lambda: acquire(client, 1, [0, 1]))
    time.sleep(0.5)
    assert thread.is_alive() and not got
    explicit.release(0, list(range(8)))
    thread.join(10)
    assert len(got.get("value", [])) == 2, got


def test_an_error_ends_every_lease(connect):
    client = connect()
    acquire(client, 0, [0, 1])
    with pytest.raises(MemdError, match="distinct"):
        acquire(client, 1, [3, 3])
    assert client.leases == {}
    assert client.stats().pinned == 0


def test_return_leases_unpins_everything(connect):
    client = connect()
    acquire(client, 0, [6, 7])
    acquire(client, 3, [6, 7])
    client.return_leases()
    assert client.leases == {} and client.stats().pinned == 0


@pytest.fixture(scope="module")
def memd_half(mixtral, tmp_path_factory):
    """memd at 50%: 16 slots, so the admin may pin up to 8 (the capacity minus one layer)."""
    yield from running_memd(mixtral, tmp_path_factory, "50%")


def test_an_admin_pin_asks_the_workers_leases_back_instead_of_failing(memd_half, mixtral):
    """Every slot leased by a worker: ``moeinf admin pin`` of an expert that is not resident waits for the worker to
    give leases back at its next layer (memd moved the epoch), then reads it; it failed at once before."""
    holder = attach_to(memd_half, mixtral)
    try:
        acquire(holder, 0, list(range(8)))
        acquire(holder, 1, list(range(8)))
        assert len(holder.leases) == 16 and holder.stats().pinned == 16
        thread, got = in_thread(lambda: admin_main(["admin", "--state-dir", str(memd_half), "--json", "pin", "3:5"]))
        time.sleep(0.5)
        assert thread.is_alive() and not got, "the pin waits for the leases, it does not fail"
        acquire(holder, 1, [0])
        assert not holder.last_leased, "the moved epoch sends the holder to memd, which takes its leases back"
        thread.join(15)
        assert got.get("value") == 0, got
        assert holder.stats().pinned == len(holder.leases) + 1
        assert admin_main(["admin", "--state-dir", str(memd_half), "unpin", "3:5"]) == 0
    finally:
        holder.return_leases()
        holder.stats()
        holder.close()


def test_a_waiting_acquire_gives_back_its_own_leases_once_another_worker_let_go_of_them(memd_half, mixtral):
    """The pool holds one layer per worker. The waiting worker shared layer 0's leases with the holder, so they were
    no candidates when its acquire began; once the holder gave its own back, they alone held the slots the waiting
    acquire needed, and it failed after 10 s with ``capacity`` (the pool size memd says is enough)."""
    holder, waiter = attach_to(memd_half, mixtral), attach_to(memd_half, mixtral)
    try:
        acquire(holder, 0, list(range(8)))
        acquire(holder, 1, list(range(8)))
        acquire(waiter, 0, list(range(8)))  # resident: leased by both
        thread, got = in_thread(lambda: acquire(waiter, 2, list(range(8))))
        time.sleep(0.5)
        assert thread.is_alive() and not got
        acquire(holder, 1, [0])  # the holder comes back (its epoch moved) and keeps only this
        thread.join(5)
        assert len(got.get("value", [])) == 8, got
        assert not any(k[0] == 0 for k in waiter.leases), "layer 0's leases came back in the reply's revoked"
        assert set(waiter.leases) == {(2, e) for e in range(8)}
    finally:
        for client in (holder, waiter):
            client.return_leases()
            client.stats()
            client.close()
