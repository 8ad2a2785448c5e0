"""``moeinf bench gpu --lockstep``: where the default's time per token goes against on-demand LRU.

Best-of-N wall times through the worker's socket swing by 20-30% run to run on a small shared machine, more than
the difference being looked for. Here every system is a real memd process with the worker's engine in this process
(``services.worker.main.attach``, as ``bench overhead`` does), all attached at once, and their generations advance
one decode step at a time in turn (the order rotating every step), so a burst of load from elsewhere lands on
every system alike. Per system: the decode step's median and mean, and how much of it the worker spent waiting in
acquires (its round trips to memd: loads, memd's decisions, the socket) against everything else (compute, the
hidden-state guesses, the layer notes); from memd's counters over the timed prompts: loads on demand per decode
step, prefetch precision, how far ahead it asked for guesses and the load bandwidth it planned with.
``--ablate`` adds the activation policy without prefetch and LRU with
prefetch, to split the default's cost between the policy and the prefetching.
"""
from __future__ import annotations

import contextlib
import gc
import random
import statistics
from pathlib import Path

THREADS = 1  # every system's torch threads, in lockstep and in gpu.py's runs (transformers' too)
ABLATIONS = {"moeinf-prefetch-off": ["--prefetch", "off"], "moeinf-lru-prefetch": ["--policy", "lru"]}
GPU_ABLATIONS = {  # no event ring (memd waits for the copies); host-tier experts on the worker's CPU, by cost or all
    "moeinf-host-copy-wait": ["--copy-events", "host"], "moeinf-cpu-experts": ["--cpu-experts", "auto"],
    "moeinf-cpu-experts-always": ["--cpu-experts", "always"]}


class _System:
    """One memd process and an in-process worker engine attached to it."""

    def __init__(self, name: str, model: Path, memory: str, device: str, memd_args: list[str],
                 stack: contextlib.ExitStack):
        from common.config import WorkerConfig
        from services.bench.memd_proc import MemdProcess
        from services.bench.worker_proc import kernel_cache_dir
        from services.worker.engine import Engine
        from services.worker.main import attach, max_model_len

        self.name, self.memory = name, memory
        memd = stack.enter_context(MemdProcess(model, memory, extra=memd_args))
        cfg = WorkerConfig(model=model, state_dir=memd.state_dir, threads=THREADS, device=device,
                           kernel_cache_dir=kernel_cache_dir())
        engine_model, self.client, _, self.steps, _ = attach(cfg)
        stack.callback(self.client.close)  # LIFO: the client closes before its memd stops
        self.engine = Engine(engine_model, max_model_len(cfg, engine_model), self.steps)
        self.logits: list = []  # (TimedGeneration clears it; nothing records the logits here)
        self.decode_s: list[float] = []
        self.acquire_s = 0.0
        self.tokens: list[list[int]] = []

    def request_start(self, request: str, prompt_tokens: int) -> None:
        self.steps.request_started(request, prompt_tokens)

    def request_end(self, request: str, generated: int) -> None:
        self.steps.request_ended(request, generated)

    def stats(self) -> None:  # (TimedGeneration reads memd's counters when this gives them)
        return None


def run(model: Path, memories: list[str], device: str, tokens: int, prompts: list[list[int]],
        systems: dict[str, list[str]], reference: list[list[int]], memd_args: list[str] = ()) -> list[dict]:
    """``prompts[0]`` warms every system up (untimed), the others are timed; ``reference``: transformers' tokens
    for those; ``memd_args``: memd flags every system gets (a GPU's pool and host tier)."""
    rows = []
    for memory in memories:
        with contextlib.ExitStack() as stack:
            group = [_System(name, model, memory, device, [*memd_args, *args], stack)
                     for name, args in systems.items()]
            _lockstep(group, prompts[0], tokens, f"warmup-{memory}")
            for s in group:
                s.decode_s, s.acquire_s, s.tokens = [], 0.0, []
                s.before = s.client.stats()
            for i, prompt in enumerate(prompts[1:]):
                _lockstep(group, prompt, tokens, f"lockstep-{memory}-{i}")
            rows += [_row(s, tokens, reference) for s in group]
    return rows


