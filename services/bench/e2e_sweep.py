"""The ``moeinf bench e2e`` run: every system at every memory setting, each under its memory limit.

Order: the raw disk bandwidth first, then ``transformers-resident`` once (no limit: it needs the whole model; its
memory gives the baselines' runtime), then moeinf's and llama.cpp's runtimes measured apart (``e2e_runtime.py``,
``e2e_llama.py``) when a limit needs them, then per memory setting (``--expert-memory`` or ``--memory-limit-total``)
``accelerate-offload``, ``moeinf-ondemand-lru``, ``moeinf`` and ``llama.cpp``, each in a fresh cgroup with the
setting's limit, interleaved by repeat: repeat r runs every system once, the order rotated by r, each started afresh
(``merge_repeats`` then keeps each system's median run, with every run's figures). The page cache is dropped before
every system. A system that fails (for example killed by the kernel at its limit) gets a row with ``error`` and the
run goes on.
"""
from __future__ import annotations

import json
from contextlib import ExitStack

from common.sizes import parse_bytes
from services.bench.baselines import OFFLOAD, RESIDENT, Job, accelerate_missing, run_baseline
from services.bench.budget import Budget, derive, derive_total, model_bytes
from services.bench.blkio import ReadThrottle
from services.bench.cgroup import CgroupUnavailable, MemoryCgroup, drop_caches
from services.bench.diskbw import PROBE_PASSES, read_bandwidth
from services.bench.e2e_floor import measure as measure_compute_floor
from services.bench.e2e_formats import check_slot_images, fill_expert_cache, fill_slot_images, format_system
from services.bench.e2e import ONDEMAND, MOEINF, Options, Result, Timing, measure, progress, summarize
from services.bench.e2e_system import MoeinfSystem, cpu_sets
from services.bench.e2e_runtime import ProcMemory, Runtimes, baseline_runtime, checkpoint_files, moeinf_runtime
from services.bench.e2e_llama import (compare_tokens, environment_note, llama_runtime, llama_share, run_llama,
                                      same_tokens)
from services.bench.e2e_repeats import merge_repeats, rotated, run_status, uneven_order
from services.bench.e2e_workload import Workloads
from services.bench.llama_cpp import LLAMA, find_server, llama_missing, read_ahead_kb
from services.bench.memd_proc import TerminateAsInterrupt

BASELINES = "baselines"  # the runtime kind of transformers-resident and accelerate-offload


