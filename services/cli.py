"""``moeinf``: the console script (pyproject's entry point), one subcommand per service or tool.

It lives in ``services/``: it composes every service, and ``common/`` (the shared vocabulary) imports none."""
from __future__ import annotations

import argparse
import logging
import os
import sys

import zmq

from common.checkpoint import CheckpointError
from common.config import (ATTENTION_KERNELS, MATVEC_KERNELS, GatewayConfig, MemdConfig, WorkerConfig, add_config_args,
                           build_config)
from common.serve_config import ServeConfig


def _setup_logging(level: str, name: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s {name} %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _service(config_cls, module: str, name: str):
    """A subcommand that parses its service's config once, sets up logging and runs ``module.run(cfg)``.

    A service that has stopped in order (sockets, shared memory and state files cleaned up by ``run``) exits at
    once: the interpreter's own teardown of torch and transformers takes seconds on a busy machine, which is time
    a SIGTERM'd service does not have (serve kills what has not exited 8 s after SIGTERM)."""

    def command(args) -> int:
        import importlib

        cfg = build_config(config_cls, args)
        _setup_logging(cfg.log_level, name)
        code = importlib.import_module(module).run(cfg)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)

    return command


cmd_memd = _service(MemdConfig, "services.memd.main", "memd")
cmd_worker = _service(WorkerConfig, "services.worker.main", "worker")
cmd_gateway = _service(GatewayConfig, "services.gateway.main", "gateway")
cmd_serve = _service(ServeConfig, "services.supervisor", "serve")


def cmd_health(args) -> int:
    from services.health import HealthConfig, run

    return run(args.service, build_config(HealthConfig, args))


def cmd_demo_model(args) -> int:
    from dataclasses import replace

    from common.demo_model import PRESETS, DemoSize, check_format, write_demo_model

    arch = args.arch or ("gpt_oss" if args.format == "mxfp4" else "mixtral")

    if args.preset:  # the preset's shape (the size flags are ignored); its dtype, seed and shards as asked
        size = replace(PRESETS[args.preset], format=args.format, arch=arch, dtype=args.dtype, seed=args.seed,
                       max_shard_size=args.max_shard_size)
    else:
        size = DemoSize(layers=args.layers, experts=args.experts, top_k=args.top_k, hidden=args.hidden,
                        intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads, dtype=args.dtype,
                        max_shard_size=args.max_shard_size, seed=args.seed, arch=arch, format=args.format)
    try:
        check_format(size)
    except ValueError as exc:
        print(f"moeinf demo-model: {exc}", file=sys.stderr)
        return 2
    out = write_demo_model(args.dir, size, build_in_dtype=bool(args.preset))
    print(f"wrote a demo {size.arch} checkpoint ({size.format}, random weights) to {out}")
    return 0


def cmd_bench_overhead(args) -> int:
    from services.bench.overhead import run

    return run(args)


def cmd_families(args) -> int:
    from common.families import run_cli

    return run_cli(args)


SERVICES_ONLY = ("serve", "memd", "worker", "gateway", "health", "admin")  # need none of the tools' parsers


