"""memd follows every layer with leases on (real memd + worker): each MoE layer of each step sends a LAYER_NOTE,
leased or not, and every one of them feeds memd's predictor (none ignored); the hidden-state guesses are scored
at every distance, prefetches are issued and used, and the tokens still equal plain transformers'."""
import time

from helpers import Stack
from test_exactness import NEW_TOKENS, PROMPTS, reference

from common.worker_client import WorkerClient
from services.memd.testhooks import VARIABLE as READ_LATENCY

LAYERS, EXPERTS = 4, 8  # the mixtral test checkpoint


def test_leased_layers_feed_the_predictor(mixtral, state_dir):
    expected = reference(mixtral, PROMPTS)
    with Stack(mixtral, state_dir, expert_memory="50%") as stack:
        client = WorkerClient(stack.worker_addr)
        try:
            got = [client.generate(p, NEW_TOKENS)[0] for p in PROMPTS]
        finally:
            client.close()
        deadline = time.monotonic() + 10
        # until every step's notes and its step trace arrived (the trace comes at the step's end, after its notes)
        while (stats := stack.memd_stats()).layer_notes != LAYERS * stats.trace_steps or stats.trace_steps < len(
                PROMPTS) * NEW_TOKENS - len(PROMPTS):
            assert time.monotonic() < deadline, f"notes or step traces missing: {stats}"
            time.sleep(0.05)
    assert got == expected
    assert stats.leased_layers > 0, "at 50% some layers must be served from leases (no acquire)"
    assert stats.acquires + stats.leased_layers == LAYERS * stats.trace_steps
    assert stats.layer_notes == LAYERS * stats.trace_steps and stats.notes_dropped == 0  # every layer fed
    assert [s.distance for s in stats.speculation] == [1, 2, 3]  # 4 layers: guesses up to 3 ahead
    assert all(s.routed > 0 and 0 < s.correct <= min(s.predicted, s.routed) for s in stats.speculation)
    assert stats.prefetch_issued > 0 and stats.prefetch_used > 0


def guessed(stats) -> int:
    return sum(s.predicted for s in stats.speculation)


def test_no_guesses_once_memd_has_no_use_for_them(mixtral, state_dir):
    """A pool of every expert never evicts; without prefetch nothing acts on a guess: the worker stops spending
    router matmuls on guesses (memd says so in its acquire replies), filled pool or not (a leased worker acquires
    nothing, so it would never hear that the pool filled)."""
    with Stack(mixtral, state_dir, expert_memory="100%") as stack:
        first = stack.generate_all(PROMPTS, NEW_TOKENS)
        time.sleep(0.3)  # the last notes land
        before = guessed(stack.memd_stats())
        assert stack.generate_all(PROMPTS, NEW_TOKENS) == first
        time.sleep(0.3)
        stats = stack.memd_stats()
    # only the first layer guesses, before memd's first acquire reply: at most every expert of the layers after it
    assert stats.layer_notes > 0 and guessed(stats) == before <= (LAYERS - 1) * EXPERTS
    with Stack(mixtral, state_dir / "off", expert_memory="50%", extra_memd=["--prefetch", "off"]) as stack:
        stack.generate_all(PROMPTS, NEW_TOKENS)
        time.sleep(0.3)
        stats = stack.memd_stats()
    # only the first layer guesses, before memd's first acquire reply: at most every expert of the layers after it
    assert stats.layer_notes > 0 and guessed(stats) <= (LAYERS - 1) * EXPERTS


def test_memd_looks_ahead_no_further_than_the_worker_guesses(mixtral, state_dir):
    """The worker's READY carries its --speculate-layers: memd's k (what it reports, sizes its prefetch reserve for
    and asks for) stays within it, however slow its reads are against a layer."""
    slow = {READ_LATENCY: "30"}  # a read ~30 layers long: memd alone would ask for every layer ahead (3)
    with Stack(mixtral, state_dir, expert_memory="50%", extra_worker=["--speculate-layers", "1"],
               memd_env=slow) as stack:
        client = WorkerClient(stack.worker_addr)
        try:
            client.generate(PROMPTS[0], NEW_TOKENS)
        finally:
            client.close()
        stats = stack.memd_stats()
    assert stats.layer_notes > 0 and stats.prefetch_issued > 0  # (reads measured: k was computed)
    assert stats.speculate_layers == 1 and [s.distance for s in stats.speculation] == [1]
