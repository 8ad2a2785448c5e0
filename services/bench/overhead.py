"""``moeinf bench overhead``: decode ms/token of plain transformers vs moeinf at several expert-memory settings.

Every system runs in this process on the same torch thread count, the same prompts and greedy decoding, driven
by the same loop (``services.worker.engine.Engine``: one forward per token, exactly what ``model.generate``
runs), so the only difference between them is where the experts live:

* ``transformers``: ``AutoModelForCausalLM.from_pretrained``, every weight resident, transformers' default
  experts implementation (``grouped_mm``). Its ``model.generate`` output on each round's prompt is the reference
  that every system's run of that round must reproduce token for token.
* ``moeinf-<memory>``: a real ``moeinf memd --expert-memory <memory>`` process and the worker's model bound to
  it (``services.worker.main.attach``): per MoE layer an acquire RPC, then grouped_mm on views of the pool. Every
  generation sends memd REQUEST_START and REQUEST_END on the trace socket, as the worker's server does, so memd's
  EAMC learns from finished requests and predicts from it exactly as in serving.

The systems run in lockstep: each repeat starts one generation per system on that round's own prompt (one no
system has served: memd's EAMC is never warm with it) and advances them one step at a time in turn (rotating the
order), so load from elsewhere on a noisy machine hits all of them alike. Every system gets one untimed warm-up
run first, on a prompt of its own (it also fills memd's pool at 100%). Below 100% the lockstep gives each memd
the other systems' compute time to read and prefetch in, which a lone run would not: those rows favour
prefetching (the report says so); ``bench e2e`` compares offloading systems, each run alone.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import messages as m
from common.checkpoint import max_positions
from common.sizes import parse_size
from services.bench.memd_proc import MemdProcess, TerminateAsInterrupt
from services.bench.report import STAT_FIELDS, Summary, format_table, summarize, write_json

PROMPT_SEED = 0


@dataclass(frozen=True)
class Options:
    model: Path
    tokens: int
    prompt_len: int
    repeats: int
    memory: tuple[str, ...]
    threads: int
    json: Path | None
    dequant_cache_mb: int = 0  # the worker's --dequant-cache-mb (quantized experts)
    dequant_kernel: tuple[str, ...] = ("auto",)  # the worker's --dequant-kernel; several: a moeinf row for each
    prepack_dense: tuple[str, ...] = ("off",)  # the worker's --prepack-dense; both: a moeinf row for each
    matvec_kernel: tuple[str, ...] = ("auto",)  # the worker's --matvec-kernel; likewise
    attention_kernel: tuple[str, ...] = ("auto",)  # the worker's --attention-kernel; likewise

    @classmethod
    def from_args(cls, args) -> Options:
        opts = cls(Path(args.model), args.tokens, args.prompt_len, args.repeats, tuple(args.memory),
                   args.threads, Path(args.json) if args.json else None, args.dequant_cache_mb,
                   tuple(getattr(args, "dequant_kernel", ("auto",))), tuple(getattr(args, "prepack_dense", ("off",))),
                   tuple(getattr(args, "matvec_kernel", ("auto",))),
                   tuple(getattr(args, "attention_kernel", ("auto",))))
        opts.validate()
        return opts

    def validate(self) -> None:
        if not (self.model / "config.json").is_file():
            raise FileNotFoundError(f"--model {self.model}: no config.json (give a checkpoint directory)")
        for name in ("tokens", "prompt_len", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.threads < 0:
            raise ValueError("--threads must be >= 0 (0: torch's default)")
        if self.dequant_cache_mb < 0:
            raise ValueError("--dequant-cache-mb must be >= 0")
        for name in ("dequant_kernel", "prepack_dense", "matvec_kernel", "attention_kernel"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"--{name.replace('_', '-')} {' '.join(values)}: each setting once")
        for memory in self.memory:
            parse_size(memory, what="--memory")
        if len(set(self.memory)) != len(self.memory):
            raise ValueError(f"--memory {' '.join(self.memory)}: each setting once")


@dataclass
class Run:
    """One timed generation: the prefill step, then ``tokens`` decode steps."""

    prefill_s: float
    decode_s: list[float]
    tokens: list[int]
    decode_stats: dict[str, float] = field(default_factory=dict)  # memd counters over the decode steps
    logits: list[torch.Tensor] = field(default_factory=list)  # each step's, until compared (then dropped)
    agreement: tuple[float, int, int] = (0.0, 0, 0)  # logit_agreement against transformers' run of the same round


# ---------------------------------------------------------------------------------------------------- systems
class TransformersSystem:
    name = "transformers"
    expert_memory = None
    pool = None

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM

        from services.worker.engine import Engine

        from services.bench.formats import dequantize_config

        # a quantized checkpoint: transformers' own dequantize=True model, the reference moeinf must reproduce
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto",
                                                          **dequantize_config(model_dir)).eval()
        self.engine = Engine(self.model, max_positions(self.model.config))
        self.logits = record_logits(self.engine)

    def request_start(self, request: str, prompt_tokens: int) -> None:
        pass

    def request_end(self, request: str, generated: int) -> None:
        pass

    def stats(self) -> dict[str, float] | None:
        return None

    def eamc_size(self) -> int | None:
        return None

    @torch.inference_mode()
    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        """``model.generate``, greedy, fixed length: the reference every timed run must reproduce."""
        out = self.model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()


class MoeinfSystem:
    def __init__(self, model_dir: Path, expert_memory: str, threads: int, stack: contextlib.ExitStack,
                 dequant_cache_mb: int = 0, dequant_kernel: str = "auto", prepack_dense: bool = False,
                 matvec_kernel: str = "auto", attention_kernel: str = "auto", batched: bool = False):
        from common.config import WorkerConfig
        from services.worker.engine import Engine
        from services.bench.worker_proc import kernel_cache_dir
        from services.worker.main import attach, max_model_len

        self.name = f"moeinf-{expert_memory}"
        self.expert_memory = expert_memory
        self.memd = memd = stack.enter_context(MemdProcess(model_dir, expert_memory))
        cfg = WorkerConfig(model=model_dir, state_dir=memd.state_dir, threads=threads,
                           kernel_cache_dir=kernel_cache_dir(), dequant_cache_mb=dequant_cache_mb,
                           dequant_kernel=dequant_kernel, prepack_dense=prepack_dense, matvec_kernel=matvec_kernel,
                           attention_kernel=attention_kernel)
        model, self.client, hello, self.steps, self.attention = attach(cfg)  # its own step state and memd
        stack.callback(self.client.close)  # LIFO: the client closes before its memd stops
        self.pool = (hello.num_slots, hello.num_layers * hello.num_experts, hello.pool_bytes)
        self.engine = Engine(model, max_model_len(cfg, model), self.steps)
        if batched or self.attention is not None:  # the worker's batched path (``run``), whose per-request
            self.engine.enable_batching(self.attention)  # attention the decode kernel replaces
        self.logits = record_logits(self.engine)

    def request_start(self, request: str, prompt_tokens: int) -> None:
        """What the worker's server sends when a request starts (memd opens its activation matrix)."""
        self.steps.request_started(request, prompt_tokens)

    def request_end(self, request: str, generated: int) -> None:
        """... and when it ends (its last step's trace is flushed first; memd adds the matrix to the EAMC)."""
        self.steps.request_ended(request, generated)

    def stats(self) -> dict[str, float]:
        reply = self.client.stats()
        return {name: getattr(reply, name) for name in STAT_FIELDS}

    def eamc_size(self) -> int:
        return self.client.stats().eamc_size



