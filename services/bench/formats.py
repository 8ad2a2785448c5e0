"""``moeinf bench formats``: decode ms/token and expert bytes read per token of the same model stored as bf16,
MXFP4 and block FP8, under the same memory limits.

Every ``--memory`` setting is a share of the pool the *first* model (the bf16 baseline) needs for all its
experts, turned into one absolute byte count that every format's memd gets: the limit a user's machine sets.
A quantized model holds more of its experts in it, and reads fewer bytes per miss.
The systems of one setting run in this process in lockstep
(``services/bench/overhead.py``: one generation per system, advanced a step at a time in turn, so load from
elsewhere hits them alike), after one untimed warm-up each; the settings run one after the other. The formats
are lossy against each other, so their tokens are not compared here: ``moeinf bench overhead --model DIR`` checks
each format's tokens against transformers' own (``dequantize=True``) model.
"""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import MATVEC_KERNELS
from common.sizes import format_bytes, parse_size


def dequantize_config(model_dir: Path) -> dict:
    """``from_pretrained`` kwargs that load a quantized checkpoint dequantized, as transformers' CPU reference."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method == "mxfp4":
        from transformers import Mxfp4Config

        return {"quantization_config": Mxfp4Config(dequantize=True)}
    if method == "fp8":
        from transformers import FineGrainedFP8Config

        return {"quantization_config": FineGrainedFP8Config(dequantize=True)}
    return {}


@dataclass(frozen=True)
class Options:
    models: tuple[tuple[str, Path], ...]  # (label, directory); the first is the baseline
    memory: tuple[str, ...]
    tokens: int
    prompt_len: int
    repeats: int
    threads: int
    json: Path | None
    dequant_cache_mb: int = 0  # the worker's --dequant-cache-mb: memory beyond the limit, stated in the report
    matvec_kernel: str = "auto"  # the worker's --matvec-kernel, for every format (stated in the report)

    @classmethod
    def from_args(cls, args) -> Options:
        models = []
        for item in args.model:
            label, sep, path = item.partition("=")
            if not sep or not (Path(path) / "config.json").is_file():
                raise ValueError(f"--model {item}: give LABEL=DIR with a checkpoint directory (bf16=/m/a mxfp4=/m/b)")
            models.append((label, Path(path)))
        if len(models) < 2:
            raise ValueError("--model: give the baseline and at least one other format")
        for memory in args.memory:
            if parse_size(memory, what="--memory").fraction is None:
                raise ValueError(f"--memory {memory}: give a share of the baseline's expert bytes (25%)")
        if min(args.tokens, args.prompt_len, args.repeats) < 1:
            raise ValueError("--tokens, --prompt-len and --repeats must be >= 1")
        if args.dequant_cache_mb < 0:
            raise ValueError("--dequant-cache-mb must be >= 0")
        return cls(tuple(models), tuple(args.memory), args.tokens, args.prompt_len, args.repeats, args.threads,
                   Path(args.json) if args.json else None, args.dequant_cache_mb,
                   getattr(args, "matvec_kernel", "auto"))


def expert_bytes(model_dir: Path) -> tuple[int, int]:
    """``(the pool bytes that hold every expert, one expert's bytes)`` as memd stores them (slots are padded to
    4 KiB per part and bf16 rows may lie spread apart, so a share of the first is the pool that holds that share of
    the experts)."""
    from common.checkpoint import Checkpoint
    from services.memd.spread import served_slot_bytes
    from services.memd.store import ExpertStore

    store = ExpertStore(Checkpoint(model_dir))
    return served_slot_bytes(store.index()) * store.num_layers * store.num_experts, store.expert_bytes


def measure_setting(opts: Options, limit: int, vocab: int, threads: int) -> list[dict]:
    from services.bench.overhead import MoeinfSystem, measure, round_prompts
    from services.bench.overhead import Options as OverheadOptions

    with contextlib.ExitStack() as stack:
        systems = []
        for label, path in opts.models:
            system = MoeinfSystem(path, str(limit), threads, stack, opts.dequant_cache_mb,
                                  matvec_kernel=opts.matvec_kernel)
            system.name = label
            systems.append(system)
        warmup, prompts = round_prompts(vocab, opts.prompt_len, opts.repeats)  # no format sees a prompt twice
        runs = measure(systems, warmup, prompts, OverheadOptions(opts.models[0][1], opts.tokens, opts.prompt_len,
                                                                 opts.repeats, (), threads, None))
    rows = []
    for system in systems:
        decode = [t for run in runs[system.name] for t in run.decode_s]
        read = sum(run.decode_stats["bytes_read"] for run in runs[system.name])
        hits = sum(run.decode_stats["hits"] for run in runs[system.name])
        misses = sum(run.decode_stats["misses"] for run in runs[system.name])
        slots, experts, _ = system.pool
        rows.append({"format": system.name, "decode_ms_p50": float(np.median(decode)) * 1e3,
                     "bytes_read_per_token": read / len(decode), "hit_rate": hits / max(1, hits + misses),
                     "resident_share": slots / experts, "steps": len(decode)})
    base = rows[0]
    for row in rows:
        row["ms_vs_base"] = row["decode_ms_p50"] / base["decode_ms_p50"]
        row["bytes_fall_vs_base"] = (base["bytes_read_per_token"] / row["bytes_read_per_token"]
                                     if row["bytes_read_per_token"] else float("inf"))
    return rows


def run(args) -> int:
    import torch  # here, not at import: the console script builds its parser for memd too, which never loads torch

    from services.bench.memd_proc import TerminateAsInterrupt
    from services.bench.overhead import _quiet_logging

    opts = Options.from_args(args)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    threads = torch.get_num_threads()
    _quiet_logging()
    base_total, _ = expert_bytes(opts.models[0][1])
    sizes = {label: expert_bytes(path) for label, path in opts.models}
    vocab = json.loads((opts.models[0][1] / "config.json").read_text())["vocab_size"]
    results = {}
    with TerminateAsInterrupt():
        for memory in opts.memory:
            limit = parse_size(memory).resolve(base_total)
            print(f"[bench] --memory {memory} of {opts.models[0][0]}'s experts = {format_bytes(limit)} for every"
                  " format", file=sys.stderr, flush=True)
            results[memory] = measure_setting(opts, limit, vocab, threads)
    print(report(opts, sizes, results, threads))
    if opts.json:
        opts.json.write_text(json.dumps({"models": {k: str(v) for k, v in opts.models}, "threads": threads,
                                         "pool_bytes_all_experts": sizes, "results": results}, indent=2))
    return 0


def report(opts: Options, sizes: dict, results: dict, threads: int) -> str:
    lines = [f"moeinf bench formats: {opts.tokens} decode tokens x {opts.repeats} repeats, prompt {opts.prompt_len},"
             f" {threads} threads; memory = share of {opts.models[0][0]}'s expert bytes, same limit for all"
             + (f" (+ a {opts.dequant_cache_mb} MiB dequantized-expert cache per quantized model)"
                if opts.dequant_cache_mb else "")
             + f"; every worker with --matvec-kernel {opts.matvec_kernel}",
             "  pool for all experts: " + ", ".join(f"{k} {format_bytes(v[0])} ({format_bytes(v[1])} an expert)"
                                             for k, v in sizes.items()),
             f"{'memory':>7} {'format':>8} {'resident':>8} {'decode ms/tok':>13} {'x base':>7}"
             f" {'read/tok':>10} {'fall':>6} {'hit rate':>8}"]
    for memory, rows in results.items():
        for r in rows:
            lines.append(f"{memory:>7} {r['format']:>8} {r['resident_share']:>8.0%} {r['decode_ms_p50']:>13.2f}"
                         f" {r['ms_vs_base']:>7.2f} {format_bytes(int(r['bytes_read_per_token'])):>10}"
                         f" {r['bytes_fall_vs_base']:>6.1f} {r['hit_rate']:>8.1%}")
    return "\n".join(lines)


def add_parser(bench) -> None:
    p = bench.add_parser("formats", help="decode ms/token and bytes read per token: bf16 vs MXFP4 vs FP8, same limit")
    p.add_argument("--model", nargs="+", required=True, metavar="LABEL=DIR",
                   help="the baseline first (bf16=DIR), then the other formats of the same model (mxfp4=DIR fp8=DIR)")
    p.add_argument("--memory", nargs="+", default=["12.5%", "25%", "50%"],
                   help="shares of the baseline's expert bytes; each is one byte limit for every format")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--dequant-cache-mb", type=int, default=0,
                   help="quantized formats: the worker's cache of dequantized experts, memory beyond the limit")
    p.add_argument("--matvec-kernel", choices=MATVEC_KERNELS, default="auto",
                   help="the worker's knob for every format (decode products in moeinf's own kernel)")
    p.set_defaults(func=lambda args: run(args))
