"""``moeinf bench replay``: the LRU and Belady bounds (hand-worked examples, an exhaustive optimum), and one short
replay of the demo trace against real memd processes (the JSON's shape and consistent counts)."""
import functools
import importlib.util
import itertools
import json
import os
import random
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import moeinf_cmd, new_orphans, orphan_regions

from services.bench.bounds import belady_fetches, lru_fetches
from services.bench.replay import median_row, paired_ratios, parse_variants
from services.bench.replay_drive import guesses, load_plan

DEMO_TRACE = Path(__file__).parents[1] / "data" / "demo-trace.jsonl"


# ---------------------------------------------------------------------------------------------------- bounds
def test_hand_example_lru_and_belady():
    # capacity 2, a b c a b: LRU misses all 5; Belady evicts b for c (b's next use is furthest), then a hits
    seq = [["a"], ["b"], ["c"], ["a"], ["b"]]
    assert lru_fetches(seq, 2) == 5
    assert belady_fetches(seq, 2) == 4


def test_a_layers_own_experts_are_pinned():
    # at [a, c], a's next use is never, yet a is in use: Belady must evict b (used again next), so b is fetched twice
    seq = [["a"], ["b"], ["a", "c"], ["b"]]
    assert belady_fetches(seq, 2) == 4
    # LRU: at [c, a], a is touched first, so b is the least recent unpinned expert
    assert lru_fetches([["a", "b"], ["c", "a"]], 2) == 3


def test_everything_fits_costs_one_fetch_per_expert():
    seq = [["a", "b"], ["c"], ["a"], ["b", "c"], ["d"]]
    assert lru_fetches(seq, 4) == belady_fetches(seq, 4) == 4


def test_capacity_below_one_access_is_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        belady_fetches([["a", "b", "c"]], 2)
    with pytest.raises(ValueError, match="cannot hold"):
        lru_fetches([["a", "b", "c"]], 2)


def optimum(seq, capacity) -> int:
    """The fewest fetches, by trying every choice of victims (tiny inputs only)."""
    @functools.lru_cache(maxsize=None)
    def best(i: int, resident: frozenset) -> int:
        if i == len(seq):
            return 0
        need = set(seq[i])
        missing = need - resident
        evict = max(0, len(resident) + len(missing) - capacity)
        choices = itertools.combinations(sorted(resident - need), evict)
        return len(missing) + min(best(i + 1, (resident - set(v)) | need) for v in choices)

    return best(0, frozenset())


def test_belady_is_optimal_and_never_above_lru():
    rng = random.Random(7)
    for _ in range(300):
        capacity = rng.randint(2, 3)
        seq = [rng.sample("abcde", rng.randint(1, 2)) for _ in range(rng.randint(1, 9))]
        b, lru = belady_fetches(seq, capacity), lru_fetches(seq, capacity)
        assert b == optimum(seq, capacity), seq
        assert len({k for a in seq for k in a}) <= b <= lru


def test_plan_follows_the_trace():
    plan = load_plan(DEMO_TRACE, max_steps=20)
    assert len(plan.steps) == 20 and plan.steps[0].prefill == [True] and plan.steps[1].prefill == [False]
    assert plan.steps[0].starts == [("cooking-0", plan.steps[0].tokens[0])]
    assert len(plan.accesses()) == 20 * 4
    first = plan.steps[0].layers[0]
    assert sum(map(sum, first.tokens)) == plan.steps[0].tokens[0] * 2  # top-2: two experts per token


