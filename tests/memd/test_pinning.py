"""Two workers on one memd at 25% memory: one worker's pinned experts survive the other's evictions, byte for
byte in the shared pool, and the counters add up. Also: malformed or out-of-order requests get error replies and
memd keeps serving."""
import mmap
import os
import time

import pytest
import torch
import zmq
from helpers import spawn, stop, wait_for_log

from common import messages as m
from common.codec import decode, encode
from common.config import PROTOCOL_VERSION
from common.protocol import Op
from common.zmq_utils import make_socket
from services.memd.pool import SHM_DIR
from services.worker.memd_client import MemdClient, MemdError

EXPERT_BYTES = 3 * 128 * 64 * 4  # the mixtral test checkpoint: w1, w3, w2 in float32 (4 KiB aligned: slot size)


@pytest.fixture(scope="module")
def memd(mixtral, tmp_path_factory):
    """memd at 25%: 8 slots for 4 layers x 8 experts."""
    state_dir = tmp_path_factory.mktemp("pinning") / "state"
    state_dir.mkdir()
    log = state_dir / "memd.log"
    proc = spawn(["memd", "--model", str(mixtral), "--state-dir", str(state_dir), "--expert-memory", "25%"], log)
    try:
        wait_for_log(proc, log, "memd ready", timeout=60)
        yield state_dir
    finally:
        assert stop(proc) == 0


def connect(state_dir) -> MemdClient:
    return MemdClient(f"ipc://{state_dir.resolve()}/memd.sock", f"ipc://{state_dir.resolve()}/memd-trace.sock",
                      timeout_s=30)


def attach(state_dir, model) -> tuple[MemdClient, m.HelloReply]:
    client = connect(state_dir)
    hello = client.handshake(str(model.resolve()), 30, "x")
    client.ready()
    return client, hello


def expected_bytes(model, store_module: str, expert: int) -> dict[str, bytes]:
    module = model.get_submodule(store_module)
    return {name: getattr(module, name)[expert].detach().contiguous().view(torch.uint8).numpy().tobytes()
            for name, _ in module.named_parameters(recurse=False)}


def assert_slot_holds(pool: mmap.mmap, hello: m.HelloReply, slot: int, want: dict[str, bytes], what: str) -> None:
    base = slot * hello.slot_bytes
    for spec in hello.tensors:
        got = pool[base + spec.offset: base + spec.offset + len(want[spec.name])]
        assert got == want[spec.name], f"{what}: slot {slot} {spec.name} does not hold the expert's bytes"


def settle(client: MemdClient, timeout: float = 10) -> m.StatsReply:
    """Wait until no slot is loading (every slot holds a resident expert)."""
    deadline = time.monotonic() + timeout
    while (stats := client.stats()).resident < stats.num_slots:
        assert time.monotonic() < deadline, f"loads did not finish: {stats}"
        time.sleep(0.02)
    return stats


def test_pinned_experts_survive_another_workers_evictions(memd, mixtral):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mixtral)
    a, hello = attach(memd, mixtral)
    b, hello_b = attach(memd, mixtral)
    pool_file = open(SHM_DIR / hello.pool_name, "rb")
    pool = mmap.mmap(pool_file.fileno(), hello.pool_bytes, prot=mmap.PROT_READ)
    try:
        assert hello_b.pool_name == hello.pool_name and hello.num_slots == 8
        assert hello.slot_bytes == EXPERT_BYTES and (hello.num_layers, hello.num_experts) == (4, 8)
        module = lambda layer: f"model.layers.{layer}.mlp.experts"  # noqa: E731 - MoE layer i is decoder layer i
        start = a.stats()

        # A pins four experts of layer 0
        mine = [0, 3, 5, 6]
        a_slots = a.acquire(0, mine, ["req-a"], [[1, 2, 1, 4]])
        assert len(set(a_slots)) == 4
        want = {e: expected_bytes(model, module(0), e) for e in mine}
        for e, slot in zip(mine, a_slots):
            assert_slot_holds(pool, hello, slot, want[e], f"A's expert {e}")

        # B cycles through 24 other experts; only the 4 unpinned slots are free to it
        loads = 0
        for layer in (1, 2, 3):
            for group in ([0, 1, 2, 3], [4, 5, 6, 7]):
                b_slots = b.acquire(layer, group, [], [])
                loads += len(group)
                assert not set(b_slots) & set(a_slots), "B was given one of A's pinned slots"
                for e, slot in zip(group, b_slots):
                    assert_slot_holds(pool, hello, slot, expected_bytes(model, module(layer), e),
                                      f"B's layer {layer} expert {e}")
                b.release(layer, group)
                # A's experts are untouched after every round of B's evictions
                for e, slot in zip(mine, a_slots):
                    assert_slot_holds(pool, hello, slot, want[e], f"A's pinned expert {e} after B's layer {layer}")

        stats = b.stats()
        assert stats.pinned == 4 and stats.resident == 8 and stats.num_slots == 8
        assert stats.misses - start.misses == 4 + loads
        assert stats.hits == start.hits
        assert stats.evictions - start.evictions == loads - 4  # B's first 4 loads filled free slots
        assert stats.bytes_read - start.bytes_read == (4 + loads) * EXPERT_BYTES
        assert stats.resident_per_layer == [4, 0, 0, 4]

        # A acquiring its experts again: hits, same slots
        again = a.call(Op.ACQUIRE, m.AcquireRequest(0, mine))
        assert again.slots == a_slots and again.hits == 4
        stats = a.stats()
        assert stats.hits - start.hits == 4 and stats.pinned == 4
        assert stats.bytes_read - start.bytes_read == (4 + loads) * EXPERT_BYTES  # hits read nothing

        # with 4 slots pinned, B cannot have 5 at once: a capacity error, and no pin is left behind
        with pytest.raises(MemdError, match=r"pinned or loading.*raise --expert-memory \[capacity\]"):
            b.acquire(1, [0, 1, 2, 3, 4], [], [])
        assert b.stats().pinned == 4
        # the loads the failed acquire had started finish in the background (their slots are loading till then)
        settle(b)
        for e, slot in zip(mine, a_slots):
            assert_slot_holds(pool, hello, slot, want[e], f"A's pinned expert {e} after B's failed acquire")

        # A releases (twice: it acquired twice); now B can take every slot
        a.release(0, mine)
        a.release(0, mine)
        assert a.stats().pinned == 0
        all_slots = b.acquire(2, list(range(8)), [], [])
        assert sorted(all_slots) == list(range(8))
        for e, slot in zip(range(8), all_slots):
            assert_slot_holds(pool, hello, slot, expected_bytes(model, module(2), e), f"B's layer 2 expert {e}")
        b.release(2, list(range(8)))
        assert b.stats().resident_per_layer == [0, 0, 8, 0]
    finally:
        pool.close()
        pool_file.close()
        a.close()
        b.close()


