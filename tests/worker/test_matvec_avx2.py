"""The exact kernels of an AVX2 CPU (``matvec_exact.c``: ATen's AVX2 order, bfloat16 and block-FP8 weights;
``matvec_exact_xw.c``: its ``x @ W`` order, MXFP4 weights), run on
any x86 CPU with AVX2 and FMA: torch is told to take its AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``, oneDNN kept
off bfloat16 with ``ONEDNN_MAX_CPU_ISA=AVX2``) and the library is built without AVX-512 (``-mno-avx512f``), in
fresh processes, so an AVX-512 machine (CI's) checks what an AVX2 one (a Zen 3, most desktops) runs. The oracle is
torch under the same settings: ``F.linear`` on the dequantized weight, and transformers' generate on the checkpoint
loaded with ``dequantize=True``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import Stack, write_family

from common.quant_write import quantize_checkpoint
from services.worker import dequant_kernel as dk

ROOT = Path(__file__).resolve().parents[2]


def _flags() -> set[str]:
    try:
        return set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


pytestmark = [pytest.mark.skipif(dk.compiler() is None, reason="no C compiler"),
              pytest.mark.skipif(not {"avx2", "fma"} <= _flags(), reason="this CPU has no AVX2 with FMA")]


@pytest.fixture(scope="module")
def avx2_env():
    return {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "CC": " ".join(dk.compiler()) + " -mno-avx512f"}


def run_avx2(script: str, env: dict, *args: str) -> str:
    """``script`` in a fresh interpreter under ``env`` (the repository and tests on its path); its stdout."""
    path = f"{ROOT}:{ROOT / 'tests'}"
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env, "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


KERNELS = r"""
import sys, types
from pathlib import Path
import torch, torch.nn.functional as F
from services.worker import dequant_kernel as dk, matvec_checks
from services.worker.quant import fp8_block_table, fp8_table, mxfp4_pairs, mxfp4_reference

