"""``moeinf bench e2e``'s report: the table, the two floors, the targets, and the JSON document.

Floors, per moeinf row:
* compute floor: the weights one decode token reads over the best matrix-vector bandwidth measured at the run's
  start (``e2e_floor.py``; ``transformers-resident``'s decode, slower than moeinf's own kernels, is a reference, not
  a floor);
* I/O floor: the row's bytes read per token over the disk's O_DIRECT bandwidth at memd's queue depth (the
  multi-stream probe: memd's reader threads, each reading memd's chunk size, the best of two passes over the same
  bytes, as a disk host that caches what was read lately serves memd's re-reads of hot experts; the best of the run
  start's and the probes just before and just after the system's run, so the floor is never too high).
With perfect overlap of compute and I/O a system reaches the larger of the two; ``vs_floor`` is its mean decode
time per token over that bound (mean over mean: the floor's bytes are a mean per token, and reads are bursty, so a
p50 could sit below it).

Targets (checked at every expert-memory setting, at 1 client):
* decode at least 3.5x faster than accelerate-offload under the same memory limit;
* moeinf within 1.15x of the larger floor;
* memd's expert loads at >= 90% of the multi-stream read bandwidth, judged on ``moeinf-ondemand-lru`` where
  every read is on demand: its bytes read over the wall time some load was in flight (``busy_read_gbps``; not over
  the worker's wait, which its computing while a layer's last experts load shortens). Both go through O_DIRECT at
  the same queue depth, so the fraction cannot honestly exceed 100%;
* moeinf's prefetch precision >= 0.6 (its prefetches' own: used / used + wasted; they target the next layers, within
  the speculation distance), shown with memd's fused prediction one layer ahead (``services/bench/e2e_quality.py``);
  not met when no prefetch was issued;
* moeinf's decode p50 <= 0.85x that of ``moeinf-ondemand-lru`` (issue 11), at each expert memory both ran: the
  median of the repeats' paired ratios (the same workload, run next to each other), else the middle runs' ratio
  (``e2e.median_run``: of an even count, the upper of the two middle runs, for every system alike).
"""
from __future__ import annotations

import numpy as np

from services.bench.baselines import OFFLOAD, RESIDENT
from services.bench.e2e import MOEINF, ONDEMAND
from services.bench.llama_cpp import LLAMA
from services.bench.e2e_formats import FORMAT_SYSTEMS
from services.bench.e2e_quality import PRECISION_TARGET, at, describe
from services.bench.e2e_system import cpu_sets

SPEEDUP_TARGET, FLOOR_TARGET, BANDWIDTH_TARGET, LRU_TARGET = 3.5, 1.15, 0.9, 0.85


