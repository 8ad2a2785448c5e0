"""``moeinf bench e2e``: end-to-end serving latency and throughput of moeinf against the baselines a user would pick.

Systems (``--systems``; all by default), each in its own process(es) and, where a limit applies, its own memory
cgroup (``services/bench/cgroup.py``; the limit counts the page cache, ``services/bench/budget.py`` derives it):

* ``transformers-resident``: plain transformers with every weight resident, a reference (not a floor: moeinf's own
  kernels decode faster; the compute floor is ``e2e_floor.py``'s); it runs without a limit (it needs the whole
  model);
* ``accelerate-offload``: ``device_map="auto"`` with ``max_memory`` = dense weights + expert memory and an
  ``offload_folder`` (``services/bench/baselines.py``);
* ``moeinf-ondemand-lru``: memd with ``--prefetch off --policy lru`` (pure on-demand loads);
* ``moeinf``: memd with its defaults. Both moeinf systems run a real ``moeinf memd`` and ``moeinf worker``;
* ``llama.cpp``: ``llama-server`` on a GGUF of the same checkpoint, memory-mapped (``services/bench/llama_cpp.py``;
  skipped with a note unless ``--gguf`` and a server are given).

Greedy workloads (``--requests`` prompts, ``--max-tokens`` each) are served: a fresh one for every repeat and client
count, the same for every system (paired; each system runs in fresh processes), so memd's EAMC has never seen the
prompts it is timed on and every system routes the same tokens (``services/bench/e2e_workload.py``;
``--warm-eamc`` asks for the warm scenario instead, labelled). moeinf systems serve at every ``--concurrency``
value (N client threads, one ``WorkerClient`` each, draining a shared queue); the baselines serve one request at a
time. With ``--workers N`` the moeinf systems run N worker processes on their one memd (one pool), client k talking
to worker k mod N, with a memory limit raised by N-1 times dense weights + allowance (no expert memory: the
workers share the pool); ``pss_bytes`` (PSS of memd + workers, the shared pool counted once) is the memory they
hold. Every system runs ``--repeats`` times (baselines too), interleaved (all but ``transformers-resident``, which has
no limit and runs its repeats in one start): repeat r runs every system once, in an order rotated by r (A B, then B A),
each started afresh, so a disk whose speed drifts over minutes (VMs) weighs on every
system alike (a count of repeats that is no multiple of the systems' count says it rotates unevenly); the median
run is reported, with every run's figures; every system first serves one untimed warm-up request outside the
workloads. Per run: tokens/s, time to first token, decode time per token (gaps between a request's tokens, p50 and
p90), memd's bytes read per token and hit rate, and how good its predictions were over the run (prefetch precision
and recall, precision and recall by lookahead distance: ``services/bench/e2e_quality.py``). The page cache is
dropped before every system, and the disk's O_DIRECT read bandwidth at memd's queue depth
(``services/bench/diskbw.py``: memd's reader threads, each reading memd's chunk size, the best of two passes over the
same bytes) is measured in the same run.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.config import MemdConfig
from common.knobs import build_config
from common.sizes import parse_bytes, parse_size
from services.bench.baselines import OFFLOAD, RESIDENT
from services.bench.diskbw import READ_CHUNK, STREAMS
from services.bench.e2e_formats import format_system
from services.bench.e2e_quality import delta, quality
from services.bench.e2e_system import check_pin
from services.bench.llama_cpp import LLAMA

ONDEMAND = "moeinf-ondemand-lru"
MOEINF = "moeinf"
SYSTEMS = (RESIDENT, OFFLOAD, ONDEMAND, MOEINF, LLAMA)


@dataclass(frozen=True)
class Options:
    model: Path
    expert_memory: tuple[str, ...]
    max_tokens: int
    prompts: Path | None
    requests: int
    concurrency: tuple[int, ...]
    repeats: int
    threads: int
    json: Path | None
    systems: tuple[str, ...] = (MOEINF,)
    runtime_allowance: str = "measured"  # or a size
    memory_limit: bool = True
    disk_probe: str = "2GiB"
    warmup_tokens: int = 8
    plot: Path | None = None
    seed: int = 0
    warm_eamc: bool = False
    workers: int = 1
    formats: tuple[str, ...] = ()  # memd --expert-format runs of the same checkpoint: rows moeinf-fp8, moeinf-mxfp4
    expert_cache_dir: Path | None = None
    memory_limit_total: tuple[str, ...] = ()  # equal-memory settings: each system sizes its experts from the total
    disk_read_limit: str = ""  # bytes per second every read of the run is throttled to ("": the disk as it is)
    slot_cache: str = "auto"  # memd --slot-cache of every moeinf system (images filled before the timed runs)
    pin: bool = False  # moeinf systems: each worker on --threads CPUs of its own, memd on the others (cpu_sets)
    llama_server: Path | None = None  # the llama.cpp system: its llama-server (None: found as llama_cpp.find_server)
    gguf: Path | None = None  # ... and a GGUF of --model
    read_threads: int = STREAMS  # memd's queue depth (its --read-threads / MOEINF_READ_THREADS): every moeinf
    read_chunk: str = READ_CHUNK  # system's memd reads so, and the disk probes read alike (--read-chunk)
    floor_probe: str = "auto"  # the compute floor's weight (auto: twice the largest CPU cache, at least 1 GiB)
    slot_compression: str = "off"  # memd --slot-compression of every moeinf system (its images filled ahead)

    @property
    def settings(self) -> tuple[str, ...]:
        """The memory settings swept: ``--memory-limit-total`` values, else ``--expert-memory`` values."""
        return self.memory_limit_total or self.expert_memory

    @property
    def run_systems(self) -> tuple[str, ...]:
        """The systems, then one moeinf row per ``--formats`` entry (the same workloads)."""
        return tuple(self.systems) + tuple(format_system(f) for f in self.formats)

    @property
    def floor_bytes(self) -> int:
        from services.bench.profile_parts import l3_bytes

        if self.floor_probe == "auto":
            return max(2 * l3_bytes(), 1 << 30)
        return parse_bytes(self.floor_probe, what="--floor-probe")

    @property
    def read_chunk_bytes(self) -> int:
        return parse_bytes(self.read_chunk, what="MOEINF_READ_CHUNK")

    @classmethod
    def from_args(cls, args, env: Mapping[str, str] | None = None) -> Options:
        """From the command's flags; memd's queue depth (``read_threads``, ``read_chunk``) from ``env``
        (``MOEINF_READ_THREADS``, ``MOEINF_READ_CHUNK``; default ``os.environ``, parsed as memd parses them), so that
        the disk probes read at the depth the benchmark's memd reads at."""
        memd = build_config(MemdConfig, env=os.environ if env is None else env, model=str(args.model))
        path = lambda v: Path(v) if v else None  # noqa: E731
        systems = tuple(s for s in SYSTEMS if s in args.systems)  # table order
        totals = tuple(args.memory_limit_total or ())
        if totals and args.expert_memory:
            raise ValueError("--memory-limit-total and --expert-memory: give one (under a total, each system sizes"
                             " its expert memory from what its runtime leaves)")
        memory = () if totals else tuple(args.expert_memory or ["25%"])
        opts = cls(Path(args.model), memory, args.max_tokens, path(args.prompts), args.requests,
                   tuple(args.concurrency), args.repeats, args.threads, path(args.json), systems,
                   args.runtime_allowance, args.memory_limit == "on", args.disk_probe, args.warmup_tokens,
                   path(args.plot), args.seed, args.warm_eamc, args.workers, tuple(args.formats),
                   path(args.expert_cache_dir), totals, args.disk_read_limit or "", args.slot_cache, args.pin,
                   path(args.llama_server), path(args.gguf), memd.read_threads, memd.read_chunk, args.floor_probe,
                   args.slot_compression)
        opts.validate()
        return opts

    def validate(self) -> None:
        if not (self.model / "config.json").is_file():
            raise FileNotFoundError(f"--model {self.model}: no config.json (give a checkpoint directory)")
        if min(self.concurrency) < 1 or min(self.max_tokens, self.requests, self.repeats, self.workers) < 1:
            raise ValueError("--concurrency, --max-tokens, --requests, --repeats and --workers must be >= 1")
        if self.prompts is not None and not self.prompts.is_file():
            raise FileNotFoundError(f"--prompts {self.prompts}: no such file")
        if not self.systems:
            raise ValueError(f"--systems: choose from {', '.join(SYSTEMS)}")
        if self.max_tokens < 2:
            raise ValueError("--max-tokens must be >= 2 (decode times are the gaps between tokens)")
        if self.slot_compression != "off" and self.slot_cache == "off":
            raise ValueError("--slot-compression compresses the slot images: give --slot-cache auto or on")
        for memory in self.expert_memory:
            parse_size(memory, what="--expert-memory")
        for total in self.memory_limit_total:
            if parse_size(total, what="--memory-limit-total").fraction is not None:
                raise ValueError(f"--memory-limit-total {total}: give bytes (3GiB), not a share")
        if len(set(self.settings)) != len(self.settings):
            raise ValueError(f"memory settings {' '.join(self.settings)}: each setting once")
        if self.memory_limit_total and not self.memory_limit:
            raise ValueError("--memory-limit-total needs --memory-limit on (the total is a cgroup limit)")
        if self.memory_limit_total and self.workers > 1:
            raise ValueError("--memory-limit-total with --workers > 1: the total is one process set's; run the"
                             " workers with --expert-memory (their limit grows by dense weights + allowance each)")
        if self.memory_limit_total and self.runtime_allowance != "measured":
            raise ValueError("--memory-limit-total sizes each system from its measured runtime: drop"
                             " --runtime-allowance")
        if self.runtime_allowance != "measured":
            parse_bytes(self.runtime_allowance, what="--runtime-allowance")
        if ((self.runtime_allowance == "measured" or self.memory_limit_total) and OFFLOAD in self.systems
                and RESIDENT not in self.systems and self.memory_limit):
            raise ValueError("accelerate-offload's runtime is measured on transformers-resident: add it to --systems"
                             " (or give --runtime-allowance SIZE with --expert-memory)")
        if self.pin:
            check_pin(self.threads, self.workers, self.run_systems)
        if self.formats and MOEINF not in self.systems:
            raise ValueError("--formats: compared against the moeinf system, so --systems must include moeinf")
        if self.gguf is not None:  # asked for llama.cpp: what it needs is an error, not a note
            from services.bench.llama_cpp import find_server, llama_missing

            if why := llama_missing(find_server(self.llama_server), self.gguf, self.model):
                raise ValueError(why)
        parse_bytes(self.disk_probe, what="--disk-probe")
        if self.floor_bytes < 1 << 20:
            raise ValueError(f"--floor-probe {self.floor_probe}: at least 1MiB (auto: twice the largest CPU cache)")
        if self.disk_read_limit:
            self.read_limit_bytes()

    def read_limit_bytes(self) -> int | None:
        """``--disk-read-limit`` in bytes per second (``600MB/s``, ``1GB``), or None when not given."""
        if not self.disk_read_limit:
            return None
        text = self.disk_read_limit.removesuffix("/s")
        spec = parse_size(text, what="--disk-read-limit")
        if spec.fraction is not None:
            raise ValueError(f"--disk-read-limit {self.disk_read_limit}: give bytes per second (600MB/s), not a share")
        return spec.resolve(0)