def _lockstep(group: list[_System], prompt: list[int], tokens: int, run_id: str) -> None:
    from services.bench.overhead import TimedGeneration, _rotate

    gens = [TimedGeneration(s, prompt, tokens, f"{run_id}-{s.name}") for s in group]
    waited = [s.client.acquire_seconds for s in group]
    gc.collect()
    step = 0
    while not all(g.done for g in gens):
        for gen in _rotate(gens, step):
            if not gen.done:
                before = gen.system.client.acquire_seconds
                gen.step()
                if len(gen.seq.generated) == 1:  # the prefill: not a decode step, its acquires not counted
                    waited[group.index(gen.system)] += gen.system.client.acquire_seconds - before
        step += 1
    for s, gen, w in zip(group, gens, waited):
        s.decode_s += gen.decode_s
        s.acquire_s += s.client.acquire_seconds - w
        s.tokens.append(list(gen.seq.generated))


def _row(s: _System, tokens: int, reference: list[list[int]]) -> dict:
    steps = max(1, len(s.decode_s))
    before, after = s.before, s.client.stats()
    used, wasted = after.prefetch_used - before.prefetch_used, after.prefetch_wasted - before.prefetch_wasted
    return {"system": s.name, "memory": s.memory, "lockstep": True,
            "decode_p50_ms": 1e3 * statistics.median(s.decode_s), "decode_mean_ms": 1e3 * sum(s.decode_s) / steps,
            "acquire_wait_ms": 1e3 * s.acquire_s / steps,
            "misses_per_step": (after.misses - before.misses) / steps,  # the prefills' among them
            "cpu_experts_per_step": (after.cpu_experts - before.cpu_experts) / steps,  # --cpu-experts
            "prefetch_precision": used / (used + wasted) if used + wasted else None,
            "speculate_layers": after.speculate_layers, "load_gbps": after.read_bandwidth / 1e9,
            "tokens_equal": s.tokens == [r[:tokens + 1] for r in reference]}


def table(rows: list[dict], device: str) -> str:
    lru = {r["memory"]: r["decode_mean_ms"] for r in rows if r["system"] == "moeinf-ondemand-lru"}
    lines = [f"decode on {device}, in lockstep (one step of each system in turn, 1 torch thread, after a warm-up):"
             " ms per decode step; acquire = the worker's wait in round trips to memd, rest = everything else; on CPU ="
             " experts per step computed on the worker's CPU (--cpu-experts)",
             f"{'system':<26}{'memory':>8}{'p50':>9}{'mean':>9}{'x LRU':>8}{'acquire':>9}{'rest':>9}{'misses':>8}"
             f"{'on CPU':>8}{'precision':>10}{'k':>3}{'GB/s':>7}  tokens"]
    for r in rows:
        if not r.get("lockstep"):  # transformers' generate, timed apart: the reference
            lines.append(f"{r['system']:<26}{r['memory']:>8}{'':>9}{r['ms_per_token']:>9.2f}  (its own run)")
            continue
        vs = f"{r['decode_mean_ms'] / lru[r['memory']]:.2f}" if r["memory"] in lru else "-"
        precision = "-" if r["prefetch_precision"] is None else f"{r['prefetch_precision']:.2f}"
        lines.append(f"{r['system']:<26}{r['memory']:>8}{r['decode_p50_ms']:>9.2f}{r['decode_mean_ms']:>9.2f}{vs:>8}"
                     f"{r['acquire_wait_ms']:>9.2f}{r['decode_mean_ms'] - r['acquire_wait_ms']:>9.2f}"
                     f"{r['misses_per_step']:>8.2f}{r.get('cpu_experts_per_step', 0):>8.2f}{precision:>10}"
                     f"{r['speculate_layers']:>3}{r['load_gbps']:>7.2f}  "
                     f"{'equal' if r['tokens_equal'] else 'DIFFER'}")
    return "\n".join(lines)


def prompts_for(vocab: int, count: int, length: int, seed: int = 4321) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]
