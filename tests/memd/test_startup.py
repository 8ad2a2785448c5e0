"""``moeinf memd`` as a real process: bad inputs fail fast with one clear line and leave nothing behind; a
stale region is reclaimed; one memd per state directory; SIGTERM/SIGINT clean up the pool and the sockets.
(The autouse ``no_leaked_shm`` fixture checks /dev/shm after every test.)"""
import contextlib
import os
import shutil
import signal
import subprocess

import pytest
from helpers import moeinf_cmd, spawn, stop, wait_for_log

from services.memd.pool import SHM_DIR, pool_name

TIMEOUT_S = 60  # a memd that neither starts nor fails within this hangs


def run_memd(state_dir, *args) -> subprocess.CompletedProcess:
    return subprocess.run(moeinf_cmd("memd", "--state-dir", str(state_dir), *args), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def assert_failed_cleanly(proc: subprocess.CompletedProcess, state_dir, *words: str) -> str:
    """Non-zero exit, no traceback, the last stderr line is the one error line, and nothing was created."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    error = lines[-1]
    assert error.startswith("moeinf memd: error: "), proc.stderr
    assert sum("error" in line.lower() for line in lines) == 1, proc.stderr
    for word in words:
        assert word in error, f"{word!r} not in {error!r}"
    assert not (SHM_DIR / pool_name(state_dir)).exists()
    assert not (state_dir / "memd.sock").exists() and not (state_dir / "memd-trace.sock").exists()
    return error


def broken_copy(src, dst, damage) -> str:
    shutil.copytree(src, dst)
    damage(dst / "model.safetensors")
    return str(dst)


def garbage_header(file):
    with open(file, "r+b") as f:
        f.write(os.urandom(64))


def truncate_half(file):
    os.truncate(file, file.stat().st_size // 2)


def test_missing_model_dir(tmp_path, state_dir):
    proc = run_memd(state_dir, "--model", str(tmp_path / "no-such-model"))
    assert_failed_cleanly(proc, state_dir, str(tmp_path / "no-such-model"), "does not exist")


def test_model_flag_missing(state_dir):
    env = {k: v for k, v in os.environ.items() if k != "MOEINF_MODEL"}
    proc = subprocess.run(moeinf_cmd("memd", "--state-dir", str(state_dir)), capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env)
    assert_failed_cleanly(proc, state_dir, "--model is required")


def test_corrupt_checkpoint(mixtral, tmp_path, state_dir):
    model = broken_copy(mixtral, tmp_path / "corrupt", garbage_header)
    error = assert_failed_cleanly(run_memd(state_dir, "--model", model), state_dir, f"{model}/model.safetensors")
    assert "header" in error and ("corrupt" in error or "impossible" in error)


def test_truncated_safetensors(mixtral, tmp_path, state_dir):
    model = broken_copy(mixtral, tmp_path / "truncated", truncate_half)
    assert_failed_cleanly(run_memd(state_dir, "--model", model), state_dir, f"{model}/model.safetensors",
                          "truncated")


@pytest.fixture(scope="module")
def bad_size_runs(mixtral, tmp_path_factory):
    """Both bad ``--expert-memory`` runs at once (each loads transformers before it can judge the size)."""
    sizes = {"too-small": "700KiB", "malformed": "lots"}
    state_dirs = {name: tmp_path_factory.mktemp(name) / "state" for name in sizes}
    procs = {name: subprocess.Popen(moeinf_cmd("memd", "--state-dir", str(state_dirs[name]), "--model", str(mixtral),
                                               "--expert-memory", size),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, size in sizes.items()}
    runs = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        runs[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), state_dirs[name])
    return runs


def test_expert_memory_too_small_states_the_minimum(bad_size_runs):
    slot_bytes = 3 * 128 * 64 * 4  # mixtral test checkpoint: one float32 expert, already 4 KiB aligned
    minimum = 8 * slot_bytes  # one layer's 8 experts
    error = assert_failed_cleanly(*bad_size_runs["too-small"], "--expert-memory", "too small", "the minimum is",
                                  f"({minimum} bytes)")
    assert "768.0 KiB" in error


def test_expert_memory_just_enough_is_accepted(mixtral):
    """The minimum the error states is what the pool planning accepts: 8 slots, one layer (checked in-process: the
    same planning code, no start-up); a real memd of 8 slots serving a whole layer's acquire is
    tests/memd/test_memd_leases.py's (25% of this checkpoint)."""
    from common.checkpoint import Checkpoint
    from common.config import build_config, MemdConfig
    from services.memd.main import plan_pool
    from services.memd.store import ExpertStore

    store = ExpertStore(Checkpoint(mixtral))
    minimum = store.num_experts * store.slot_bytes
    assert plan_pool(build_config(MemdConfig, env={}, model=mixtral, expert_memory=str(minimum)), store) == 8
    assert plan_pool(build_config(MemdConfig, env={}, model=mixtral, expert_memory="25%"), store) == 8
    assert plan_pool(build_config(MemdConfig, env={}, model=mixtral, expert_memory="100%"), store) == 32
    assert plan_pool(build_config(MemdConfig, env={}, model=mixtral, expert_memory="1GiB"), store) == 32
    with pytest.raises(ValueError, match=f"minimum is .* \\({minimum} bytes\\)"):
        plan_pool(build_config(MemdConfig, env={}, model=mixtral, expert_memory=str(minimum - 1)), store)


def test_malformed_expert_memory(bad_size_runs):
    assert_failed_cleanly(*bad_size_runs["malformed"], "--expert-memory 'lots' is not a size", "MiB", "%")


def signal_and_check_cleanup(proc, sig, state_dir, log) -> None:
    """``sig`` stops memd with status 0, and the pool region and both socket files are gone."""
    region = SHM_DIR / pool_name(state_dir)
    sockets = [state_dir / "memd.sock", state_dir / "memd-trace.sock"]
    assert region.exists() and all(s.exists() for s in sockets)
    proc.send_signal(sig)
    assert proc.wait(TIMEOUT_S) == 0
    assert not region.exists()
    assert not any(s.exists() for s in sockets)
    assert "memd stopped" in log.read_text()


@pytest.mark.serial  # the stale region it plants is an orphan until memd reclaims it: the other test process sees it
def test_stale_region_is_reclaimed_then_sigterm_cleans_up(mixtral, state_dir):
    state_dir.mkdir(parents=True)
    stale = SHM_DIR / pool_name(state_dir)
    stale.write_bytes(b"\xab" * 12345)  # left by a crashed memd
    (state_dir / "memd.sock").write_text("stale")  # a dead socket file
    (state_dir / "memd.lock").write_text("999999999")  # unlocked: its owner is gone
    try:
        proc = spawn(["memd", "--model", str(mixtral), "--state-dir", str(state_dir), "--expert-memory", "25%"],
                     state_dir / "memd.log")
        try:
            wait_for_log(proc, state_dir / "memd.log", "memd ready", timeout=TIMEOUT_S)
            assert stale.stat().st_size == 8 * 3 * 128 * 64 * 4  # the new 8-slot pool, not the stale file
            with open(stale, "rb") as f:
                assert f.read(4096) == bytes(4096)
            assert (state_dir / "memd.lock").read_text() == str(proc.pid)
            signal_and_check_cleanup(proc, signal.SIGTERM, state_dir, state_dir / "memd.log")
        finally:
            stop(proc)
    finally:
        stale.unlink(missing_ok=True)


def test_second_memd_is_refused_then_sigint_cleans_up(mixtral, state_dir):
    from services.worker.memd_client import MemdClient

    args = ["--model", str(mixtral), "--expert-memory", "25%"]
    first = spawn(["memd", "--state-dir", str(state_dir), *args], state_dir.parent / "first.log")
    try:
        wait_for_log(first, state_dir.parent / "first.log", "memd ready", timeout=TIMEOUT_S)
        second = run_memd(state_dir, *args)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        error = second.stderr.strip().splitlines()[-1]
        assert error.startswith("moeinf memd: error: another memd")
        assert f"(pid {first.pid})" in error and str(state_dir) in error and "--state-dir" in error
        # the refused one touched nothing of the first: its pool and sockets still serve
        assert first.poll() is None
        assert (SHM_DIR / pool_name(state_dir)).exists()
        client = MemdClient(f"ipc://{state_dir.resolve()}/memd.sock", f"ipc://{state_dir.resolve()}/memd-trace.sock",
                            timeout_s=10)
        try:
            hello = client.handshake(str(mixtral.resolve()), 10, "x")
            assert hello.pid == first.pid and hello.pool_name == pool_name(state_dir)
            assert client.stats().num_slots == 8
        finally:
            client.close()
        signal_and_check_cleanup(first, signal.SIGINT, state_dir, state_dir.parent / "first.log")
    finally:
        stop(first)


def test_sigterm_before_memd_serves_removes_its_regions(mixtral, state_dir):
    """A stop while memd still starts (here: pulling a peer's EAMC that never answers, after the pool was made)
    unwinds through its cleanup: no region the size of the pool is left in /dev/shm."""
    import socket
    import time

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    regions = [SHM_DIR / pool_name(state_dir, kind) for kind in ("pool", "control")]
    proc = spawn(["memd", "--model", str(mixtral), "--state-dir", str(state_dir), "--expert-memory", "25%",
                  "--eamc-from", f"tcp://127.0.0.1:{port}", "--admin-token", "t" * 32], state_dir.parent / "memd.log")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not all(r.exists() for r in regions):
            assert proc.poll() is None and time.monotonic() < deadline, "memd never made its regions"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT_S) == 128 + signal.SIGTERM
        assert not any(r.exists() for r in regions)
    finally:
        stop(proc)
        for r in regions:
            r.unlink(missing_ok=True)


def test_sigterm_while_memd_indexes_stops_the_indexer_too(mixtral, state_dir, tmp_path):
    """A stop while the indexer child reads the checkpoint (a fresh state directory, no index cached): memd exits
    and takes the indexer with it (it ran on as an orphan, an audit: `docker stop` right after a start)."""
    import time

    proc = spawn(["memd", "--model", str(mixtral), "--state-dir", str(state_dir), "--expert-memory", "25%",
                  "--index-cache-dir", str(tmp_path / "no-index-yet")], state_dir.parent / "memd.log")
    children = []
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (children := _children(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, "memd never started its indexer"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT_S) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 5
        while any(os.path.exists(f"/proc/{pid}") for pid in children):
            assert time.monotonic() < deadline, f"the indexer {children} outlived memd"
            time.sleep(0.05)
    finally:
        stop(proc)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []
