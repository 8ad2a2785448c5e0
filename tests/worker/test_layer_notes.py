"""memd follows every layer with leases on (real memd + worker): each MoE layer of each step sends a LAYER_NOTE,
leased or not, and every one of them feeds memd's predictor (none ignored); the hidden-state guesses are scored
at every distance, prefetches are issued and used, and the tokens still equal plain transformers'. A pool of every
expert, which decides nothing from them, gets none."""
import contextlib
import io
import json
import time

from helpers import Stack
from test_exactness import NEW_TOKENS, PROMPTS, reference

from common.worker_client import WorkerClient
from services.cli import main
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
    assert guessed(stats) == before <= (LAYERS - 1) * EXPERTS
    # ... and only its note went: that reply said memd decides nothing from notes (a message per layer spared)
    assert stats.layer_notes == 1 and stats.trace_steps > 0
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


def test_notes_resume_when_the_pool_shrinks_below_every_expert(mixtral, state_dir):
    """A pool of every expert takes no notes; resized below that (``moeinf admin resize``), its next acquire reply
    asks for a note per layer again (the worker, idle between the generations, returned its leases: the next
    generation acquires)."""
    with Stack(mixtral, state_dir, expert_memory="100%") as stack:
        first = stack.generate_all(PROMPTS, NEW_TOKENS)
        assert stack.memd_stats().layer_notes == 1
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["admin", "--state-dir", str(state_dir), "--json", "resize", "50%"]) == 0
        assert json.loads(out.getvalue())["capacity"] == LAYERS * EXPERTS // 2
        assert stack.generate_all(PROMPTS, NEW_TOKENS) == first
        deadline = time.monotonic() + 10
        while (stats := stack.memd_stats()).layer_notes < LAYERS * NEW_TOKENS:  # (one-way: they may still be queued)
            assert time.monotonic() < deadline, f"no notes after the shrink: {stats}"
            time.sleep(0.05)
    assert stats.acquires > LAYERS