def test_bad_requests_get_error_replies_and_memd_keeps_serving(memd, mixtral):
    ctx = zmq.Context()
    raw = make_socket(ctx, zmq.DEALER, f"ipc://{memd.resolve()}/memd.sock", bind=False)

    def ask(frame: bytes):
        raw.send(frame)
        assert raw.poll(10_000), "memd did not answer"
        return decode(raw.recv(), reply=True)

    try:
        # an ERROR frame is not a request: memd answers bad_request (it used to kill memd's RPC reader)
        op, rid, reply = ask(encode(Op.ERROR, 7, m.ErrorReply("x", "y")))
        assert (op, rid, reply.code) == (Op.ERROR, 7, "bad_request") and "op ERROR" in reply.message
        op, rid, reply = ask(b"\x03")
        assert (op, rid, reply.code) == (Op.ERROR, 0, "bad_request") and "header" in reply.message
        op, rid, reply = ask(encode(Op.GENERATE, 8, m.GenerateRequest("r", [1], 1)))
        assert (rid, reply.code) == (8, "bad_request") and "not served" in reply.message
        op, rid, reply = ask(encode(Op.ACQUIRE, 9, m.AcquireRequest(0, [1])))
        assert (rid, reply.code) == (9, "handshake")
        op, rid, reply = ask(encode(Op.READY, 10, m.ReadyRequest(1)))
        assert (rid, reply.code) == (10, "handshake")
        op, rid, reply = ask(encode(Op.HELLO, 11, m.HelloRequest(PROTOCOL_VERSION, 1, "/some/other/model", "cpu")))
        assert (rid, reply.code) == (11, "model") and "/some/other/model" in reply.message
        op, rid, reply = ask(encode(Op.HELLO, 12, m.HelloRequest(99, 1, str(mixtral), "cpu")))
        assert (rid, reply.code) == (12, "protocol")
        config = mixtral / "config.json"  # the checkpoint updated in place while memd runs: refused
        st = config.stat()
        os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        try:
            op, rid, reply = ask(encode(Op.HELLO, 13, m.HelloRequest(PROTOCOL_VERSION, 1, str(mixtral), "cpu")))
            assert (rid, reply.code) == (13, "model") and "changed since memd started" in reply.message
        finally:
            os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        raw.close()
        ctx.term()

    client, hello = attach(memd, mixtral)
    try:
        with pytest.raises(MemdError, match=r"layer 4 out of range 0\.\.3 \[bad_request\]"):
            client.acquire(4, [0], [], [])
        with pytest.raises(MemdError, match=r"must be distinct, in 0\.\.7 \[bad_request\]"):
            client.acquire(0, [1, 1], [], [])
        with pytest.raises(MemdError, match=r"must be distinct, in 0\.\.7 \[bad_request\]"):
            client.acquire(0, [8], [], [])
        client.emit(Op.REQUEST_START, m.RequestStartEvent("r", 3))
        assert len(client.acquire(1, [2, 3], [], [])) == 2  # still serving
        client.release(1, [2, 3])
        assert client.stats().pinned == 0
    finally:
        client.close()


def test_an_acquire_waits_for_the_loads_a_failed_acquire_left_running(mixtral, tmp_path):
    """A failed acquire's loads go on (unpinned) and hold their slots until they end: an acquire that needs those
    slots waits for them instead of failing with "pinned or loading" (a slow disk makes them last)."""
    from services.memd.testhooks import VARIABLE as READ_LATENCY

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    log = state_dir / "memd.log"
    proc = spawn(["memd", "--model", str(mixtral), "--state-dir", str(state_dir), "--expert-memory", "25%",
                  "--prefetch", "off"], log, env={READ_LATENCY: "400"})
    try:
        wait_for_log(proc, log, "memd ready", timeout=60)
        client, _ = attach(state_dir, mixtral)
        client.acquire(0, [0], [], [])  # one slot pinned by this client: no other client holds anything
        with pytest.raises(MemdError, match="pinned or loading"):
            client.acquire(1, list(range(8)), [], [])  # 7 loads start, the 8th has no slot: fails at once
        client.release(0, [0])
        start = time.monotonic()
        slots = client.acquire(2, list(range(8)), [], [])  # every slot: 7 of them still loading layer 1
        assert sorted(slots) == list(range(8)) and time.monotonic() - start < 10
        client.release(2, list(range(8)))
        client.close()
    finally:
        assert stop(proc) == 0
