"""The interleaved repeats of ``bench e2e``: which system runs first in each, one row per system from its runs
(failed runs said on the row), and the run's exit status."""
from __future__ import annotations

from services.bench.e2e import median_run


def uneven_order(repeats: int, systems: int) -> str | None:
    """The note when ``rotated`` cannot give every system each place in the order equally often."""
    if systems > 1 and repeats % systems:
        return (f"{repeats} repeats rotate the order of {systems} systems unevenly (some run first more often than"
                f" others): a multiple of {systems} repeats balances it")
    return None


def rotated(items: list, r: int) -> list:
    """``items`` starting at its ``r``-th (cyclically): no system always runs first."""
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def merge_repeats(rows: list[dict]) -> list[dict]:
    """One row per (system, expert memory, concurrency), in first-seen order, from the runs of the interleaved repeats:
    the run with the median decode p50 (``e2e.median_run``, as ``summarize`` picks within one start), its tokens/s the
    median of ``tokens_per_s_all`` (the good runs'), and ``decode_ms_per_token_p50_all`` (one entry per run in repeat
    order, None for a run that failed, so two systems' lists pair repeat by repeat). A run that failed is kept only
    when every run failed; otherwise ``failed_repeats`` says which failed and why (the report prints it, the exit
    status counts it: a system killed at its limit in some repeats is not reported on its survivors alone)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["system"], row.get("expert_memory"), row["concurrency"]), []).append(row)
    merged = []
    for runs in groups.values():
        good = [r for r in runs if not r.get("error")]
        if not good:
            merged.append(runs[0])
            continue
        row = median_run(good, [t for r in good for t in r.get("tokens_per_s_all") or [r["tokens_per_s"]]])
        ordered = sorted(runs, key=lambda r: r.get("repeat_index") or 0)
        row["decode_ms_per_token_p50_all"] = [None if r.get("error") else r["decode_ms_per_token_p50"] for r in ordered]
        row["repeats"] = sum(r.get("repeats", 1) for r in good)
        if failed := [f"repeat {r.get('repeat_index') or 0}: {r['error']}" for r in ordered if r.get("error")]:
            row["failed_repeats"] = failed
            row["oom_kills"] = sum(r.get("oom_kills") or 0 for r in runs)
        if any("same_tokens_as_c1" in r for r in good):
            row["same_tokens_as_c1"] = all(r.get("same_tokens_as_c1", True) for r in good)
        merged.append(row)
    return merged


def run_status(doc: dict) -> int:
    """1 when any system failed in any repeat or generated other tokens than its reference (the table says which),
    else 0: a script that runs the benchmark must not take a partial or wrong run for a result."""
    failed = any(r.get("error") or r.get("failed_repeats") for r in doc["systems"])
    return 1 if failed or any(n.startswith("MISMATCH") for n in doc["notes"]) else 0
