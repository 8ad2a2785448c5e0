"""``moeinf bench profile``: where one decode step's time goes at 100% expert residency, against the memory-
bandwidth floor measured in the same run.

Two systems decode the same greedy tokens in this process, one token per step: plain transformers (every weight
resident, its own ``grouped_mm`` experts) and moeinf's worker path (a real ``moeinf memd --expert-memory 100%``,
the worker's model bound to it, ``Engine.run`` on the flattened step as the worker's compute loop calls it). For
each, forward hooks (``profile_parts.LayerTimers``) time every layer's norms, attention, router and experts, and
the embedding, final norm and LM head; the rest of the step is Python and dispatch. Decode steps are also timed
without hooks, in lockstep with the other system (load from elsewhere hits both alike), the floor's fastest product
run once after each round (``FloorStep``): "vs floor, same rounds" is each p50 step against the median of those runs,
the floor at the moments the steps ran, beside "vs floor", against the fastest the run measured (the best of the
floor's own runs at the end, or the fastest round: a floor the product itself beat is no floor).

Bytes touched per token: the resident dense weights (one embedding row), the routed experts (``top_k`` per MoE
layer) and the KV cache. The floor is those weight bytes over the best bf16 matrix-vector throughput reached on a
buffer larger than the largest CPU cache (``profile_parts.bandwidth_floor``: ``F.linear``, oneDNN on a weight packed
once, or moeinf's own kernels, rows packed or spread apart, whichever is fastest); one whose active weights fit in
that cache decodes below it: the table says so.
"""
from __future__ import annotations

import contextlib
import gc
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import messages as m
from common.config import ATTENTION_KERNELS, MATVEC_KERNELS
from services.bench.memd_proc import TerminateAsInterrupt
from services.bench.overhead import MoeinfSystem, TransformersSystem, _progress, _quiet_logging, make_prompt
from services.bench.profile_parts import (KINDS, OUTSIDE, Floor, FloorStep, LayerTimers, TokenBytes,
                                          bandwidth_floor, dense_bytes, kv_bytes, l3_bytes, layer_indices)
from services.worker import dequant_kernel

MIB = 2**20
WARMUP_SEED = 7919  # the warm-up's prompt: another than the timed one (make_prompt's default seed)


