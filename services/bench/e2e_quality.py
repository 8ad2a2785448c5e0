"""``moeinf bench e2e``: how good memd's predictions and prefetches were over one run, from its ``StatsReply``.

memd's counters only grow, so a run's figures are the difference of two STATS replies (before and after it):

* prefetch precision: prefetches used (acquired before eviction) over used + wasted (evicted or cancelled unused);
  prefetch recall: used over used + on-demand loads (the needed reads a prefetch had started);
* by lookahead distance d: ``lookahead`` (memd's fused prediction d layers ahead, what the planner prefetches from)
  and ``speculation`` (the worker's hidden-state guesses d layers ahead): precision = correct / predicted, recall =
  correct / routed.

The counts travel flat in the counters dict (``lookahead_1_predicted``...) so a run's delta is a plain difference.
"""
from __future__ import annotations

PREDICTIONS = ("lookahead", "speculation")
COUNTS = ("predicted", "correct", "routed")
PREFETCH = ("prefetch_issued", "prefetch_used", "prefetch_wasted", "prefetch_late", "prefetch_cancelled",
            "prefetch_declined", "prefetch_deferred")
PRECISION_TARGET = 0.6  # issue 11: prefetch precision >= 0.6 at lookahead 1


def stats_counters(stats) -> dict[str, float]:
    """The cumulative counters of a ``StatsReply`` that a run's figures are differences of."""
    out = {"hits": stats.hits, "misses": stats.misses, "bytes_read": stats.bytes_read,
           "read_seconds": stats.read_seconds, "stall_seconds": stats.stall_seconds,
           "reader_busy_seconds": stats.reader_busy_seconds}
    out.update({name: getattr(stats, name) for name in PREFETCH})
    for kind in PREDICTIONS:
        for s in getattr(stats, kind):
            for count in COUNTS:
                out[f"{kind}_{s.distance}_{count}"] = getattr(s, count)
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``after - before``, key by key (a distance first scored during the run counts from 0)."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in after.keys() | before.keys()}


def quality(c: dict[str, float] | None) -> dict:
    """The row fields: prefetch counts, precision and recall; per-distance precision and recall of each kind."""
    if c is None or "prefetch_used" not in c:
        return {}
    used, wasted = c["prefetch_used"], c["prefetch_wasted"]
    row = {name: c[name] for name in PREFETCH}
    row["prefetch_precision"] = _ratio(used, used + wasted)
    row["prefetch_recall"] = _ratio(used, used + c["misses"])
    for kind in PREDICTIONS:
        distances = sorted({int(k.split("_")[1]) for k in c if k.startswith(kind + "_")})
        row[kind] = [_distance(c, kind, d) for d in distances]
    return row


def _distance(c: dict[str, float], kind: str, d: int) -> dict:
    predicted, correct, routed = (c.get(f"{kind}_{d}_{count}", 0) for count in COUNTS)
    return {"distance": d, "predicted": predicted, "correct": correct, "routed": routed,
            "precision": _ratio(correct, predicted), "recall": _ratio(correct, routed)}


def at(row: dict, kind: str, distance: int, what: str) -> float | None:
    """``row``'s ``what`` (precision or recall) of ``kind`` at ``distance``; None when not measured."""
    return next((s[what] for s in row.get(kind) or () if s["distance"] == distance), None)


def describe(row: dict) -> str | None:
    """One line: precision/recall by distance of each kind, and the prefetches' fate."""
    if "prefetch_used" not in row:
        return None
    late, declined = row.get("prefetch_late", 0), row.get("prefetch_declined", 0)
    parts = [f"prefetch {row['prefetch_issued']} issued, {row['prefetch_used']} used ({late} late),"
             f" {row['prefetch_wasted']} wasted, {declined} declined, {row.get('prefetch_deferred', 0)} plans deferred:"
             f" precision {_cell(row['prefetch_precision'])}, recall {_cell(row['prefetch_recall'])}"]
    for kind in PREDICTIONS:
        cells = [f"{s['distance']}: {_cell(s['precision'])}/{_cell(s['recall'])}" for s in row[kind]]
        parts.append(f"{kind} P/R by distance {', '.join(cells) if cells else '-'}")
    return "; ".join(parts)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