def build_doc(opts, sweep, disk, single=None, compute=None) -> dict:
    """``compute``: the run's ``e2e_floor.ComputeFloor`` (None: no compute floor)."""
    rows = sweep.rows
    compute_ms = compute.ms if compute else None
    floors = [_floor(row, compute_ms, disk.gbps) for row in rows if row["system"] in (ONDEMAND, MOEINF)
              and row["concurrency"] == 1 and row.get("bytes_read_per_token") is not None]  # the floors: 1 client
    return {
        "disk_read_gbps": disk.gbps, "disk_read_direct": disk.direct, "disk_read_bytes": disk.bytes_read,
        "disk_read_streams": disk.streams, "disk_read_chunk": disk.chunk, "disk_read_passes": disk.passes,
        "disk_read_of": "memd's slot images" if sweep.image_file else "the checkpoint",
        "disk_read_gbps_single_stream": single.gbps if single else None,
        "disk_read_limit_bytes_per_s": opts.read_limit_bytes(),
        "prompts": sweep.workloads.label(), "warm_eamc": sweep.workloads.warm, "seed": opts.seed,
        "systems": rows,
        "memory_limit_bytes": sweep.budgets[0].limit_bytes if sweep.limits_applied and sweep.budgets else None,
        "memory_limits": {b.expert_memory: _budget_doc(b) for b in sweep.budgets},
        "system_budgets": {f"{s} {name}": _budget_doc(b) for (s, name), b in sweep.system_budgets.items()
                           if name != RESIDENT},
        "memory_limit_total": list(opts.memory_limit_total),
        "runtime_bytes": dict(sweep.runtimes.measured),
        "runtime_allowance": opts.runtime_allowance,
        "memory_fair": sweep.limits_applied,
        "resident_limit": "none: transformers-resident needs the whole model (a reference, not a floor)",
        "compute_floor": compute.as_json() if compute else None,
        "floors": floors,
        "targets": _targets(rows, floors, disk.gbps, [b.expert_memory for b in sweep.budgets]),
        "notes": sweep.notes,
        "model": str(opts.model), "max_tokens": opts.max_tokens, "requests": opts.requests,
        "prompt_tokens": [len(p) for p in sweep.workloads.prompts(opts.systems[0])],
        "warmup_tokens": opts.warmup_tokens,
        "pin": dict(zip(("workers", "memd"), cpu_sets(opts.threads, opts.workers))) if opts.pin else None,
        "threads": opts.threads, "workers": opts.workers, "repeats": opts.repeats,
        "concurrency": list(opts.concurrency),
    }


def _budget_doc(b) -> dict:
    return {"limit_bytes": b.limit_bytes, "dense_bytes": b.dense_bytes, "expert_budget_bytes": b.expert_budget_bytes,
            "expert_total_bytes": b.expert_total_bytes, "experts": b.slots, "allowance_bytes": b.allowance_bytes,
            "runtime_bytes": b.runtime_bytes, "fraction": b.fraction, "derivation": b.describe()}


def _find(rows: list[dict], system: str, memory: str | None, concurrency: int = 1) -> dict | None:
    for row in rows:
        if (row["system"] == system and row["concurrency"] == concurrency and not row.get("error")
                and (memory is None or row["expert_memory"] == memory)):
            return row
    return None


def _floor(row: dict, compute_ms: float | None, gbps: float) -> dict:
    """The I/O floor of decode uses the bytes read per decode token where they were measured apart from the
    prompts' (1 client), else all bytes read per token; less the prefetches that ended unused, each counted as a
    whole expert (a system that reads more than it needs must not get a larger floor for it)."""
    per_token = row.get("decode_bytes_read_per_token")
    per_token = row["bytes_read_per_token"] if per_token is None else per_token
    if row.get("decode_wasted_prefetches_per_token") and row.get("experts"):
        expert = row["expert_budget_bytes"] / row["experts"]
        per_token = max(0.0, per_token - row["decode_wasted_prefetches_per_token"] * expert)
    gbps = disk_best(gbps, row)
    io_ms = per_token / (gbps * 1e9) * 1e3 if gbps else None
    bound = max(v for v in (compute_ms, io_ms) if v is not None) if (compute_ms or io_ms) else None
    mean = row.get("decode_ms_per_token_mean")
    return {"system": row["system"], "expert_memory": row["expert_memory"], "concurrency": row["concurrency"],
            "compute_floor_ms": compute_ms, "io_floor_ms": io_ms, "bound_ms": bound, "io_bytes_per_token": per_token,
            "disk_read_gbps": gbps, "decode_ms_per_token_p50": row["decode_ms_per_token_p50"],
            "decode_ms_per_token_mean": mean, "vs_floor": mean / bound if bound and mean else None}


