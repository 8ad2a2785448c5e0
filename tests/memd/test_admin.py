"""``moeinf admin`` against a real memd (and worker): every command, a live resize under load with no failed
request and the pool's memory really going back to the OS, a live policy switch, EAMC save -> clear -> load giving
the same predictions, the socket's 0600 mode, the TCP listener's token, and the errors a user can run into."""
import contextlib
import io
import json
import os
import socket
import stat
import threading
import time

import numpy as np
import pytest
from helpers import Stack, spawn, stop, wait_for_log, write_family

from common import messages as m
from services.cli import main
from common.protocol import Op
from common.worker_client import WorkerClient
from services.memd.pool import SHM_DIR, pool_name
from services.worker.memd_client import MemdClient

SLOTS, SLOT_BYTES = 32, 3 * 128 * 64 * 4  # the mixtral test checkpoint at 100%: 4 layers x 8 experts of 96 KiB
PROMPTS = [[1, 5, 9, 22, 7], [3] * 11, list(range(2, 40, 2))]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_family("mixtral", tmp_path_factory.mktemp("admin") / "mixtral")


@pytest.fixture(scope="module")
def stack(model, tmp_path_factory):
    # (no preload: the tests count the misses their requests read, and pin experts a request loaded)
    with Stack(model, tmp_path_factory.mktemp("admin") / "state", expert_memory="100%",
               extra_memd=["--preload", "off"]) as s:
        yield s


@pytest.fixture(scope="module")
def worker(stack):
    client = WorkerClient(stack.worker_addr)
    yield client
    client.close()


