"""Leases through a real worker: at 100% expert memory the steady state sends memd no acquire (every layer is
served from the worker's leases), the output is the same as with explicit pins, and an idle worker holds
nothing."""
import time

import pytest
from helpers import Stack

from common.worker_client import WorkerClient

LAYERS, EXPERTS = 4, 8  # the mixtral test checkpoint
PROMPTS = [[1, 2, 3, 4], [5, 6, 7]]
TOKENS = 40


def generate_all(stack: Stack) -> list[list[int]]:
    client = WorkerClient(stack.worker_addr)
    try:
        return [client.generate(prompt, TOKENS)[0] for prompt in PROMPTS]
    finally:
        client.close()


def settled_stats(stack: Stack):
    """memd's stats once the worker's last step trace and its RETURN_LEASES have arrived."""
    deadline = time.monotonic() + 10
    while True:
        stats = stack.memd_stats()
        if stats.pinned == 0 and stats.trace_steps >= len(PROMPTS) * TOKENS or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


@pytest.fixture(scope="module")
def explicit(mixtral, tmp_path_factory):
    with Stack(mixtral, tmp_path_factory.mktemp("explicit") / "state", expert_memory="100%",
               extra_worker=["--leases", "off"]) as stack:
        return generate_all(stack), settled_stats(stack)


def test_full_memory_steady_state_sends_no_acquire(mixtral, tmp_path, explicit):
    with Stack(mixtral, tmp_path / "state", expert_memory="100%") as stack:
        tokens = generate_all(stack)
        stats = settled_stats(stack)
    want_tokens, want_stats = explicit
    assert tokens == want_tokens
    layer_steps = want_stats.acquires  # explicit pins: one acquire per MoE layer per step
    assert layer_steps == LAYERS * want_stats.trace_steps and want_stats.leased_layers == 0
    # with free slots nothing is revoked, so each acquire leases a new expert: at most LAYERS * EXPERTS of them per
    # request (an idle worker returns its leases), against LAYERS messages per token without leases
    assert stats.acquires <= len(PROMPTS) * LAYERS * EXPERTS < layer_steps / 2
    assert stats.acquires + stats.leased_layers == layer_steps
    assert stats.hits + stats.misses == want_stats.hits + want_stats.misses  # leased layers still count as hits
    assert stats.pinned == 0, "an idle worker gives its leases back"