def _targets(rows: list[dict], floors: list[dict], gbps: float, memories: list[str]) -> list[dict]:
    out = []
    for memory in memories:
        ours, offload = _find(rows, MOEINF, memory), _find(rows, OFFLOAD, memory)
        if ours and offload:  # (judged as the LRU target is: the median of the paired repeats where they pair)
            x = offload["decode_ms_per_token_p50"] / ours["decode_ms_per_token_p50"]
            if pairs := paired_ratios(offload, ours):
                x = float(np.median(pairs))
            out.append(_target(memory, f"decode >= {SPEEDUP_TARGET}x faster than accelerate-offload", x,
                               x >= SPEEDUP_TARGET, f"{x:.2f}x" + (" (paired median)" if pairs else " (one run)")))
        floor = next((f for f in floors if f["system"] == MOEINF and f["expert_memory"] == memory
                      and f["concurrency"] == 1), None)
        if floor and floor["vs_floor"]:
            x = floor["vs_floor"]
            out.append(_target(memory, f"moeinf within {FLOOR_TARGET}x of the larger floor", x, x <= FLOOR_TARGET,
                               f"{x:.2f}x of {floor['bound_ms']:.1f} ms"))
        if ours and ours.get("prefetch_issued") is not None:
            out.append(_precision_target(memory, ours))
        ondemand = _find(rows, ONDEMAND, memory)
        if ours and ondemand:
            x = ours["decode_ms_per_token_p50"] / ondemand["decode_ms_per_token_p50"]
            shown = f"{x:.2f}x ({ours['decode_ms_per_token_p50']:.1f} vs {ondemand['decode_ms_per_token_p50']:.1f} ms)"
            if pairs := paired_ratios(ours, ondemand):  # judged on the median of the paired runs' ratios
                x = float(np.median(pairs))
                shown = (f"{x:.2f}x, the median of the paired repeats' ratios ({', '.join(f'{p:.2f}' for p in pairs)});"
                         f" middle runs {shown}")
            out.append(_target(memory, f"decode <= {LRU_TARGET}x of {ONDEMAND}", x, x <= LRU_TARGET, shown))
        if ondemand and ondemand.get("busy_read_gbps") and gbps:
            best = disk_best(gbps, ondemand)
            x = ondemand["busy_read_gbps"] / best
            per_load = _cell(ondemand.get("load_read_gbps"), ".2f")
            shown = (f"on-demand loads deliver {ondemand['busy_read_gbps']:.2f} of {best:.2f} GB/s = {x:.0%}"
                     f" (bytes / seconds some load was in flight, {ONDEMAND}; one load alone reads at {per_load}"
                     " GB/s)")
            if x > 1.0:  # the reader cannot beat the probe on one disk state: the disk's speed changed in between
                shown += ("; above every probe (the run's start, just before and just after the system): the disk's"
                          " speed changed during the run, so not counted as met")
            out.append(_target(memory, f"expert loads >= {BANDWIDTH_TARGET:.0%} of the multi-stream read bandwidth",
                               x, BANDWIDTH_TARGET <= x <= 1.0, shown))
    return out


def disk_best(gbps: float, row: dict) -> float:
    """The disk's best measured rate around ``row``'s run: the run start's (``gbps``) and the probes just before
    and just after the system (a higher rate: a lower I/O floor and a harder bandwidth target)."""
    return max(gbps, row.get("disk_read_gbps_before") or 0.0, row.get("disk_read_gbps_after") or 0.0)


def paired_ratios(ours: dict, base: dict) -> list[float]:
    """Repeat by repeat (interleaved runs on the same workload), our decode p50 over ``base``'s, skipping repeats where
    either failed; [] unless at least two repeats pair."""
    a, b = ours.get("decode_ms_per_token_p50_all") or [], base.get("decode_ms_per_token_p50_all") or []
    pairs = [x / y for x, y in zip(a, b) if x and y] if len(a) == len(b) else []
    return pairs if len(pairs) >= 2 else []


