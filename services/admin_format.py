"""``moeinf admin``'s human-readable output: one printer per command, plain aligned text tables."""
from __future__ import annotations

from common import admin_messages as a
from common.messages import LayerStats, StatsReply
from common.sizes import format_bytes


def table(headers: list[str], rows: list[list]) -> str:
    """Columns aligned: the first to the left, the others (numbers) to the right."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2 5 7-8``; ``-`` for none."""
    if not numbers:
        return "-"
    parts, start = [], numbers[0]
    for prev, cur in zip(numbers, numbers[1:] + [None]):
        if cur != prev + 1 if cur is not None else True:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return " ".join(parts)


def _ratio(num: float, den: float) -> str:
    return f"{num / den:.2f}" if den else "-"


def stats(r: a.AdminStatsReply) -> str:
    s = r.stats
    region = f" (resized: the region has {r.region_slots})" if r.capacity != r.region_slots else ""
    head = [
        f"memd pid {s.pid}: policy {s.policy}, prefetch {'on' if s.prefetch else 'off'}",
        f"pool: {s.resident} of {r.capacity} slots resident{region}; {format_bytes(r.capacity * r.slot_bytes)} of"
        f" {format_bytes(r.region_slots * r.slot_bytes)}, holding {format_bytes(r.pool_resident_bytes)} of memory now",
        f"      loading {r.loading}, pinned {s.pinned} (admin {r.admin_pinned}), leaving when released {r.leaving}",
        f"reads: {format_bytes(s.bytes_read)} in {s.read_seconds:.2f} s, {format_bytes(s.read_bandwidth)}/s measured;"
        f" acquires stalled {s.stall_seconds:.3f} s",
        *_tiers(s),
        *([f"slot images: {s.slot_images} experts have one on disk{_packed(s)}, read straight into their slots"
           f" ({s.images_written} written behind reads by this memd)"] if s.slot_cache else []),
        f"prefetch: issued {s.prefetch_issued}, used {s.prefetch_used} (late {s.prefetch_late}), wasted"
        f" {s.prefetch_wasted} (cancelled {s.prefetch_cancelled}); precision {s.prefetch_precision:.2f},"
        f" recall {s.prefetch_recall:.2f}",
        f"          deferred for demand reads {s.prefetch_deferred}, declined (not worth it) {s.prefetch_declined}",
        f"EAMC: {s.eamc_size} of {s.eamc_capacity} patterns (best-match similarity {s.match_similarity:.2f})",
        f"layer notes: {s.layer_notes} ({s.notes_dropped} already fed, {s.notes_unattached} of no attached worker:"
        f" ignored); workers guess {s.speculate_layers} layers ahead",
        _lookahead("prediction (EAMC + guesses)", s.lookahead),
        _lookahead("hidden-state guesses", s.speculation),
        "",
    ]
    rows = []
    for ls in s.layers:
        resident = s.resident_per_layer[ls.layer] if ls.layer < len(s.resident_per_layer) else 0
        rows.append(_layer_row(str(ls.layer), resident, ls))
    rows.append(_layer_row("total", sum(s.resident_per_layer), _total(s)))
    headers = ["layer", "resident", "hits", "misses", "hit rate", "pf issued", "pf used", "pf wasted", "precision",
               "recall", "stall s", "read"]
    return "\n".join(head) + "\n" + table(headers, rows)


def _packed(s: StatsReply) -> str:
    """--slot-compression: what share of their bytes the images read ("" for images stored as the slots hold them)."""
    return f" (compressed to {s.slot_images_share:.3f} of their bytes)" if s.slot_images_share else ""


def _tiers(s: StatsReply) -> list[str]:
    """A GPU pool's host tier and copies (nothing for a pool in host memory)."""
    if not s.host_hits + s.host_misses:
        return []
    rate = format_bytes(s.copy_bytes / s.copy_seconds) if s.copy_seconds else "-"
    return [f"host tier: {s.host_hits} hits, {s.host_misses} read from disk first (hit rate"
            f" {_ratio(s.host_hits, s.host_hits + s.host_misses)}); copies {format_bytes(s.copy_bytes)} at {rate}/s"
            f" each, {s.ring_reuse_waits} waited for a copy-event ring entry; {s.cpu_experts} computed on a worker's"
            " CPU instead (--cpu-experts)"]


