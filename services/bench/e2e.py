"""``moeinf bench e2e``: end-to-end serving throughput and latency with N concurrent clients.

A system is started once (for moeinf: a real ``moeinf memd`` and ``moeinf worker``, as ``moeinf serve`` runs
them). A fixed greedy workload (``--requests`` prompts, ``--max-tokens`` each) is then served at every
``--concurrency`` value: N client threads, one ``WorkerClient`` each, take the next prompt from a shared queue
until the workload is done. Per concurrency the bench reports tokens/s (generated tokens / wall time), time to
first token, the decode time per token (gaps between a request's streamed tokens, p50 and p90), and memd's
bytes read per token and hit rate over that run. One untimed pass at the highest concurrency warms up first, and
with ``--repeats`` the concurrency values run in rotating order, so load from elsewhere hits all of them alike.

Systems implement ``start``/``stop``, ``client()`` (an object with ``stream(prompt, max_tokens)`` yielding
token lists) and ``counters()``, so baselines (plain transformers, accelerate offloading) can join the table.
"""
from __future__ import annotations

import json
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.config import MEMD_SOCKET, MEMD_TRACE_SOCKET, state_socket
from services.bench.memd_proc import MemdProcess, TerminateAsInterrupt
from services.bench.worker_proc import WorkerProcess

PROMPT_LENGTHS = (16, 48, 24, 64, 8, 32, 40, 56)
PROMPT_SEED = 0


@dataclass(frozen=True)
class Options:
    model: Path
    expert_memory: str
    max_tokens: int
    prompts: Path | None
    requests: int
    concurrency: tuple[int, ...]
    repeats: int
    threads: int
    json: Path | None

    @classmethod
    def from_args(cls, args) -> Options:
        opts = cls(Path(args.model), args.expert_memory, args.max_tokens, Path(args.prompts) if args.prompts else None,
                   args.requests, tuple(args.concurrency), args.repeats, args.threads,
                   Path(args.json) if args.json else None)
        if not (opts.model / "config.json").is_file():
            raise FileNotFoundError(f"--model {opts.model}: no config.json (give a checkpoint directory)")
        if min(opts.concurrency) < 1 or opts.max_tokens < 1 or opts.requests < 1 or opts.repeats < 1:
            raise ValueError("--concurrency, --max-tokens, --requests and --repeats must be >= 1")
        if opts.prompts is not None and not opts.prompts.is_file():
            raise FileNotFoundError(f"--prompts {opts.prompts}: no such file")
        return opts


# ---------------------------------------------------------------------------------------------------- systems
class MoeinfSystem:
    """memd + worker processes; clients talk to the worker's socket."""

    def __init__(self, opts: Options, name: str = "moeinf"):
        self.name, self.opts = name, opts
        self.memd: MemdProcess | None = None
        self.worker: WorkerProcess | None = None

    def start(self) -> MoeinfSystem:
        self.memd = MemdProcess(self.opts.model, self.opts.expert_memory).start()
        self.worker = WorkerProcess(self.opts.model, self.memd.state_dir, ["--threads", str(self.opts.threads)]).start()
        return self

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.memd is not None:
            self.memd.stop()

    def client(self):
        from common.worker_client import WorkerClient

        return _TokenStream(WorkerClient(self.worker.addr, timeout_s=600))

    def counters(self) -> dict[str, float]:
        from services.worker.memd_client import MemdClient

        client = MemdClient(state_socket(self.memd.state_dir, MEMD_SOCKET),
                            state_socket(self.memd.state_dir, MEMD_TRACE_SOCKET),
                            timeout_s=30)
        try:
            stats = client.stats()
        finally:
            client.close()
        return {"hits": stats.hits, "misses": stats.misses, "bytes_read": stats.bytes_read}


class _TokenStream:
    def __init__(self, client):
        self.client = client

    def stream(self, prompt: list[int], max_tokens: int):
        for reply in self.client.stream(prompt, max_tokens):
            if reply.tokens:
                yield reply.tokens

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------------------------------- workload
def load_prompts(opts: Options) -> list[list[int]]:
    """``--prompts``: one text prompt per line, tokenized with the checkpoint's tokenizer; default: fixed
    pseudo-random token ids of several lengths (ids from 3 skip the usual special tokens)."""
    if opts.prompts is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(opts.model)
        lines = [line.strip() for line in opts.prompts.read_text().splitlines() if line.strip()]
        base = [tokenizer(line)["input_ids"] for line in lines]
    else:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(opts.model).get_text_config().vocab_size
        rng = np.random.default_rng(PROMPT_SEED)
        base = [rng.integers(min(3, vocab - 1), vocab, n).tolist() for n in PROMPT_LENGTHS]
    if not base:
        raise ValueError(f"--prompts {opts.prompts}: no prompts in it")
    return [base[i % len(base)] for i in range(opts.requests)]


@dataclass
class Timing:
    """One request: when it was sent and when each token arrived."""

    index: int
    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def serve_workload(system, prompts: list[list[int]], max_tokens: int, concurrency: int) -> list[Timing]:
    """``concurrency`` client threads drain the prompts; every request's timing, in prompt order."""
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
                timing = Timing(i, time.perf_counter())
                for tokens in client.stream(prompt, max_tokens):
                    timing.arrivals.extend([time.perf_counter()] * len(tokens))
                    timing.tokens.extend(tokens)
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

    @property
    def generated(self) -> int:
        return sum(len(t.tokens) for t in self.timings)

    @property
    def wall_s(self) -> float:
        return max(t.arrivals[-1] for t in self.timings) - min(t.sent for t in self.timings)

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
            "tokens_per_s": self.generated / self.wall_s,
            "bytes_read_per_token": None if c is None else c["bytes_read"] / self.generated,
            "hit_rate": None if not lookups else c["hits"] / lookups,
            "requests": len(self.timings), "generated_tokens": self.generated, "wall_s": self.wall_s,
        }


