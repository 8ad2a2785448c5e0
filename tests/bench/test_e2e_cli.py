"""``moeinf bench e2e`` on a tiny checkpoint: the table and the JSON have the promised shape (timings are not
checked), the greedy outputs with several clients equal those of the same prompts served alone, every run gets
its own prompts (or, with --warm-eamc, the same, labelled), and memd and the worker are stopped."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import moeinf_cmd, new_orphans, orphan_regions, write_family

FIXED = ("--runtime-allowance", "1GiB",  # skips measuring the runtime (tests/bench/test_e2e_baselines.py does)
         "--floor-probe", "64MiB")  # (the compute floor's own test: tests/bench/test_e2e_floor.py)
ROW_KEYS = {"system", "ttft_s", "decode_ms_per_token_p50", "decode_ms_per_token_p90", "tokens_per_s",
            "bytes_read_per_token", "hit_rate"}


def test_table_and_json(tmp_path, bench_tmp):
    model = write_family("mixtral", tmp_path / "m")
    stale = orphan_regions()  # another run's leftovers are not this bench's
    out, tmp = tmp_path / "e2e.json", bench_tmp
    cmd = moeinf_cmd("bench", "e2e", "--model", str(model), *FIXED, "--systems", "moeinf", "--expert-memory", "100%",
                     "--concurrency", "1", "3", "--requests", "5", "--max-tokens", "6", "--threads", "1",
                     "--repeats", "2", "--json", str(out))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    assert "3 clients:" in proc.stdout and "same tokens as 1 client" in proc.stdout

    doc = json.loads(out.read_text())
    assert doc["disk_read_gbps"] > 0 and isinstance(doc["memory_limit_bytes"], (int, type(None)))
    rows = doc["systems"]
    assert [(r["system"], r["concurrency"]) for r in rows] == [("moeinf", 1), ("moeinf", 3)]
    for r in rows:
        assert ROW_KEYS <= set(r) and r["tokens_per_s"] > 0 and r["generated_tokens"] == 5 * 6
        assert r["decode_ms_per_token_p90"] >= r["decode_ms_per_token_p50"] > 0 and 0 <= r["hit_rate"] <= 1
    assert rows[1]["same_tokens_as_c1"] is True and "same_tokens_as_c1" not in rows[0]
    assert all(r["repeats"] == 2 and len(r["tokens_per_s_all"]) == 2 and r["eamc"] == "fresh" for r in rows)
    assert doc["warm_eamc"] is False and "fresh prompts" in proc.stdout
    for r in rows:  # prediction quality from memd's STATS (values: tests/bench/test_e2e_quality.py)
        assert {"prefetch_precision", "prefetch_recall", "lookahead", "speculation"} <= set(r)
        assert all(s["precision"] == (s["correct"] / s["predicted"] if s["predicted"] else None)
                   for s in r["lookahead"])
    assert "la1 P" in proc.stdout and "lookahead P/R by distance 1:" in proc.stdout
    assert list(tmp.iterdir()) == [] and not new_orphans(stale), "the bench left a state directory or a pool"


def test_every_run_gets_fresh_prompts_paired_across_systems_unless_warm(tmp_path):
    from services.bench.e2e_workload import Workloads

    model = write_family("mixtral", tmp_path / "m")
    systems = ("accelerate-offload", "moeinf-ondemand-lru", "moeinf")
    fresh = Workloads(model, 4, 0, False, systems, 3, 2, vocab=320)
    seen = [tuple(map(tuple, fresh.prompts("moeinf", r, c))) for r in range(3) for c in range(2)]
    assert len(set(seen)) == len(seen) == 6  # every repeat and client count: its own workload
    prompts = {p for workload in seen for p in workload}
    assert len(prompts) == 6 * 4 and tuple(fresh.warmup()) not in prompts
    for s in systems:  # paired: every system serves the same workloads (each in a fresh memd)
        assert [tuple(map(tuple, fresh.prompts(s, r, c))) for r in range(3) for c in range(2)] == seen
    assert fresh.prompts("moeinf", 1, 1) == fresh.prompts("moeinf", 1, 1)  # reproducible
    warm = Workloads(model, 4, 0, True, systems, 3, 2, vocab=320)
    assert warm.prompts("moeinf", 2, 1) == warm.prompts("accelerate-offload", 0, 0) and "WARM" in warm.label()
    lines = Workloads(model, 4, 0, False, systems, 3, 2, lines=tuple((i, i + 1) for i in range(20)), vocab=320)
    with pytest.raises(ValueError, match="need 24 .*--warm-eamc"):
        lines.check()


@pytest.mark.slow  # CI's time: one more full e2e run for a label
def test_warm_eamc_is_labelled(tmp_path):
    model = write_family("mixtral", tmp_path / "m")
    out = tmp_path / "e2e.json"
    cmd = moeinf_cmd("bench", "e2e", "--model", str(model), *FIXED, "--systems", "moeinf", "--expert-memory", "100%",
                     "--requests", "2", "--max-tokens", "3", "--threads", "1", "--warm-eamc", "--json", str(out))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "moeinf*" in proc.stdout and "WARM EAMC" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["warm_eamc"] is True and doc["systems"][0]["eamc"] == "warm"


@pytest.mark.slow  # CI's time (~40 s): serving with two workers is tests/fault/test_multi_worker.py's
def test_two_workers_on_one_memd(tmp_path):
    """--workers 2: two worker processes on the one memd serve the clients (the same greedy tokens as one client);
    the row says so and carries the PSS memd and the workers hold."""
    model = write_family("mixtral", tmp_path / "m")
    stale = orphan_regions()  # another run's leftovers are not this bench's
    out = tmp_path / "e2e.json"
    cmd = moeinf_cmd("bench", "e2e", "--model", str(model), *FIXED, "--systems", "moeinf", "--expert-memory", "100%",
                     "--concurrency", "2", "--requests", "4", "--max-tokens", "4", "--threads", "1",
                     "--workers", "2", "--memory-limit", "off", "--json", str(out))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    (row,) = doc["systems"]
    assert doc["workers"] == 2 and row["workers"] == 2 and row["same_tokens_as_c1"] is True
    assert row["pss_bytes"] > 0 and row["generated_tokens"] == 4 * 4
    assert not new_orphans(stale)


@pytest.mark.slow  # converts a checkpoint twice and serves it three times (~1 min)
def test_formats_run_the_same_checkpoint_compressed_at_the_same_byte_limit(tmp_path):
    """``--formats fp8 mxfp4``: rows moeinf-fp8 and moeinf-mxfp4 beside moeinf, memd given the stored experts'
    pool in bytes; the expert cache is filled ahead, so the timed runs convert nothing."""
    model = write_family("gpt_oss", tmp_path / "m", dtype="bfloat16")
    out, cache = tmp_path / "e2e.json", tmp_path / "cache"
    cmd = moeinf_cmd("bench", "e2e", "--model", str(model), *FIXED, "--systems", "moeinf", "--expert-memory", "50%",
                     "--requests", "2", "--max-tokens", "4", "--threads", "1", "--memory-limit", "off",
                     "--formats", "fp8", "mxfp4", "--expert-cache-dir", str(cache), "--json", str(out))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {r["system"]: r for r in json.loads(out.read_text())["systems"]}
    assert set(rows) == {"moeinf", "moeinf-fp8", "moeinf-mxfp4"}
    assert all(r["expert_memory"] == "50%" and r["generated_tokens"] == 2 * 4 for r in rows.values())
    assert rows["moeinf"]["bytes_read_per_token"] > 0
    assert rows["moeinf-mxfp4"]["bytes_read_per_token"] < rows["moeinf"]["bytes_read_per_token"]
    assert "expert formats (memd --expert-format" in proc.stdout and "x the stored experts'" in proc.stdout
    assert "fp8, 32 experts converted now" in proc.stderr
    assert len([p for p in cache.iterdir() if "-slots-" not in p.name]) == 2  # the two formats (and the slot images)


def test_a_gone_service_says_why():
    from services.bench.service_proc import ServiceProcess, exited_with

    assert exited_with(-9).endswith("(killed: out of memory under the limit?)") and exited_with(1) == "exited with 1"
    proc = ServiceProcess("worker", [], Path("/nonexistent/log"), "ready", ready_timeout_s=1)
    assert proc.gone() is None  # not started: nothing to report
    proc.proc = subprocess.Popen(["sh", "-c", "kill -9 $$"])
    proc.proc.wait()
    assert proc.gone() == "moeinf worker exited with -9 (killed: out of memory under the limit?)"


def test_repeats_interleave_and_merge_to_the_median_run():
    from services.bench.e2e_report import paired_ratios
    from services.bench.e2e_repeats import merge_repeats, rotated, uneven_order

    assert [rotated(["a", "b"], r) for r in range(3)] == [["a", "b"], ["b", "a"], ["a", "b"]] and rotated([], 1) == []
    assert "a multiple of 2 repeats" in uneven_order(3, 2)  # "a" ran first twice: the report says so
    assert uneven_order(4, 2) is None and uneven_order(3, 3) is None and uneven_order(3, 1) is None

    def run(system, repeat, tps, p50):
        return {"system": system, "expert_memory": "25%", "concurrency": 1, "tokens_per_s": tps,
                "decode_ms_per_token_p50": p50, "repeats": 1, "repeat_index": repeat}

    def failed(system, repeat):
        return {"system": system, "expert_memory": "25%", "concurrency": 1, "error": "killed", "repeat_index": repeat}

    # interleaved: repeat 0 runs lru then moeinf, repeat 1 moeinf then lru, ...; lru's repeat 2 failed
    rows = [run("lru", 0, 1.0, 700.0), run("moeinf", 0, 1.5, 500.0), run("moeinf", 1, 1.2, 560.0),
            run("lru", 1, 0.9, 760.0), failed("lru", 2), run("moeinf", 2, 1.3, 540.0)]
    lru, ours = merge_repeats(rows)
    # the failed run dropped
    assert (lru["system"], lru["decode_ms_per_token_p50"], lru["repeats"]) == ("lru", 760.0, 2)  # (the upper of two)
    assert lru["decode_ms_per_token_p50_all"] == [700.0, 760.0, None] and lru["tokens_per_s_all"] == [1.0, 0.9]
    assert ours["decode_ms_per_token_p50"] == 540.0 and ours["decode_ms_per_token_p50_all"] == [500.0, 560.0, 540.0]
    assert paired_ratios(ours, lru) == pytest.approx([500 / 700, 560 / 760])  # repeat by repeat; repeat 2 unpaired
    # moeinf failing in repeat 0 and lru in repeat 1: no two repeats pair, so nothing is paired across repeats
    lru, ours = merge_repeats([run("lru", 0, 1.0, 700.0), failed("moeinf", 0), failed("lru", 1),
                               run("moeinf", 1, 1.2, 560.0)])
    assert paired_ratios(ours, lru) == []
    # the run with the median decode p50 is the row (not the median tokens/s one: its prompts count there too)
    (row,) = merge_repeats([run("m", 0, 1.0, 300.0), run("m", 1, 2.0, 500.0), run("m", 2, 3.0, 400.0)])
    assert (row["decode_ms_per_token_p50"], row["repeat_index"], row["tokens_per_s"]) == (400.0, 2, 2.0)
    (row,) = merge_repeats([run("m", 0, 1.0, 300.0), run("m", 1, 2.0, None), run("m", 2, 3.0, None)])
    assert row["decode_ms_per_token_p50"] == 300.0  # a run with no decode gap is not the median one
    only_failed = merge_repeats([{"system": "x", "concurrency": 1, "error": "e"}] * 2)
    assert only_failed == [{"system": "x", "concurrency": 1, "error": "e"}]


def test_a_failed_repeat_is_said_on_its_row_and_in_the_exit_status():
    """A system that failed in some repeats (killed at its memory limit, say) is not reported on its good runs
    alone: the row names the failures, its OOM kills are kept, and the run exits 1 (so does a token mismatch)."""
    from services.bench.e2e_report import _line
    from services.bench.e2e_repeats import merge_repeats, run_status

    good = {"system": "moeinf", "expert_memory": "25%", "concurrency": 1, "tokens_per_s": 1.0, "repeats": 1,
            "decode_ms_per_token_p50": 500.0, "decode_ms_per_token_p90": 600.0, "repeat_index": 0,
            "memory_limit_bytes": None, "ttft_s": 0.5, "bytes_read_per_token": None, "hit_rate": None,
            "peak_memory_bytes": None}
    (row,) = merge_repeats([good, {"system": "moeinf", "expert_memory": "25%", "concurrency": 1, "repeat_index": 1,
                                   "error": "the worker was killed (OOM)", "oom_kills": 1}])
    assert row["failed_repeats"] == ["repeat 1: the worker was killed (OOM)"] and row["oom_kills"] == 1
    assert "(1 of 2 repeats FAILED)" in _line(row)
    assert run_status({"systems": [row], "notes": []}) == 1
    assert run_status({"systems": [dict(good)], "notes": []}) == 0
    assert run_status({"systems": [dict(good)], "notes": ["MISMATCH: moeinf at 25% generated other tokens"]}) == 1


def test_pin_puts_each_worker_and_memd_on_their_own_cpus(tmp_path):
    from common.config_checks import format_cpus
    from services.bench.e2e import Options
    from services.bench.e2e_system import cpu_sets

    model = write_family("mixtral", tmp_path / "m")
    cpus = sorted(os.sched_getaffinity(0))
    opts = Options(model, ("25%",), 4, None, 1, (1,), 1, 1, None, pin=True)
    if len(cpus) < 2:
        with pytest.raises(ValueError, match="--pin: --threads x --workers must be between 1 and 0"):
            opts.validate()
        return
    opts.validate()
    assert cpu_sets(1, 1) == ([format_cpus(cpus[:1])], format_cpus(cpus[1:]))
    if len(cpus) >= 3:
        assert cpu_sets(1, 2) == ([format_cpus(cpus[:1]), format_cpus(cpus[1:2])], format_cpus(cpus[2:]))
    for threads, workers in ((0, 1), (len(cpus), 1), (1, len(cpus))):  # no CPU left for memd, or none for a worker
        with pytest.raises(ValueError, match="--pin: --threads x --workers must be between 1 and"):
            Options(model, ("25%",), 4, None, 1, (1,), 1, threads, None, workers=workers, pin=True).validate()
    with pytest.raises(ValueError, match="--pin places the moeinf systems' processes"):
        Options(model, ("25%",), 4, None, 1, (1,), 1, 1, None, systems=("transformers-resident",), pin=True).validate()


def test_the_disk_probes_read_at_the_benchmarks_memd_queue_depth(tmp_path):
    """memd's queue depth comes from the environment as memd parses it (MOEINF_READ_THREADS / MOEINF_READ_CHUNK);
    every moeinf system's memd is started with it and the probes read alike, so an on-demand load can never beat
    a probe run at a shallower depth."""
    import argparse

    from services.bench.diskbw import CHUNK, STREAMS
    from services.bench.e2e import Options
    from services.bench.e2e_cli import add_parser
    from services.bench.e2e_system import MoeinfSystem

    model = write_family("mixtral", tmp_path / "m")
    bench = argparse.ArgumentParser().add_subparsers()
    add_parser(bench)
    args = bench.choices["e2e"].parse_args(["--model", str(model), "--systems", "moeinf"])
    default = Options.from_args(args, env={})
    assert (default.read_threads, default.read_chunk_bytes) == (STREAMS, CHUNK)
    opts = Options.from_args(args, env={"MOEINF_READ_THREADS": "2", "MOEINF_READ_CHUNK": "512KiB"})
    assert (opts.read_threads, opts.read_chunk_bytes) == (2, 512 << 10)
    flags = MoeinfSystem(opts, "moeinf", "25%").flags
    assert flags[flags.index("--read-threads") + 1] == "2" and flags[flags.index("--read-chunk") + 1] == "512KiB"
    with pytest.raises(ValueError, match="read"):
        Options.from_args(args, env={"MOEINF_READ_THREADS": "0"})
    with pytest.raises(ValueError, match="--read-chunk '25%': give a size in bytes"):  # (memd read 1 MiB pieces)
        Options.from_args(args, env={"MOEINF_READ_CHUNK": "25%"})
    off = bench.choices["e2e"].parse_args(["--model", str(model), "--systems", "moeinf", "--slot-cache", "off",
                                           "--slot-compression", "zstd"])
    with pytest.raises(ValueError, match="--slot-compression compresses the slot images"):
        Options.from_args(off, env={})
    for flag in ("--disk-probe", "--runtime-allowance"):  # ... 0 bytes too: a probe of nothing, a limit of no room
        shared = bench.choices["e2e"].parse_args(["--model", str(model), "--systems", "moeinf", flag, "25%"])
        with pytest.raises(ValueError, match=f"{flag} '25%': give a size in bytes"):
            Options.from_args(shared, env={})
