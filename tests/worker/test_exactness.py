"""The oracle: greedy generation through real memd + worker processes, with the expert pool at 25% of all
expert bytes (so experts are evicted and re-read on every token), equals plain transformers' generate: with the
default policy (activation, prefetch on) for every family, and with every other policy and prefetch setting."""
import re

import pytest
import torch
from helpers import FAMILIES, Stack, write_family


PROMPTS = [[1, 5, 9, 22, 7], [3] * 11, list(range(2, 60, 2))]
NEW_TOKENS = 24


_REFERENCE: dict = {}


def load_counts(stats, expert_bytes: int) -> set[int]:
    """How many whole loads ``stats.bytes_read`` can be: ``a`` experts read from the checkpoint (``expert_bytes``
    each) and ``b`` slot images (a whole slot each, memd's ``--slot-cache``), ``a + b`` for every ``a, b >= 0``
    that add up exactly (empty: the bytes are not whole loads)."""
    slot = stats.pool_bytes // stats.num_slots
    total = stats.bytes_read - stats.cancelled_bytes  # (a cancelled prefetch's pieces: counted, but not a whole load)
    return {b + (total - b * slot) // expert_bytes for b in range(total // slot + 1)
            if (total - b * slot) % expert_bytes == 0}


def reference(model_dir, prompts):
    key = (str(model_dir), tuple(map(tuple, prompts)))
    if key not in _REFERENCE:
        _REFERENCE[key] = _reference(model_dir, prompts)
    return _REFERENCE[key]


def _reference(model_dir, prompts, dtype=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, **({"dtype": dtype} if dtype else {}))
    model.generation_config.eos_token_id = None  # compare fixed-length outputs; stop ids are tested elsewhere
    outs = []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        outs.append(out[0, len(prompt):].tolist())
    return outs