def test_recorded_guesses_become_the_notes_guesses(tmp_path):
    trace = tmp_path / "t.jsonl"
    lines = ['{"format": "moeinf-trace/1", "num_layers": 2, "num_experts": 4, "top_k": 1}',
             '{"req": "a", "pos": 0, "layer": 0, "experts": [1], "speculated": [3]}',
             '{"req": "b", "pos": 0, "layer": 0, "experts": [2], "speculated": [0, 3]}',
             '{"req": "a", "pos": 0, "layer": 1, "experts": [3], "speculated": [1]}',
             '{"req": "b", "pos": 0, "layer": 1, "experts": [0]}']
    trace.write_text("\n".join(lines) + "\n")
    first, last = load_plan(trace).steps[0].layers
    client = SimpleNamespace(speculate=True, speculate_layers=4, speculate_threshold=0.3)
    assert guesses(first, 2, client) == ([1, 1], [0, 3], [1.0, 1.0])  # the union, for the next layer, confidence 1
    assert guesses(last, 2, client) == ([], [], [])  # no layer after the last
    assert guesses(load_plan(DEMO_TRACE, 1).steps[0].layers[0], 4, client) == ([], [], [])  # the demo trace: none
    assert guesses(first, 2, SimpleNamespace(speculate=False)) == ([], [], [])  # memd has no use for them


def test_recorded_guesses_with_confidences_are_sent_as_memd_asks(tmp_path):
    """A trace's ``guesses`` (any distance, with the router's confidence) go out as the worker sends them: within
    memd's lookahead and threshold, the union of the step's tokens at their highest confidence."""
    trace = tmp_path / "t.jsonl"
    lines = ['{"format": "moeinf-trace/1", "num_layers": 4, "num_experts": 4, "top_k": 1}',
             '{"req": "a", "pos": 0, "layer": 0, "experts": [1], "guesses": [[1, 3, 0.9], [2, 0, 0.2], [3, 1, 0.8]]}',
             '{"req": "b", "pos": 0, "layer": 0, "experts": [2], "guesses": [[1, 3, 0.95], [1, 2, 0.5]]}']
    trace.write_text("\n".join(lines) + "\n")
    (first,) = load_plan(trace).steps[0].layers
    assert first.guesses == [(1, 2, 0.5), (1, 3, 0.95), (2, 0, 0.2), (3, 1, 0.8)]
    two = SimpleNamespace(speculate=True, speculate_layers=2, speculate_threshold=0.3)
    assert guesses(first, 4, two) == ([1, 1], [2, 3], [0.5, 0.95])
    three = SimpleNamespace(speculate=True, speculate_layers=3, speculate_threshold=0.1)
    assert guesses(first, 4, three) == ([1, 1, 2, 3], [2, 3, 0, 1], [0.5, 0.95, 0.2, 0.8])


# ---------------------------------------------------------------------------------------------------- the bench
def test_variants_and_repeats():
    assert [(v.policy, v.prefetch) for v in parse_variants("lru, activation+prefetch")] == [("lru", False),
                                                                                          ("activation", True)]
    for bad in ("belady", "lru+pf", ""):
        with pytest.raises(ValueError):
            parse_variants(bad)
    rows = [{"policy": "lru", "fetches": f, "prefetch": False, "prefetch_precision": None, "fetches_per_token": f / 2,
             "stall_ms_per_token": s} for f, s in ((3, 1.0), (9, 4.0), (4, 0.5))]
    med = median_row(rows)
    assert med["fetches"] == 4 and med["prefetch"] is False and med["prefetch_precision"] is None
    assert med["repeats"] == rows
    assert med["stall_ms_per_token"] == 1.0 and med["stall_ms_per_token_range"] == [0.5, 4.0]
    assert med["fetches_per_token_range"] == [1.5, 4.5]


def test_ratios_to_lru_are_paired_by_repeat():
    lru = [{"fetches_per_token": f, "stall_ms_per_token": s} for f, s in ((10, 2.0), (10, 8.0), (10, 0.0))]
    other = [{"fetches_per_token": f, "stall_ms_per_token": s} for f, s in ((8, 1.0), (9, 6.0), (7, 1.0))]
    got = paired_ratios(other, lru)
    # stall: 0.5 and 0.75 (the repeat where LRU stalled 0 gives no ratio); a ratio of medians would say 1/2
    assert got["stall_vs_lru"] == 0.625 and got["stall_vs_lru_range"] == [0.5, 0.75]
    assert got["fetches_vs_lru"] == 0.8 and got["fetches_vs_lru_range"] == [0.7, 0.9]


