"""``moeinf bench replay``: a routing trace against a real memd, per policy, with the LRU and Belady bounds.

For every trace, pool capacity and policy variant, a fresh ``moeinf memd`` (cold pool, cold EAMC; page cache
dropped first when running as root; O_DIRECT reads anyway) serves an on-disk store with the trace's shape
(``replay_store.py``, or ``--model``). The worker's own ``MemdClient`` then replays the trace
(``replay_drive.py``), and memd's STATS before and after give, per token: fetches (on-demand loads + prefetches
issued), on-demand misses, stall, bytes read, prefetch precision and recall. Pure on-demand LRU and Belady's MIN
for the same accesses and capacity (``bounds.py``) are the reference: no policy fetches fewer than Belady.

``--json`` writes one object per (trace, capacity) with ``tokens``, ``capacity_experts``,
``belady_fetches_per_token``, ``lru_fetches_per_token`` and ``results`` (one row per policy variant): the
object itself for one trace at one capacity, else a JSON list of them (traces in order, capacities within).

With ``--repeats N`` every number of a row is the median over the N runs; fetches and stall per token also carry
their range (``*_range``: min, max), and, when ``lru`` is among the variants, every row carries ``fetches_vs_lru`` and
``stall_vs_lru``: the median over the repeats of its value over LRU's in the same repeat (paired: run next to each
other, under the same disk load), with their range. A table of these spreads follows the medians.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from common.config import MEMD_SOCKET, MEMD_TRACE_SOCKET, state_socket
from common.sizes import format_bytes, parse_size
from services.bench.bounds import belady_fetches, lru_fetches
from services.bench.memd_proc import MemdProcess, TerminateAsInterrupt
from services.bench.replay_compute import LayerCompute, given, measure
from services.bench.replay_drive import ReplayPlan, drive, load_plan
from services.bench.replay_store import StoreShape, ensure_store

DEFAULT_POLICIES = "lru,lfu,activation,lru+prefetch,activation+prefetch"
POLICY_NAMES = ("lru", "lfu", "activation")
MIB = 2**20


@dataclass(frozen=True, slots=True)
class Variant:
    name: str  # as given: "lru", "activation+prefetch"
    policy: str
    prefetch: bool


def parse_variants(text: str) -> list[Variant]:
    """``lru,activation+prefetch``: a policy alone runs with prefetch off, ``+prefetch`` turns it on."""
    variants = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        policy, plus, rest = name.partition("+")
        if policy not in POLICY_NAMES or (plus and rest != "prefetch"):
            raise ValueError(f"--policies: {name!r} is not a policy; use {', '.join(POLICY_NAMES)}, each optionally"
                             " with +prefetch (e.g. lru,activation+prefetch)")
        variants.append(Variant(name, policy, bool(plus)))
    if not variants:
        raise ValueError("--policies is empty")
    return variants


@dataclass(frozen=True)
class Options:
    traces: list[Path]
    memories: list[str]
    variants: list[Variant]
    expert_bytes: int
    model: Path | None
    layer_ms: float | None  # None: measured for each store (replay_compute.py)
    max_steps: int | None
    store_dir: Path
    leases: bool
    repeats: int
    json: Path | None
    plot: Path | None

    @classmethod
    def from_args(cls, args) -> Options:
        for t in args.trace:
            if not Path(t).is_file():
                raise FileNotFoundError(f"--trace {t}: no such file")
        if args.model and not (Path(args.model) / "config.json").is_file():
            raise FileNotFoundError(f"--model {args.model}: no config.json (give a checkpoint directory)")
        for memory in args.expert_memory:
            parse_size(memory, what="--expert-memory")
        expert_bytes = parse_size(args.expert_bytes, what="--expert-bytes")
        if expert_bytes.fraction is not None or expert_bytes.nbytes < 1024:
            raise ValueError(f"--expert-bytes {args.expert_bytes}: give a size of at least 1 KiB (16MiB, 65536)")
        if args.layer_compute_ms is not None and args.layer_compute_ms < 0:
            raise ValueError("--layer-compute-ms must be >= 0")
        if (args.max_steps is not None and args.max_steps < 1) or args.repeats < 1:
            raise ValueError("--max-steps and --repeats must be >= 1")
        return cls([Path(t) for t in args.trace], list(args.expert_memory), parse_variants(args.policies),
                   expert_bytes.nbytes, Path(args.model) if args.model else None, args.layer_compute_ms, args.max_steps,
                   Path(args.store_dir), args.leases == "on", args.repeats, _path(args.json), _path(args.plot))


def _path(p) -> Path | None:
    return Path(p) if p else None


@dataclass(frozen=True, slots=True)
class Store:
    path: Path
    num_layers: int
    num_experts: int
    expert_bytes: int
    slot_bytes: int
    compute: LayerCompute  # the layer compute the replay waits between acquires


def open_store(plan: ReplayPlan, opts: Options) -> Store:
    """The checkpoint memd serves for ``plan``: ``--model``, or a random store with the trace's shape."""
    from common.checkpoint import Checkpoint
    from services.memd.spread import served_slot_bytes
    from services.memd.store import ExpertStore

    h = plan.header
    path = opts.model or ensure_store(opts.store_dir, StoreShape.for_bytes(h.num_layers, h.num_experts, h.top_k,
                                                                           opts.expert_bytes))
    store = ExpertStore(Checkpoint(path))
    if (store.num_layers, store.num_experts) != (h.num_layers, h.num_experts):
        raise ValueError(f"{path} has {store.num_layers} MoE layers x {store.num_experts} experts, the trace"
                         f" {plan.path} {h.num_layers} x {h.num_experts}")
    compute = given(opts.layer_ms) if opts.layer_ms is not None else measure(path)
    return Store(path.resolve(), store.num_layers, store.num_experts, store.expert_bytes,
                 served_slot_bytes(store.index()), compute)