# CI's time: olmoe and qwen3_moe route as Mixtral does (softmax top-k, no shared expert); they run under -m slow
@pytest.mark.parametrize("family", [f if f not in ("olmoe", "qwen3_moe") else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
def test_greedy_equals_transformers_at_25_percent(family, checkpoints, state_dir):
    expected = reference(checkpoints[family], PROMPTS)
    with Stack(checkpoints[family], state_dir, expert_memory="25%") as stack:
        got = stack.generate_all(PROMPTS, NEW_TOKENS)
        stats = stack.memd_stats()
    for prompt, exp, out in zip(PROMPTS, expected, got):
        assert out == exp, f"{family}: prompt {prompt[:6]}... diverged"
    assert len(set(map(tuple, expected))) > 1, "degenerate oracle: all prompts gave the same output"
    assert stats.evictions > 0 and stats.misses > stats.num_slots, "25% memory must evict and reload experts"
    expert_bytes = _expert_bytes(checkpoints[family])
    # every load reads one whole expert (from the checkpoint, or its whole slot image), and every miss was read
    # (prefetches that finished add whole experts)
    assert max(load_counts(stats, expert_bytes), default=-1) >= stats.misses
    assert stats.stall_seconds > 0  # a cold 25% pool: the worker waited for reads


@pytest.mark.parametrize("family, memd_args", [
    pytest.param("mixtral", ["--policy", "lru", "--prefetch", "on"], marks=pytest.mark.slow),  # CI: 3 of 4
    ("mixtral", ["--policy", "lfu", "--prefetch", "on", "--read-chunk", "4KiB"]),  # many preemption points
    ("mixtral", ["--policy", "activation", "--prefetch", "off"]),
    ("qwen2_moe", ["--policy", "lru", "--prefetch", "on", "--prefetch-threshold", "0.05", "--prefetch-window", "8"]),
], ids=["lru-prefetch", "lfu-prefetch-4KiB-chunks", "activation-no-prefetch", "lru-aggressive-prefetch"])
def test_greedy_equals_transformers_with_every_policy(family, memd_args, checkpoints, state_dir):
    expected = reference(checkpoints[family], PROMPTS)
    with Stack(checkpoints[family], state_dir, expert_memory="25%", extra_memd=memd_args) as stack:
        got = stack.generate_all(PROMPTS, NEW_TOKENS)
        stats = stack.memd_stats()
    assert got == expected, f"{family} {memd_args} diverged"
    assert stats.policy == memd_args[1] and stats.prefetch == (memd_args[3] == "on")
    assert stats.evictions > 0 and stats.misses > stats.num_slots and stats.stall_seconds > 0
    expert_bytes = _expert_bytes(checkpoints[family])
    if not stats.prefetch:  # every read is a miss's: exactly one expert each
        assert stats.misses in load_counts(stats, expert_bytes)
    else:
        assert max(load_counts(stats, expert_bytes), default=-1) >= stats.misses
    if stats.prefetch:
        assert stats.prefetch_issued > 0
        if "--prefetch-threshold" in memd_args:  # aggressive: some guesses land before their layer runs
            assert stats.prefetch_used > 0
        # (mixtral at 25% holds one layer's 8 experts, all leased while it runs: prefetches are issued, none lands)
    else:
        assert stats.prefetch_issued == 0


@pytest.mark.parametrize("family", ["mixtral", pytest.param("qwen2_moe", marks=pytest.mark.slow)])
def test_bfloat16_with_packed_dense_linears(family, tmp_path, state_dir):
    """``--prepack-dense`` on a bfloat16 checkpoint: the worker packs its bias-free dense linears for oneDNN and
    serves. On these prompts its greedy tokens equal transformers' eager bfloat16 model; the flag is opt-in because
    a rounding tie can break the other way (services/worker/prepack.py), which this would show first."""
    from services.worker import prepack
    if not prepack.available():
        pytest.skip("this torch or CPU has no oneDNN bfloat16 linear packing")
    model = write_family(family, tmp_path / family, dtype="bfloat16")
    expected = _reference(model, PROMPTS, dtype=torch.bfloat16)
    with Stack(model, state_dir, expert_memory="25%", extra_worker=["--prepack-dense", "on"]) as stack:
        got = stack.generate_all(PROMPTS, NEW_TOKENS)
        log = stack.worker_log.read_text()
    assert re.search(r"packed [1-9][0-9]* dense linears", log), log[-2000:]
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY=128 LRU_CACHE_CAPACITY=128" in log  # --matmul-cache's default
    assert len(set(map(tuple, expected))) > 1, "degenerate oracle: all prompts gave the same output"
    assert got == expected, f"{family} in bfloat16 with packed linears diverged"


@pytest.mark.parametrize("family", ["mixtral", pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def test_bfloat16_by_default_multiplies_with_torchs_own_bits(family, tmp_path, state_dir, kernel_cache):
    """The worker's default (``--matvec-kernel auto``): decode steps' products in ``matvec_exact.c`` where its
    check holds (torch's own summation order), so the tokens are transformers' eager bfloat16 model's; elsewhere
    torch's products, said in the log."""
    from services.worker import dequant_kernel, matvec_checks
    try:
        dequant_kernel.load("c", kernel_cache, 1, check=matvec_checks.check_exact)
        used = True
    except dequant_kernel.KernelError:
        used = False
    model = write_family(family, tmp_path / family, dtype="bfloat16")
    expected = _reference(model, PROMPTS, dtype=torch.bfloat16)
    with Stack(model, state_dir, expert_memory="25%") as stack:
        got = stack.generate_all(PROMPTS, NEW_TOKENS)
        log = stack.worker_log.read_text()
    if used:  # they ran, not only loaded; or the log says which shapes the kernel left to torch (Qwen3-MoE's tiny
        # 64-wide experts: oneDNN sums them in an order the exact kernel does not reproduce)
        assert "decode steps' expert products by matvec_exact.c" in log \
            or family != "mixtral" and "products to torch: oneDNN sums them in another order" in log, log[-2000:]
        assert "decode rows of the dense linears by matvec_exact.c" in log, log[-2000:]
    else:
        assert "multiplying with torch's own bfloat16 products" in log, log[-2000:]
    assert len(set(map(tuple, expected))) > 1, "degenerate oracle: all prompts gave the same output"
    assert got == expected, f"{family} in bfloat16 with the exact kernel diverged"


def test_bfloat16_with_expert_rows_spread_apart(tmp_path, state_dir, kernel_cache):
    """Experts whose rows are 2 KiB long (hidden 1024 in bfloat16) lie in the slots with their rows spread apart
    (services/memd/spread.py), and the worker reads them there, in every product (decode steps by the exact kernel
    where it holds, prompts by the grouped matmul), and routes decode steps by router.c where the exact kernel
    holds: the tokens are transformers' eager bfloat16 model's at 25%."""
    from services.worker import dequant_kernel, matvec_checks
    try:
        dequant_kernel.load("c", kernel_cache, 1, check=matvec_checks.check_exact)
        exact = True
    except dequant_kernel.KernelError:
        exact = False
    model = write_family("mixtral", tmp_path / "wide", dtype="bfloat16", hidden_size=1024, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2)
    expected = _reference(model, PROMPTS, dtype=torch.bfloat16)
    with Stack(model, state_dir, expert_memory="25%") as stack:
        got = stack.generate_all(PROMPTS, NEW_TOKENS)
        log = stack.memd_log.read_text()
        worker_log = stack.worker_log.read_text()
    assert "the rows of gate_up_proj spread 64 bytes further apart" in log, log[-2000:]
    if exact and re.search(r": [1-9][0-9]* routers route decode rows", worker_log):
        assert "decode rows of the routers by router.c" in worker_log, worker_log[-2000:]  # used, not only wrapped
    elif exact:  # (a CPU whose oneDNN sums the router's product otherwise: tests/worker/test_router_kernel.py skips)
        assert "router.c does not give its bits" in worker_log, worker_log[-2000:]
    assert len(set(map(tuple, expected))) > 1, "degenerate oracle: all prompts gave the same output"
    assert got == expected, "mixtral with spread expert rows diverged"


@pytest.mark.parametrize("family", ["mixtral", pytest.param("gpt_oss", marks=pytest.mark.slow)])
def test_bfloat16_with_the_matvec_kernel(family, tmp_path, state_dir, kernel_cache):
    """``--matvec-kernel fast``: decode steps' expert products in moeinf's own kernel (services/worker/matvec.py). Its
    sums are added in another order than oneDNN's, so a product's last bit can differ; on these prompts the greedy
    tokens still equal transformers' eager bfloat16 model's (opt-in: elsewhere a close call could go the other way)."""
    from services.worker import dequant_kernel, matvec_checks
    try:
        dequant_kernel.load("c", kernel_cache, 1, check=matvec_checks.check)
    except dequant_kernel.KernelError as exc:
        pytest.skip(f"no matrix-vector kernel here: {exc}")
    model = write_family(family, tmp_path / family, dtype="bfloat16")
    expected = _reference(model, PROMPTS, dtype=torch.bfloat16)
    with Stack(model, state_dir, expert_memory="25%", extra_worker=["--matvec-kernel", "fast"]) as stack:
        got = stack.generate_all(PROMPTS, NEW_TOKENS)
        log = stack.worker_log.read_text()
    assert "decode rows of the dense linears by matvec.c" in log, log[-2000:]  # they ran, not only loaded
    if family != "gpt_oss":  # (GPT-OSS's bf16 experts are [in, out]: declined, the grouped matmul runs them)
        assert "decode steps' expert products by matvec.c" in log, log[-2000:]
    assert len(set(map(tuple, expected))) > 1, "degenerate oracle: all prompts gave the same output"
    assert got == expected, f"{family} in bfloat16 with the matvec kernel diverged"


def _expert_bytes(model_dir) -> int:
    from common.checkpoint import Checkpoint
    from services.memd.store import ExpertStore

    return ExpertStore(Checkpoint(model_dir)).expert_bytes