# ---------------------------------------------------------------------------------------------------- serving
@dataclass
class Timing:
    """One request: when it was sent and when each token arrived."""

    index: int
    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    decode_bytes: float | None = None  # memd's bytes read between the first token and the last (1 client only)
    decode_busy: tuple[float, float] | None = None  # (seconds some expert was loading, seconds) over that span
    decode_wasted: float = 0.0  # prefetches that ended unused (or cancelled) over that span


def serve_workload(system, prompts: list[list[int]], max_tokens: int, concurrency: int,
                   split_bytes: bool = False) -> list[Timing]:
    """``concurrency`` client threads drain the prompts; every request's timing, in prompt order. ``split_bytes``
    (1 client): read memd's counters at each request's first and last token, so decode reads are known apart
    from prefill reads (this adds one STATS round trip to each request's first decode gap)."""
    todo: queue.Queue = queue.Queue()
    for i, prompt in enumerate(prompts):
        todo.put((i, prompt))
    done: list[Timing] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client_loop():
        client = system.client()
        try:
            while True:
                try:
                    i, prompt = todo.get_nowait()
                except queue.Empty:
                    return
                timing, first, first_at = Timing(i, time.perf_counter()), None, 0.0
                for tokens in client.stream(prompt, max_tokens):
                    timing.arrivals.extend([time.perf_counter()] * len(tokens))
                    timing.tokens.extend(tokens)
                    if split_bytes and first is None:
                        first, first_at = system.counters(), time.perf_counter()
                if split_bytes:
                    decode = delta(first, system.counters())
                    timing.decode_bytes = decode["bytes_read"]
                    timing.decode_wasted = decode.get("prefetch_wasted", 0.0)
                    timing.decode_busy = (decode.get("reader_busy_seconds", 0.0), time.perf_counter() - first_at)
                with lock:
                    done.append(timing)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, name=f"client-{k}") for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]}") from errors[0]
    return sorted(done, key=lambda t: t.index)


