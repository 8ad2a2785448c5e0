"""``--preload`` (a real memd, no worker): a pool that holds every expert reads them all at start, in the
background, without a request and without counting them as prefetches or misses; ``--preload off``, or a pool of
fewer slots than experts, reads nothing until asked."""
import time

import pytest
from helpers import spawn, stop, wait_for_log

from services.worker.memd_client import MemdClient

EXPERTS = 4 * 8  # the mixtral test checkpoint: 4 MoE layers x 8 experts
EXPERT_BYTES = 3 * 128 * 64 * 4  # w1, w3, w2 of its float32 experts


def stats(state_dir):
    client = MemdClient(f"ipc://{state_dir.resolve()}/memd.sock", f"ipc://{state_dir.resolve()}/memd-trace.sock",
                        timeout_s=10)
    try:
        return client.stats()
    finally:
        client.close()


@pytest.fixture
def memd(mixtral, state_dir):
    procs = []

    def start(*args):
        state_dir.mkdir(parents=True, exist_ok=True)
        log = state_dir / "memd.log"
        proc = spawn(["memd", "--model", str(mixtral), "--state-dir", str(state_dir), *args], log)
        procs.append(proc)
        wait_for_log(proc, log, "memd ready")
        return log

    yield start
    for proc in procs:
        assert stop(proc) == 0


def test_a_pool_of_every_expert_reads_them_all_at_start(memd, state_dir):
    log = memd("--expert-memory", "100%")
    deadline = time.monotonic() + 30
    while (s := stats(state_dir)).resident < EXPERTS:
        assert time.monotonic() < deadline, f"not every expert preloaded: {s}"
        time.sleep(0.05)
    assert s.bytes_read == EXPERTS * EXPERT_BYTES  # each read once, whole
    assert s.misses == 0 and s.prefetch_issued == 0  # no acquire asked; not the planner's prefetches
    deadline = time.monotonic() + 10
    while f"preloaded {EXPERTS} of {EXPERTS} experts" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@pytest.mark.parametrize("args", [["--expert-memory", "100%", "--preload", "off"], ["--expert-memory", "50%"]],
                         ids=["off", "fewer-slots"])
def test_nothing_is_read_unasked_otherwise(memd, state_dir, args):
    log = memd(*args)
    time.sleep(1.0)  # (a preload would have read the 32 small experts by now)
    s = stats(state_dir)
    assert s.resident == 0 and s.bytes_read == 0
    assert "preload" not in log.read_text()