def build_parser(tools: bool = True) -> argparse.ArgumentParser:
    """The whole CLI. ``tools=False`` (a service's own process) leaves out the parsers of ``convert`` and ``bench``,
    whose modules import torch: memd's process must not (its RSS is bytes, not a framework)."""
    parser = argparse.ArgumentParser(prog="moeinf", description="Serve sparse MoE LLMs with offloaded experts.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run memd, worker and gateway together (the demo model without --model)",
                       description="Start memd, worker and gateway, wait until ready, supervise them. Every knob is"
                                   " also an environment variable (shown in brackets).")
    add_config_args(p, ServeConfig)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("memd", help="run the expert-memory daemon")
    add_config_args(p, MemdConfig)
    p.set_defaults(func=cmd_memd)

    p = sub.add_parser("worker", help="run the inference worker (needs a running memd)")
    add_config_args(p, WorkerConfig)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway (needs a running worker)")
    add_config_args(p, GatewayConfig)
    p.set_defaults(func=cmd_gateway)

    from services.health import SERVICES, HealthConfig

    p = sub.add_parser("health", help="exit 0 if a service answers and is ready, 1 if not (container healthchecks)")
    p.add_argument("service", choices=SERVICES)
    add_config_args(p, HealthConfig)
    p.set_defaults(func=cmd_health)

    from services.selftest import add_parser as add_selftest_parser

    add_selftest_parser(sub)
    from services.admin_cli import add_parser as add_admin_parser

    add_admin_parser(sub)

    p = sub.add_parser("demo-model", help="write a random-weight Mixtral checkpoint with the real Mixtral tokenizer")
    p.add_argument("dir")
    for name, default in (("layers", 4), ("experts", 8), ("top-k", 2), ("hidden", 256), ("intermediate", 512),
                          ("heads", 8), ("kv-heads", 4), ("seed", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-shard-size", default="2GB", help="shard the safetensors above this size")
    p.add_argument("--format", default="bf16", choices=["bf16", "fp8", "mxfp4"],
                   help="bf16: unquantized (--dtype); fp8: block-wise FP8 (128x128, DeepSeek-V3/Qwen3-FP8 names);"
                        " mxfp4: GPT-OSS's *_blocks/*_scales (implies --arch gpt_oss)")
    p.add_argument("--arch", choices=["mixtral", "gpt_oss"], help="architecture (default mixtral; gpt_oss for mxfp4)")
    p.add_argument("--preset", choices=["bench"], help="bench: 16 layers x 8 experts of 33 MiB (4.1 GiB of experts),"
                                                       " for `moeinf bench e2e`; overrides the size flags (not"
                                                       " --dtype, --seed or --max-shard-size)")
    p.set_defaults(func=cmd_demo_model)

    if tools:
        from services.memd.compressed import add_convert_parser

        add_convert_parser(sub)

    p = sub.add_parser("families", help="the MoE families of the installed transformers and moeinf's status for each")
    p.add_argument("--markdown", action="store_true", help="print docs/families.md")
    p.add_argument("--results", default="docs/families.json",
                   help="the family matrix's results (written by tests/worker/test_family_matrix.py, which takes"
                        " MOEINF_FAMILY_RESULTS as another place to write them)")
    p.set_defaults(func=cmd_families)

    if tools:
        add_bench_parsers(sub)
    return parser


def add_bench_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (print tables)").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("overhead", help="decode ms/token: plain transformers vs moeinf at 100%% and 25%% memory")
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", type=int, default=32, help="tokens decoded per measurement")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", nargs="+", default=["100%", "25%"], help="expert memory settings to measure")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--dequant-cache-mb", type=int, default=0, help="quantized experts: the worker's knob")
    p.add_argument("--dequant-kernel", nargs="+", default=["auto"], choices=["auto", "c", "torch"],
                   help="quantized experts: the worker's knob; several: one moeinf row per kernel, side by side (each"
                        " its own memd and model, all held at once)")
    p.add_argument("--prepack-dense", nargs="+", default=["off"], choices=["off", "on"],
                   help="the worker's knob (bfloat16: dense linears packed once for oneDNN); 'off on': a row each")
    p.add_argument("--matvec-kernel", nargs="+", default=["auto"], choices=MATVEC_KERNELS,
                   help="the worker's knob (bfloat16: decode steps' expert and dense products in moeinf's kernels);"
                        " 'off exact fast': a row each")
    p.add_argument("--attention-kernel", nargs="+", default=["auto"], choices=ATTENTION_KERNELS,
                   help="the worker's knob (decode attention on CPU); 'torch exact fast': a row each (unless only"
                        " torch, every moeinf row steps through the worker's batched path, whose per-request attention"
                        " the kernels replace)")
    p.set_defaults(func=cmd_bench_overhead)
    from services.bench.cache import add_parsers

    add_parsers(bench)
    from services.bench.e2e_cli import add_parser as add_e2e_parser

    add_e2e_parser(bench)
    from services.bench.disk import add_parser as add_disk_parser

    add_disk_parser(bench)
    from services.bench.replay import add_parsers as add_replay_parsers

    add_replay_parsers(bench)
    from services.bench.wire import add_parser as add_wire_parser

    add_wire_parser(bench)
    from services.bench.soak import add_parser as add_soak_parser

    add_soak_parser(bench)
    from services.bench.formats import add_parser as add_formats_parser

    add_formats_parser(bench)
    from services.bench.profile import add_parser as add_profile_parser

    add_profile_parser(bench)
    from services.bench.quality import add_parser as add_quality_parser

    add_quality_parser(bench)
    from services.bench.gpu import add_parser as add_gpu_parser

    add_gpu_parser(bench)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(tools=not (argv and argv[0] in SERVICES_ONLY))
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, CheckpointError, RuntimeError, OSError, zmq.ZMQError) as exc:  # a user's mistake: one line
        print(f"moeinf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