@dataclass
class Result:
    system: str
    concurrency: int
    timings: list[Timing]
    counters: dict[str, float] | None  # memd's, over this run
    same_as_alone: bool | None = None  # several clients: the same tokens as the prompts served at 1 client

    @property
    def generated(self) -> int:
        return sum(len(t.tokens) for t in self.timings)

    @property
    def wall_s(self) -> float:
        return max(t.arrivals[-1] for t in self.timings) - min(t.sent for t in self.timings)

    def disk_busy(self) -> float | None:
        """The share of the decode time (1 client; else of the run's wall time) during which memd had some expert
        loading."""
        if self.timings and all(t.decode_busy is not None for t in self.timings):
            span = sum(t.decode_busy[1] for t in self.timings)
            return sum(t.decode_busy[0] for t in self.timings) / span if span > 0 else None
        c = self.counters
        return None if c is None or not self.wall_s else c.get("reader_busy_seconds", 0.0) / self.wall_s

    def decode_bytes_per_token(self) -> float | None:
        """memd's bytes read per decode token (after each request's first token), when measured."""
        if any(t.decode_bytes is None for t in self.timings):
            return None
        steps = sum(len(t.tokens) - 1 for t in self.timings)
        return sum(t.decode_bytes for t in self.timings) / steps if steps else None

    def decode_wasted_per_token(self) -> float | None:
        """Prefetches per decode token that ended unused, when decode was measured apart."""
        steps = sum(len(t.tokens) - 1 for t in self.timings)
        return sum(t.decode_wasted for t in self.timings) / steps if steps and self.decode_bytes_per_token() else None

    def row(self) -> dict:
        gaps = np.concatenate([np.diff(t.arrivals) for t in self.timings]) * 1e3
        ttft = [t.arrivals[0] - t.sent for t in self.timings]
        c = self.counters
        lookups = None if c is None else c["hits"] + c["misses"]
        return {
            "system": self.system, "concurrency": self.concurrency,
            "ttft_s": float(np.median(ttft)),
            "decode_ms_per_token_p50": float(np.percentile(gaps, 50)) if gaps.size else None,
            "decode_ms_per_token_p90": float(np.percentile(gaps, 90)) if gaps.size else None,
            "decode_ms_per_token_mean": float(gaps.mean()) if gaps.size else None,  # (against the mean-bytes floor)
            "tokens_per_s": self.generated / self.wall_s,
            "bytes_read_per_token": None if c is None else c["bytes_read"] / self.generated,
            "decode_bytes_read_per_token": self.decode_bytes_per_token(),
            "decode_wasted_prefetches_per_token": self.decode_wasted_per_token(),
            "hit_rate": None if not lookups else c["hits"] / lookups,
            "load_read_gbps": _gbps(c, "read_seconds"), "stall_read_gbps": _gbps(c, "stall_seconds"),
            "busy_read_gbps": _gbps(c, "reader_busy_seconds"),
            "stall_ms_per_token": None if c is None else 1e3 * c.get("stall_seconds", 0.0) / self.generated,
            "disk_busy": self.disk_busy(),
            "requests": len(self.timings), "generated_tokens": self.generated, "wall_s": self.wall_s,
            **quality(c),
        }


