"""``moeinf bench gpu``: decode ms/token with the experts in a GPU's memory (docs/gpu.md), side by side in one run.

Systems, each a fresh set of processes per expert-memory level, every repeat a fresh prompt (same for all):
* ``transformers``: ``generate`` with the whole model resident on the device (the reference);
* ``moeinf``: memd ``--pool-backend cuda`` (on ``--device cpu``: shm) and a worker ``--device cuda``, the defaults
  (activation policy, prefetch on);
* ``moeinf-ondemand-lru``: the same with ``--policy lru --prefetch off``.

ms/token = (time for ``--tokens`` + 1 new tokens - time for 1 on another fresh prompt of the same length: memd's
EAMC has seen neither) / ``--tokens``, through the worker's socket (no gateway), the best of ``--repeats``, every
system on ``THREADS`` torch thread; each system's greedy tokens are checked against transformers'. ``--device
cpu`` runs the same comparison on the CPU (the check this command gets where no GPU is). ``--lockstep``: the
systems side by side in one process, a decode step of each in turn, with the worker's time in acquires apart
(``gpu_lockstep.py``); ``--ablate`` adds the activation policy without prefetch and LRU with prefetch (on a GPU
also the default with ``--copy-events host``).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from common.config import MEMD_SOCKET, MEMD_TRACE_SOCKET, state_socket
from common.sizes import format_bytes, parse_size
from services.bench.gpu_lockstep import ABLATIONS, GPU_ABLATIONS, THREADS, prompts_for
from services.bench.gpu_lockstep import run as run_lockstep
from services.bench.gpu_lockstep import table as lockstep_table

SYSTEMS = {"moeinf": [], "moeinf-ondemand-lru": ["--policy", "lru", "--prefetch", "off", "--preload", "off"]}


def add_parser(bench) -> None:
    p = bench.add_parser("gpu", help="decode ms/token with the expert pool in GPU memory: transformers, moeinf and"
                                     " on-demand LRU side by side")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--memory", nargs="+", default=["100%", "25%"], help="expert pool sizes (as --expert-memory)")
    p.add_argument("--host-memory", default="100%", help="memd's pinned host tier on a GPU (as --host-memory)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the same comparison on the CPU)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens timed per request")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed requests per system (fresh prompts; best kept)")
    p.add_argument("--lockstep", action="store_true", help="the moeinf systems in lockstep in this process, the"
                   " worker's wait in acquires apart (small differences on a noisy machine)")
    p.add_argument("--ablate", action="store_true", help="also the activation policy without prefetch and LRU with"
                   " prefetch (on a GPU also the default with --copy-events host)")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    if args.device != "cpu":
        from services.selftest import cuda_missing

        if why := cuda_missing():
            print(f"moeinf bench gpu: no CUDA device: {why} (--device cpu runs the comparison on the CPU)")
            return 2
    for memory in args.memory:
        parse_size(memory, what="--memory")
    systems = SYSTEMS | (ABLATIONS if args.ablate else {})
    if args.ablate and args.device != "cpu":  # memd waits for each copy before answering (no event ring)
        systems |= GPU_ABLATIONS
    if args.lockstep:
        rows = lockstep(Path(args.model), args.memory, args.host_memory, args.device, args.tokens, args.prompt_len,
                        args.repeats, systems)
        print(lockstep_table(rows, args.device))
    else:
        rows = run(Path(args.model), args.memory, args.host_memory, args.device, args.tokens, args.prompt_len,
                   args.repeats, systems)
        print(table(rows, args.device))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def run(model: Path, memories: list[str], host_memory: str, device: str, tokens: int, prompt_len: int,
        repeats: int, systems: dict[str, list[str]] = SYSTEMS) -> list[dict]:
    vocab = _vocab(model)
    rng = random.Random(1234)
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(2 * repeats + 1)]
    reference, rows = _transformers(model, device, prompts, tokens)
    for memory in memories:
        for name, extra in systems.items():
            rows.append(_moeinf(model, memory, host_memory, device, name, extra, prompts, tokens, reference))
    return rows


def lockstep(model: Path, memories: list[str], host_memory: str, device: str, tokens: int, prompt_len: int,
             repeats: int, systems: dict[str, list[str]]) -> list[dict]:
    """transformers' tokens for the prompts (its timing row kept), then the moeinf systems in lockstep (the first
    prompt their warm-up), each memd with the GPU pool and host tier as in ``_moeinf``."""
    from services.supervisor import gpu_memd_args

    prompts = prompts_for(_vocab(model), 2 * repeats + 1, prompt_len)
    reference, rows = _transformers(model, device, prompts, tokens)
    gpu = [] if device == "cpu" else [*gpu_memd_args(device), "--host-memory", host_memory]
    timed = [prompts[0], *timed_prompts(prompts)]  # (the warm-up, then those transformers' reference is for)
    return rows + run_lockstep(model, memories, device, tokens, timed, systems, reference, gpu)


def _vocab(model: Path) -> int:
    from common.checkpoint import Checkpoint

    return Checkpoint(model).load_config().get_text_config().vocab_size


def _timed(generate, prompts: list[list[int]], tokens: int) -> float:
    """Best (time for tokens + 1 - time for 1) / tokens, in ms, over pairs of the prompts after the first (a
    warm-up): the one token on the pair's first, the many on its second (``timed_prompts``), so no run serves a
    prompt memd's EAMC learned from the run before it."""
    generate(prompts[0], 1)
    best = float("inf")
    for first, prompt in zip(prompts[1::2], timed_prompts(prompts)):
        one = _seconds(generate, first, 1)
        many = _seconds(generate, prompt, tokens + 1)
        best = min(best, (many - one) / tokens * 1e3)
    return best


