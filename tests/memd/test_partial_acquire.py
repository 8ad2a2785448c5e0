"""An acquire answered in two parts (``AcquireRequest.partial``, memd's staged.py): memd answers as soon as some
of the layer's experts are resident, naming the positions still loading; AWAIT gives every slot once they are
loaded, or the error that ended a load. A real memd with a slow disk (every read sleeps first), pool bytes checked."""
import mmap
import time

import pytest
from helpers import spawn, stop, wait_for_log

from services.memd.pool import SHM_DIR
from services.memd.testhooks import VARIABLE as READ_LATENCY
from services.worker.memd_client import MemdError
from test_pinning import assert_slot_holds, attach, connect, expected_bytes

SLOW_MS = 300


def start_memd(model, tmp_path, *extra: str):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    log = state_dir / "memd.log"
    proc = spawn(["memd", "--model", str(model), "--state-dir", str(state_dir), "--expert-memory", "25%",
                  "--prefetch", "off", *extra], log, env={READ_LATENCY: str(SLOW_MS)})
    wait_for_log(proc, log, "memd ready", timeout=60)
    return proc, state_dir


def leasing(state_dir, model):
    """A client that holds leases, as the worker does by default."""
    client = connect(state_dir)
    client.use_leases = True
    client.handshake(str(model.resolve()), 30, "x")
    client.ready()
    assert client.leasing
    return client


def test_resident_experts_are_handed_out_while_the_others_load(mixtral, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mixtral)
    store_module = "model.layers.0.mlp.experts"
    proc, state_dir = start_memd(mixtral, tmp_path)
    try:
        client, hello = attach(state_dir, mixtral)
        with open(f"{SHM_DIR}/{hello.pool_name}", "rb") as f:
            pool = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        client.acquire(0, [0], [], [])  # expert 0 resident
        client.release(0, [0])
        assert client.acquire(0, [0], [], [], partial=True) is not None and client.loading == []  # all resident:
        client.release(0, [0])  # one reply, as without ``partial``

        start = time.monotonic()
        slots = client.acquire(0, [0, 3], [], [], partial=True)
        answered = time.monotonic() - start
        assert client.loading == [1] and answered < SLOW_MS / 1e3, (client.loading, answered)
        assert_slot_holds(pool, hello, slots[0], expected_bytes(model, store_module, 0), "resident expert 0")
        slots = client.rest(0, [0, 3])
        assert time.monotonic() - start >= SLOW_MS / 1e3 and client.loading == []
        for expert, slot in zip([0, 3], slots):
            assert_slot_holds(pool, hello, slot, expected_bytes(model, store_module, expert), f"expert {expert}")
        client.release(0, [0, 3])

        slots = client.acquire(0, [5, 6], [], [], partial=True)  # neither resident: answered once one of them is
        assert len(client.loading) == 1, client.loading
        ready = 1 - client.loading[0]
        assert_slot_holds(pool, hello, slots[ready], expected_bytes(model, store_module, [5, 6][ready]), "first")
        slots = client.rest(0, [5, 6])
        for expert, slot in zip([5, 6], slots):
            assert_slot_holds(pool, hello, slot, expected_bytes(model, store_module, expert), f"expert {expert}")
        client.release(0, [5, 6])
        assert client.stats().acquires_partial == 2 and client.partial_layers == 2

        with pytest.raises(MemdError, match=r"AWAIT of layer 0: this worker has no partly answered acquire"):
            client.rest(0, [5, 6])  # nothing left to wait for
        assert len(client.acquire(1, [2], [], [])) == 1  # memd keeps serving
        pool.close()
        client.close()
    finally:
        assert stop(proc) == 0


def test_a_load_that_fails_after_the_partial_answer_fails_the_await(mixtral, tmp_path):
    """The resident expert was handed out, then the other's read hit the end of a truncated file: AWAIT is an
    ``io`` error naming the file (never a hang), the worker's leases end, and memd keeps serving the rest."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(mixtral, copy)
    proc, state_dir = start_memd(copy, tmp_path, "--slot-cache", "off")
    try:
        client = leasing(state_dir, copy)
        client.acquire(0, [0], [], [])
        file = copy / "model.safetensors"
        with open(file, "r+b") as f:
            f.truncate(4096)  # (after memd indexed it: every later read of it ends early)
        client.acquire(0, [0, 7], [], [], partial=True)
        assert client.loading == [1] and client.leases == {(0, 0): client.leases[(0, 0)]}
        with pytest.raises(MemdError, match=r"unexpected end of file.*\[io\]"):
            client.rest(0, [0, 7])
        assert client.leases == {} and client.stats().pinned == 0  # the error ended every lease, on both sides
        assert len(client.acquire(0, [0], [], [])) == 1  # resident: no read needed, memd still answers
        with pytest.raises(MemdError, match=r"AWAIT of layer 0: this worker has no partly answered"):
            client.rest(0, [0])
        assert client.leases == {} and client.stats().pinned == 0  # (a refused AWAIT ends them too)
        client.close()
    finally:
        assert stop(proc) == 0


def test_with_leases_the_loading_experts_are_leased_from_the_await(mixtral, tmp_path):
    """A leasing worker records a loading expert's slot only from AWAIT's reply: before it, the next layer that
    routes to that expert asks memd instead of reading a slot still being written."""
    proc, state_dir = start_memd(mixtral, tmp_path)
    try:
        client = leasing(state_dir, mixtral)
        client.acquire(2, [4], [], [])
        slots = client.acquire(2, [4, 1], [], [], partial=True)
        assert client.loading == [1] and client.leases == {(2, 4): slots[0]}
        slots = client.rest(2, [4, 1])
        assert client.leases == {(2, 4): slots[0], (2, 1): slots[1]}
        assert client.acquire(2, [1, 4], [], [], partial=True) == [slots[1], slots[0]] and client.last_leased
        client.close()
    finally:
        assert stop(proc) == 0