@dataclass(frozen=True)
class Options:
    model: Path
    tokens: int
    prompt_len: int
    threads: int
    floor_mib: int  # 0: twice the largest CPU cache, at least 1 GiB
    floor_runs: int  # the floor's product at the end, the best of this many runs
    json: Path | None
    service: bool = False  # also stream through a real worker process
    prepack_dense: bool = False  # the worker's knobs that change the arithmetic (moeinf's rows; tokens may differ)
    matvec_kernel: str = "auto"  # the worker's --matvec-kernel
    attention_kernel: str = "auto"  # ... and --attention-kernel
    gguf: Path | None = None  # also decode with llama.cpp's llama-server on this GGUF
    llama_server: Path | None = None

    @classmethod
    def from_args(cls, args) -> Options:
        opts = cls(Path(args.model), args.tokens, args.prompt_len, args.threads, args.floor_mib, args.floor_runs,
                   Path(args.json) if args.json else None, args.service, args.prepack_dense == "on",
                   args.matvec_kernel, args.attention_kernel, Path(args.gguf) if args.gguf else None,
                   Path(args.llama_server) if args.llama_server else None)
        if not (opts.model / "config.json").is_file():
            raise FileNotFoundError(f"--model {opts.model}: no config.json (give a checkpoint directory)")
        for name in ("tokens", "prompt_len", "floor_runs"):
            if getattr(opts, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if opts.gguf is not None:
            from services.bench.llama_cpp import find_server, llama_missing

            if why := llama_missing(find_server(opts.llama_server), opts.gguf, opts.model):
                raise ValueError(why)
        if opts.threads < 0 or opts.floor_mib < 0:
            raise ValueError("--threads and --floor-mib must be >= 0 (0: the default)")
        return opts

    @property
    def worker_args(self) -> list[str]:
        kernels = ["--matvec-kernel", self.matvec_kernel, "--attention-kernel", self.attention_kernel]
        return ["--prepack-dense", "on"] * self.prepack_dense + kernels

    @property
    def exact(self) -> bool:
        """moeinf's worker computes transformers' bits: no knob that changes the arithmetic."""
        return not self.prepack_dense and "fast" not in (self.matvec_kernel, self.attention_kernel)

    @property
    def floor_bytes(self) -> int:
        return self.floor_mib * MIB if self.floor_mib else max(2 * l3_bytes(), 1 << 30)


# ---------------------------------------------------------------------------------------------------- decoding
class Decoder:
    """One system's generation, one step per call: moeinf through the worker's ``Engine.run``, transformers
    through ``Engine.step`` (what ``model.generate`` runs)."""

    def __init__(self, system, expert_modules: list, batched: bool):
        self.system, self.batched = system, batched
        self.model = system.engine.model
        self.expert_modules = expert_modules
        if batched:  # (with the worker's decode attention kernel, if any)
            system.engine.enable_batching(system.attention)

    def start(self, prompt: list[int], tokens: int, run_id: str):
        self.seq = self.system.engine.start(m.GenerateRequest(request=run_id, prompt=prompt, max_tokens=tokens + 1))
        self.system.request_start(run_id, len(prompt))
        return self

    @property
    def done(self) -> bool:
        return self.seq.finish_reason is not None

    def step(self) -> float:
        from services.worker.scheduler import Chunk

        start = time.perf_counter()
        if self.batched:
            self.system.engine.run([Chunk(self.seq, self.seq.next_tokens(len(self.seq.req.prompt)))])
        else:
            self.system.engine.step(self.seq)
        elapsed = time.perf_counter() - start
        if self.done:
            self.system.request_end(self.seq.request_id, len(self.seq.generated))
        return elapsed


def experts_of(model) -> list:
    """The experts modules, in layer order (transformers' ``@use_experts_implementation`` classes)."""
    return [module for module in model.modules()
            if type(module).__name__.endswith("Experts") and hasattr(module, "num_experts")]


def profile_hooked(decoder: Decoder, prompt: list[int], tokens: int) -> tuple[dict, list[float], list[int]]:
    """Decode with the layer timers on: their seconds summed over the decode steps, each step's wall time."""
    timers = LayerTimers(decoder.model, decoder.expert_modules)
    try:
        decoder.start(prompt, tokens, f"hooked-{decoder.system.name}")
        decoder.step()  # the prompt
        timers.reset()
        steps = []
        while not decoder.done:
            steps.append(decoder.step())
        return dict(timers.seconds), steps, list(decoder.seq.generated)
    finally:
        timers.remove()


def lockstep(decoders: list[Decoder], prompt: list[int], tokens: int, run_id: str,
             between=None) -> list[list[float]]:
    """Each system's decode step times without hooks, one step of each in turn (the order rotating), ``between``
    called after each round (the floor's run)."""
    for d in decoders:
        d.start(prompt, tokens, f"{run_id}-{d.system.name}").step()
    times = [[] for _ in decoders]
    k = 0
    while not all(d.done for d in decoders):
        order = list(range(len(decoders)))
        for i in order[k % len(order):] + order[:k % len(order)]:
            if not decoders[i].done:
                times[i].append(decoders[i].step())
        if between is not None:
            between()
        k += 1
    return times


def service_decode(opts: Options, prompt: list[int], warmup: list[int], threads: int) -> tuple[list[float], list[int]]:
    """The same generation through a real memd + worker process pair, streamed over the worker's socket (as the
    gateway reads it): the gaps between token arrivals, and the tokens (every expert read, one warm-up first)."""
    from common.worker_client import WorkerClient
    from services.bench.memd_proc import MemdProcess
    from services.bench.worker_proc import WorkerProcess

    with MemdProcess(opts.model, "100%") as memd, \
            WorkerProcess(opts.model, memd.state_dir, ["--threads", str(threads), *opts.worker_args]) as worker:
        memd.load_every_expert()
        client = WorkerClient(worker.addr, timeout_s=600)
        try:
            client.generate(warmup, opts.tokens + 1)
            arrivals, tokens = [], []
            for reply in client.stream(prompt, opts.tokens + 1):
                if reply.tokens:
                    arrivals.append(time.perf_counter())
                    tokens.extend(reply.tokens)
        finally:
            client.close()
    return np.diff(arrivals).tolist(), tokens


def llama_decode(opts: Options, prompt: list[int], threads: int) -> tuple[list[float], list[int]]:
    """The same generation through llama.cpp's ``llama-server`` on ``--gguf`` (memory-mapped, the page cache warmed
    by one generation first, as moeinf's pool is): the gaps between token arrivals, and the tokens."""
    from services.bench.llama_cpp import LlamaCppSystem, find_server

    system = LlamaCppSystem(find_server(opts.llama_server), opts.gguf, threads, len(prompt) + opts.tokens + 17).start()
    try:
        client = system.client()
        for _ in client.stream(prompt, opts.tokens + 1):
            pass
        arrivals, tokens = [], []
        for chunk in client.stream(prompt, opts.tokens + 1):
            arrivals.extend([time.perf_counter()] * len(chunk))  # a held-back token arrives with the next (as e2e)
            tokens.extend(chunk)
    finally:
        system.stop()
    return np.diff(arrivals).tolist(), tokens


def floor_kernels(threads: int):
    """``--matvec-kernel``'s kernels on ``threads`` threads, as the worker runs them, for the floor to count (None
    where they cannot be built or this CPU has neither AVX-512 BF16 nor AVX2: then they serve nothing either)."""
    from services.worker import matvec_checks

    from services.bench.worker_proc import kernel_cache_dir

    with tempfile.TemporaryDirectory() as scratch:  # (where no kernel cache of this user's is at hand)
        try:
            return dequant_kernel.load("c", kernel_cache_dir() or Path(scratch), threads, check=matvec_checks.check,
                                       flag="the floor's kernel")
        except dequant_kernel.KernelError:
            return None


# ---------------------------------------------------------------------------------------------------- report
def breakdown(seconds: dict, steps: list[float], layers: list[int]) -> dict:
    """ms per token: per kind (summed over layers), per layer and kind, and the remainder."""
    n = len(steps)
    per_kind = {k: sum(s for (_, kind), s in seconds.items() if kind == k) * 1e3 / n for k in (*KINDS, *OUTSIDE)}
    per_layer = [{"layer": layer, **{k: seconds.get((layer, k), 0.0) * 1e3 / n for k in KINDS}} for layer in layers]
    step_ms = sum(steps) * 1e3 / n
    per_kind["python/dispatch"] = step_ms - sum(per_kind.values())
    return {"step_ms": step_ms, "kinds": per_kind, "layers": per_layer}


def token_bytes(model, expert_modules: list, prompt_len: int, tokens: int) -> TokenBytes:
    text = model.config.get_text_config()
    top_k = getattr(text, "num_experts_per_tok", None) or 2
    per_expert = 0
    for p in expert_modules[0].parameters():
        per_expert += p.numel() * p.element_size() // expert_modules[0].num_experts
    return TokenBytes(dense_bytes(model, expert_modules), top_k * per_expert * len(expert_modules),
                      kv_bytes(model, prompt_len + tokens // 2))


def format_report(doc: dict) -> str:
    names = [s["system"] for s in doc["systems"]]
    lines = [doc["header"], "", f"{'ms per decode token':<22}" + "".join(f"{n:>16}" for n in names)]
    for kind in (*KINDS, *OUTSIDE, "python/dispatch"):
        lines.append(f"{kind:<22}" + "".join(f"{s['hooked']['kinds'][kind]:>16.3f}" for s in doc["systems"]))
    lines.append(f"{'step (hooked)':<22}" + "".join(f"{s['hooked']['step_ms']:>16.3f}" for s in doc["systems"]))
    lines.append(f"{'step (no hooks, p50)':<22}" + "".join(f"{s['decode_ms_p50']:>16.3f}" for s in doc["systems"]))
    lines.append(f"{'vs floor':<22}" + "".join(f"{s['vs_floor']:>15.2f}x" for s in doc["systems"]))
    lines.append(f"{'vs floor, same rounds':<22}" + "".join(f"{s['vs_floor_rounds']:>15.2f}x" for s in doc["systems"]))
    lines.append(f"{'same tokens':<22}" + "".join(f"{'yes' if s['identical'] else 'NO':>16}" for s in doc["systems"]))
    service = doc.get("service")
    if service is not None:
        lines.append(f"service path (a worker process, its socket): {service['decode_ms_p50']:.3f} ms/token p50,"
                     f" {service['vs_in_process']:.3f}x moeinf in process (a separate run, not in lockstep);"
                     f" same tokens: {'yes' if service['identical'] else 'NO'}")
    llama = doc.get("llama_cpp")
    if llama is not None:
        lines.append(f"llama.cpp (llama-server on the GGUF, mmap, same threads; a separate run):"
                     f" {llama['decode_ms_p50']:.3f} ms/token p50 = {llama['vs_floor']:.2f}x the floor; moeinf in"
                     f" process {llama['moeinf_vs_llama']:.2f}x its time; {llama['tokens_agreement']:.0%} of its"
                     " tokens equal transformers' (up to the first difference)")
    lines += ["", "per layer (moeinf), ms per token:", f"{'layer':<8}" + "".join(f"{k:>12}" for k in KINDS)]
    for row in doc["systems"][-1]["hooked"]["layers"]:
        lines.append(f"{row['layer']:<8}" + "".join(f"{row[k]:>12.3f}" for k in KINDS))
    b, f = doc["bytes_per_token"], doc["floor"]
    lines += ["", f"bytes per decode token: dense {b['dense'] / MIB:.1f} MiB + experts {b['experts'] / MIB:.1f} MiB"
                  f" = {b['weights'] / MIB:.1f} MiB of weights; KV cache {b['kv_cache'] / MIB:.2f} MiB",
              f"bandwidth floor: bf16 matrix-vector (F.linear, packed, matvec.c or matvec_exact.c) over"
              f" {f['buffer_bytes'] / MIB:.0f} MiB,"
              f" the fastest in this run: {f['gb_per_s']:.2f} GB/s (best of {f['runs']} at the end"
              f" {f['end_gb_per_s']:.2f}, the fastest between the rounds {f['rounds_best_gb_per_s']:.2f})"
              f" -> {f['ms_per_token']:.3f} ms/token for the weights",
              f"  same rounds: its fastest product once after each lockstep round, median"
              f" {f['rounds_gb_per_s']:.2f} GB/s -> {f['rounds_ms_per_token']:.3f} ms/token (the steps' p50 against"
              " the floor at the same moments)"]
    if doc["fits_in_cache"]:
        lines.append(f"note: the active weights fit in the {doc['cache_bytes'] / MIB:.0f} MiB CPU cache, so decode"
                     " can run below this floor")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- entry
def run(args) -> int:
    opts = Options.from_args(args)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    threads = torch.get_num_threads()
    _quiet_logging()
    with TerminateAsInterrupt(), contextlib.ExitStack() as stack:
        _progress("starting memd --expert-memory 100% and attaching the worker")
        moeinf = MoeinfSystem(opts.model, "100%", threads, stack, prepack_dense=opts.prepack_dense,
                              matvec_kernel=opts.matvec_kernel, attention_kernel=opts.attention_kernel)
        _progress(f"loading transformers ({opts.model})")
        plain = TransformersSystem(opts.model)
        plain_experts = experts_of(plain.model)
        decoders = [Decoder(plain, plain_experts, batched=False),
                    Decoder(moeinf, experts_of(moeinf.engine.model), batched=True)]
        vocab = plain.model.config.get_text_config().vocab_size
        prompt, warmup = make_prompt(vocab, opts.prompt_len), make_prompt(vocab, opts.prompt_len, seed=WARMUP_SEED)
        reference = plain.generate(prompt, opts.tokens + 1)
        moeinf.memd.load_every_expert()  # 100% residency from here, whatever the prompt routes to
        lockstep(decoders, warmup, opts.tokens, "warmup")  # (caches, kernels: on another prompt than the timed one)
        _progress("decoding with layer timers")
        hooked = [profile_hooked(d, prompt, opts.tokens) for d in decoders]
        _progress("decoding without hooks (lockstep, the floor's product run between the steps)")
        rounds = FloorStep(opts.floor_bytes, floor_kernels(threads))
        plain_times = lockstep(decoders, prompt, opts.tokens, "timed", between=rounds.run)
        rounds_gb, rounds_best, rounds.product = rounds.gb_per_s(), rounds.best_gb_per_s(), None  # (weight freed)
    service = None
    if opts.service:
        _progress("streaming through a worker process")
        service = service_decode(opts, prompt, warmup, threads)
    _progress("measuring the bandwidth floor")
    floor = bandwidth_floor(opts.floor_bytes, opts.floor_runs, kernels=floor_kernels(threads))
    nbytes = token_bytes(plain.model, plain_experts, opts.prompt_len, opts.tokens)
    doc = _document(opts, threads, plain.model, decoders, hooked, plain_times, reference, floor, nbytes,
                    (rounds_gb, rounds_best))
    if service is not None:
        p50 = float(np.median(service[0])) * 1e3
        doc["service"] = {"decode_ms_p50": p50, "vs_in_process": p50 / doc["systems"][-1]["decode_ms_p50"],
                          "identical": service[1] == reference}
    if opts.gguf is not None:
        from services.bench.llama_cpp import agreement

        del decoders, hooked, plain_experts, plain  # the models out of memory: the GGUF's pages get the room
        gc.collect()
        _progress("decoding with llama.cpp's llama-server on the GGUF")
        llama = llama_decode(opts, prompt, threads)
        p50 = float(np.median(llama[0])) * 1e3
        doc["llama_cpp"] = {"decode_ms_p50": p50, "vs_floor": p50 / doc["floor"]["ms_per_token"],
                            "moeinf_vs_llama": doc["systems"][-1]["decode_ms_p50"] / p50,
                            "tokens_agreement": agreement([llama[1]], [reference])}
    print(format_report(doc))
    if opts.json:
        opts.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {opts.json}")
    if not all(s["identical"] for s in [*doc["systems"], *([doc["service"]] if "service" in doc else [])]):
        print("MISMATCH: some system generated other tokens than transformers' model.generate", file=sys.stderr)
        if opts.exact:  # (with the knobs that change the arithmetic, a difference is a finding)
            return 1
    return 0


def _document(opts, threads, model, decoders, hooked, times, reference, floor: Floor, nbytes: TokenBytes,
              rounds: tuple[float, float]) -> dict:
    """``rounds``: the floor's product between the lockstep rounds, (median, fastest) GB/s. The floor: the fastest
    the run measured (``floor``'s best at the end, or the fastest round), never weaker than what the product reached."""
    text = model.config.get_text_config()
    rounds_gb, best = rounds[0], max(floor.gb_per_s, rounds[1])
    floor_ms, rounds_ms = nbytes.weights / best / 1e6, nbytes.weights / rounds_gb / 1e6
    systems = []
    for d, (seconds, steps, generated), t in zip(decoders, hooked, times):
        p50 = float(np.median(t)) * 1e3
        systems.append({"system": d.system.name, "decode_ms_p50": p50, "vs_floor": p50 / floor_ms,
                        "vs_floor_rounds": p50 / rounds_ms,
                        "hooked": breakdown(seconds, steps, layer_indices(d.model)),
                        "identical": generated == reference and d.seq.generated == reference})
    cache = l3_bytes()
    header = (f"moeinf bench profile: {opts.model} ({text.model_type}, {model.dtype}, {text.num_hidden_layers}"
              f" layers), 100% expert residency\n  torch {torch.__version__}, {threads} threads; prompt"
              f" {opts.prompt_len} tokens; {opts.tokens} decode tokens; greedy"
              + (f"; moeinf's worker with {' '.join(opts.worker_args)}" if opts.worker_args else ""))
    return {"header": header, "model": str(opts.model), "threads": threads, "prompt_len": opts.prompt_len,
            "tokens": opts.tokens, "systems": systems, "bytes_per_token": nbytes.as_json(),
            "floor": {"buffer_bytes": floor.buffer_bytes, "runs": floor.runs, "gb_per_s": best,
                      "end_gb_per_s": floor.gb_per_s, "rounds_best_gb_per_s": rounds[1], "ms_per_token": floor_ms,
                      "rounds_gb_per_s": rounds_gb, "rounds_ms_per_token": rounds_ms},
            "cache_bytes": cache, "fits_in_cache": 0 < nbytes.weights <= cache}


def add_parser(bench) -> None:
    p = bench.add_parser("profile", help="one decode step's time by layer part at 100%% memory, vs the bandwidth"
                                         " floor measured in the same run")
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", type=int, default=16, help="tokens decoded per measurement")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--floor-mib", type=int, default=0, help="the floor's buffer (0: 2x the CPU cache, >= 1 GiB)")
    p.add_argument("--floor-runs", type=int, default=5, help="matrix-vector runs for the floor at the end (best of)")
    p.add_argument("--service", action="store_true",
                   help="also stream the generation through a real worker process (memd + worker, its socket)")
    p.add_argument("--prepack-dense", choices=["off", "on"], default="off", help="moeinf's rows: the worker's knob")
    p.add_argument("--matvec-kernel", choices=MATVEC_KERNELS, default="auto", help="moeinf's rows: the worker's knob")
    p.add_argument("--attention-kernel", choices=ATTENTION_KERNELS, default="auto", help="moeinf's rows: ditto")
    p.add_argument("--gguf", metavar="FILE", help="also decode with llama.cpp's llama-server on this GGUF of --model"
                                                   " (`make gguf MODEL=DIR`), the lean runtime beside the floor")
    p.add_argument("--llama-server", metavar="PATH", help="with --gguf: the server (default: $MOEINF_LLAMA_SERVER,"
                                                          " `make llama-cpp`'s build, or llama-server on PATH)")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=run)
