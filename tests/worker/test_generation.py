"""Generation through a real worker: stop ids, seeded sampling, request errors, memd accounting."""
import time

import pytest
from helpers import Stack

from common.worker_client import WorkerClient, WorkerClientError


@pytest.fixture(scope="module")
def stack(mixtral, tmp_path_factory):
    with Stack(mixtral, tmp_path_factory.mktemp("gen") / "state", expert_memory="25%") as s:
        yield s


@pytest.fixture
def client(stack):
    c = WorkerClient(stack.worker_addr)
    yield c
    c.close()


def test_stop_token_ends_with_stop(client):
    greedy, _ = client.generate([1, 2, 3], 12)
    stop_at = greedy[4]
    tokens, reason = client.generate([1, 2, 3], 12, stop_token_ids=[stop_at])
    assert reason == "stop" and tokens == greedy[:greedy.index(stop_at) + 1]


def test_length_limit(client):
    tokens, reason = client.generate([4, 5], 7)
    assert len(tokens) == 7 and reason == "length"


def test_seeded_sampling_is_reproducible(client):
    a = client.generate([1, 9, 7], 16, temperature=1.5, top_p=0.9, top_k=50, seed=11)[0]
    b = client.generate([1, 9, 7], 16, temperature=1.5, top_p=0.9, top_k=50, seed=11)[0]
    c = client.generate([1, 9, 7], 16, temperature=1.5, top_p=0.9, top_k=50, seed=12)[0]
    assert a == b and a != c


def test_streams_one_token_per_step(client):
    replies = list(client.stream([1, 2], 5))
    assert [len(r.tokens) for r in replies] == [1] * 5
    assert [r.finish_reason for r in replies] == [None] * 4 + ["length"]
    assert replies[-1].completion_tokens == 5 and replies[-1].prompt_tokens == 2


@pytest.mark.parametrize("prompt,max_tokens,params,message", [
    ([], 4, {}, "empty"),
    ([10**6], 4, {}, "token ids"),
    ([1] * 500, 100, {}, "context"),
    ([1], 4, {"temperature": -1.0}, "temperature"),
])
def test_bad_requests_are_refused_with_a_reason(client, prompt, max_tokens, params, message):
    with pytest.raises(WorkerClientError) as err:
        client.generate(prompt, max_tokens, **params)
    assert err.value.code == "bad_request" and message in str(err.value)
    assert client.generate([1], 2)[1] == "length"  # the worker still serves


def test_memd_counts_hits_misses_and_bytes(stack, client):
    before = stack.memd_stats()
    client.generate(list(range(1, 30)), 16)
    after = stack.memd_stats()
    assert after.misses > before.misses and after.hits > before.hits
    assert after.evictions > before.evictions  # 25%: experts are evicted and re-read
    assert after.bytes_read - before.bytes_read > 0
    deadline = time.monotonic() + 10
    while after.pinned and time.monotonic() < deadline:  # the idle worker returns its leases right after
        time.sleep(0.05)
        after = stack.memd_stats()
    assert after.pinned == 0
