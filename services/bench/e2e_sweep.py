"""The ``moeinf bench e2e`` run: every system at every expert-memory setting, each under its memory limit.

Order: the raw disk bandwidth first, then ``transformers-resident`` once (no limit: it needs the whole model), then
per expert-memory setting ``accelerate-offload``, ``moeinf-ondemand-lru`` and ``moeinf``, each in a fresh cgroup
with the setting's limit. The page cache is dropped before every system. A system that fails (for example killed
by the kernel at its limit) gets a row with ``error`` and the run goes on.
"""
from __future__ import annotations

import json
from contextlib import ExitStack

from common.sizes import parse_size
from services.bench.baselines import OFFLOAD, RESIDENT, Job, accelerate_missing, run_baseline
from services.bench.budget import Budget, derive, model_bytes
from services.bench.cgroup import CgroupUnavailable, MemoryCgroup, drop_caches
from services.bench.diskbw import read_bandwidth
from services.bench.e2e_formats import fill_expert_cache, format_system
from services.bench.e2e import (Options, MoeinfSystem, Result, Timing, measure,
                                progress, summarize)
from services.bench.e2e_workload import Workloads
from services.bench.memd_proc import TerminateAsInterrupt


class Sweep:
    def __init__(self, opts: Options):
        self.opts = opts
        self.workloads = Workloads.build(opts)
        self.sizes = model_bytes(opts.model)
        self.budgets = [derive(self.sizes, memory, opts.runtime_allowance) for memory in opts.expert_memory]
        self.notes: list[str] = []
        self.limits_applied = opts.memory_limit
        if not opts.memory_limit:
            self.notes.append("--memory-limit off: no system runs under a memory limit, so the comparison is NOT"
                              " memory-fair (offloaded files stay in the page cache)")
        self.rows: list[dict] = []
        self.probe_bytes = parse_size(opts.disk_probe, what="--disk-probe").resolve(0)

    # ------------------------------------------------------------------------------------------------ limits
    def cgroup(self, budget: Budget, name: str, stack: ExitStack) -> MemoryCgroup | None:
        if not self.limits_applied:
            return None
        extra = 0 if name in (RESIDENT, OFFLOAD) else (self.opts.workers - 1) * (budget.dense_bytes + budget.allowance_bytes)
        try:
            return stack.enter_context(MemoryCgroup.create(budget.limit_bytes + extra, name))
        except CgroupUnavailable as exc:
            self.limits_applied = False
            self.notes.append(f"no memory cgroup ({exc}): the systems run without a memory limit from here on, so"
                              " the comparison is NOT memory-fair (offloaded files stay in the page cache)")
            progress(self.notes[-1])
            return None

    def drop_caches(self) -> None:
        why = drop_caches()
        if why and why not in self.notes:
            self.notes.append(why + ": systems may read from a warm page cache")

    # ------------------------------------------------------------------------------------------------ systems
    def run_all(self) -> None:
        if RESIDENT in self.opts.systems:
            self.run_system(RESIDENT, None)
        for budget in self.budgets:
            for name in self.opts.systems:
                if name == OFFLOAD and (why := accelerate_missing()):
                    if why not in self.notes:
                        self.notes.append(why)
                    continue
                if name != RESIDENT:
                    self.run_system(name, budget)
            for fmt in self.opts.formats:
                self.run_system(format_system(fmt), budget, fmt)

    def run_system(self, name: str, budget: Budget | None, expert_format: str = "") -> None:
        memory = budget.expert_memory if budget else "100%"
        progress(f"{name} (expert memory {memory}): dropping caches, starting")
        self.drop_caches()
        disk = read_bandwidth(list(self.sizes.files), min(self.probe_bytes, 512 << 20))  # the disk varies (VMs)
        progress(f"disk just before {name}: {disk.describe()}")
        with ExitStack() as stack:
            group = self.cgroup(budget, name, stack) if budget else None
            prefix = group.exec_prefix() if group else []
            try:
                rows = self.baseline(name, budget, prefix) if name in (RESIDENT, OFFLOAD) else self.moeinf(
                    name, budget, prefix, group, expert_format)
            except RuntimeError as exc:
                progress(f"{name} (expert memory {memory}) failed: {exc}")
                rows = [{"system": name, "concurrency": 1, "error": str(exc).splitlines()[0]}]
            extra = {"expert_memory": memory, "eamc": "warm" if self.workloads.warm else "fresh", "disk_read_gbps_before": disk.gbps, "memory_limit_bytes": group.limit_bytes if group else None,
                     "peak_memory_bytes": group.peak_bytes() if group else None,
                     "oom_kills": group.oom_kills() if group else None}
            # processes gone before the cgroup is removed (ExitStack)
        for row in rows:
            self.rows.append({**_EMPTY, **row, **extra})

    def baseline(self, name: str, budget: Budget | None, prefix: list[str]) -> list[dict]:
        """``--repeats`` runs in one child (one model load), each on its own workload; the median run's row."""
        w, opts = self.workloads, self.opts
        job = Job(name, opts.model, [w.prompts(name, r) for r in range(opts.repeats)], w.warmup(), opts.warmup_tokens,
                  opts.max_tokens, opts.threads, budget.accelerate_cpu_bytes if budget else None,
                  w.prompts(name) if w.warm else None)
        run = run_baseline(job, prefix)
        results = [Result(name, 1, [Timing(i, t["sent"], t["arrivals"], t["tokens"]) for i, t in enumerate(timings)],
                       None) for timings in run.runs]
        row = summarize({1: results})[0]
        progress(f"{name}: {row['tokens_per_s']:.2f} tokens/s, decode p50 {row['decode_ms_per_token_p50']:.1f} ms"
                 f" (median of {len(results)}; load {run.load_s:.1f} s; placement {run.placement or 'all in memory'})")
        return [{**row, "load_s": run.load_s, "placement": run.placement or None, "rss_bytes": run.rss_bytes}]

    def moeinf(self, name: str, budget: Budget, prefix: list[str], group: MemoryCgroup | None,
               expert_format: str = "") -> list[dict]:
        # a compressed format gets the stored checkpoint's pool in bytes (the same limit), so it holds more experts
        memory = str(budget.expert_budget_bytes) if expert_format else budget.expert_memory
        system = MoeinfSystem(self.opts, name, memory, prefix, expert_format)
        try:
            system.start()
            results = measure(system, self.workloads, self.opts)
            held = group.unreclaimable_bytes() if group else None  # memd + worker, before they stop
            pss = system.pss_bytes()
        finally:
            system.stop()
        return [{**row, "unreclaimable_bytes": held, "pss_bytes": pss, "workers": self.opts.workers}
                for row in summarize(results)]


_EMPTY = {"ttft_s": None, "decode_ms_per_token_p50": None, "decode_ms_per_token_p90": None, "tokens_per_s": None,
          "bytes_read_per_token": None, "hit_rate": None}


def run_sweep(opts: Options) -> int:
    from services.bench.e2e_report import build_doc, format_report

    sweep = Sweep(opts)
    for budget in sweep.budgets:
        progress(budget.describe())
    probe = parse_size(opts.disk_probe, what="--disk-probe").resolve(0)
    single = read_bandwidth(list(sweep.sizes.files), probe, streams=1)
    disk = read_bandwidth(list(sweep.sizes.files), probe)
    progress(f"raw disk read at memd's queue depth: {disk.describe()}; single stream: {single.gbps:.2f} GB/s")
    progress(sweep.workloads.label())
    with TerminateAsInterrupt():
        for fmt in opts.formats:
            fill_expert_cache(opts, fmt)
        sweep.run_all()
    doc = build_doc(opts, sweep, disk, single)
    print(format_report(doc))
    if opts.json:
        opts.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {opts.json}")
    if opts.plot:
        from services.bench.plots import plot_e2e_decode_vs_memory

        print(f"wrote {plot_e2e_decode_vs_memory(doc, opts.plot)}")
    return 0
