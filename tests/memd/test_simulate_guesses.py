"""The simulator's guesses: a trace's own (``guesses``, any distance, filtered as memd asks) or perfect ones
(``guesses="oracle"``: the real routing of the layers memd looks ahead to)."""
import json
from pathlib import Path

from common.traces import group_steps, read_trace
from services.memd.core import CacheSettings
from services.memd.simulate import SimConfig, simulate

DEMO = Path(__file__).parent.parent / "data" / "demo-trace.jsonl"


def run(path: Path, guesses: str = "trace", slots: int = 8):
    header, records = read_trace(path)
    cfg = SimConfig(slots, CacheSettings(policy="activation", prefetch=True), read_seconds=2e-3,
                    layer_seconds=1e-3, guesses=guesses)
    return simulate(header, list(group_steps(records)), cfg)


def with_true_guesses(tmp_path: Path) -> Path:
    """The demo trace with every token's real experts of every later layer as its guesses, at confidence 1."""
    lines = [json.loads(x) for x in DEMO.read_text().splitlines()]
    header, records = lines[0], lines[1:]
    routed = {(r["req"], r["pos"], r["layer"]): r["experts"] for r in records}
    for r in records:
        later = range(1, header["num_layers"] - r["layer"])
        r["guesses"] = [[d, e, 1.0] for d in later for e in sorted(routed[r["req"], r["pos"], r["layer"] + d])]
    path = tmp_path / "true-guesses.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_oracle_guesses_are_never_wrong():
    r = run(DEMO, "oracle")
    assert r.prefetch_issued > 0 and r.prefetch_wasted == 0 and r.prefetch_used == r.prefetch_issued


def test_a_traces_guesses_go_out_as_memd_asks_for_them(tmp_path):
    """Guesses recorded for every later layer, filtered by memd's lookahead and threshold as the worker filters
    them, are exactly the oracle's: the same decisions, the same result."""
    mine, oracle = run(with_true_guesses(tmp_path)), run(DEMO, "oracle")
    assert (mine.misses, mine.prefetch_issued, mine.prefetch_used, mine.stall_seconds) == (
        oracle.misses, oracle.prefetch_issued, oracle.prefetch_used, oracle.stall_seconds)
    plain = run(DEMO)  # the demo trace records no guesses: prefetch acts on memd's own prediction
    assert (plain.misses, plain.prefetch_issued) != (mine.misses, mine.prefetch_issued)