def timed_prompts(prompts: list[list[int]]) -> list[list[int]]:
    """The prompts whose ``--tokens`` + 1 are timed (and whose tokens are checked)."""
    return prompts[2::2]


def _seconds(generate, prompt: list[int], n: int) -> float:
    start = time.perf_counter()
    got = generate(prompt, n)
    elapsed = time.perf_counter() - start
    if len(got) != n:
        raise RuntimeError(f"asked for {n} tokens, got {len(got)}")
    return elapsed


def _transformers(model: Path, device: str, prompts: list[list[int]], tokens: int) -> tuple[list[list[int]], list]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)  # (as the workers: their --threads)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype="auto").to(device).eval()
    hf.generation_config.eos_token_id = None  # fixed-length outputs

    def generate(prompt: list[int], n: int) -> list[int]:
        out = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=n, do_sample=False, pad_token_id=0)
        if device != "cpu":
            torch.cuda.synchronize()
        return out[0, len(prompt):].tolist()

    ms = _timed(generate, prompts, tokens)
    reference = [generate(p, tokens + 1) for p in timed_prompts(prompts)]
    del hf
    if device != "cpu":
        torch.cuda.empty_cache()
    return reference, [{"system": "transformers", "memory": "100%", "ms_per_token": ms, "tokens_equal": True}]


def _moeinf(model: Path, memory: str, host_memory: str, device: str, name: str, extra: list[str],
            prompts: list[list[int]], tokens: int, reference: list[list[int]]) -> dict:
    from common.worker_client import WorkerClient
    from services.bench.memd_proc import MemdProcess
    from services.bench.worker_proc import WorkerProcess
    from services.supervisor import gpu_memd_args
    from services.worker.memd_client import MemdClient

    gpu = [] if device == "cpu" else [*gpu_memd_args(device), "--host-memory", host_memory]
    with MemdProcess(model, memory, extra=[*gpu, *extra]) as memd:
        with WorkerProcess(model, memd.state_dir, ["--device", device, "--threads", str(THREADS)]) as worker:
            client = WorkerClient(worker.addr)
            try:
                generate = lambda prompt, n: client.generate(prompt, n)[0]  # noqa: E731
                ms = _timed(generate, prompts, tokens)
                equal = all(generate(p, tokens + 1) == ref for p, ref in zip(timed_prompts(prompts), reference))
            finally:
                client.close()
            stats_client = MemdClient(state_socket(memd.state_dir, MEMD_SOCKET),
                                      state_socket(memd.state_dir, MEMD_TRACE_SOCKET), timeout_s=10)
            try:
                s = stats_client.stats()
            finally:
                stats_client.close()
    return {"system": name, "memory": memory, "ms_per_token": ms, "tokens_equal": equal, "misses": s.misses,
            "bytes_read": s.bytes_read, "prefetch_issued": s.prefetch_issued, "prefetch_used": s.prefetch_used,
            "host_memory": host_memory if gpu else ""}


def table(rows: list[dict], device: str) -> str:
    floor = rows[0]["ms_per_token"]
    lru = {r["memory"]: r["ms_per_token"] for r in rows if r["system"] == "moeinf-ondemand-lru"}
    lines = [f"decode on {device}: ms/token (best of the repeats); x hf = / transformers (resident), x LRU = /"
             " on-demand LRU at the same memory",
             f"{'system':<22}{'memory':>8}{'ms/token':>10}{'x hf':>9}{'x LRU':>8}{'misses':>8}{'read':>11}"
             f"{'prefetch used/issued':>22}  tokens"]
    for r in rows:
        vs_lru = f"{r['ms_per_token'] / lru[r['memory']]:.2f}" if r["memory"] in lru and "misses" in r else "-"
        read = format_bytes(r["bytes_read"]) if "bytes_read" in r else "-"
        pf = f"{r['prefetch_used']}/{r['prefetch_issued']}" if "prefetch_used" in r else "-"
        lines.append(f"{r['system']:<22}{r['memory']:>8}{r['ms_per_token']:>10.2f}{r['ms_per_token'] / floor:>9.2f}"
                     f"{vs_lru:>8}{r.get('misses', '-'):>8}{read:>11}{pf:>22}  "
                     f"{'equal' if r['tokens_equal'] else 'DIFFER'}")
    return "\n".join(lines)
