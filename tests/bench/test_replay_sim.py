"""The simulator (services/memd/simulate.py: leases, memd's reader rules) agrees with ``bench replay`` (a real
memd, leases on) within 5% on fetches, per policy and capacity, on a short stretch of the demo trace. The simulated
reader gets the bandwidth the real one measured in the same run, and the layer compute memd measured (the replay's
own Python work per layer is part of what memd sees as compute, and is not small against a replay's sleep).
One row is known not to agree and is allowed to miss (``KNOWN_OFF``); the issue's target (every row) is not met."""
import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import moeinf_cmd

from common.traces import group_steps, read_trace
from services.memd.core import CacheSettings
from services.memd.simulate import SimConfig, simulate

DEMO_TRACE = Path(__file__).parents[1] / "data" / "demo-trace.jsonl"
KNOWN_OFF = {(16, "activation+prefetch")}
STEPS = 180  # enough steps that the replay's run-to-run noise (a few fetches) is small against the counts


@pytest.mark.slow
def test_simulator_agrees_with_replay_on_fetches(tmp_path, bench_tmp):
    out, tmp = tmp_path / "replay.json", bench_tmp
    cmd = moeinf_cmd("bench", "replay", "--trace", str(DEMO_TRACE), "--max-steps", str(STEPS), "--expert-bytes",
                     "64KiB", "--store-dir", str(tmp_path / "stores"),
                     "--policies", "lru,activation,activation+prefetch",
                     "--expert-memory", "25%", "50%", "--json", str(out))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "leases on" in proc.stdout and "layer compute" in proc.stdout
    header, records = read_trace(DEMO_TRACE)
    steps = list(group_steps(records))[:STEPS]
    compared, off = 0, {}
    for doc in json.loads(out.read_text()):
        assert doc["leases"] and doc["layer_compute_ms"] > 0
        for row in doc["results"]:
            bandwidth = (row["read_mib_per_s"] or 100.0) * 2**20
            cfg = SimConfig(doc["capacity_experts"], CacheSettings(policy=row["eviction"], prefetch=row["prefetch"]),
                            read_seconds=doc["slot_bytes"] / bandwidth, layer_seconds=row["memd_layer_ms"] / 1e3,
                            expert_bytes=doc["slot_bytes"])
            sim = simulate(header, steps, cfg)
            if abs(sim.fetches - row["fetches"]) > max(2, 0.05 * row["fetches"]):
                off[(doc["capacity_experts"], row["policy"])] = (sim.fetches, row["fetches"])
            compared += 1
    assert compared == 6
    # known and not fixed (docs/benchmarks.md): at 16 slots the real memd issues more prefetches than the simulator
    # (149 simulated against 159 replayed on 3 December); any other row off by more than 5% fails
    assert set(off) <= KNOWN_OFF, off