def _lookahead(name: str, stats) -> str:
    """``name``: precision/recall per distance, e.g. ``d1 0.82/0.75``."""
    parts = [f"d{x.distance} {_ratio(x.correct, x.predicted)}/{_ratio(x.correct, x.routed)}" for x in stats]
    return f"{name}, precision/recall by layers ahead: {'  '.join(parts) if parts else 'none yet'}"


def _total(s: StatsReply) -> LayerStats:
    ls = s.layers
    return LayerStats(-1, sum(x.hits for x in ls), sum(x.misses for x in ls), sum(x.prefetch_issued for x in ls),
                      sum(x.prefetch_used for x in ls), sum(x.prefetch_wasted for x in ls),
                      sum(x.stall_seconds for x in ls), sum(x.bytes_read for x in ls))


def _layer_row(name: str, resident: int, ls: LayerStats) -> list:
    return [name, resident, ls.hits, ls.misses, _ratio(ls.hits, ls.hits + ls.misses), ls.prefetch_issued,
            ls.prefetch_used, ls.prefetch_wasted, _ratio(ls.prefetch_used, ls.prefetch_used + ls.prefetch_wasted),
            _ratio(ls.prefetch_used, ls.prefetch_used + ls.misses), f"{ls.stall_seconds:.3f}",
            format_bytes(ls.bytes_read)]


def experts(r: a.AdminExpertsReply) -> str:
    rows = [[x.layer, ranges(x.resident), ranges(x.pinned), ranges(x.loading), ranges(x.admin_pinned),
             ranges(x.leaving)] for x in r.layers]
    head = f"capacity {r.capacity} of {r.num_slots} slots\n"
    return head + table(["layer", "resident", "pinned", "loading", "admin pins", "leaving"], rows)


def resize(r: a.ResizeReply) -> str:
    text = (f"pool: {r.old_capacity} -> {r.capacity} slots ({format_bytes(r.capacity * r.slot_bytes)}; at most"
            f" {r.num_slots}); the region holds {format_bytes(r.pool_resident_bytes)} of memory now")
    if r.capacity < r.old_capacity:
        text += f"\n{r.evicted} experts evicted, {r.pending} in use leave when released"
    return text


def policy(r: a.PolicyReply) -> str:
    return f"eviction policy: {r.old} -> {r.policy}"


def prefetch(r: a.PrefetchReply) -> str:
    onoff = {True: "on", False: "off"}
    return f"prefetch: {onoff[r.was]} -> {onoff[r.prefetch]}" + (f" ({r.cancelled} in flight cancelled)"
                                                                   if r.cancelled else "")


def eamc(verb: str):
    def show(r: a.EamcReply) -> str:
        where = f" {verb} {r.path}" if r.path else f" after {verb}"
        return f"EAMC: {r.size} of {r.capacity} activation patterns{where}"
    return show


def eamc_match(r: a.EamcMatchReply, top: int = 4) -> str:
    lines = [f"best match similarity {r.similarity:.3f}" + ("" if r.similarity else " (the EAMC is empty)")]
    for layer, row in enumerate(r.predicted):
        best = sorted((p, e) for e, p in enumerate(row) if p > 0)[::-1][:top]
        lines.append(f"layer {layer}: " + (" ".join(f"{e} ({p:.2f})" for p, e in best) or "-"))
    return "\n".join(lines)


def pin(r: a.PinReply) -> str:
    return f"pinned in slots {' '.join(map(str, r.slots))} ({r.loaded} read); the admin pins {r.admin_pinned} experts"


def unpin(r: a.UnpinReply) -> str:
    return f"unpinned {r.unpinned}; the admin pins {r.admin_pinned} experts"


def drop(r: a.DropReply) -> str:
    return f"dropped {r.evicted} experts; {r.pending} in use leave when released; {r.resident} resident"


def health(r: a.AdminHealthReply) -> str:
    workers = f"{len(r.workers)} worker(s) attached" + (f" (pid {' '.join(map(str, r.workers))})" if r.workers else "")
    return f"ok: memd pid {r.pid}, up {r.uptime_s:.1f} s, model {r.model}, pool {r.pool_name}; {workers}"


PRINTERS = {
    "stats": stats, "experts": experts, "resize": resize, "policy": policy, "prefetch": prefetch,
    "eamc save": eamc("saved to"), "eamc load": eamc("loaded from"), "eamc clear": eamc("clear"),
    "eamc match": eamc_match, "pin": pin, "unpin": unpin, "drop": drop, "health": health,
}
