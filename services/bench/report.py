"""Aggregating timed runs into one row per system, and printing / writing them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STAT_FIELDS = ("hits", "misses", "bytes_read", "read_seconds", "stall_seconds", "prefetch_issued")  # memd's counters

MIB = 2**20


@dataclass
class Summary:
    system: str
    expert_memory: str | None
    pool: tuple[int, int, int] | None  # (slots, all experts, bytes)
    prefill_ms: float
    decode_ms_p50: float
    decode_ms_p90: float
    decode_ms_mean: float
    decode_steps: int
    identical: bool
    hits: int | None = None
    misses: int | None = None
    bytes_read: int | None = None
    read_seconds: float | None = None
    stall_seconds: float | None = None
    prefetch_issued: int | None = None  # of the reads, those memd started ahead of an acquire
    ratio_vs_transformers: float = 1.0
    prefill_ratio_vs_transformers: float = 1.0
    eamc_size: int | None = None  # memd's EAMC at the end (finished requests it learned from)

    @property
    def bytes_read_per_token(self) -> float | None:
        return None if self.bytes_read is None else self.bytes_read / self.decode_steps

    @property
    def read_mib_s(self) -> float | None:
        if not self.read_seconds:
            return None
        return self.bytes_read / MIB / self.read_seconds

    def as_json(self) -> dict:
        pool = None if self.pool is None else {"slots": self.pool[0], "experts": self.pool[1], "bytes": self.pool[2]}
        return {
            "system": self.system, "expert_memory": self.expert_memory, "pool": pool,
            "decode_ms_p50": self.decode_ms_p50, "decode_ms_p90": self.decode_ms_p90,
            "decode_ms_mean": self.decode_ms_mean, "decode_steps": self.decode_steps,
            "prefill_ms": self.prefill_ms, "ratio_vs_transformers": self.ratio_vs_transformers,
            "prefill_ratio_vs_transformers": self.prefill_ratio_vs_transformers,
            "bytes_read_per_token": self.bytes_read_per_token, "hits": self.hits, "misses": self.misses,
            "prefetch_issued": self.prefetch_issued,
            "read_mib_per_s": self.read_mib_s,
            "stall_ms_per_token": None if self.stall_seconds is None else self.stall_seconds * 1e3 / self.decode_steps,
            "identical_to_transformers": self.identical, "eamc_size": self.eamc_size,
        }


def summarize(system, runs: list, references: list[list[int]]) -> Summary:
    """Median / p90 over the decode steps of all runs; prefill is the median over runs; counters are summed;
    ``identical``: every run's tokens are its round's reference (``references``, one per run)."""
    decode_ms = np.array([t for run in runs for t in run.decode_s]) * 1e3
    prefill_ms = np.array([run.prefill_s for run in runs]) * 1e3
    summary = Summary(
        system=system.name, expert_memory=system.expert_memory, pool=system.pool,
        prefill_ms=float(np.median(prefill_ms)), decode_ms_p50=float(np.median(decode_ms)),
        decode_ms_p90=float(np.percentile(decode_ms, 90)), decode_ms_mean=float(decode_ms.mean()),
        decode_steps=len(decode_ms), identical=len(runs) == len(references)
        and all(run.tokens == reference for run, reference in zip(runs, references)),
    )
    if runs and runs[0].decode_stats:
        for name in STAT_FIELDS:
            setattr(summary, name, sum(run.decode_stats[name] for run in runs))
    return summary


COLUMNS = (
    # title, width, cell
    ("system", 14, lambda s: s.system),
    ("pool slots", 10, lambda s: "all" if s.pool is None else f"{s.pool[0]}/{s.pool[1]}"),
    ("prefill ms", 10, lambda s: f"{s.prefill_ms:.1f}"),
    ("decode p50", 10, lambda s: f"{s.decode_ms_p50:.2f}"),
    ("decode p90", 10, lambda s: f"{s.decode_ms_p90:.2f}"),
    ("vs transf.", 10, lambda s: f"{s.ratio_vs_transformers:.3f}x"),
    ("hits/tok", 8, lambda s: _per_token(s, s.hits, "{:.1f}")),
    ("miss/tok", 8, lambda s: _per_token(s, s.misses, "{:.1f}")),
    ("MiB rd/tok", 10, lambda s: _per_token(s, None if s.bytes_read is None else s.bytes_read / MIB, "{:.1f}")),
    ("rd MiB/s", 8, lambda s: "-" if s.read_mib_s is None else f"{s.read_mib_s:.0f}"),
    ("stall ms/tok", 12, lambda s: _per_token(s, None if s.stall_seconds is None else s.stall_seconds * 1e3,
                                               "{:.2f}")),
    ("same tokens", 11, lambda s: "yes" if s.identical else "NO"),
)


def _per_token(s: Summary, value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value / s.decode_steps)


def format_table(header: str, summaries: list[Summary]) -> str:
    lines = [header, ""]
    first = max([COLUMNS[0][1], *(len(s.system) for s in summaries)])  # the system column fits every name
    columns = [(COLUMNS[0][0], first, COLUMNS[0][2]), *COLUMNS[1:]]
    lines.append("  ".join(f"{title:>{width}}" if i else f"{title:<{width}}"
                           for i, (title, width, _) in enumerate(columns)))
    for s in summaries:
        lines.append("  ".join(f"{cell(s):>{width}}" if i else f"{cell(s):<{width}}"
                               for i, (_, width, cell) in enumerate(columns)))
    lines.append("")
    lines.append("decode p50/p90: ms per token over all decode steps of all repeats; prefill: median over repeats;"
                 " vs transf.: decode p50 / transformers' decode p50;")
    lines.append("memd counters (hits, misses, MiB read, stall) are per decode token, measured runs only; rd MiB/s:"
                 " bytes read / memd's read seconds; same tokens: equal to transformers' model.generate")
    return "\n".join(lines)


def write_json(path: Path, model: str, threads: int, opts, summaries: list[Summary]) -> None:
    doc = {
        "model": model, "threads": threads, "prompt_len": opts.prompt_len, "tokens": opts.tokens,
        "repeats": opts.repeats, "systems": [s.as_json() for s in summaries],
    }
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