def _gbps(c: dict | None, seconds: str) -> float | None:
    """memd's bytes read over the run, per ``read_seconds`` (the seconds each load spent reading, summed: what one
    load sees while others share the device), per ``stall_seconds`` (the seconds the worker waited for loads; less
    than the loads took where it computed a layer's resident experts meanwhile, worker ``--early-experts``) or per
    ``reader_busy_seconds`` (the wall seconds some load was in flight: the rate the disk delivered while it had
    work)."""
    if not c or not c.get(seconds):
        return None
    return c["bytes_read"] / c[seconds] / 1e9


def measure(system, workloads, opts: Options, repeats: list[int]) -> dict[int, list[Result]]:
    """The warm-up request (and, with ``--warm-eamc``, the workload once, untimed), then one round over the
    concurrency values per repeat in ``repeats``, each run on its own workload: 1 client first, straight after the
    warm-up as the baselines serve theirs (every target judges that row; a run after others would meet an EAMC and a
    pool they filled), then the others in the order given (the same in every moeinf system). A run at several
    clients is checked afterwards (untimed): its prompts served at 1 client must give the same tokens (greedy)."""
    serve_workload(system, [workloads.warmup()], opts.warmup_tokens, 1)
    if workloads.warm:
        serve_workload(system, workloads.prompts(system.name), opts.max_tokens, 1)
    results: dict[int, list[Result]] = {c: [] for c in opts.concurrency}
    order = sorted(opts.concurrency, key=lambda c: c != 1)  # (stable: the others as given)
    for r in repeats:
        for c in order:
            prompts = workloads.prompts(system.name, r, opts.concurrency.index(c))
            before = system.counters()
            timings = serve_workload(system, prompts, opts.max_tokens, c, split_bytes=c == 1)
            after = system.counters()
            counters = None if before is None else delta(before, after)
            result = Result(system.name, c, timings, counters)
            if c > 1:
                alone = serve_workload(system, prompts, opts.max_tokens, 1)
                result.same_as_alone = [t.tokens for t in alone] == [t.tokens for t in timings]
            results[c].append(result)
            progress(f"{system.name}: repeat {r + 1}/{opts.repeats}, concurrency {c}:"
                     f" {result.row()['tokens_per_s']:.2f} tokens/s")
    return results


