"""``--matvec-kernel`` (opt-in): the compiled matrix-vector kernel against float64 products, the experts forward built
on it against transformers' grouped matmul on every family's real experts module (same gating, biases, transposed
layouts, weights and sums; only the products' rounding may differ), the fallback to the grouped matmul where the
kernel does not apply, and a worker serving with it."""
import types

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.moe import grouped_mm_experts_forward

from transformers.integrations.finegrained_fp8 import Fp8Dequantize

from common import messages as m
from common.quant_write import fp8_tensors, mxfp4_tensors
from helpers import FAMILIES, family_config
from services.worker import dequant_kernel as dk
from services.worker import matvec, matvec_checks
from services.worker.quant import Dequantizer, QuantParam, fp8_table
from worker.test_quant import pool_of

pytestmark = pytest.mark.skipif(dk.compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module")
def kernels(kernel_cache):
    return dk.load("c", kernel_cache, threads=1)


@pytest.fixture(scope="module")
def mv(kernels):
    if not kernels.matvec_fast:
        pytest.skip("this CPU has neither AVX-512 BF16 nor AVX2 with FMA")
    matvec_checks.check(kernels)
    return matvec.Matvec(kernels)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("m,rows,cols", [(1, 8, 32), (1, 200, 96), (2, 77, 64), (3, 9, 1000), (4, 129, 40),
                                         (5, 130, 128)])
def test_kernel_is_a_float32_sum_of_the_products(mv, kernel_cache, threads, m, rows, cols):
    kernels = dk.load("c", kernel_cache, threads, check=matvec_checks.check)
    gen = torch.Generator().manual_seed(rows * cols + m)
    slots = torch.randn(3, rows, cols + 16, generator=gen).to(torch.bfloat16)
    weight = slots[2, :, :cols]  # a pool slot: rows strided, not contiguous as a whole
    x = torch.randn(m, cols, generator=gen).to(torch.bfloat16)
    out = torch.full((m, rows), float("nan"))
    kernels.matvec(weight, x, out)
    want = x.double() @ weight.double().T
    bound = 2e-6 * (x.double().abs() @ weight.double().abs().T)  # float32 rounding of the sum, any order
    assert ((out.double() - want).abs() <= bound).all()


def test_kernel_refuses_what_it_cannot_read(kernels):
    w = torch.randn(8, 32).to(torch.bfloat16)
    for weight, x, out in ((w.float(), w[:1], torch.empty(1, 8)), (w.T, w[:1], torch.empty(1, 8)),
                           (w, w[:1, :16], torch.empty(1, 8)), (w, w[:1], torch.empty(1, 8, dtype=torch.bfloat16))):
        with pytest.raises(ValueError, match="matvec kernel"):
            kernels.matvec(weight, x, out)


def test_a_cpu_without_avx512_bf16_or_avx2_is_refused_by_name(tmp_path):
    with pytest.raises(dk.KernelError, match="neither AVX-512 BF16 nor AVX2 with FMA"):
        matvec_checks.check(types.SimpleNamespace(matvec_fast=False))
    no_bf16 = types.SimpleNamespace(matvec_fast=False)
    with pytest.raises(dk.KernelError,
                       match="--matvec-kernel: .*neither AVX-512 BF16 nor AVX2.*, or leave --matvec-kernel off"):
        dk.load("c", tmp_path, 1, check=lambda kernels: matvec_checks.check(no_bf16), flag="--matvec-kernel",
                advice="leave --matvec-kernel off")


def experts_module(family: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family)).to(torch.bfloat16)
    module = next(mod for mod in model.modules() if hasattr(mod, "down_proj") and hasattr(mod, "num_experts")
                  and isinstance(getattr(mod, "down_proj"), torch.nn.Parameter))
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)  # wider than the init: products well away from zero
    return module