def _precision_target(memory: str, ours: dict) -> dict:
    """Issue 11's "prefetch precision >= 0.6 at lookahead 1", judged on both things it can mean: the prefetches' own
    precision (used / used + wasted, over every distance they were issued at; memd does not count them by
    distance) and memd's prediction one layer ahead. No prefetch issued, or no prediction scored one layer ahead:
    not met (there is nothing to judge)."""
    name = (f"prefetch precision >= {PRECISION_TARGET} (every distance) and memd's prediction one layer ahead"
            f" >= {PRECISION_TARGET}")
    la1 = at(ours, "lookahead", 1, "precision")
    shown = f"prediction one layer ahead {_cell(la1, '.2f')}"
    x = ours.get("prefetch_precision")
    if not ours["prefetch_issued"] or x is None:
        return _target(memory, name, None, False, f"no prefetch issued ({shown})")
    met = x >= PRECISION_TARGET and la1 is not None and la1 >= PRECISION_TARGET
    return _target(memory, name, x, met,
                   f"prefetches {x:.2f} ({ours['prefetch_used']} used, {ours['prefetch_wasted']} wasted); {shown}")


def _target(memory: str, name: str, value: float | None, met: bool, text: str) -> dict:
    return {"expert_memory": memory, "target": name, "value": value, "met": met, "measured": text}


# ---------------------------------------------------------------------------------------------------- text
def format_report(doc: dict) -> str:
    lines = [f"moeinf bench e2e: {doc['model']}; {doc['requests']} requests, prompts {min(doc['prompt_tokens'])}-"
             f"{max(doc['prompt_tokens'])} tokens, {doc['max_tokens']} new tokens each, greedy; torch threads"
             f" {doc['threads'] or 'default'}; every system (baselines too): median of {doc['repeats']} repeat(s)",
             f"prompts: {doc['prompts']}",
             f"disk read: {doc['disk_read_gbps']:.2f} GB/s at memd's queue depth"
             f" ({doc['disk_read_streams']} streams"
             f" of {doc['disk_read_chunk'] >> 10} KiB reads, the best of {doc.get('disk_read_passes', 1)} pass(es),"
             f" {'O_DIRECT' if doc['disk_read_direct'] else 'page cache'},"
             f" {doc['disk_read_bytes'] / 2**30:.1f} GiB of {doc.get('disk_read_of', 'the checkpoint')}; single stream"
             f" {_cell(doc['disk_read_gbps_single_stream'], '.2f')} GB/s); the I/O floors use the former"]
    if doc.get("disk_read_limit_bytes_per_s"):
        lines.append(f"every read throttled to {doc['disk_read_limit_bytes_per_s'] / 1e9:.2f} GB/s (--disk-read-limit:"
                     " one disk speed for every system and probe)")
    budgets = doc["system_budgets"] if doc["memory_limit_total"] else doc["memory_limits"]
    lines += [f"{key}: {m['derivation']}" for key, m in budgets.items()]
    runtime = {k: v for k, v in doc["runtime_bytes"].items() if v is not None}
    if runtime:
        lines.append("runtime measured (beyond weights; e2e_runtime.py): "
                     + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in runtime.items()))
    lines.append("memory-fair: every limited system ran in its own memory cgroup (page cache counted), caches dropped"
                 " before each" if doc["memory_fair"] else "NOT memory-fair: the systems ran without a memory limit")
    lines.append(f"transformers-resident: {doc['resident_limit']}")
    lines += [f"note: {n}" for n in doc["notes"]]
    lines += ["", _HEADER]
    lines += [_line(r) for r in doc["systems"]]
    if doc.get("warm_eamc"):
        lines.append("* WARM EAMC (--warm-eamc): the timed prompts were served once before; not the default scenario")
    lines += _concurrency_lines(doc["systems"])
    lines += _quality_lines(doc["systems"])
    lines += _format_lines(doc["systems"])
    lines += _llama_lines(doc["systems"])
    if doc["floors"]:
        compute = doc.get("compute_floor")
        lines += ["", "floors (decode ms/token): compute = weights per decode token / best matrix-vector bandwidth"
                      + (f" ({compute['bytes_per_token'] / 2**20:.1f} MiB at {compute['gbps']:.2f} GB/s)" if compute
                         else " (none measured)") + "; I/O = bytes read per decode token (1 client; else per"
                      " token) / multi-stream read bandwidth (the best of the run start's and the probes just before"
                      " and after the system); perfect overlap reaches the larger"]
        for f in doc["floors"]:
            lines.append(f"  {f['system']:<20} {f['expert_memory']:>6} c{f['concurrency']}: compute"
                         f" {_cell(f['compute_floor_ms'], '.1f')}, I/O {_cell(f['io_floor_ms'], '.1f')}"
                         f" ({f['io_bytes_per_token'] / 2**20:.1f} MiB/token at {f['disk_read_gbps']:.2f} GB/s),"
                         f" measured mean {_cell(f.get('decode_ms_per_token_mean'), '.1f')} ="
                         f" {_cell(f['vs_floor'], '.2f')}x the larger")
    if doc["targets"]:
        lines += ["", "targets (1 client):"]
        lines += [f"  {t['expert_memory']:>6} {t['target']}: {t['measured']} -> {'met' if t['met'] else 'NOT met'}"
                  for t in doc["targets"]]
    lines.append("decode p50/p90: ms between a request's consecutive tokens; TTFT: median time to first token;"
                 " load GB/s: memd's bytes over its loads' read seconds; wait GB/s: over the\n"
                 "worker's wait for loads (it computes a layer's resident experts while the others load, so above"
                 " the disk's rate is possible); disk busy: the share of decode time some expert was loading; peak:"
                 " the cgroup's peak memory use (page cache included);\npf P/R: prefetch precision (used / used +"
                 " wasted) and recall (used / used + on-demand loads); la1 P/R: precision and recall of memd's\n"
                 "prediction one layer ahead (correct / predicted, correct / routed)")
    return "\n".join(lines)