def measure(system, prompts: list[list[int]], opts: Options) -> dict[int, list[Result]]:
    _progress(f"warm-up: the workload once at concurrency {max(opts.concurrency)}")
    serve_workload(system, prompts, opts.max_tokens, max(opts.concurrency))
    results: dict[int, list[Result]] = {c: [] for c in opts.concurrency}
    for r in range(opts.repeats):
        order = list(opts.concurrency[r % len(opts.concurrency):] + opts.concurrency[:r % len(opts.concurrency)])
        for c in order:
            before = system.counters()
            timings = serve_workload(system, prompts, opts.max_tokens, c)
            after = system.counters()
            counters = None if before is None else {k: after[k] - before[k] for k in before}
            results[c].append(Result(system.name, c, timings, counters))
            _progress(f"repeat {r + 1}/{opts.repeats}, concurrency {c}: {results[c][-1].row()['tokens_per_s']:.1f}"
                      " tokens/s")
    return results


def summarize(results: dict[int, list[Result]]) -> list[dict]:
    """One row per concurrency: the repeat with the median tokens/s; ``same_tokens_as_c1``: every request's
    output equals the one at concurrency 1 (greedy), when concurrency 1 was measured."""
    rows, reference = [], None
    if 1 in results:
        reference = [t.tokens for t in results[1][0].timings]
    for c, runs in results.items():
        ranked = sorted(runs, key=lambda res: res.row()["tokens_per_s"])
        row = ranked[len(ranked) // 2].row()
        row["tokens_per_s_all"] = [res.row()["tokens_per_s"] for res in runs]
        if reference is not None:
            row["same_tokens_as_c1"] = all([t.tokens for t in res.timings] == reference for res in runs)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- entry
def run(args) -> int:
    opts = Options.from_args(args)
    prompts = load_prompts(opts)
    system = MoeinfSystem(opts)
    with TerminateAsInterrupt():
        _progress(f"starting memd (--expert-memory {opts.expert_memory}) and the worker")
        try:
            system.start()
            results = measure(system, prompts, opts)
        finally:
            system.stop()
    rows = summarize(results)
    print(format_table(opts, prompts, rows))
    if opts.json:
        doc = {"disk_read_gbps": None, "systems": rows, "memory_limit_bytes": None, "model": str(opts.model),
               "expert_memory": opts.expert_memory, "max_tokens": opts.max_tokens, "requests": opts.requests,
               "prompt_tokens": [len(p) for p in prompts], "threads": opts.threads, "repeats": opts.repeats}
        opts.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {opts.json}")
    return 0


def format_table(opts: Options, prompts: list[list[int]], rows: list[dict]) -> str:
    lines = [f"moeinf bench e2e: {opts.model}, expert memory {opts.expert_memory}; {len(prompts)} requests,"
             f" prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, {opts.max_tokens} new tokens each,"
             f" greedy; worker threads {opts.threads or 'default'}; median of {opts.repeats} repeat(s)", ""]
    lines.append(f"{'system':<10} {'clients':>7} {'tokens/s':>9} {'TTFT s':>7} {'decode p50':>10} {'decode p90':>10}"
                 f" {'MiB rd/tok':>10} {'hit rate':>8}")
    for r in rows:
        mib = None if r["bytes_read_per_token"] is None else r["bytes_read_per_token"] / 2**20
        lines.append(f"{r['system']:<10} {r['concurrency']:>7} {r['tokens_per_s']:>9.1f} {r['ttft_s']:>7.3f}"
                     f" {_cell(r['decode_ms_per_token_p50'], '.2f'):>10}"
                     f" {_cell(r['decode_ms_per_token_p90'], '.2f'):>10}"
                     f" {_cell(mib, '.2f'):>10} {_cell(r['hit_rate'], '.3f'):>8}")
    base = next((r for r in rows if r["concurrency"] == 1), None)
    for r in rows:
        if base is not None and r is not base:
            same = {True: "same tokens as 1 client", False: "OTHER tokens than 1 client"}[r["same_tokens_as_c1"]]
            lines.append(f"{r['concurrency']} clients: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x the tokens/s"
                         f" of 1 client; {same}")
    lines.append("decode p50/p90: ms between a request's consecutive tokens; TTFT: median time to first token")
    return "\n".join(lines)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def add_parser(bench) -> None:
    p = bench.add_parser("e2e", help="serving throughput and latency with N concurrent clients")
    p.add_argument("--model", required=True)
    p.add_argument("--expert-memory", default="100%", help="memd's pool: bytes or a share of all expert bytes")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (greedy)")
    p.add_argument("--prompts", help="text file, one prompt per line (default: fixed random token ids)")
    p.add_argument("--requests", type=int, default=16, help="requests in the workload (cycling through the prompts)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8], help="client counts to measure, e.g. 1 8")
    p.add_argument("--repeats", type=int, default=1, help="runs per concurrency; the median is reported")
    p.add_argument("--threads", type=int, default=0, help="the worker's torch threads (0: torch's default)")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=run)


def _progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)