def median_run(rows: list[dict], tokens_per_s: list[float]) -> dict:
    """A copy of the run with the median decode p50 (every target judges decode; of an even count, the upper of the
    two middle runs, a run's own fields kept together: the report calls it the middle run), its ``tokens_per_s`` the
    median of ``tokens_per_s`` (every run's: tokens/s counts the prompts too, so its median run can be another)."""
    timed = [r for r in rows if r["decode_ms_per_token_p50"] is not None] or rows  # (None: a run of one token)
    ranked = sorted(timed, key=lambda r: r["decode_ms_per_token_p50"] or 0.0)
    row = dict(ranked[len(ranked) // 2])
    row["tokens_per_s_all"], row["tokens_per_s"] = tokens_per_s, float(np.median(tokens_per_s))
    return row


def summarize(results: dict[int, list[Result]]) -> list[dict]:
    """One row per concurrency: the repeat with the median decode p50 (``median_run``); ``same_tokens_as_c1``:
    every request's output at several clients equals its output served alone (greedy), in every repeat."""
    rows = []
    for c, runs in results.items():
        each = [res.row() for res in runs]
        row = median_run(each, [r["tokens_per_s"] for r in each])
        row["repeats"] = len(runs)
        checked = [res.same_as_alone for res in runs if res.same_as_alone is not None]
        if checked:
            row["same_tokens_as_c1"] = all(checked)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- entry
def run(args) -> int:
    from services.bench.e2e_sweep import run_sweep

    return run_sweep(Options.from_args(args))


def progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)