def routing(module, tokens: int, k: int, gen):
    hidden_size = module.down_proj.shape[2] if module.is_transposed else module.down_proj.shape[1]
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(torch.bfloat16)
    index = torch.stack([torch.randperm(module.num_experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen).softmax(-1)
    return hidden, index, weights


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_matches_the_grouped_matmul(family, mv):
    module = experts_module(family)
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for tokens in (1, 2, 3):  # decode steps: a few tokens per expert at most
            hidden, index, weights = routing(module, tokens, 2, gen)
            want = grouped_mm_experts_forward(module, hidden, index, weights)
            got = matvec.forward(module, hidden, index, weights, mv)
            assert got.dtype == want.dtype and got.shape == want.shape
            scale = want.float().abs().max()
            assert (got.float() - want.float()).abs().max() <= 0.02 * scale, family
            assert (got == want).float().mean() > 0.5  # most values keep their bits: the same arithmetic around


def test_prompt_steps_and_other_dtypes_take_the_grouped_matmul(mv, monkeypatch):
    module = experts_module("mixtral")
    calls = []
    monkeypatch.setattr(mv, "linear", lambda *a: calls.append(a) or pytest.fail("kernel used"))
    gen = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        hidden, _, weights = routing(module, 5, 2, gen)
        index = torch.tensor([[0, 1]] * 5)  # expert 0 gets 5 tokens: more than MAX_TOKENS
        assert torch.equal(matvec.forward(module, hidden, index, weights, mv),
                           grouped_mm_experts_forward(module, hidden, index, weights))
        assert torch.equal(matvec.forward(module, hidden[:1], index[:1], weights[:1], None),
                           grouped_mm_experts_forward(module, hidden[:1], index[:1], weights[:1]))
        as_float = module.float()
        assert torch.equal(matvec.forward(as_float, hidden.float()[:1], index[:1], weights[:1], mv),
                           grouped_mm_experts_forward(as_float, hidden.float()[:1], index[:1], weights[:1]))
    assert not calls and matvec.MAX_TOKENS < 5


def test_the_profile_floor_counts_the_kernel():
    """``bench profile``'s floor is the fastest product we have, the kernel's included, on the weight's rows as
    stored and spread apart as moeinf lays them: one we beat is no floor."""
    from services.bench.profile_parts import bandwidth_floor

    calls = []
    fake = types.SimpleNamespace(matvec_fast=True, matvec_exact_avx2=True, matvec_exact_onednn=True,
                                 matvec=lambda w, x, out, exact=False, block=0: calls.append((w.shape, w.stride(0),
                                                                                              exact, block)))
    floor = bandwidth_floor(1 << 20, 2, kernels=fake)
    for ld in (4096, 4096 + 32):  # packed, then spread (layouts.SPREAD_BYTES)
        each = [((128, 4096), ld, False, 0)] * 3 + [((128, 4096), ld, True, 0)] * 3 + [((128, 4096), ld, True, 512)] * 3
        assert calls[:9] == each
        del calls[:9]
    assert not calls and floor.gb_per_s > 0


@pytest.fixture(scope="module")
def fp8_kernels(kernels):
    if not kernels.matvec_fp8_fast:
        pytest.skip("this CPU has neither AVX-512 VBMI and BF16 nor AVX2 with FMA")
    return kernels


@pytest.mark.parametrize("m,rows,cols,block", [(1, 64, 128, (8, 64)), (2, 256, 640, (128, 128)), (4, 24, 64, (8, 64))])
def test_fp8_kernel_multiplies_the_dequantized_weight(fp8_kernels, m, rows, cols, block):
    gen = torch.Generator().manual_seed(rows + cols)
    values, scales = fp8_tensors(torch.randn(rows, cols, generator=gen) * 3, block)
    weight = Fp8Dequantize(None)._dequantize_one(values, scales, output_dtype=torch.bfloat16)
    x = torch.randn(m, cols, generator=gen).to(torch.bfloat16)
    out = torch.empty(m, rows)
    assert fp8_kernels.matvec_fp8(values.view(torch.uint8), scales.float().contiguous(), fp8_table(), block, x, out)
    want = x.double() @ weight.double().T
    assert ((out.double() - want).abs() <= 2e-6 * (x.double().abs() @ weight.double().abs().T)).all()


def test_fp8_kernel_declines_layouts_it_does_not_take(fp8_kernels):
    # 96 columns (AVX-512 takes multiples of 64) in blocks 16 wide (AVX2 takes multiples of 32)
    values, scales = fp8_tensors(torch.randn(16, 96), (8, 16))
    out = torch.empty(1, 16)
    x = torch.randn(1, 96).to(torch.bfloat16)
    assert not fp8_kernels.matvec_fp8(values.view(torch.uint8), scales.float(), fp8_table(), (8, 16), x, out)


SLOTS = [7, 6, 5, 4, 3, 2, 1, 0]  # expert e lives in slot 7 - e


def direct_and_rows(dq, module, mv, kernel: str, monkeypatch):
    """``dq`` multiplying its slots in place, the kernel ``kernel``'s calls counted, and ``both(hidden, index,
    weights)``: the forward in place and by the dequantized rows."""
    dq.use(mv, module)
    assert dq.direct
    calls = []
    real = getattr(mv.kernels, kernel)
    monkeypatch.setattr(mv.kernels, kernel, lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def both(hidden, index, weights):
        got = dq.forward(module, 0, torch.arange(8), SLOTS, hidden, index, weights)
        dq.direct = False
        want = dq.forward(module, 0, torch.arange(8), SLOTS, hidden, index, weights)
        dq.direct = True
        return got, want
    return calls, both


def decode_steps_agree(module, both, calls, gen) -> None:
    """Decode steps of 1 and 3 tokens use the kernel and agree with the rows within bf16 rounding."""
    for tokens in (1, 3):
        got, want = both(*routing(module, tokens, 2, gen))
        assert calls and (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()
        calls.clear()


def quant_params(module, pool, offsets, parts, kind: tuple[str, str, str], mv) -> dict:
    """``QuantParam`` views of ``gate_up_proj`` and ``down_proj``, stored as ``parts`` (values, scales, ...) at
    ``offsets`` of ``pool``; ``kind``: (values dtype, format, scales dtype)."""
    values_dtype, fmt, scales_dtype = kind
    params = {}
    for i, name in enumerate(("gate_up_proj", "down_proj")):
        values, scales = parts[2 * i], parts[2 * i + 1]
        spec = m.TensorSpec(name, offsets[2 * i], list(values.shape[1:]), values_dtype, fmt, offsets[2 * i + 1],
                            list(scales.shape[1:]), scales_dtype)
        params[name] = QuantParam(spec, pool, tuple(getattr(module, name).shape[1:]), torch.bfloat16, capacity=8,
                                  kernels=mv.kernels, transposed=bool(module.is_transposed))
    return params


def test_fp8_experts_run_straight_from_their_slots(mv, fp8_kernels, monkeypatch):
    """``--matvec-kernel`` on a block-FP8 checkpoint: a decode step multiplies the slots' FP8 bytes (nothing
    dequantized) and agrees with the dequantize-then-grouped-matmul path; a prompt step takes that path."""
    module = experts_module("mixtral")  # gate_up [8, 256, 64], down [8, 64, 128]
    block = (8, 64)
    parts = []
    for name in ("gate_up_proj", "down_proj"):
        pairs = [fp8_tensors(getattr(module, name)[e].float(), block) for e in range(8)]
        parts += [torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])]
    pool, offsets = pool_of(parts, 8)
    params = quant_params(module, pool, offsets, parts, ("float8_e4m3fn", "fp8", "float32"), mv)
    dq = Dequantizer(params, {}, 8)
    calls, both = direct_and_rows(dq, module, mv, "matvec_fp8", monkeypatch)
    gen = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        decode_steps_agree(module, both, calls, gen)
        hidden, _, weights = routing(module, 6, 2, gen)
        got, want = both(hidden, torch.tensor([[0, 1]] * 6), weights)  # 6 tokens on expert 0: a prompt step
        assert not calls and torch.equal(got, want)


def exact_onednn(kernels, vbmi: bool = False) -> matvec.Matvec:
    """The default exact mode where it sums in oneDNN's order (an AVX-512 BF16 CPU; ``vbmi``: and VBMI, what the
    in-place FP8 and MXFP4 kernels need), else skip."""
    try:
        matvec_checks.check_exact(kernels)
    except dk.KernelError:
        pytest.skip("the exact kernel does not hold here")
    if kernels.exact_order != "onednn" or (vbmi and not kernels.matvec_exact_onednn_fp8):
        pytest.skip("no AVX-512 BF16 (and VBMI), or torch sums with ATen's AVX2 order here")
    return matvec.Matvec(kernels, exact=True)


def wide_experts_module(family: str):
    """``experts_module`` with experts 512 wide: shapes whose order oneDNN's probe finds (the tiny ones are too
    narrow)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(
        family, hidden_size=512, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
        num_hidden_layers=1)).to(torch.bfloat16)
    module = next(mod for mod in model.modules() if isinstance(getattr(mod, "down_proj", None), torch.nn.Parameter))
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module


def test_fp8_slots_in_onednns_order_are_the_dequantized_rows_bit_for_bit(kernels, monkeypatch):
    """The default exact mode on an AVX-512 BF16 and VBMI CPU (oneDNN's order): a decode step multiplies the
    block-FP8 slots in place and gives the dequantize-then-multiply path's bits exactly (that path is torch's own
    product of transformers' dequantized weights)."""
    exact = exact_onednn(kernels, vbmi=True)
    module = wide_experts_module("mixtral")
    parts = []
    for name in ("gate_up_proj", "down_proj"):
        pairs = [fp8_tensors(getattr(module, name)[e].float(), (128, 128)) for e in range(8)]
        parts += [torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])]
    pool, offsets = pool_of(parts, 8)
    dq = Dequantizer(quant_params(module, pool, offsets, parts, ("float8_e4m3fn", "fp8", "float32"), exact), {}, 8)
    calls, both = direct_and_rows(dq, module, exact, "matvec_fp8", monkeypatch)
    gen = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for tokens in (1, 3):
            step = routing(module, tokens, 2, gen)
            got, want = both(*step)
            assert calls and torch.equal(got, want), tokens
            calls.clear()
            dq.use(None, module)  # torch's own products of the dequantized rows: the reference itself
            assert torch.equal(got, dq.forward(module, 0, torch.arange(8), SLOTS, *step)), tokens
            dq.use(exact, module)


def test_mxfp4_slots_in_onednns_order_are_the_dequantized_rows_bit_for_bit(kernels, monkeypatch):
    """The same for GPT-OSS's MXFP4 experts (``[in, out]`` parameters with biases, stored ``[out, in]``)."""
    exact = exact_onednn(kernels, vbmi=True)
    module = wide_experts_module("gpt_oss")
    parts = []
    for name in ("gate_up_proj", "down_proj"):
        parts += list(mxfp4_tensors(getattr(module, name).float().transpose(1, 2)))  # stored [out, in]
    for name in ("gate_up_proj_bias", "down_proj_bias"):
        parts.append(getattr(module, name).detach())
    pool, offsets = pool_of(parts, 8)
    params = quant_params(module, pool, offsets, parts, ("uint8", "mxfp4", "uint8"), exact)
    plain = {name: pool[:, offsets[4 + i]:offsets[4 + i] + parts[4 + i][0].numel() * 2].view(torch.bfloat16)
             for i, name in enumerate(("gate_up_proj_bias", "down_proj_bias"))}
    dq = Dequantizer(params, plain, 8)
    calls, both = direct_and_rows(dq, module, exact, "matvec_mxfp4", monkeypatch)
    gen = torch.Generator().manual_seed(6)
    with torch.inference_mode():
        for tokens in (1, 3):
            got, want = both(*routing(module, tokens, 2, gen))
            assert calls and torch.equal(got, want), tokens
            calls.clear()


def test_an_in_out_weight_is_declined(mv):
    """A contiguous ``[in, out]`` weight (GPT-OSS's bf16 experts): no fast form, so the grouped matmul runs."""
    with pytest.raises(matvec.Declined):
        mv.linear(torch.randn(64, 96).to(torch.bfloat16), torch.randn(1, 64).to(torch.bfloat16), None, True)
    with pytest.raises(matvec.Declined):
        mv.linear(torch.randn(96, 64), torch.randn(1, 64), None, False)  # float32


def test_a_transposed_view_is_read_in_its_own_order(mv):
    """The dequantized MXFP4 rows are a transposed view of row-major storage: read as stored, no copy."""
    stored = torch.randn(96, 64).to(torch.bfloat16)  # [out, in], the module wants [in, out]
    view = stored.T
    x = torch.randn(2, 64).to(torch.bfloat16)
    got = mv.linear(view, x, None, True)
    want = (x.float() @ view.float()).to(torch.bfloat16)
    assert got.shape == want.shape and (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()


def test_dense_linears_take_the_kernel_for_decode_rows_only(mv):
    """``wrap_dense``: bf16 linears (biased too) multiply up to MAX_TOKENS rows by the kernel, larger inputs by
    ``F.linear`` (the same bits); float32 and packed linears are left alone."""
    from services.worker import prepack

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Linear(64, 128, bias=False)).to(torch.bfloat16)
    model.append(torch.nn.Linear(128, 8))  # float32: not wrapped
    plain = torch.nn.Linear(96, 64).to(torch.bfloat16)
    packed = torch.nn.Linear(96, 64, bias=False).to(torch.bfloat16)
    if prepack.available():
        prepack.prepack_dense(torch.nn.Sequential(packed))
    router = torch.nn.Linear(96, 8, bias=False).to(torch.bfloat16)  # as wide as the experts' count: kept as is
    assert matvec.wrap_dense(torch.nn.Sequential(model, plain, packed, router), mv, {1, 8}) \
        == (3 if prepack.available() else 4)
    assert "forward" not in vars(router)
    with torch.inference_mode():
        for shape in ((1, 1, 96), (2, 96), (1, 4, 96), (2, 3, 96)):
            x = torch.randn(*shape).to(torch.bfloat16)
            a = model[0](x)
            b = torch.nn.functional.linear(x, model[0].weight, model[0].bias)
            if x.numel() // 96 > matvec.MAX_TOKENS:
                assert torch.equal(a, b)
            else:
                assert a.shape == b.shape and (a.float() - b.float()).abs().max() <= 0.02 * b.float().abs().max()


def test_mxfp4_experts_run_straight_from_their_slots(mv, monkeypatch):
    """GPT-OSS's MXFP4 experts (a transposed module with biases): a decode step decodes the slots' blocks in
    registers and agrees with the dequantized rows' forward; a scale byte the kernel does not compute sends the layer
    to the rows."""
    if not mv.kernels.matvec_mxfp4_fast:
        pytest.skip("this CPU has neither AVX-512 BF16 nor AVX2 with FMA")
    module = experts_module("gpt_oss")  # gate_up [8, 64, 64] ([in, out]), down [8, 32, 64]
    parts = []
    for name in ("gate_up_proj", "down_proj"):
        blocks, scales = mxfp4_tensors(getattr(module, name).float().transpose(1, 2))  # stored [out, in]
        parts += [blocks, scales]
    for name in ("gate_up_proj_bias", "down_proj_bias"):
        parts.append(getattr(module, name).detach())
    pool, offsets = pool_of(parts, 8)
    params = quant_params(module, pool, offsets, parts, ("uint8", "mxfp4", "uint8"), mv)
    plain = {}
    for i, name in enumerate(("gate_up_proj_bias", "down_proj_bias")):
        t = parts[4 + i]
        plain[name] = pool[:, offsets[4 + i]:offsets[4 + i] + t[0].numel() * 2].view(torch.bfloat16)
    dq = Dequantizer(params, plain, 8)
    calls, both = direct_and_rows(dq, module, mv, "matvec_mxfp4", monkeypatch)
    gen = torch.Generator().manual_seed(6)
    with torch.inference_mode():
        decode_steps_agree(module, both, calls, gen)
        params["down_proj"].scales[SLOTS[5]][0, 0] = 253  # expert 5's first block: a scale it declines
        hidden, _, weights = routing(module, 1, 2, gen)
        got, want = both(hidden, torch.tensor([[5, 1]]), weights)
        assert calls and torch.equal(got, want)  # declined: the rows path, the same bits