def capacity(memory: str, store: Store) -> tuple[int, bool]:
    """Pool slots for ``--expert-memory`` (a share of all experts, or bytes) and whether it was raised to the
    one-layer minimum memd needs."""
    total = store.num_layers * store.num_experts
    spec = parse_size(memory, what="--expert-memory")
    slots = int(total * spec.fraction + 1e-9) if spec.fraction is not None else spec.nbytes // store.slot_bytes
    slots = min(slots, total)
    return max(slots, store.num_experts), slots < store.num_experts


def drop_page_cache() -> bool:
    """Drop the page cache (root only), so no run inherits another's cached reads; False when it could not."""
    if os.geteuid() != 0:
        return False
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def run_variant(plan: ReplayPlan, store: Store, slots: int, v: Variant, opts: Options) -> dict:
    """One fresh memd with ``v``'s policy, the replay, and the counters it moved."""
    from services.memd.simulate import WORKER_AHEAD
    from services.worker.memd_client import MemdClient

    dropped = drop_page_cache()
    # every variant reads the stand-in checkpoint as stored (no slot images written behind its reads into its fresh
    # state directory: those writes would compete with the replay's reads, more for the policies that miss more)
    extra = ["--policy", v.policy, "--prefetch", "on" if v.prefetch else "off", "--slot-cache", "off",
             "--preload", "off"]  # (a replay counts its own reads: a pool of every expert is not filled ahead)
    with MemdProcess(store.path, str(slots * store.slot_bytes), extra=extra) as memd:
        client = MemdClient(state_socket(memd.state_dir, MEMD_SOCKET), state_socket(memd.state_dir, MEMD_TRACE_SOCKET),
                            timeout_s=120.0, leases=opts.leases)
        try:
            hello = client.handshake(str(store.path), 60.0, "the bench's handshake timeout")
            if hello.num_slots != slots:
                raise RuntimeError(f"memd made {hello.num_slots} slots, the bench asked for {slots}")
            client.ready(speculate_max=WORKER_AHEAD)  # (a worker's default: memd's lookahead stays within it)
            client.speculate_layers = WORKER_AHEAD  # the worker's guess lookahead until memd replies (experts.bind)
            before = client.stats()
            result = drive(client, plan, store.compute.seconds)
            after = _settled_stats(client, before, result.steps)
        finally:
            client.close()
    return _row(v, plan, store, before, after, result, dropped)