def record_logits(engine) -> list[torch.Tensor]:
    """The list ``engine`` appends each step's logits to, as it samples from them (float32, the step's last row)."""
    logits: list[torch.Tensor] = []
    accept = engine.accept

    def recording(seq, step_logits):
        logits.append(step_logits.detach().clone())
        return accept(seq, step_logits)
    engine.accept = recording
    return logits


def logit_agreement(run: Run, reference: Run) -> tuple[float, int, int]:
    """``(max |logit difference|, steps, steps compared)`` of ``run`` against transformers' run of the same round:
    steps are compared while both generations' tokens so far are equal (the same inputs)."""
    worst, compared = 0.0, 0
    for mine, theirs, a, b in zip(run.logits, reference.logits, run.tokens, reference.tokens):
        worst = max(worst, (mine - theirs).abs().max().item())
        compared += 1
        if a != b:
            break
    return worst, len(reference.logits), compared


def build_systems(opts: Options, threads: int, stack: contextlib.ExitStack) -> list:
    """``[transformers, moeinf-<memory>...]``; the memd processes start first, so a bad setting fails fast."""
    moeinf = []
    for memory, kernel, prepack, mv, attention in itertools.product(
            opts.memory, opts.dequant_kernel, opts.prepack_dense, opts.matvec_kernel, opts.attention_kernel):
        _progress(f"starting memd --expert-memory {memory} and attaching the worker")
        system = MoeinfSystem(opts.model, memory, threads, stack, opts.dequant_cache_mb, kernel, prepack == "on", mv,
                              attention, batched=opts.attention_kernel != ("torch",))  # (every row on one path)
        system.name += f"-{kernel}" if len(opts.dequant_kernel) > 1 else ""
        system.name += "-prepack" if prepack == "on" and len(opts.prepack_dense) > 1 else ""
        system.name += f"-matvec-{mv}" if len(opts.matvec_kernel) > 1 else ""
        system.name += f"-attention-{attention}" if len(opts.attention_kernel) > 1 else ""
        moeinf.append(system)
    _progress(f"loading transformers ({opts.model})")
    return [TransformersSystem(opts.model), *moeinf]


