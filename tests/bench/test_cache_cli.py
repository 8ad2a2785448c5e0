"""``moeinf bench synth`` + ``moeinf bench cache``: the simulator's table for every policy, with the CPU time memd's
decisions took per layer."""
import json
import subprocess
import sys


def cli(*args):
    return subprocess.run([sys.executable, "-m", "services.cli", "bench", *args], capture_output=True, text=True,
                          timeout=600)


def test_cache_rows_for_every_policy_with_the_decisions_cpu(tmp_path):
    trace, out = tmp_path / "flat.jsonl", tmp_path / "cache.json"
    made = cli("synth", str(trace), "--workload", "mixtral-flat", "--requests", "1", "--seed", "3")
    assert made.returncode == 0, made.stderr[-2000:]
    run = cli("cache", str(trace), "--memory", "25%", "--read-ms", "3", "--layer-ms", "0.11", "--json", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["policy"], r["prefetch"], r["guesses"]) for r in rows] == [
        ("lru", False, "trace"), ("lfu", False, "trace"), ("activation", False, "trace"), ("lru", True, "trace"),
        ("activation", True, "trace"), ("activation", True, "oracle")]
    oracle = rows[-1]  # prefetch on perfect guesses: never wrong
    assert oracle["prefetch_issued"] > 0 and oracle["prefetch_wasted"] == 0
    assert all(r["slots"] == 64 and r["misses_per_token"] > 0 and r["decide_us_per_layer"] > 0 for r in rows), rows
    assert rows[0]["prefetch_used"] == rows[0]["prefetch_wasted"] == 0
    assert "us/layer" in run.stdout
