"""common/worker_client.py: a client waiting on a worker that is gone stops at once and says why."""
import time

import pytest

from common.worker_client import WorkerClient


def test_a_gone_worker_ends_the_wait_at_once(tmp_path):
    state = {"why": None}
    client = WorkerClient(f"ipc://{tmp_path}/nobody.sock", timeout_s=60, gone=lambda: state["why"])
    try:
        stream = client.stream([1, 2, 3], 4)
        state["why"] = "worker exited with -9"
        start = time.monotonic()
        with pytest.raises(ConnectionError, match="is gone: worker exited with -9"):
            next(stream)
        assert time.monotonic() - start < 2, "it waited for the timeout instead"
    finally:
        client.close()


def test_without_a_liveness_check_the_timeout_still_applies(tmp_path):
    client = WorkerClient(f"ipc://{tmp_path}/nobody.sock", timeout_s=0.3)
    try:
        with pytest.raises(TimeoutError, match="did not answer GENERATE"):
            next(client.stream([1], 1))
    finally:
        client.close()