class Sweep:
    def __init__(self, opts: Options):
        self.opts = opts
        self.workloads = Workloads.build(opts)
        self.sizes = model_bytes(opts.model)
        self.runtimes = Runtimes()
        self.budgets: list[Budget] = []  # one per setting, in order (under a total: moeinf's); see plan_budgets
        self.system_budgets: dict[tuple[str, str], Budget] = {}  # (setting, system) -> its budget
        self.notes: list[str] = []
        self.limits_applied = opts.memory_limit
        if not opts.memory_limit:
            self.notes.append("--memory-limit off: no system runs under a memory limit, so the comparison is NOT"
                              " memory-fair (offloaded files stay in the page cache)")
        if opts.pin:
            workers, memd = cpu_sets(opts.threads, opts.workers)
            self.notes.append(f"--pin: every moeinf system's worker(s) on CPUs {' | '.join(workers)}, its memd on CPUs"
                              f" {memd}; the baselines unpinned")
        if env := environment_note():
            self.notes.append(env)
        self.rows: list[dict] = []
        self.outputs: dict[tuple[str, str | None, int], list[list[int]]] = {}  # (system, memory, repeat) -> tokens
        self.probe_bytes = parse_bytes(opts.disk_probe, what="--disk-probe")
        self.image_file = None  # memd's slot images, once filled: the moeinf systems' probes read them

    # ------------------------------------------------------------------------------------------------ limits
    def cgroup(self, budget: Budget, name: str, stack: ExitStack) -> MemoryCgroup | None:
        if not self.limits_applied:
            return None
        workers = 1 if name in (RESIDENT, OFFLOAD, LLAMA) else self.opts.workers
        extra = (workers - 1) * (budget.dense_bytes + budget.allowance_bytes)  # each extra worker: its own dense copy
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
        self.plan_budgets()
        runs = [(name, "") for name in self.opts.systems if name != RESIDENT and self.available(name)]
        runs += [(format_system(fmt), fmt) for fmt in self.opts.formats]
        if uneven := uneven_order(self.opts.repeats, len(runs)):
            self.notes.append(uneven)
        for setting in self.opts.settings:
            first = len(self.rows)
            for r in range(self.opts.repeats):
                for name, fmt in rotated(runs, r):
                    self.run_budgeted(name, setting, fmt, repeat=r)
            self.rows[first:] = merge_repeats(self.rows[first:])
        self.reference_tokens()
        compare_tokens(self.rows, self.outputs)
        self.notes += same_tokens(self.rows, self.outputs)

    def reference_tokens(self) -> None:
        """Without transformers-resident among the systems: plain transformers' greedy tokens on every repeat's
        1-client prompts, untimed, unlimited, after the systems (their tokens are checked against transformers,
        never only against each other: the two moeinf systems share their kernels)."""
        if RESIDENT in self.opts.systems or not any(r["system"] in (MOEINF, ONDEMAND) for r in self.rows):
            return
        progress("transformers (untimed, no limit): the reference tokens for every repeat's prompts")
        w, opts = self.workloads, self.opts
        alone = opts.concurrency.index(1) if 1 in opts.concurrency else 0
        repeats = range(opts.repeats)
        job = Job(RESIDENT, opts.model, [w.prompts(RESIDENT, r, alone) for r in repeats], w.warmup(), 1,
                  opts.max_tokens, opts.threads, None)
        try:
            run = run_baseline(job, [])
        except (RuntimeError, OSError) as exc:
            self.notes.append(f"the reference tokens could not be made ({exc}): moeinf's tokens are unchecked")
            return
        for r, timings in zip(repeats, run.runs):
            self.outputs[(RESIDENT, None, r)] = [t["tokens"] for t in timings]

    def probe_paths(self, name: str) -> list:
        """The files ``name``'s disk probes read: what it reads itself (memd's slot images, where kept, for the
        two moeinf systems; the checkpoint for every other)."""
        return [self.image_file] if self.image_file and name in (MOEINF, ONDEMAND) else list(self.sizes.files)

    def available(self, name: str) -> bool:
        why = accelerate_missing() if name == OFFLOAD else self.llama_missing() if name == LLAMA else None
        if why and why not in self.notes:
            self.notes.append(why)
        return why is None

    def llama_missing(self) -> str | None:
        why = llama_missing(find_server(self.opts.llama_server), self.opts.gguf, self.opts.model)
        if why is None and not any(n.startswith("llama.cpp:") for n in self.notes):
            kb = read_ahead_kb(self.opts.gguf)
            self.notes.append(f"llama.cpp: {self.opts.threads or 'default'} thread(s), each page fault on the mapped"
                              f" GGUF reading {'?' if kb is None else kb} KiB ahead (the disk's read_ahead_kb) on"
                              " the thread that faults; moeinf's worker waits while memd's reader threads read")
        return why

    def run_budgeted(self, name: str, setting: str, expert_format: str = "", repeat: int | None = None) -> None:
        budget = self.system_budgets.get((setting, name))
        if budget is None:  # under a total, a system whose runtime could not be measured has no budget
            why = f"{name}'s runtime was not measured in this run, so its share of the total is unknown"
            self.rows.append({**_EMPTY, "system": name, "concurrency": 1, "error": why,
                              "expert_memory": f"total {setting}"})
            return
        self.run_system(name, budget, expert_format, repeat)

    # ------------------------------------------------------------------------------------------------ budgets
    def plan_budgets(self) -> None:
        """Every setting's budget per system, from the runtimes measured so far (and moeinf's, measured now: the
        checkpoint's own, then each ``--formats`` entry's, whose worker dequantizes and so holds more)."""
        opts, moeinf_runs = self.opts, bool({ONDEMAND, MOEINF} & set(self.opts.systems))
        measured = (opts.runtime_allowance == "measured" or opts.memory_limit_total) and self.limits_applied
        if measured and moeinf_runs:
            for kind, fmt in [(MOEINF, ""), *((format_system(f), f) for f in opts.formats)]:
                self.measure_runtime(kind, fmt)
        if measured and LLAMA in opts.systems and not self.llama_missing():
            self.measure_runtime(LLAMA, "")
        runnable = [name for name in opts.run_systems if name == RESIDENT or self.available(name)]
        kinds = {self.kind(name) for name in runnable if name != RESIDENT}
        if measured and (missing := sorted(kinds - set(self.runtimes.measured))) and not opts.memory_limit_total:
            self.notes.append(f"runtime not measured for {', '.join(missing)}: the limits' allowance is the largest"
                              " of the others'")
        progress(self.runtimes.describe())
        for setting in opts.settings:
            for name in runnable:
                budget = self.budget(setting, name)
                if budget is not None:
                    self.system_budgets[(setting, name)] = budget
            shown = [self.system_budgets.get((setting, s)) for s in (MOEINF, ONDEMAND, *opts.run_systems)]
            if any(shown):
                self.budgets.append(next(b for b in shown if b is not None))
        for (setting, name), budget in self.system_budgets.items():
            if name != RESIDENT:
                progress(f"{name}: {budget.describe()}" + ("" if self.limits_applied else " (not applied)"))

    @staticmethod
    def kind(name: str) -> str:
        """Whose measured runtime a system has: the baselines', moeinf's, or its format's own."""
        return BASELINES if name in (RESIDENT, OFFLOAD) else MOEINF if name == ONDEMAND else name  # llama.cpp: its own

    def budget(self, setting: str, name: str) -> Budget | None:
        if self.opts.memory_limit_total:
            if self.kind(name) not in self.runtimes.measured:
                return None
            return derive_total(self.sizes, setting, self.runtimes.allowance(self.kind(name)))
        if self.opts.runtime_allowance != "measured":
            return derive(self.sizes, setting, self.opts.runtime_allowance)
        allowance = self.runtimes.allowance()  # one limit for all: the largest (none measured without limits)
        if not allowance and self.limits_applied:
            raise ValueError(f"no runtime was measured to size {name}'s memory limit (see the notes above): pass"
                             " --runtime-allowance SIZE")
        return derive(self.sizes, setting, str(allowance) if allowance else None)

    def measure_runtime(self, kind: str, expert_format: str) -> None:
        try:
            self.runtimes.measured[kind] = (llama_runtime(self) if kind == LLAMA
                                            else self.measure_moeinf_runtime(expert_format))
        except (RuntimeError, OSError) as exc:  # a worker's error reply is a RuntimeError
            self.notes.append(f"{kind}'s runtime could not be measured: {str(exc).splitlines()[0]}")
            progress(self.notes[-1])

    def measure_moeinf_runtime(self, expert_format: str = "") -> int:
        """memd + one worker at the smallest pool, no limit, after a warm-up and the longest workload request."""
        what = f"moeinf{'-' + expert_format if expert_format else ''}"
        progress(f"measuring {what}'s runtime (memd + worker, no limit, one layer's experts)")
        self.drop_caches()
        system = MoeinfSystem(self.opts, MOEINF, str(self.sizes.layer_experts * self.sizes.slot_bytes),
                              expert_format=expert_format)
        try:
            system.start()
            client = system.client()
            try:
                for prompt in (self.workloads.warmup(), self.workloads.longest()):
                    for _ in client.stream(prompt, self.opts.max_tokens):
                        pass
            finally:
                client.close()
            return moeinf_runtime(system.memd.pid, [w.pid for w in system.workers[:1]], self.sizes.dense_bytes,
                                  checkpoint_files(self.opts.model))
        finally:
            system.stop()

    def run_system(self, name: str, budget: Budget | None, expert_format: str = "", repeat: int | None = None) -> None:
        """``repeat``: that repeat only (a fresh start); None: every repeat in this one start."""
        memory = budget.expert_memory if budget else "100%"
        repeats = list(range(self.opts.repeats)) if repeat is None else [repeat]
        which = "" if repeat is None else f", repeat {repeat + 1}/{self.opts.repeats}"
        progress(f"{name} (expert memory {memory}{which}): dropping caches, starting")
        self.drop_caches()
        disk = read_bandwidth(self.probe_paths(name), min(self.probe_bytes, 512 << 20),  # the disk varies (VMs)
                              self.opts.read_chunk_bytes, self.opts.read_threads, PROBE_PASSES)
        progress(f"disk just before {name}: {disk.describe()}")
        with ExitStack() as stack:
            group = self.cgroup(budget, name, stack) if budget else None
            prefix = group.exec_prefix() if group else []
            try:
                self.check_room(name, budget)
                if name in (RESIDENT, OFFLOAD):
                    rows = self.baseline(name, budget, prefix, repeats)
                elif name == LLAMA:
                    rows = run_llama(self, budget, prefix, repeats)
                else:
                    rows = self.moeinf(name, budget, prefix, group, repeats, expert_format)
            except (RuntimeError, OSError) as exc:  # OSError: a worker gone or silent
                progress(f"{name} (expert memory {memory}) failed: {exc}")
                rows = [{"system": name, "concurrency": 1, "error": str(exc).splitlines()[0]}]
            extra = {"expert_memory": memory, **_budget_fields(budget, expert_format),
                     **(llama_share(self, budget) if name == LLAMA else {}),
                     "eamc": "warm" if self.workloads.warm else "fresh", "disk_read_gbps_before": disk.gbps,
                     "memory_limit_bytes": group.limit_bytes if group else None,
                     "peak_memory_bytes": group.peak_bytes() if group else None,
                     "oom_kills": group.oom_kills() if group else None}
            # processes gone before the cgroup is removed (ExitStack)
        after = read_bandwidth(self.probe_paths(name), min(self.probe_bytes, 512 << 20), self.opts.read_chunk_bytes,
                               self.opts.read_threads, PROBE_PASSES)  # (a disk that sped up during the run shows)
        progress(f"disk just after {name}: {after.describe()}")
        extra["disk_read_gbps_after"] = after.gbps
        for row in rows:
            self.rows.append({**_EMPTY, **row, **extra, "repeat_index": repeat})

    def check_room(self, name: str, budget: Budget | None) -> None:
        """Under a total, a system whose runtime and dense weights leave too little does not start."""
        if budget is None or not budget.total:
            return
        need = 0 if name in (RESIDENT, OFFLOAD, LLAMA) else self.sizes.layer_experts
        if budget.allowance_bytes < budget.runtime_bytes:
            raise RuntimeError(f"{budget.expert_memory} is below the dense weights and {name}'s measured runtime"
                               f" ({budget.dense_bytes + budget.runtime_bytes} bytes): raise the total")
        if budget.slots < need:
            raise RuntimeError(f"{budget.expert_memory} leaves {budget.slots} experts after the dense weights and"
                               f" {name}'s runtime; it needs at least {need}: raise the total")

    def baseline(self, name: str, budget: Budget | None, prefix: list[str], repeats: list[int]) -> list[dict]:
        """The ``repeats`` in one child (one model load), each on its own workload; the median run's row."""
        w, opts = self.workloads, self.opts
        alone = opts.concurrency.index(1) if 1 in opts.concurrency else 0  # moeinf's 1-client workload: paired
        job = Job(name, opts.model, [w.prompts(name, r, alone) for r in repeats], w.warmup(), opts.warmup_tokens,
                  opts.max_tokens, opts.threads, budget.accelerate_cpu_bytes if budget else None,
                  w.prompts(name) if w.warm else None)
        run = run_baseline(job, prefix)
        for r, timings in zip(repeats, run.runs):
            self.outputs[(name, None if name == RESIDENT else budget.expert_memory, r)] = [t["tokens"] for t in timings]
        if name == RESIDENT:  # it holds the whole model: what else it holds is the baselines' runtime
            memory = ProcMemory(run.rss_anon_bytes, run.rss_file_bytes)
            self.runtimes.measured[BASELINES] = baseline_runtime(memory, run.anon_weight_bytes)
        results = [Result(name, 1, [Timing(i, t["sent"], t["arrivals"], t["tokens"]) for i, t in enumerate(timings)],
                       None) for timings in run.runs]
        row = summarize({1: results})[0]
        progress(f"{name}: {row['tokens_per_s']:.2f} tokens/s, decode p50 {row['decode_ms_per_token_p50']:.1f} ms"
                 f" (median of {len(results)}; load {run.load_s:.1f} s; placement {run.placement or 'all in memory'})")
        return [{**row, "load_s": run.load_s, "placement": run.placement or None, "rss_bytes": run.rss_bytes}]

    def moeinf(self, name: str, budget: Budget, prefix: list[str], group: MemoryCgroup | None, repeats: list[int],
               expert_format: str = "") -> list[dict]:
        # a compressed format gets the stored checkpoint's pool in bytes (the same limit), so it holds more experts
        memory = str(budget.expert_budget_bytes) if expert_format else budget.memd_memory
        system = MoeinfSystem(self.opts, name, memory, prefix, expert_format)
        try:
            system.start()
            results = measure(system, self.workloads, self.opts, repeats)
            for r, result in zip(repeats, results.get(1, [])):
                self.outputs[(name, budget.expert_memory, r)] = [t.tokens for t in result.timings]
            held = group.unreclaimable_bytes() if group else None  # memd + worker, before they stop
            pss = system.pss_bytes()
        finally:
            system.stop()
        return [{**row, "unreclaimable_bytes": held, "pss_bytes": pss, "workers": self.opts.workers}
                for row in summarize(results)]


