"""SIGTERM to a worker with requests in flight: each of them gets an ``unavailable`` error reply before the worker
exits (its last replies are flushed, not dropped by a socket closed without linger), and the worker exits 0."""
import signal
import threading

import pytest
from helpers import Stack

from common.worker_client import WorkerClient, WorkerClientError


@pytest.mark.slow  # ~2 min on the shared box: a memd and a worker of their own
def test_sigterm_answers_every_request_in_flight(mixtral, tmp_path):
    with Stack(mixtral, tmp_path / "state", expert_memory="25%") as stack:
        clients = [WorkerClient(stack.worker_addr, timeout_s=60) for _ in range(4)]
        try:
            streams = [c.stream([1, 5, 9, 2 + i], 400) for i, c in enumerate(clients)]
            for s in streams:
                assert next(s).tokens  # running
            outcomes = [None] * len(streams)

            def drain(i):
                try:
                    for reply in streams[i]:
                        if reply.finish_reason is not None:
                            outcomes[i] = reply.finish_reason
                except WorkerClientError as exc:
                    outcomes[i] = exc.code
                except TimeoutError:
                    outcomes[i] = "no reply"

            threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(streams))]
            stack.worker.send_signal(signal.SIGTERM)
            for t in threads:
                t.start()
            for t in threads:
                t.join(90)
            assert stack.worker.wait(30) == 0
            assert outcomes == ["unavailable"] * len(streams), outcomes
        finally:
            for c in clients:
                c.close()
