"""The oracle for quantized checkpoints: greedy generation through real memd + worker processes, with the pool at
25% of the (quantized) expert bytes, equals transformers' generate on the same checkpoint loaded with
``dequantize=True``: GPT-OSS in MXFP4, DeepSeek-V3 and Qwen3-MoE (sharded) in block FP8."""
import pytest
import torch
from helpers import Stack
from quant_helpers import QUANTIZED, dequantized_reference, write_quantized

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
CASES += [(name, 0, 2, KERNEL) for name in list(QUANTIZED)[:2]]  # a scratch of 2 experts: every prefill runs in groups
CASES += [(name, 0, 0, "torch") for name in list(QUANTIZED)[:2]]


@pytest.mark.parametrize("name,cache_mb,scratch,kernel", CASES)
def test_greedy_equals_transformers_dequantized_at_25_percent(name, cache_mb, scratch, kernel, quantized, state_dir):
    """``cache_mb`` > 0: dequantized rows cached across layer calls (every expert fits) while memd evicts and
    reuses their slots, so a stale row would show as a diverged token. ``scratch`` 2: the scratch holds one
    token's experts (--dequant-scratch-experts), so a prompt's tokens run in groups (quant.token_groups)."""
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
