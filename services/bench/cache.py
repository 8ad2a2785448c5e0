"""``moeinf bench cache``: replay a routing trace through memd's decisions for each policy, with and without
prefetch, at several pool sizes, and print on-demand misses and stall per token (services/memd/simulate.py), and
the simulator's process time per layer (memd's decisions: policy, predictor, planner, leases; and the simulator's
own bookkeeping: the same for every row, so the rows compare the decisions' cost; the ``oracle`` row's also builds
its guesses from the routing ahead). The last row of each size,
prefetch ``oracle``, prefetches on perfect guesses (the step's real routing of the layers memd looks ahead to, at
confidence 1): what memd's planner would hide if every guess were right, beside the trace's own guesses (``on``).

``moeinf bench synth OUT`` writes the synthetic workload (services/bench/synthetic.py) as a trace file.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict

from common.sizes import parse_size
from common.traces import group_steps, read_trace
from services.bench.synthetic import FlatWorkload, Workload, write, write_flat
from services.memd.core import CacheSettings
from services.memd.simulate import SimConfig, simulate

# (policy, prefetch, guesses): the last row prefetches on perfect guesses (the real routing of the layers memd looks
# ahead to): what memd's planner, its admission rules unchanged, would hide if every guess were right
VARIANTS = (("lru", False, "trace"), ("lfu", False, "trace"), ("activation", False, "trace"),
            ("lru", True, "trace"), ("activation", True, "trace"), ("activation", True, "oracle"))


def run_cache(args) -> int:
    header, records = read_trace(args.trace)
    steps = list(group_steps(records))
    total = header.num_layers * header.num_experts
    print(f"{args.trace}: {header.model}, {header.num_layers} MoE layers x {header.num_experts} experts (top-"
          f"{header.top_k}), {len(steps)} steps; one expert read {args.read_ms:g} ms, one layer {args.layer_ms:g} ms")
    print(f"{'memory':>7} {'slots':>5} {'policy':>10} {'prefetch':>8} {'miss/tok':>9} {'decode':>7} {'stall/tok':>10}"
          f" {'pf used/wasted':>15} {'us/layer':>8}  lookahead precision/recall")
    rows = []
    for memory in args.memory:
        slots = max(header.num_experts, parse_size(memory, what="--memory").resolve(total))
        for policy, prefetch, guesses in VARIANTS:
            cfg = SimConfig(slots, CacheSettings(policy=policy, prefetch=prefetch, window=args.window),
                            read_seconds=args.read_ms / 1e3, layer_seconds=args.layer_ms / 1e3, guesses=guesses)
            start = time.process_time()
            r = simulate(header, steps, cfg)
            decide = (time.process_time() - start) / max(1, len(steps) * header.num_layers)  # per layer, all included
            ahead = " ".join(f"d{d}:{p:.2f}/{rc:.2f}" for d, p, rc in r.lookahead)
            shown = guesses if guesses == "oracle" else "on" if prefetch else "off"
            print(f"{memory:>7} {slots:>5} {policy:>10} {shown:>8} {r.misses_per_token:>9.3f}"
                  f" {r.decode_misses_per_token:>7.3f} {1e3 * r.stall_seconds / max(1, r.tokens):>8.3f}ms"
                  f" {f'{r.prefetch_used}/{r.prefetch_wasted}':>15} {1e6 * decide:>8.0f}  {ahead}")
            rows.append({"memory": memory, "slots": slots, "policy": policy, "prefetch": prefetch, "guesses": guesses,
                         "misses_per_token": r.misses_per_token, "decide_us_per_layer": 1e6 * decide, **asdict(r)})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def run_synth(args) -> int:
    if args.workload == "mixtral-flat":
        f = FlatWorkload(requests=args.requests or FlatWorkload().requests, batch=args.batch, seed=args.seed)
        path = write_flat(args.out, f)
        print(f"wrote a flat Mixtral-like trace ({f.requests} requests, batch {f.batch}, {f.num_layers} layers x"
              f" {f.num_experts} experts) to {path}")
        return 0
    w = Workload(requests=args.requests or Workload().requests, batch=args.batch, seed=args.seed)
    path = write(args.out, w)
    print(f"wrote a synthetic trace ({w.requests} requests, batch {w.batch}, {w.topics} topics) to {path}")
    return 0


def add_parsers(bench) -> None:
    p = bench.add_parser("cache", help="misses and stall per token of each policy, replaying a routing trace")
    p.add_argument("trace", help="a moeinf-trace/1 file (docs/traces.md)")
    p.add_argument("--memory", nargs="+", default=["12.5%", "25%", "50%"],
                   help="pool sizes: a share of all experts (25%%) or a number of slots")
    p.add_argument("--read-ms", type=float, default=2.0, help="time to read one expert")
    p.add_argument("--layer-ms", type=float, default=1.0, help="compute time of one MoE layer")
    p.add_argument("--window", type=int, default=CacheSettings().window, help="prefetch lookahead in layers")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=run_cache)
    p = bench.add_parser("synth", help="write the synthetic topic workload as a trace file")
    p.add_argument("out")
    p.add_argument("--workload", choices=["topics", "mixtral-flat"], default="topics",
                   help="topics: the paper's structure; mixtral-flat: flat routing with Mixtral's statistics")
    p.add_argument("--requests", type=int, help=f"default: {Workload().requests} (topics), {FlatWorkload().requests}"
                                                " (mixtral-flat)")
    p.add_argument("--batch", type=int, default=Workload().batch, help="requests running at once")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_synth)