# ---------------------------------------------------------------------------------------------------- measuring
def make_prompt(vocab_size: int, length: int, seed: int = PROMPT_SEED) -> list[int]:
    """A fixed pseudo-random prompt (ids 3.. skip the usual special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    low = 3 if vocab_size > 3 else 0
    return torch.randint(low, vocab_size, (length,), generator=generator).tolist()


class TimedGeneration:
    """Prefill + ``tokens`` greedy decode steps of one system, each step timed on its own; memd's counters are
    read (untimed) after the prefill and at the end, so they cover exactly the decode steps."""

    def __init__(self, system, prompt: list[int], tokens: int, run_id: str):
        self.system = system
        system.logits.clear()  # one generation of a system runs at a time
        self.seq = system.engine.start(m.GenerateRequest(request=run_id, prompt=prompt, max_tokens=tokens + 1))
        system.request_start(run_id, len(prompt))
        self.prefill_s = 0.0
        self.decode_s: list[float] = []
        self.before: dict | None = None

    @property
    def done(self) -> bool:
        return self.seq.finish_reason is not None

    def step(self) -> None:
        from services.worker.scheduler import Chunk

        engine = self.system.engine
        start = time.perf_counter()
        if getattr(engine, "flat_step", None) is not None:  # the worker's batched path (one request's chunk)
            engine.run([Chunk(self.seq, self.seq.next_tokens(len(self.seq.req.prompt)))])
        else:
            engine.step(self.seq)
        elapsed = time.perf_counter() - start
        if len(self.seq.generated) == 1:
            self.prefill_s = elapsed
            self.before = self.system.stats()
        else:
            self.decode_s.append(elapsed)
        if self.done:
            self.system.request_end(self.seq.request_id, len(self.seq.generated))

    def result(self) -> Run:
        after = self.system.stats()
        stats = {k: after[k] - self.before[k] for k in STAT_FIELDS} if after is not None else {}
        return Run(self.prefill_s, self.decode_s, list(self.seq.generated), stats, list(self.system.logits))


def run_alone(system, prompt: list[int], tokens: int, run_id: str) -> Run:
    gen = TimedGeneration(system, prompt, tokens, run_id)
    while not gen.done:
        gen.step()
    return gen.result()


def run_lockstep(systems: list, prompt: list[int], tokens: int, run_id: str) -> list[Run]:
    """One generation per system, advanced one step at a time in turn (the order rotating every step): a burst
    of load from elsewhere on a shared machine then lands on every system alike, not on whichever ran then."""
    gens = [TimedGeneration(s, prompt, tokens, f"{run_id}-{s.name}") for s in systems]
    gc.collect()
    step = 0
    while not all(g.done for g in gens):
        for gen in _rotate(gens, step):
            if not gen.done:
                gen.step()
        step += 1
    return [g.result() for g in gens]


def round_prompts(vocab_size: int, length: int, repeats: int) -> tuple[list[int], list[list[int]]]:
    """The warm-up's prompt and one prompt per lockstep round, each its own: every finished request feeds memd's
    EAMC, so a round on a prompt served before would be predicted from its own past (a warm EAMC)."""
    return (make_prompt(vocab_size, length),
            [make_prompt(vocab_size, length, PROMPT_SEED + 1 + r) for r in range(repeats)])


def measure(systems: list, warmup: list[int], prompts: list[list[int]], opts: Options) -> dict[str, list[Run]]:
    """One warm-up run per system, then a lockstep round over all systems per prompt (every system gets the round's
    prompt; no system has seen it)."""
    for system in systems:
        _progress(f"warm-up {system.name}")
        run_alone(system, warmup, opts.tokens, f"warmup-{system.name}")
    runs: dict[str, list[Run]] = {s.name: [] for s in systems}
    for r, prompt in enumerate(prompts):
        done = run_lockstep(systems, prompt, opts.tokens, f"r{r}")
        for system, run in zip(systems, done):
            run.agreement = logit_agreement(run, done[0])
            runs[system.name].append(run)
        for run in done:  # a vocabulary of floats per step: compared, then dropped
            run.logits = []
        _progress(f"round {r + 1}/{opts.repeats}: decode median ms/token " + ", ".join(
            f"{name} {np.median(rs[-1].decode_s) * 1e3:.2f}" for name, rs in runs.items()))
    return runs


def _rotate(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


# ---------------------------------------------------------------------------------------------------- entry
def run(args) -> int:
    opts = Options.from_args(args)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    threads = torch.get_num_threads()
    _quiet_logging()
    with TerminateAsInterrupt(), contextlib.ExitStack() as stack:
        systems = build_systems(opts, threads, stack)
        warmup, prompts = round_prompts(systems[0].model.config.get_text_config().vocab_size, opts.prompt_len,
                                        opts.repeats)
        _progress("references: transformers model.generate, one per round's prompt")
        references = [systems[0].generate(prompt, opts.tokens + 1) for prompt in prompts]
        runs = measure(systems, warmup, prompts, opts)
        summaries = [summarize(s, runs[s.name], references) for s in systems]
        for system, summary in zip(systems, summaries):
            summary.eamc_size = system.eamc_size()
    _finish_ratios(summaries)
    header = _header(opts, systems[0].model, threads)
    print(format_table(header, summaries))
    if any(s.expert_memory not in (None, "100%") for s in systems):
        print("note: below 100% the lockstep lets each memd read (and prefetch) while the other systems compute,"
              " time a lone run would not give it: those rows favour prefetching; bench e2e runs each system alone")
    for system in systems[1:]:
        checks = [run.agreement for run in runs[system.name]]
        worst, steps, compared = max(c[0] for c in checks), sum(c[1] for c in checks), sum(c[2] for c in checks)
        print(f"{system.name}: logits vs transformers' (float32, {compared} of {steps} steps compared, up to the"
              f" first differing token): max |difference| {worst:.6g}")
    if opts.json:
        write_json(opts.json, str(opts.model), threads, opts, summaries)
        print(f"wrote {opts.json}")
    if not all(s.identical for s in summaries):
        print("MISMATCH: some system generated other tokens than transformers' model.generate", file=sys.stderr)
        return 1
    return 0


def _finish_ratios(summaries: list[Summary]) -> None:
    base = summaries[0]
    for s in summaries:
        s.ratio_vs_transformers = s.decode_ms_p50 / base.decode_ms_p50
        s.prefill_ratio_vs_transformers = s.prefill_ms / base.prefill_ms


def _header(opts: Options, model, threads: int) -> str:
    text = model.config.get_text_config()
    return (f"moeinf bench overhead: {opts.model} ({text.model_type}, {model.dtype}, {text.num_hidden_layers} layers)"
            f"\n  torch {torch.__version__}, {threads} threads; prompt {opts.prompt_len} tokens; {opts.tokens} decode"
            f" tokens x {opts.repeats} repeats (+1 warm-up); greedy")


def _quiet_logging() -> None:
    for name in ("transformers", "moeinf"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # the worker's engine passes ``past_key_values`` (deprecated in transformers 5.24, still supported)
    warnings.filterwarnings("ignore", message=".*past_key_values.*is deprecated", category=FutureWarning)


def _progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)
