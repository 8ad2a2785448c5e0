"""``bench e2e``'s llama.cpp row, run by the sweep (``e2e_sweep.py``): its runtime measured apart, its timed repeats,
and how many of its tokens equal the reference's on the same prompts."""
from __future__ import annotations

from services.bench.baselines import RESIDENT
from services.bench.e2e import MOEINF, ONDEMAND, Result, progress, serve_workload, summarize
from services.bench.e2e_workload import WARMUP_LENGTH
from services.bench.llama_cpp import LLAMA, LlamaCppSystem, agreement, find_server


def llama_system(sweep, prefix: list[str]) -> LlamaCppSystem:
    """A server whose context holds the longest request (the warm-up's too), on as many threads as the other systems
    compute on (``--threads 0``: torch's default, which the worker and the baselines take, not llama.cpp's own)."""
    import torch

    opts = sweep.opts
    context = max(len(sweep.workloads.longest()), WARMUP_LENGTH) + max(opts.max_tokens, opts.warmup_tokens) + 16
    threads = opts.threads or torch.get_num_threads()
    return LlamaCppSystem(find_server(opts.llama_server), opts.gguf, threads, context, prefix=prefix)


def llama_runtime(sweep) -> int:
    """llama-server without a limit, after the warm-up and the longest workload request: what it holds beyond the
    GGUF's pages."""
    progress("measuring llama.cpp's runtime (llama-server, no limit)")
    sweep.drop_caches()
    system = llama_system(sweep, [])
    try:
        system.start()
        serve_workload(system, [sweep.workloads.warmup(), sweep.workloads.longest()], sweep.opts.max_tokens, 1)
        return system.runtime_bytes()
    finally:
        system.stop()


def run_llama(sweep, budget, prefix: list[str], repeats: list[int]) -> list[dict]:
    """llama-server, started once for ``repeats``: the warm-up request, then each repeat's 1-client workload (the
    prompts every system gets at 1 client), one request at a time; the median run's row."""
    w, opts = sweep.workloads, sweep.opts
    alone = opts.concurrency.index(1) if 1 in opts.concurrency else 0
    memory = budget.expert_memory if budget else "100%"
    system = llama_system(sweep, prefix)
    try:
        system.start()
        serve_workload(system, [w.warmup()], opts.warmup_tokens, 1)
        if w.warm:  # --warm-eamc: the workload once, untimed, as every other system gets it
            serve_workload(system, w.prompts(LLAMA), opts.max_tokens, 1)
        results = []
        for r in repeats:
            timings = serve_workload(system, w.prompts(LLAMA, r, alone), opts.max_tokens, 1)
            sweep.outputs[(LLAMA, memory, r)] = [t.tokens for t in timings]
            results.append(Result(LLAMA, 1, timings, None))
        pss = system.pss_bytes()
    finally:
        system.stop()
    row = summarize({1: results})[0]
    progress(f"{LLAMA}: {row['tokens_per_s']:.2f} tokens/s, decode p50 {row['decode_ms_per_token_p50']:.1f} ms")
    return [{**row, "pss_bytes": pss}]


def llama_share(sweep, budget) -> dict:
    """The experts llama.cpp's page cache can hold under ``budget``'s limit: what the dense weights and its own
    measured runtime (with the margin) leave, where the limit was set by another system's runtime
    (``--expert-memory``: one limit for all, the largest allowance); {} when unknown or already its own."""
    if budget is None or budget.total or LLAMA not in sweep.runtimes.measured:
        return {}
    room = budget.limit_bytes - budget.dense_bytes - sweep.runtimes.allowance(LLAMA)
    experts = max(0, min(room // sweep.sizes.slot_bytes, sweep.sizes.num_experts))
    return {"experts": experts, "expert_fraction": experts / sweep.sizes.num_experts}


def compare_tokens(rows: list[dict], outputs: dict[tuple[str, str | None, int], list[list[int]]]) -> None:
    """Each llama.cpp row: the share of its greedy tokens equal to the reference's on the same prompts (transformers'
    when it ran, else moeinf's, which are transformers'), over every repeat both served (``agreement``)."""
    for row in rows:
        if row["system"] != LLAMA or row.get("error"):
            continue
        memory = row["expert_memory"]
        for ref, ref_memory in ((RESIDENT, None), (MOEINF, memory), (ONDEMAND, memory)):
            if pairs := _pairs(outputs, LLAMA, memory, ref, ref_memory):
                mine = [t for tokens, _ in pairs for t in tokens]
                theirs = [t for _, tokens in pairs for t in tokens]
                row["tokens_reference"], row["tokens_agreement"] = ref, agreement(mine, theirs)
                break


def _pairs(outputs: dict, system: str, memory: str, ref: str, ref_memory: str | None) -> list:
    """(``system``'s tokens, ``ref``'s tokens) for every repeat both served at these memory settings."""
    return [(tokens, outputs[(ref, ref_memory, r)]) for (name, m, r), tokens in outputs.items()
            if name == system and m == memory and (ref, ref_memory, r) in outputs]


def same_tokens(rows: list[dict], outputs: dict[tuple[str, str | None, int], list[list[int]]]) -> list[str]:
    """Each moeinf row's greedy tokens against the reference's on the same prompts, every repeat (transformers'
    when it ran, else the other moeinf system's at that memory: both compute transformers' bits): the row's
    ``tokens_identical``; a note per mismatch (a faster system that computes something else is no win)."""
    notes = []
    for row in rows:
        if row["system"] not in (MOEINF, ONDEMAND) or row.get("error") or row["concurrency"] != 1:
            continue
        memory = row["expert_memory"]
        other = ONDEMAND if row["system"] == MOEINF else MOEINF
        for ref, ref_memory in ((RESIDENT, None), (other, memory)):
            if pairs := _pairs(outputs, row["system"], memory, ref, ref_memory):
                row["tokens_identical"] = all(mine == theirs for mine, theirs in pairs)
                row["tokens_identical_to"] = ref
                if not row["tokens_identical"]:
                    notes.append(f"MISMATCH: {row['system']} at {memory} generated other tokens than {ref} on the same"
                                 " prompts (greedy): its figures are not comparable")
                break
    return notes


def environment_note() -> str:
    """The ``MOEINF_*`` variables set here, which every moeinf system's memd and worker read (secrets masked)."""
    import os

    env = {k: ("***" if any(w in k for w in ("KEY", "TOKEN")) else v) for k, v in sorted(os.environ.items())
           if k.startswith("MOEINF_")}
    return ("moeinf's memd and worker read these from the environment: "
            + ", ".join(f"{k}={v}" for k, v in env.items())) if env else ""