def admin(state_dir, *args, raw: bool = False):
    """Run ``moeinf admin`` in-process: ``(exit status, stdout, stderr)``; with ``raw=False`` and status 0, the
    parsed JSON reply instead."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["admin", "--state-dir", str(state_dir), *([] if raw else ["--json"]), *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    if raw:
        return code, out.getvalue(), err.getvalue()
    assert code == 0, f"moeinf admin {' '.join(args)} exited {code}: {err.getvalue()}"
    return json.loads(out.getvalue())


def test_slot_table_shrinks_lazily_and_grows_back():
    from services.memd.policy import make_policy
    from services.memd.slots import SlotTable

    retired = []
    t = SlotTable(6, 2, make_policy("lru", 2, 4), on_retire=retired.append)
    for i, key in enumerate([(0, 0), (0, 1), (0, 2), (1, 0)]):  # slots 0..3; 4 and 5 free
        assert t.reserve(key) == i
        if key != (1, 0):
            t.loaded(key)
    t.pin((0, 2))
    assert t.shrink(2) == (0, [(0, 2), (1, 0)])  # slot 2 pinned, slot 3 loading: they leave later
    assert sorted(retired) == [4, 5] and t.free == [] and t.capacity == 2
    assert t.must_leave((0, 2)) and not t.must_leave((0, 0))
    assert t.live_resident() == 2 and t.resident_per_layer(2) == [2, 0]  # (0, 2) leaving: not the live pool's
    t.loaded((1, 0))  # its load ends: nothing pins it, it leaves at once
    assert (1, 0) not in t.slot_of and retired[-1] == 3
    t.unpin((0, 2))  # the last pin goes: it leaves
    assert (0, 2) not in t.slot_of and retired[-1] == 2 and t.free == []
    assert t.reserve((1, 1)) == 0 and (0, 0) not in t.slot_of  # the live slots only: it evicts the LRU one
    assert t.grow(6) == [2, 3, 4, 5] and t.free[-1] == 2
    t.pin((0, 1))
    t.reserve((1, 2))
    t.loaded((1, 2))
    assert t.drop() == (1, [(0, 1), (1, 1)])  # (1, 2) goes now; the pinned one and the loading one later
    assert all(t.must_leave(k) for k in [(0, 1), (1, 1)])
    for key in list(t.pins):
        t.unpin(key)
    t.loaded((1, 1))
    assert not t.slot_of and sorted(t.free) == list(range(6)) and not t.dropped


def region_bytes(state_dir) -> int:
    return os.stat(SHM_DIR / pool_name(state_dir)).st_blocks * 512


def wait_until(predicate, timeout: float = 15.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_socket_is_a_unix_socket_only_its_owner_may_use(stack):
    st = os.stat(stack.state_dir / "admin.sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()


def test_health_and_stats(stack, worker):
    health = admin(stack.state_dir, "health")
    assert health["pid"] == stack.memd.pid and health["workers"] == [stack.worker.pid] and health["uptime_s"] > 0
    code, out, _ = admin(stack.state_dir, "health", raw=True)
    assert code == 0 and out.startswith(f"ok: memd pid {stack.memd.pid}")
    worker.generate(PROMPTS[0], 4)
    stats = admin(stack.state_dir, "stats")
    assert stats["capacity"] == SLOTS and stats["slot_bytes"] == SLOT_BYTES \
        and stats["stats"]["num_slots"] == SLOTS == stats["region_slots"]
    assert stats["pool_resident_bytes"] == SLOTS * SLOT_BYTES == region_bytes(stack.state_dir)
    assert stats["stats"]["misses"] > 0 and len(stats["stats"]["layers"]) == 4
    code, out, _ = admin(stack.state_dir, "stats", raw=True)
    lines = out.splitlines()
    assert code == 0 and "policy activation, prefetch on" in lines[0] and "EAMC:" in out
    assert lines[-6].split()[:3] == ["layer", "resident", "hits"] and lines[-1].startswith("total")


def test_pin_experts_unpin(stack, worker):
    pinned = admin(stack.state_dir, "pin", "1:2", "3:7")
    assert len(pinned["slots"]) == 2 and pinned["admin_pinned"] == 2
    layers = admin(stack.state_dir, "experts")["layers"]
    assert layers[1]["admin_pinned"] == [2] and layers[3]["admin_pinned"] == [7]
    assert 2 in layers[1]["resident"] and 7 in layers[3]["pinned"]
    code, out, _ = admin(stack.state_dir, "experts", raw=True)
    assert code == 0 and out.splitlines()[1].split() == ["layer", "resident", "pinned", "loading", "admin", "pins",
                                                         "leaving"]
    # pinned experts survive a drop; everything else goes
    dropped = admin(stack.state_dir, "drop")
    assert dropped["resident"] >= 2
    wait_until(lambda: admin(stack.state_dir, "stats")["stats"]["resident"] == 2, what="the drop")
    assert admin(stack.state_dir, "unpin", "1:2", "3:7") == {"unpinned": 2, "admin_pinned": 0}
    code, _, err = admin(stack.state_dir, "unpin", "1:2", raw=True)
    assert code == 1 and "not pinned by the admin: 1:2" in err
    code, _, err = admin(stack.state_dir, "pin", "9:0", raw=True)
    assert code == 1 and "9:0 out of range: MoE layers 0..3, experts 0..7" in err
    tokens, _ = worker.generate(PROMPTS[1], 4)  # still serving
    assert len(tokens) == 4


def test_a_pin_of_an_expert_leaving_a_retired_slot_is_refused():
    """After a shrink, an expert a worker still reads sits in a retired slot until it leaves: an admin pin there
    held it in the retired slot for good (the state the shrink's own check refuses), so the pin is refused."""
    import asyncio
    from types import SimpleNamespace

    from common import admin_messages as a
    from services.memd.admin import AdminError, AdminServer
    from services.memd.policy import make_policy
    from services.memd.slots import SlotTable

    t = SlotTable(4, 2, make_policy("lru", 2, 2))
    for key in [(0, 0), (0, 1), (1, 0)]:
        t.reserve(key)
        t.loaded(key)
    t.pin((1, 0))  # a worker's: slot 2 retires with it inside
    t.shrink(2)
    server = AdminServer.__new__(AdminServer)
    server.table, server.pins, server.store = t, set(), SimpleNamespace(num_layers=2, num_experts=2)
    with pytest.raises(AdminError, match="1:0 still sit in slots a shrink retired"):
        asyncio.run(server.on_pin(a.PinRequest("", [a.ExpertKey(1, 0)])))
    assert not server.pins and t.pins == {(1, 0): 1}


def test_two_pins_of_an_expert_being_read_both_answer_its_slot(stack):
    """A second pin of an expert whose read the first pin started waits for that read (it answered 'internal': no
    slot yet, an audit); both get the expert's slot, and one unpin undoes the admin's one pin."""
    import zmq

    from common import admin_messages as a
    from common.codec import decode, encode
    from common.zmq_utils import make_socket

    admin(stack.state_dir, "drop")
    wait_until(lambda: admin(stack.state_dir, "stats")["stats"]["resident"] == 0, what="the drop")
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER, f"ipc://{stack.state_dir / 'admin.sock'}", bind=False)
    try:
        for rid in (1, 2):  # back to back: the second arrives while the first's read is in flight
            sock.send(encode(Op.ADMIN_PIN, rid, a.PinRequest("", [[2, 5]])))
        replies = []
        for _ in range(2):
            assert sock.poll(30_000), "memd did not answer a pin"
            replies.append(decode(sock.recv(), reply=True)[2])
    finally:
        sock.close()
        ctx.term()
    assert all(isinstance(r, a.PinReply) for r in replies), replies
    assert replies[0].slots == replies[1].slots and replies[1].admin_pinned == 1
    assert admin(stack.state_dir, "unpin", "2:5") == {"unpinned": 1, "admin_pinned": 0}