def _settled_stats(client, before, steps: int, timeout_s: float = 10.0):
    """STATS once memd has read every step trace (they travel on the fire-and-forget trace socket)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.stats()
        if stats.trace_steps - before.trace_steps >= steps or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def _row(v: Variant, plan: ReplayPlan, store: Store, before, after, result, dropped: bool) -> dict:
    d = {k: getattr(after, k) - getattr(before, k) for k in (
        "hits", "misses", "evictions", "bytes_read", "read_seconds", "stall_seconds", "prefetch_issued",
        "prefetch_used", "prefetch_wasted", "prefetch_cancelled", "prefetch_late", "trace_steps", "trace_lost",
        "layer_notes", "notes_dropped", "prefetch_deferred", "prefetch_declined")}
    tokens = plan.tokens
    fetches = d["misses"] + d["prefetch_issued"]
    used, wasted = d["prefetch_used"], d["prefetch_wasted"]
    return {
        "policy": v.name, "eviction": v.policy, "prefetch": v.prefetch,
        "fetches_per_token": fetches / tokens, "demand_misses_per_token": d["misses"] / tokens,
        "prefetches_per_token": d["prefetch_issued"] / tokens,
        "plans_deferred_per_token": d["prefetch_deferred"] / tokens,  # planned while demand reads were queued
        "prefetch_declined_per_token": d["prefetch_declined"] / tokens,  # benefit did not beat the cost
        "stall_ms_per_token": 1e3 * d["stall_seconds"] / tokens,
        "acquire_wait_ms_per_token": 1e3 * result.acquire_seconds / tokens,
        "bytes_read_per_token": d["bytes_read"] / tokens,
        "prefetch_precision": used / (used + wasted) if used + wasted else None,
        "prefetch_recall": used / (used + d["misses"]) if used + d["misses"] else None,
        "fetches": fetches, **d,
        "read_mib_per_s": d["bytes_read"] / MIB / d["read_seconds"] if d["read_seconds"] else None,
        "memd_layer_ms": after.layer_seconds * 1e3,  # memd's own estimate of a layer's compute at the end (its plans')
        "wall_s": result.seconds, "acquires": result.acquires, "notes_unsent": result.notes_unsent,
        "direct_io": after.direct_io,
        "page_cache_dropped": dropped,
    }


def replay_capacity(plan: ReplayPlan, store: Store, memory: str, opts: Options) -> dict:
    slots, clamped = capacity(memory, store)
    accesses = plan.accesses()
    belady, lru = belady_fetches(accesses, slots), lru_fetches(accesses, slots)
    tokens, h = plan.tokens, plan.header
    doc = {
        "trace": str(plan.path), "model": h.model, "num_layers": h.num_layers, "num_experts": h.num_experts,
        "top_k": h.top_k, "steps": len(plan.steps), "tokens": tokens, "decode_tokens": plan.decode_tokens,
        "expert_memory": memory, "capacity_experts": slots, "capacity_share": slots / (h.num_layers * h.num_experts),
        "raised_to_one_layer": clamped, "expert_bytes": store.expert_bytes, "slot_bytes": store.slot_bytes,
        "store": str(store.path), "layer_compute_ms": store.compute.seconds * 1e3,
        "layer_compute_source": store.compute.source, "leases": opts.leases,
        "belady_fetches": belady, "lru_fetches": lru,
        "belady_fetches_per_token": belady / tokens, "lru_fetches_per_token": lru / tokens, "results": [],
    }
    print(_heading(doc))
    print(_table_header())
    runs: dict[str, list[dict]] = {v.name: [] for v in opts.variants}
    for r in range(opts.repeats):  # rotating the order, so load from elsewhere hits every variant alike
        for v in opts.variants[r % len(opts.variants):] + opts.variants[:r % len(opts.variants)]:
            row = run_variant(plan, store, slots, v, opts)
            row["fetches_vs_belady"] = row["fetches"] / belady if belady else None
            row["fetches_vs_lru_bound"] = row["fetches"] / lru if lru else None
            runs[v.name].append(row)
            print(f"  repeat {r + 1}: {_table_row(row)}" if opts.repeats > 1 else _table_row(row), flush=True)
    doc["results"] = [median_row(runs[v.name]) for v in opts.variants]
    if "lru" in runs:
        for row in doc["results"]:
            row.update(paired_ratios(runs[row["policy"]], runs["lru"]))
    if opts.repeats > 1:
        print("medians:\n" + "\n".join(_table_row(row) for row in doc["results"]), flush=True)
        print(_spread_table(doc["results"]), flush=True)
    print()
    return doc


SPREAD = ("fetches_per_token", "stall_ms_per_token")


def paired_ratios(rows: list[dict], lru: list[dict]) -> dict:
    """Fetches and stall of a variant over the ``lru`` row of the same repeat (run next to it, under the same disk
    load): the median ratio and its range over the repeats; a repeat where LRU's value is 0 has no ratio, and
    ``..._unpaired`` counts those where the variant's is not 0 too (the table says so: never hidden)."""
    out = {}
    for key, name in (("fetches_per_token", "fetches_vs_lru"), ("stall_ms_per_token", "stall_vs_lru")):
        ratios = sorted(r[key] / b[key] for r, b in zip(rows, lru) if b[key])
        out[name] = statistics.median(ratios) if ratios else None
        out[name + "_range"] = [ratios[0], ratios[-1]] if ratios else None
        out[name + "_unpaired"] = sum(1 for r, b in zip(rows, lru) if not b[key] and r[key])
    return out


