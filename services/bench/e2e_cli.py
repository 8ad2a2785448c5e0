"""The command line of ``moeinf bench e2e`` (``services/bench/e2e.py`` runs it)."""
from __future__ import annotations

from services.bench.e2e import SYSTEMS, run


def add_parser(bench) -> None:
    p = bench.add_parser("e2e", help="serving latency and throughput: moeinf against transformers, accelerate"
                                     " offloading and llama.cpp under the same memory limit")
    p.add_argument("--model", required=True)
    p.add_argument("--expert-memory", nargs="+",
                   help="expert memory settings to measure (bytes or a share of all expert bytes), e.g. 12.5%% 25%%;"
                        " default 25%%")
    p.add_argument("--memory-limit-total", nargs="+", metavar="SIZE",
                   help="instead of --expert-memory: equal-memory settings, e.g. 2.2GiB 2.5GiB 3GiB; every system runs"
                        " under the total and gives its experts what the dense weights and its own measured runtime"
                        " leave")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS, metavar="SYSTEM",
                   help=f"systems to run (default: all): {', '.join(SYSTEMS)}")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (greedy)")
    p.add_argument("--prompts", help="text file, one prompt per line, each served once (default: random token ids)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the random prompts (each run draws its own)")
    p.add_argument("--warm-eamc", action="store_true",
                   help="serve one workload untimed first and again in every run (memd has seen it; labelled)")
    p.add_argument("--requests", type=int, default=16,
                   help="requests in a run's workload (fresh random prompts every run, the same for every system;"
                        " with --prompts, a slice of the file's lines of its own per run)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1],
                   help="client counts to measure, e.g. 1 8 (moeinf systems; the baselines and llama.cpp serve one"
                        " at a time)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per system and concurrency, baselines included; the median is reported")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the worker and baselines, llama-server's threads (0: default)")
    p.add_argument("--workers", type=int, default=1, help="moeinf systems: worker processes on the one memd (client k"
                                                          " talks to worker k mod N); the limit grows by a dense copy"
                                                          " + allowance per extra worker, not by expert memory")
    p.add_argument("--runtime-allowance", default="measured",
                   help="--expert-memory limits: memory beyond dense weights + expert memory (interpreters, torch,"
                        " activations); default: the larger runtime measured in this run, with a margin")
    p.add_argument("--memory-limit", choices=["on", "off"], default="on",
                   help="run each system in a memory cgroup (off: no limit; the comparison is then not memory-fair)")
    p.add_argument("--disk-probe", default="2GiB", help="bytes of the checkpoint read to measure the raw O_DIRECT"
                                                        " bandwidth at memd's queue depth")
    p.add_argument("--floor-probe", default="auto", metavar="SIZE",
                   help="the compute floor's weight: the best matrix-vector bandwidth over this many bytes (auto:"
                        " twice the largest CPU cache, at least 1 GiB, so it streams from memory)")
    p.add_argument("--disk-read-limit", default="", metavar="RATE",
                   help="throttle every read of the run (probes and all systems) to RATE, e.g. 600MB/s: one sustained"
                        " disk speed for every system (cgroup v1 blkio; root). The kernel's 100 ms throttle slices let"
                        " a read after an idle gap through at the disk's own speed: bursty on-demand reads gain, a"
                        " reader kept busy by prefetch does not")
    p.add_argument("--warmup-tokens", type=int, default=8, help="tokens of the untimed warm-up request")
    p.add_argument("--formats", nargs="+", default=[], choices=["fp8", "mxfp4"], metavar="FORMAT",
                   help="also run moeinf with memd --expert-format FORMAT (fp8, mxfp4) on the same checkpoint, at the"
                        " same byte limit as the checkpoint as stored (rows moeinf-fp8, moeinf-mxfp4)")
    p.add_argument("--slot-cache", default="auto", choices=["auto", "on", "off"],
                   help="memd --slot-cache of every moeinf system (auto: memd's default); its lossless slot images are"
                        " filled before the timed runs, as --formats' caches are")
    p.add_argument("--slot-compression", default="off", choices=["off", "zstd"],
                   help="memd --slot-compression of every moeinf system: its slot images compressed losslessly"
                        " (filled before the timed runs); needs --slot-cache auto or on")
    p.add_argument("--pin", action="store_true",
                   help="moeinf systems: each worker's threads on --threads CPUs of its own (worker --cpus), memd's on"
                        " the others (memd --io-cpus), the same for each system; the baselines run unpinned")
    p.add_argument("--expert-cache-dir", help="--formats and --slot-cache: memd's expert cache (default"
                                              " <state-dir>/expert-cache, kept: a rerun converts nothing)")
    p.add_argument("--llama-server", metavar="PATH",
                   help="the llama.cpp system's llama-server (default: $MOEINF_LLAMA_SERVER, `make llama-cpp`'s build,"
                        " or llama-server on PATH)")
    p.add_argument("--gguf", metavar="FILE", help="the llama.cpp system: a GGUF of --model (`make gguf MODEL=DIR`)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--plot", help="also draw decode time per token against expert memory here (PNG)")
    p.set_defaults(func=run)