def _budget_fields(budget: Budget | None, expert_format: str = "") -> dict:
    if budget is None:
        return {}
    experts = None if expert_format else budget.slots  # a format's smaller slots: memd fits more in the same bytes
    return {"expert_budget_bytes": budget.expert_budget_bytes, "experts": experts,
            "expert_fraction": None if expert_format else budget.fraction, "allowance_bytes": budget.allowance_bytes}


_EMPTY = {"ttft_s": None, "decode_ms_per_token_p50": None, "decode_ms_per_token_p90": None, "tokens_per_s": None,
          "bytes_read_per_token": None, "hit_rate": None}


def run_sweep(opts: Options) -> int:
    with ExitStack() as stack:
        limit = opts.read_limit_bytes()
        if limit is not None:
            throttle = stack.enter_context(ReadThrottle.create(next(iter(model_bytes(opts.model).files)), limit))
            progress(f"every read of this run throttled to {limit / 1e9:.2f} GB/s on device {throttle.device}")
        return _run_sweep(opts)


def _run_sweep(opts: Options) -> int:
    from services.bench.e2e_report import build_doc, format_report

    opts, images_note = check_slot_images(opts)  # before anything is measured
    sweep = Sweep(opts)
    if images_note:
        sweep.notes.append(images_note)
        progress(images_note)
    with TerminateAsInterrupt():
        for fmt in opts.formats:
            fill_expert_cache(opts, fmt)
        if any(s.startswith("moeinf") for s in opts.run_systems) and not images_note:  # (that note says why off)
            note, sweep.image_file = fill_slot_images(opts)
            sweep.notes.append(note)
            progress(note)
        probe, paths = parse_bytes(opts.disk_probe, what="--disk-probe"), sweep.probe_paths(MOEINF)
        single = read_bandwidth(paths, probe, opts.read_chunk_bytes, streams=1)
        disk = read_bandwidth(paths, probe, opts.read_chunk_bytes, opts.read_threads, PROBE_PASSES)
        progress(f"disk read at memd's queue depth: {disk.describe()}; single stream: {single.gbps:.2f} GB/s")
        compute = measure_compute_floor(opts.model, opts.threads, opts.floor_bytes)
        progress(f"compute floor: {compute.describe()}" if compute else "compute floor: none (an encoder-decoder"
                                                                               " model, or no experts)")
        progress(sweep.workloads.label())
        sweep.run_all()
    doc = build_doc(opts, sweep, disk, single, compute)
    print(format_report(doc))
    if opts.json:
        opts.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {opts.json}")
    if opts.plot:
        from services.bench.plots import plot_e2e_decode_vs_memory

        print(f"wrote {plot_e2e_decode_vs_memory(doc, opts.plot)}")
    return run_status(doc)