def _spread_table(rows: list[dict]) -> str:
    """Per variant: the min and max over the repeats of fetches and stall per token, the paired ratios to LRU, and
    why prefetches were not issued (median per token: plans made while demand reads were queued, candidates whose
    expected benefit did not beat their cost)."""
    def rng(values):
        return "-" if values is None else f"{values[0]:.3g}-{values[1]:.3g}"
    lines = [f"{'spread over repeats':<20}  {'fetch/tok':>13}  {'stall ms/tok':>13}  {'fetch x lru':>17}"
             f"  {'stall x lru':>17}  {'deferred/tok':>12}  {'declined/tok':>12}"]
    for row in rows:
        ratio = [("-" if row.get(k) is None else f"{row[k]:.3f} ({rng(row.get(k + '_range'))})")
                 + (f" +{row[k + '_unpaired']} vs 0" if row.get(k + "_unpaired") else "")
                 for k in ("fetches_vs_lru", "stall_vs_lru")]
        lines.append(f"{row['policy']:<20}  {rng(row.get('fetches_per_token_range')):>13}"
                     f"  {rng(row.get('stall_ms_per_token_range')):>13}  {ratio[0]:>17}  {ratio[1]:>17}"
                     f"  {row['plans_deferred_per_token']:>12.3f}  {row['prefetch_declined_per_token']:>12.3f}")
    return "\n".join(lines)


def median_row(rows: list[dict]) -> dict:
    """One row per variant: every number is the median over the repeats (which are kept under ``repeats``)."""
    out = dict(rows[0])
    for key, value in rows[0].items():
        values = [r[key] for r in rows if isinstance(r[key], (int, float)) and not isinstance(r[key], bool)]
        if values and not isinstance(value, bool):
            out[key] = statistics.median(values)
    for key in SPREAD:
        values = [r[key] for r in rows]
        out[key + "_range"] = [min(values), max(values)]
    if len(rows) > 1:
        out["repeats"] = rows
    return out


def _heading(doc: dict) -> str:
    raised = " (raised to one layer's experts, memd's minimum)" if doc["raised_to_one_layer"] else ""
    return (f"{doc['trace']}: {doc['num_layers']} MoE layers x {doc['num_experts']} experts of"
            f" {format_bytes(doc['expert_bytes'])}, {doc['steps']} steps, {doc['tokens']} tokens; --expert-memory"
            f" {doc['expert_memory']}: {doc['capacity_experts']} slots{raised};"
            f" leases {'on' if doc['leases'] else 'off'}"
            f"\nlayer compute {doc['layer_compute_ms']:.3g} ms ({doc['layer_compute_source']})"
            f"\nbounds, fetches per token: Belady {doc['belady_fetches_per_token']:.3f},"
            f" on-demand LRU {doc['lru_fetches_per_token']:.3f}")