_HEADER = (f"{'system':<21} {'memory':>11} {'experts':>7} {'clients':>7} {'limit GiB':>9} {'tokens/s':>9}"
           f" {'TTFT s':>7} {'decode p50':>10} {'decode p90':>10} {'MiB rd/tok':>10} {'hit rate':>8}"
           f" {'load GB/s':>9} {'wait GB/s':>9} {'disk busy':>9} {'peak GiB':>8} {'pf P':>5} {'pf R':>5}"
           f" {'la1 P':>5} {'la1 R':>5}")


def _line(r: dict) -> str:
    if r.get("eamc") == "warm":
        r = {**r, "system": r["system"] + "*"}  # * : warm EAMC (labelled under the table)
    if r.get("error"):
        return f"{r['system']:<21} {r['expert_memory']:>11} {'':>7} {r['concurrency']:>7} FAILED: {r['error']}"
    if failed := r.get("failed_repeats"):  # (the row is its good runs': say so on it)
        r = {**r, "system": f"{r['system']} ({len(failed)} of {len(failed) + r['repeats']} repeats FAILED)"}
    gib = lambda v: None if v is None else v / 2**30  # noqa: E731
    mib = None if r["bytes_read_per_token"] is None else r["bytes_read_per_token"] / 2**20
    share = "-" if r.get("expert_fraction") is None else f"{100 * r['expert_fraction']:.1f}%"
    return (f"{r['system']:<21} {r['expert_memory']:>11} {share:>7} {r['concurrency']:>7}"
            f" {_cell(gib(r['memory_limit_bytes']), '.2f'):>9}"
            f" {r['tokens_per_s']:>9.2f} {r['ttft_s']:>7.3f} {_cell(r['decode_ms_per_token_p50'], '.1f'):>10}"
            f" {_cell(r['decode_ms_per_token_p90'], '.1f'):>10} {_cell(mib, '.1f'):>10}"
            f" {_cell(r['hit_rate'], '.3f'):>8} {_cell(r.get('load_read_gbps'), '.2f'):>9}"
            f" {_cell(r.get('stall_read_gbps'), '.2f'):>9} {_cell(r.get('disk_busy'), '.0%'):>9}"
            f" {_cell(gib(r['peak_memory_bytes']), '.2f'):>8} {_cell(r.get('prefetch_precision'), '.2f'):>5}"
            f" {_cell(r.get('prefetch_recall'), '.2f'):>5} {_cell(at(r, 'lookahead', 1, 'precision'), '.2f'):>5}"
            f" {_cell(at(r, 'lookahead', 1, 'recall'), '.2f'):>5}")