assert torch.backends.cpu.get_cpu_capability() == "AVX2"
for threads in (1, 3):
    k = dk.load("c", Path(sys.argv[1]), threads, check=matvec_checks.check_exact)
    assert k.exact_order == "aten-avx2" and k.matvec_exact_fp8 and k.matvec_exact_mxfp4 \
        and k.matvec_exact_mxfp4_xw, vars(k)
    gen = torch.Generator().manual_seed(threads)
    table = fp8_table()
    for m, rows, cols, br, bc in ((1, 256, 1024, 128, 128), (2, 96, 3584, 32, 128), (3, 40, 640, 8, 64),
                                  (4, 128, 128, 64, 64), (16, 16, 256, 16, 128)):
        values = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=gen)
        values[: rows // 2] |= 0x08  # zero and subnormal bytes in the second half of the rows only
        values[(values & 0x7F) == 0x7F] = 0x7E
        values[:, 0], values[:, -1] = 0x38, 0xB8
        gr, gc = rows // br, cols // bc
        scales = (1 + torch.rand(gr, gc, generator=gen)) * 2.0 ** -7
        scales[0, 0] = 1e-33  # one block by the table
        scales[:, -1] = scales[:, 0]  # the two large products cancel
        index = values.long() + 256 * ((torch.arange(rows) // br).view(-1, 1) * gc + (torch.arange(cols) // bc))
        weight = fp8_block_table(scales, torch.bfloat16).view(-1)[index]
        x = torch.randn(m, cols, generator=gen)
        x[:, 0] = x[:, -1] = 2.0 ** 25  # a product cancelled only as the sum ends: another order rounds otherwise
        x = x.to(torch.bfloat16)
        out = torch.empty(m, rows)
        assert k.matvec_fp8(values, scales, table, (br, bc), x, out, exact=True)
        assert torch.equal(out.to(torch.bfloat16), F.linear(x, weight)), (m, rows, cols)
        fast = torch.empty(m, rows)
        assert m > 4 or k.matvec_fp8(values, scales, table, (br, bc), x, fast)
        assert m > 4 or not torch.equal(fast.to(torch.bfloat16), F.linear(x, weight)), "the probe tells no order apart"
    for m, rows, cols in ((1, 2880, 5760), (2, 130, 2880), (4, 64, 512)):  # MXFP4, x @ W for W [in, out]
        blocks = torch.randint(0, 256, (rows, cols // 32, 16), dtype=torch.uint8, generator=gen)
        blocks[:, 0, 0] = (blocks[:, 0, 0] & 0xF0) | 0x2  # +1 at the first input, -1 at the last
        blocks[:, -1, -1] = (blocks[:, -1, -1] & 0x0F) | 0xA0
        scales = torch.randint(118, 136, (rows, cols // 32), dtype=torch.uint8, generator=gen)
        scales[:, -1] = scales[:, 0]
        weight = mxfp4_reference(blocks.view(-1, 16), scales.view(-1), mxfp4_pairs(torch.bfloat16))
        weight = weight.view(torch.bfloat16).view(rows, cols).T.contiguous()
        x = torch.randn(m, cols, generator=gen)
        x[:, 0] = x[:, -1] = 2.0 ** 20
        x = x.to(torch.bfloat16)
        out = torch.empty(m, rows)
        assert k.matvec_mxfp4(blocks, scales, x, out, exact=True, xw=True)
        assert torch.equal(out.to(torch.bfloat16), x @ weight), (m, rows, cols)
        assert not torch.equal(F.linear(x, weight.T.contiguous()), x @ weight), "the probe tells no order apart"
        assert k.matvec_mxfp4(blocks, scales, x, out, exact=True)  # an [out, in] module's: ATen's dots
        assert torch.equal(out.to(torch.bfloat16), F.linear(x, weight.T.contiguous())), (m, rows, cols)
        scales[0, 0] = 253
        assert not k.matvec_mxfp4(blocks, scales, x, out, exact=True, xw=True)  # a scale it does not compute: declined
# a kernel summing in another order is refused, and FP8 slots are then dequantized first
other = types.SimpleNamespace(matvec=k.matvec,
                              matvec_fp8=lambda *a, exact=False, **kw: k.matvec_fp8(*a, **kw))
try:
    matvec_checks._check_exact_fp8(other)
except dk.KernelError as exc:
    assert "products differ" in str(exc)
else:
    raise AssertionError("an FP8 kernel in another order passed the exact check")
for xw in (False, True):  # an MXFP4 kernel in another order (the fast one) is refused too
    other = types.SimpleNamespace(matvec_mxfp4=lambda *a, exact=False, xw=False, **kw: k.matvec_mxfp4(*a, **kw))
    try:
        matvec_checks._check_exact_mxfp4(other, xw)
    except dk.KernelError as exc:
        assert "differ" in str(exc)
    else:
        raise AssertionError("an MXFP4 kernel in another order passed the exact check")
print("ok")
"""


def test_exact_kernels_give_torchs_avx2_products(avx2_env, kernel_cache):
    """bfloat16 products (``check_exact``) and FP8 slots multiplied in place, bit for bit as ``F.linear`` of the
    dequantized weight, 1-4 and 16 input rows, 1 and 3 threads, zero/subnormal bytes and a scale outside the
    shortcut's range; the fast kernel's order is told apart by the same inputs, and refused by the check. MXFP4
    slots bit for bit as ``x @ W`` of the ``[in, out]`` dequantized weight (GPT-OSS's own shapes among them) and as
    ``F.linear`` of the ``[out, in]`` one, a scale byte it does not compute declined."""
    assert run_avx2(KERNELS, avx2_env, str(kernel_cache)).strip().endswith("ok")


REFERENCE = r"""
import json, sys
import torch
from quant_helpers import dequantized_reference
assert torch.backends.cpu.get_cpu_capability() == "AVX2"
model = dequantized_reference(sys.argv[1])
model.generation_config.eos_token_id = None
prompts = json.loads(sys.argv[2])
print(json.dumps([model.generate(torch.tensor([p]), max_new_tokens=int(sys.argv[3]), do_sample=False,
                                 pad_token_id=0)[0, len(p):].tolist() for p in prompts]))
"""


@pytest.mark.parametrize("family,fmt,block", [  # CI: MXFP4 served (FP8 slots'
    # AVX2 products are checked bit for bit by test_exact_kernels_give_torchs_avx2_products; served under -m slow)
    pytest.param("qwen3_moe", "fp8", (8, 64), marks=pytest.mark.slow), ("gpt_oss", "mxfp4", None)])
def test_quantized_checkpoint_served_in_place_equals_transformers_on_avx2(avx2_env, tmp_path, state_dir, monkeypatch,
                                                                         family, fmt, block):
    """A block-FP8 (Qwen3-MoE) and an MXFP4 (GPT-OSS) checkpoint at 25% expert memory, the worker on torch's AVX2
    kernels: decode steps multiply the quantized slots in place in ATen's orders (the worker says so) and greedy
    tokens equal transformers' dequantized model's under the same torch settings."""
    write_family(family, tmp_path / "m", dtype="bfloat16", moe_intermediate_size=64)
    path = quantize_checkpoint(tmp_path / "m", fmt, *[block] * (block is not None))
    prompts, new = [[1, 5, 9, 22, 7], [3] * 11, list(range(2, 60, 2))], 16
    expected = json.loads(run_avx2(REFERENCE, avx2_env, str(path), json.dumps(prompts), str(new)))
    for name, value in avx2_env.items():
        monkeypatch.setenv(name, value)
    with Stack(path, state_dir, expert_memory="25%") as stack:
        got = stack.generate_all(prompts, new)
        log = stack.worker_log.read_text()
    assert "multiply the quantized slots in place" in log, log[-2000:]
    by = "matvec_exact_xw.c" if fmt == "mxfp4" else "matvec_exact.c"
    assert f"decode steps' products on the quantized slots in place by {by}" in log, log[-2000:]
    if fmt == "mxfp4":  # GPT-OSS's [in, out] experts: prompts in place too (ATen sums x @ W alike for any rows)
        assert "steps of more than 4 tokens (prompts) on the quantized slots in place by matvec_exact_xw.c" in log, \
            log[-2000:]
    assert len(set(map(tuple, expected))) > 1, "degenerate oracle: all prompts gave the same output"
    assert got == expected


ROUND_TRIP = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
from services.bench.quality import round_trip
assert torch.backends.cpu.get_cpu_capability() == "AVX2"
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model.generation_config.eos_token_id = None
round_trip(model, sys.argv[1], "mxfp4", sys.argv[4])
prompts = json.loads(sys.argv[2])
print(json.dumps([model.generate(torch.tensor([p]), max_new_tokens=int(sys.argv[3]), do_sample=False,
                                 pad_token_id=0)[0, len(p):].tolist() for p in prompts]))
"""


def test_compressed_mxfp4_of_out_in_experts_served_in_place_on_avx2(avx2_env, tmp_path, state_dir, monkeypatch):
    """memd's ``--expert-format mxfp4`` of a bf16 Mixtral (``[out, in]`` experts, which torch multiplies by its dot
    products): decode steps multiply the MXFP4 slots in place in ATen's dot order, and greedy tokens equal
    transformers' with the same round-tripped experts, torch on its AVX2 kernels in both."""
    path = write_family("mixtral", tmp_path / "m", dtype="bfloat16")
    prompts, new = [[1, 5, 9, 22, 7], [3] * 11, list(range(2, 60, 2))], 16
    expected = json.loads(run_avx2(ROUND_TRIP, avx2_env, str(path), json.dumps(prompts), str(new),
                                   str(tmp_path / "reference-cache")))
    for name, value in avx2_env.items():
        monkeypatch.setenv(name, value)
    with Stack(path, state_dir, expert_memory="25%", extra_memd=("--expert-format", "mxfp4")) as stack:
        got = stack.generate_all(prompts, new)
        log = stack.worker_log.read_text()
    assert "multiply the quantized slots in place" in log, log[-2000:]
    assert "decode steps' products on the quantized slots in place by matvec_exact.c" in log, log[-2000:]
    assert len(set(map(tuple, expected))) > 1, "degenerate oracle: all prompts gave the same output"
    assert got == expected