def test_a_shrink_that_would_strand_an_admin_pin_in_a_retired_slot_is_refused(stack):
    slot = admin(stack.state_dir, "pin", "3:7")["slots"][0]
    try:
        assert slot >= 9, "at 100% layer 3's experts sit in the pool's last slots"
        code, _, err = admin(stack.state_dir, "resize", str(slot * SLOT_BYTES), raw=True)  # retires slot `slot` on
        assert code == 1 and f"the admin's pins 3:7 sit in slots a pool of {slot} slots retires" in err
        assert "unpin them, resize, then pin them again" in err
        assert admin(stack.state_dir, "stats")["capacity"] == SLOTS
    finally:
        admin(stack.state_dir, "unpin", "3:7")


def test_policy_and_prefetch_switch_live(stack, worker):
    assert admin(stack.state_dir, "policy", "lfu") == {"old": "activation", "policy": "lfu"}
    assert admin(stack.state_dir, "prefetch", "off")["prefetch"] is False
    stats = admin(stack.state_dir, "stats")["stats"]
    assert (stats["policy"], stats["prefetch"]) == ("lfu", False)
    assert len(worker.generate(PROMPTS[2], 4)[0]) == 4
    code, _, err = admin(stack.state_dir, "policy", "mru", raw=True)
    assert code == 1 and "unknown policy 'mru': choose one of lru, lfu, activation" in err
    assert admin(stack.state_dir, "policy", "activation")["old"] == "lfu"
    assert admin(stack.state_dir, "prefetch", "on") == {"was": False, "prefetch": True, "cancelled": 0}