def _concurrency_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        base = _find(rows, r["system"], r["expert_memory"])
        if base is None or r is base or r.get("error") or r["concurrency"] == 1:
            continue
        same = {True: "same tokens as 1 client", False: "OTHER tokens than 1 client", None: ""}[
            r.get("same_tokens_as_c1")]
        out.append(f"{r['system']} {r['expert_memory']}, {r['concurrency']} clients:"
                   f" {r['tokens_per_s'] / base['tokens_per_s']:.2f}x the tokens/s of 1 client; {same}")
    return out


def _quality_lines(rows: list[dict]) -> list[str]:
    """Per moeinf row: precision/recall by lookahead distance (memd's prediction, the worker's speculation)."""
    out = []
    for r in rows:
        text = None if r.get("error") else describe(r)
        if text:
            out.append(f"{r['system']} {r['expert_memory']} c{r['concurrency']}: {text}")
    return out


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _format_lines(rows: list[dict]) -> list[str]:
    """``--formats``: each compressed run against the checkpoint as stored (moeinf), same memory setting, 1 client."""
    out = []
    for r in rows:
        if r["system"] not in FORMAT_SYSTEMS or r.get("error") or r["concurrency"] != 1:
            continue
        base = _find(rows, MOEINF, r["expert_memory"])
        if base is None or not base.get("decode_ms_per_token_p50") or not r.get("decode_ms_per_token_p50"):
            continue
        fmt = FORMAT_SYSTEMS[r["system"]]
        read, base_read = r.get("bytes_read_per_token"), base.get("bytes_read_per_token")
        fall = (f"{base_read / read:.1f}x fewer" if read else "none read") \
            if base_read is not None and read is not None else "n/a"
        out.append(f"  {r['expert_memory']:>6} {fmt}: decode p50 {r['decode_ms_per_token_p50']:.1f} ms/token ="
                   f" {r['decode_ms_per_token_p50'] / base['decode_ms_per_token_p50']:.2f}x the stored experts';"
                   f" read {_mib(read)}/token against {_mib(base_read)} ({fall})")
    return ["", "expert formats (memd --expert-format, same checkpoint and byte limit as moeinf):"] + out if out else []


def _llama_lines(rows: list[dict]) -> list[str]:
    """The GGUF runtime against moeinf at each memory setting (1 client), and how many of its tokens equal the
    reference's (its kernels are not transformers')."""
    out = []
    for r in rows:
        if r["system"] != LLAMA or r.get("error") or r["concurrency"] != 1:
            continue
        text = f"  {r['expert_memory']:>6}: decode p50 {r['decode_ms_per_token_p50']:.1f} ms/token"
        ours = _find(rows, MOEINF, r["expert_memory"])
        if ours and ours.get("decode_ms_per_token_p50"):
            x = ours["decode_ms_per_token_p50"] / r["decode_ms_per_token_p50"]
            text += f"; moeinf {ours['decode_ms_per_token_p50']:.1f} ms/token = {x:.2f}x llama.cpp's time"
        if r.get("tokens_agreement") is not None:
            text += (f"; {r['tokens_agreement']:.0%} of its greedy tokens equal {r['tokens_reference']}'s (up to each"
                     " request's first difference)")
        out.append(text)
    return ["", "llama.cpp (llama-server on a GGUF of the checkpoint, mmap; page cache under the same limit):"] + out \
        if out else []


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"
