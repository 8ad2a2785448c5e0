"""The oracle for quantized checkpoints: greedy generation through real memd + worker processes, with the pool at
25% of the (quantized) expert bytes, equals transformers' generate on the same checkpoint loaded with
``dequantize=True``: GPT-OSS in MXFP4, DeepSeek-V3 and Qwen3-MoE (sharded) in block FP8."""
import pytest
import torch
from helpers import Stack, write_family
from quant_helpers import QUANTIZED, dequantized_reference, write_quantized

from common.quant_write import quantize_checkpoint
from services.worker.dequant_kernel import compiler


PROMPTS = [[1, 5, 9, 22, 7], [3] * 11, list(range(2, 60, 2))]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {name: write_quantized(name, root / name) for name in QUANTIZED}


def reference(path, prompts):
    model = dequantized_reference(path)
    model.generation_config.eos_token_id = None
    return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=0)[0, len(p):].tolist() for p in prompts]


# the compiled kernels (services/worker/dequant_kernel.py) where a C compiler exists, so that a failed build cannot
# pass unnoticed through auto's fallback; torch's ops in their own cases
KERNEL = "c" if compiler() else "torch"
CASES = [(name, 0, 0, KERNEL) for name in QUANTIZED] + [(name, 64, 0, KERNEL) for name in list(QUANTIZED)[:2]]
CASES = [c if c in CASES[:2] + CASES[-1:] else pytest.param(*c, marks=pytest.mark.slow) for c in CASES]  # CI: 3 of 5
CASES += [(name, 0, 2, KERNEL) for name in list(QUANTIZED)[:1]]  # a scratch of 2 experts: every prefill runs in groups
# CI's time: the rest under -m slow (the torch-op path is also checked bit for bit against the kernels in
# test_dequant_kernel.py)
CASES += [pytest.param(name, 0, 2, KERNEL, marks=pytest.mark.slow) for name in list(QUANTIZED)[1:2]]
CASES += [pytest.param(name, 0, 0, "torch", marks=pytest.mark.slow) for name in list(QUANTIZED)[:2]]


@pytest.mark.parametrize("name,cache_mb,scratch,kernel", CASES)
def test_greedy_equals_transformers_dequantized_at_25_percent(name, cache_mb, scratch, kernel, quantized, state_dir):
    """``cache_mb`` > 0: dequantized rows cached across layer calls (every expert fits) while memd evicts and
    reuses their slots, so a stale row would show as a diverged token. ``scratch`` 2: the scratch holds one
    token's experts (--dequant-scratch-experts), so a prompt's experts run in groups (expert_groups.py)."""
    expected = reference(quantized[name], PROMPTS)
    with Stack(quantized[name], state_dir, expert_memory="25%",
               extra_worker=("--dequant-cache-mb", str(cache_mb), "--dequant-scratch-experts", str(scratch),
                             "--dequant-kernel", kernel)) as stack:
        got = stack.generate_all(PROMPTS, NEW_TOKENS)
        stats = stack.memd_stats()
    for prompt, exp, out in zip(PROMPTS, expected, got):
        assert out == exp, f"{name}: prompt {prompt[:6]}... diverged"
    assert len(set(map(tuple, expected))) > 1, "degenerate oracle: all prompts gave the same output"
    assert stats.evictions > 0 and stats.misses > stats.num_slots, "25% memory must evict and reload experts"


@pytest.mark.parametrize("family,fmt,block", [("qwen3_moe", "fp8", (8, 64)), ("gpt_oss", "mxfp4", None)])
def test_the_matvec_kernel_multiplies_quantized_slots_in_place(family, fmt, block, tmp_path, state_dir, kernel_cache):
    """``--matvec-kernel`` on bf16 block-FP8 (a layout the FP8 kernel takes: widths of 64, blocks 8 x 64) and MXFP4
    checkpoints: decode steps multiply the slots' quantized bytes (the worker says so; FP8 on a CPU with AVX-512 BF16
    but not VBMI: the dequantized rows) and, on these prompts, the greedy tokens equal transformers' dequantized
    model's (opt-in: another summation order, so nothing promises it elsewhere)."""
    from services.worker import dequant_kernel, matvec_checks
    try:
        kernels = dequant_kernel.load("c", kernel_cache, 1, check=matvec_checks.check)
    except dequant_kernel.KernelError as exc:
        pytest.skip(f"no matrix-vector kernel here: {exc}")
    in_place = kernels.matvec_fp8_fast if fmt == "fp8" else kernels.matvec_mxfp4_fast
    write_family(family, tmp_path / "m", dtype="bfloat16", moe_intermediate_size=64)
    path = quantize_checkpoint(tmp_path / "m", fmt, *[block] * (block is not None))
    expected = reference(path, PROMPTS)
    with Stack(path, state_dir, expert_memory="25%", extra_worker=("--matvec-kernel", "fast")) as stack:
        got = stack.generate_all(PROMPTS, NEW_TOKENS)
        log = stack.worker_log.read_text()
    if in_place:
        assert "multiply the quantized slots in place" in log, log[-2000:]
        assert "decode steps' products on the quantized slots in place by matvec.c" in log, log[-2000:]  # they ran
    else:
        assert "decode steps multiply the dequantized rows" in log, log[-2000:]
        assert "decode steps' expert products by matvec.c" in log, log[-2000:]
    assert len(set(map(tuple, expected))) > 1, "degenerate oracle: all prompts gave the same output"
    assert got == expected