def test_bad_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "other"}\n')
    for args in (["--trace", str(tmp_path / "missing.jsonl")], ["--trace", str(bad)],
                 ["--trace", str(DEMO_TRACE), "--expert-bytes", "big"]):
        proc = subprocess.run(moeinf_cmd("bench", "replay", *args), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "error:" in proc.stderr, proc.stderr


def test_replay_against_memd(tmp_path, bench_tmp):
    out, png, tmp = tmp_path / "replay.json", tmp_path / "replay.png", bench_tmp
    stale = orphan_regions()  # another run's leftovers are not this bench's
    plot = ["--plot", str(png)] if _has_matplotlib() else []
    cmd = moeinf_cmd("bench", "replay", "--trace", str(DEMO_TRACE), "--max-steps", "24", "--expert-bytes", "64KiB",
                     "--store-dir", str(tmp_path / "stores"), "--policies", "lru,activation+prefetch",
                     "--layer-compute-ms", "0.2", "--leases", "off", "--json", str(out), *plot)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Belady" in proc.stdout and "activation+prefetch" in proc.stdout

    doc = json.loads(out.read_text())
    assert {"tokens", "capacity_experts", "belady_fetches_per_token", "lru_fetches_per_token", "results"} <= set(doc)
    assert doc["capacity_experts"] == 8 and doc["steps"] == 24 and doc["expert_bytes"] == 65664
    assert 0 < doc["belady_fetches"] <= doc["lru_fetches"]
    rows = {r["policy"]: r for r in doc["results"]}
    assert list(rows) == ["lru", "activation+prefetch"]
    for r in rows.values():
        assert r["fetches"] == r["misses"] + r["prefetch_issued"] >= doc["belady_fetches"]
        assert r["fetches_per_token"] == pytest.approx(r["fetches"] / doc["tokens"])
        assert r["hits"] + r["misses"] == sum(len(a) for a in load_plan(DEMO_TRACE, 24).accesses())
        assert r["trace_steps"] == 24 and r["trace_lost"] == 0
        # one layer note per MoE layer per step, as the worker sends; none fed twice (acquires carry no routing)
        assert r["layer_notes"] == len(load_plan(DEMO_TRACE, 24).accesses()) and r["notes_dropped"] == 0
        assert r["notes_unsent"] == 0
        assert r["misses"] > 0 and r["stall_ms_per_token"] > 0  # a cold pool waits for its first reads
        # every on-demand load reads one whole expert; a prefetch does unless it is cancelled
        assert r["misses"] * doc["expert_bytes"] <= r["bytes_read"] <= r["fetches"] * doc["expert_bytes"]
        assert r["prefetch_used"] + r["prefetch_wasted"] <= r["prefetch_issued"]
    # memd's LRU without prefetch (and without leases) is the on-demand LRU bound, up to the order in which one
    # layer's misses finish loading (memd makes them most recent as they finish, the bound in expert order)
    assert abs(rows["lru"]["fetches"] - doc["lru_fetches"]) <= max(2, doc["lru_fetches"] // 20)
    assert rows["lru"]["prefetch_issued"] == 0 \
        and rows["lru"]["bytes_read"] == rows["lru"]["misses"] * doc["expert_bytes"]
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    left = [p.name for p in tmp.iterdir() if p.name.startswith("moeinf-bench-")]  # (torch may cache here too)
    assert left == [] and not new_orphans(stale), "the bench left a state directory or a pool"


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def test_paired_ratios_count_the_repeats_lru_left_unpaired():
    from services.bench.replay import paired_ratios

    def rows(*pairs):
        return [{"fetches_per_token": f, "stall_ms_per_token": s} for f, s in pairs]
    lru, ours = rows((10.0, 0.0), (20.0, 4.0)), rows((9.0, 1.5), (10.0, 2.0))
    out = paired_ratios(ours, lru)
    assert out["fetches_vs_lru"] == 0.7 and out["fetches_vs_lru_range"] == [0.5, 0.9]
    assert out["stall_vs_lru"] == 0.5 and out["stall_vs_lru_unpaired"] == 1 and out["fetches_vs_lru_unpaired"] == 0