COLUMNS = (("policy", 20, "{}", "policy"), ("fetch/tok", 9, "{:.3f}", "fetches_per_token"),
           ("x Belady", 8, "{:.2f}", "fetches_vs_belady"), ("miss/tok", 8, "{:.3f}", "demand_misses_per_token"),
           ("pf/tok", 7, "{:.3f}", "prefetches_per_token"), ("stall ms/tok", 12, "{:.2f}", "stall_ms_per_token"),
           ("wait ms/tok", 11, "{:.2f}", "acquire_wait_ms_per_token"), ("pf prec", 7, "{:.2f}", "prefetch_precision"),
           ("pf rec", 6, "{:.2f}", "prefetch_recall"), ("rd MiB/s", 8, "{:.0f}", "read_mib_per_s"),
           ("wall s", 7, "{:.1f}", "wall_s"))


def _table_header() -> str:
    return "  ".join(f"{t:<{w}}" if i == 0 else f"{t:>{w}}" for i, (t, w, _, _) in enumerate(COLUMNS))


def _table_row(row: dict) -> str:
    cells = ["-" if row.get(k) is None else f.format(row[k]) for _, _, f, k in COLUMNS]
    return "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, (_, w, _, _)) in enumerate(zip(cells, COLUMNS)))


def run(args) -> int:
    opts = Options.from_args(args)
    plans = [load_plan(t, opts.max_steps) for t in opts.traces]
    docs = []
    with TerminateAsInterrupt():
        for plan in plans:
            store = open_store(plan, opts)
            done = set()
            for memory in opts.memories:
                slots, raised = capacity(memory, store)
                if slots in done:
                    print(f"{plan.path}: --expert-memory {memory} is {slots} slots"
                          f"{' (memd minimum)' if raised else ''}, measured already\n")
                    continue
                done.add(slots)
                docs.append(replay_capacity(plan, store, memory, opts))
    print("fetches: on-demand loads + prefetches issued; stall: memd's time acquires waited for loads; wait: the"
          " client's time in acquires (stall + round trips); x Belady: fetches / Belady's")
    if opts.json:
        opts.json.write_text(json.dumps(docs[0] if len(docs) == 1 else docs, indent=1) + "\n")
    if opts.plot:
        from services.bench.plots import plot_replay

        print(f"plot: {plot_replay(docs, opts.plot)}")
    return 0


def run_plot(args) -> int:
    from services.bench.plots import plot_replay

    runs = []
    for path in args.json:
        doc = json.loads(Path(path).read_text())
        runs += doc if isinstance(doc, list) else [doc]
    print(f"plot: {plot_replay(runs, args.out)}")
    return 0


def add_parsers(bench) -> None:
    p = bench.add_parser("replay", help="replay routing traces against a real memd per policy, with LRU and"
                                        " Belady bounds")
    p.add_argument("--trace", action="append", required=True, help="a moeinf-trace/1 file (repeat for several)")
    p.add_argument("--expert-memory", nargs="+", default=["25%"],
                   help="pool capacities: shares of all experts (25%%) or bytes; each runs every policy")
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help="comma-separated: lru, lfu, activation, each optionally +prefetch (alone: prefetch off)")
    p.add_argument("--expert-bytes", default="16MiB", help="bytes per expert of the generated store")
    p.add_argument("--model", help="serve this checkpoint instead of a generated store (its shape must match)")
    p.add_argument("--layer-compute-ms", type=float, default=None,
                   help="compute time of one MoE layer (a sleep; traces carry no timings). Default: measured"
                        " now for the store's expert shape (services/bench/replay_compute.py)")
    p.add_argument("--max-steps", type=int, help="replay only the first N forward steps of each trace")
    p.add_argument("--store-dir", default=".cache/replay-store", help="where generated stores are kept")
    p.add_argument("--leases", choices=["on", "off"], default="on", help="the worker's lease mode (its default: on)")
    p.add_argument("--repeats", type=int, default=1, help="run every variant this often (rotating the order) and"
                                                          " report the medians, the range over the repeats and the"
                                                          " ratios to lru paired by repeat: stall varies with the"
                                                          " disk's load")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="draw fetches per token against capacity to this PNG (needs matplotlib)")
    p.set_defaults(func=run)
    p = bench.add_parser("replay-plot", help="draw `bench replay --json` results (needs matplotlib)")
    p.add_argument("json", nargs="+")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.set_defaults(func=run_plot)