def test_live_resize_under_load_fails_no_request_and_gives_memory_back(stack, worker):
    client = worker
    expected = [client.generate(p, NEW_TOKENS)[0] for p in PROMPTS]
    results, errors = [], []

    def load():
        c = WorkerClient(stack.worker_addr)
        try:
            for _ in range(3):
                for p in PROMPTS:
                    results.append((p, c.generate(p, NEW_TOKENS)[0]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            c.close()

    thread = threading.Thread(target=load)
    thread.start()
    sizes, replies = ["25%", "50%", "100%", "8", "60%"], []  # "8": 8 bytes -> refused, below one layer
    while thread.is_alive() or len(replies) < 4:
        size = sizes[len(replies) % len(sizes)]
        code, out, err = admin(stack.state_dir, "--json", "resize", size, raw=True)
        replies.append((size, code, json.loads(out) if code == 0 else err))
        time.sleep(0.05)
    thread.join()
    assert not errors, f"requests failed during resizes: {errors}"
    assert len(results) == 3 * len(PROMPTS)
    for prompt, tokens in results:
        assert tokens == expected[PROMPTS.index(prompt)], f"prompt {prompt[:4]}... changed under resizes"
    shrinks = [r for s, code, r in replies if s == "25%"]
    assert shrinks and all(r["capacity"] == 8 for r in shrinks)
    # under load the worker leases what it uses (pressure revokes only the shortfall), so a shrink may find every
    # resident of the retired slots leased: those leave when released (pending); the idle shrink below checks they do
    assert any(r["evicted"] + r["pending"] > 0 for s, code, r in replies if s in ("25%", "50%") and code == 0), replies
    refused = [r for s, code, r in replies if s == "8"]
    assert all("below the minimum of 8 slots" in r for r in refused)

    # shrunk with the worker idle: the retired slots' memory is back with the OS (the region keeps its size)
    full = SLOTS * SLOT_BYTES
    assert admin(stack.state_dir, "resize", "25%")["capacity"] == 8
    wait_until(lambda: admin(stack.state_dir, "stats")["leaving"] == 0, what="retired slots to empty")
    stats = admin(stack.state_dir, "stats")
    assert stats["pool_resident_bytes"] == region_bytes(stack.state_dir) <= 8 * SLOT_BYTES < full
    assert os.stat(SHM_DIR / pool_name(stack.state_dir)).st_size == full
    assert stats["stats"]["resident"] <= 8
    assert (stats["stats"]["num_slots"], stats["region_slots"]) == (8, SLOTS)  # STATS (and /metrics): the live size
    assert client.generate(PROMPTS[0], NEW_TOKENS)[0] == expected[0]  # 25%: evicting and reloading
    code, _, err = admin(stack.state_dir, "resize", "4MiB", raw=True)
    assert code == 1 and "more than the 32 slots" in err
    grown = admin(stack.state_dir, "resize", "100%")
    assert grown["capacity"] == SLOTS and grown["pool_resident_bytes"] == full == region_bytes(stack.state_dir)
    assert client.generate(PROMPTS[2], NEW_TOKENS)[0] == expected[2]


def emit_request(client: MemdClient, request: str, routes: dict[int, list[int]], step: int) -> None:
    """A finished request as the worker's trace stream reports it: start, one step routing ``routes``, end."""
    layers = [m.LayerTrace(layer, experts, [[3] * len(experts)], [[1.0] * len(experts)])
              for layer, experts in sorted(routes.items())]
    client.emit(Op.REQUEST_START, m.RequestStartEvent(request, 3))
    client.emit(Op.STEP_TRACE, m.step_trace(4_000_000, step, [request], [3], [False], layers))
    client.emit(Op.REQUEST_END, m.RequestEndEvent(request, 3))


def test_eamc_save_clear_load_gives_the_same_predictions(stack, tmp_path, monkeypatch):
    state = stack.state_dir
    admin(state, "eamc", "clear")
    client = MemdClient(stack.memd_addr, f"ipc://{state.resolve()}/memd-trace.sock", timeout_s=10)
    try:
        patterns = [{0: [1, 2], 1: [3, 4], 2: [5, 6], 3: [7, 0]}, {0: [6, 7], 1: [0, 1], 2: [2, 3], 3: [4, 5]},
                    {0: [1, 4], 1: [3, 6], 2: [0, 5], 3: [2, 7]}]
        for i, routes in enumerate(patterns):
            emit_request(client, f"eamc-{i}", routes, 100 + i)
        wait_until(lambda: admin(state, "stats")["stats"]["eamc_size"] == 3, what="3 EAMC members")
    finally:
        client.close()  # (not before memd got them: closing drops what is still queued)
    query = ["0:1", "0:2", "1:3"]
    before = admin(state, "eamc", "match", *query)
    assert before["similarity"] > 0.5 and np.argmax(before["predicted"][2]) in (5, 6)

    # memd reads and writes EAMC files only inside its state directory (--eamc-dir): anywhere else is refused
    for verb in ("save", "load"):
        code, _, err = admin(state, "eamc", verb, str(tmp_path / "patterns.eamc"), raw=True)
        assert code == 1 and "EAMC files are saved and loaded only inside" in err and "[forbidden]" in err
        code, _, err = admin(state, "eamc", verb, str(state / ".." / "escape.eamc"), raw=True)
        assert code == 1 and "[forbidden]" in err
        for own in ("memd.sock", "memd.lock", "expert-index.msgpack", "expert-cache/x/done.bin"):  # memd's files
            code, _, err = admin(state, "eamc", verb, str(state / own), raw=True)
            assert code == 1 and "[forbidden]" in err, own
    assert not (tmp_path / "patterns.eamc").exists() and not (state.parent / "escape.eamc").exists()

    monkeypatch.chdir(state)  # a relative FILE is resolved by the CLI, not by memd
    saved = admin(state, "eamc", "save", "patterns.eamc")
    real = state.resolve() / "patterns.eamc"
    assert saved["size"] == 3 and saved["path"] == str(real)
    assert real.stat().st_size > 0 and stat.S_IMODE(real.stat().st_mode) == 0o600
    assert admin(state, "eamc", "clear")["size"] == 0
    cleared = admin(state, "eamc", "match", *query)
    assert cleared["similarity"] == 0 and not np.any(cleared["predicted"])
    assert admin(state, "eamc", "load", str(real))["size"] == 3
    after = admin(state, "eamc", "match", *query)
    assert after["similarity"] == pytest.approx(before["similarity"])
    np.testing.assert_allclose(after["predicted"], before["predicted"], rtol=1e-6, atol=1e-7)

    (state / "junk.eamc").write_bytes(b"not an eamc")
    code, _, err = admin(state, "eamc", "load", "junk.eamc", raw=True)
    assert code == 1 and "not an EAMC file" in err
    assert admin(state, "stats")["stats"]["eamc_size"] == 3  # a bad file changes nothing
    code, out, _ = admin(state, "eamc", "match", *query, raw=True)
    assert code == 0 and out.splitlines()[0].startswith("best match similarity") and "layer 3:" in out


def test_errors_say_what_is_wrong(stack, tmp_path, monkeypatch):
    code, _, err = admin(tmp_path / "nowhere", "stats", raw=True)
    assert code == 2 and f"no memd admin socket at {tmp_path / 'nowhere' / 'admin.sock'}: is memd running" in err
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # as root, a 0600 socket of another user is open to us
    code, _, err = admin(stack.state_dir, "stats", raw=True)
    assert code == 2 and "permission denied on the memd admin socket" in err and "mode 0600" in err
    monkeypatch.undo()
    dead = tmp_path / "dead"
    dead.mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(dead / "admin.sock"))  # a socket nobody accepts on: memd hung or gone
    try:
        code, _, err = admin(dead, "--timeout-s", "0.3", "health", raw=True)
    finally:
        listener.close()
    assert code == 2 and "memd is not answering" in err


def test_tcp_listener_needs_the_token(model, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    log = state / "memd.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["memd", "--model", str(model), "--state-dir", str(state), "--admin-tcp", f"127.0.0.1:{port}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(args) == 2  # refused before anything starts
    assert "--admin-tcp needs --admin-token (env MOEINF_ADMIN_TOKEN)" in err.getvalue()
    token = "s3cret-token-0123456789"
    proc = spawn(args, log, env={"MOEINF_ADMIN_TOKEN": token})
    try:
        wait_for_log(proc, log, "memd ready", timeout=60)
        tcp = ["--socket", f"tcp://127.0.0.1:{port}"]
        assert admin(tmp_path, *tcp, "--admin-token", token, "health")["pid"] == proc.pid
        code, _, err = admin(tmp_path, *tcp, "--admin-token", "wrong-token-0123456789", "health", raw=True)
        assert code == 1 and "wrong admin token" in err
        assert stat.S_IMODE(os.stat(state / "admin.sock").st_mode) == 0o600  # the Unix socket is there too
    finally:
        assert stop(proc) == 0


@pytest.mark.parametrize("addr, token, words", [
    ("127.0.0.1:7070", "", "--admin-tcp needs --admin-token"),
    ("127.0.0.1:7070", "short", "at least 16 characters"),
    ("7070", "s3cret-token-0123456789", "give HOST:PORT"),
    ("host:99999", "s3cret-token-0123456789", "give HOST:PORT"),
])
def test_admin_tcp_knobs_are_checked_at_start(addr, token, words):
    from common.config import MemdConfig, build_config

    with pytest.raises(ValueError, match=words):
        build_config(MemdConfig, env={}, model="/m", admin_tcp=addr, admin_token=token)
