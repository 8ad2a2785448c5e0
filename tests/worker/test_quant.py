"""services/worker/quant.py against transformers' own dequantization, bit for bit, in every parameter dtype:
MXFP4 against ``convert_moe_packed_tensors`` (integrations/mxfp4.py), block FP8 against ``Fp8Dequantize``
(integrations/finegrained_fp8.py); scratch rows are reused and bounded."""
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from common import messages as m
from common.quant_write import fp8_tensors, mxfp4_tensors
from services.worker.layouts import ALIGN
from services.worker.quant import Dequantizer, QuantParam

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def pool_of(parts: list[torch.Tensor], slots: int) -> tuple[torch.Tensor, list[int]]:
    """A ``[slots, slot_bytes]`` uint8 pool with ``parts[i][e]`` (per-expert tensors) at aligned offsets."""
    offsets, offset = [], 0
    for p in parts:
        offsets.append(offset)
        offset += -(-p[0].numel() * p.element_size() // ALIGN) * ALIGN
    pool = torch.zeros(slots, offset, dtype=torch.uint8)
    for p, off in zip(parts, offsets):
        flat = p.reshape(slots, -1).contiguous().view(torch.uint8)
        pool[:, off:off + flat.shape[1]] = flat
    return pool, offsets


@settings(max_examples=12, deadline=None)
@given(rows=st.sampled_from([32, 64, 96]), groups=st.integers(1, 4), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16), order=st.permutations([0, 1, 2, 3]))
def test_mxfp4_equals_transformers(rows, groups, dtype, seed, order):
    torch.manual_seed(seed)
    weight = torch.randn(4, rows, groups * 32) * torch.rand(4, rows, 1) * 4  # scales spread over a few octaves
    blocks, scales = mxfp4_tensors(weight)
    pool, (bo, so) = pool_of([blocks, scales], 4)
    spec = m.TensorSpec("gate_up_proj", bo, list(blocks.shape[1:]), "uint8", "mxfp4", so, list(scales.shape[1:]),
                        "uint8")
    param = QuantParam(spec, pool, (groups * 32, rows), dtype, capacity=4, transposed=True)
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [4, K, rows]
    got = param.dequantize(order)
    assert got.dtype == dtype and torch.equal(got, want[order])
    assert got.data_ptr() % ALIGN == 0


@settings(max_examples=12, deadline=None)
@given(grid=st.tuples(st.integers(1, 3), st.integers(1, 3)), block=st.sampled_from([(8, 16), (16, 16), (32, 8)]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_fp8_equals_transformers(grid, block, dtype, seed):
    torch.manual_seed(seed)
    rows, cols = grid[0] * block[0], grid[1] * block[1]
    pairs = [fp8_tensors(torch.randn(rows, cols) * (e + 1), block) for e in range(3)]
    values, scales = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    pool, (vo, so) = pool_of([values, scales], 3)
    spec = m.TensorSpec("down_proj", vo, [rows, cols], "float8_e4m3fn", "fp8", so, list(grid), "float32")
    param = QuantParam(spec, pool, (rows, cols), dtype, capacity=3, transposed=False)
    got = param.dequantize([2, 0])
    for row, e in enumerate([2, 0]):
        want = Fp8Dequantize(None)._dequantize_one(values[e], scales[e], output_dtype=dtype)
        assert torch.equal(got[row], want)


def test_more_routed_experts_than_the_scratch_is_an_error_naming_the_bound():
    blocks, scales = mxfp4_tensors(torch.randn(3, 32, 32))
    pool, (bo, so) = pool_of([blocks, scales], 3)
    spec = m.TensorSpec("w", bo, [32, 1, 16], "uint8", "mxfp4", so, [32, 1], "uint8")
    param = QuantParam(spec, pool, (32, 32), torch.float32, capacity=2, transposed=True)
    first = param.dequantize([0, 1]).clone()
    assert torch.equal(param.dequantize([1, 0]), first.flip(0))  # the same rows, reused
    with pytest.raises(RuntimeError, match=r"3 experts routed in one layer, the dequantization buffer holds 2"):
        param.dequantize([0, 1, 2])


def test_mxfp4_rows_of_an_out_in_parameter_are_the_parameter():
    """MXFP4 is stored ``[out, in / 32, 16]``: an ``[in, out]`` parameter (GPT-OSS) is the rows' transpose, an ``[out,
    in]`` one (Mixtral, from memd's compressed cache) the rows themselves; square, only ``transposed`` tells."""
    blocks, scales = mxfp4_tensors(torch.randn(2, 64, 64))
    pool, (bo, so) = pool_of([blocks, scales], 2)
    spec = m.TensorSpec("down_proj", bo, [64, 2, 16], "uint8", "mxfp4", so, [64, 2], "uint8")
    in_out = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # transformers': [2, in, out]
    as_stored = QuantParam(spec, pool, (64, 64), torch.float32, capacity=2, transposed=False)
    assert torch.equal(as_stored.dequantize([0, 1]), in_out.transpose(1, 2))
    transposed = QuantParam(spec, pool, (64, 64), torch.float32, capacity=2, transposed=True)
    assert torch.equal(transposed.dequantize([0, 1]), in_out)
    assert not torch.equal(in_out, in_out.transpose(1, 2))


def test_layout_that_cannot_make_the_parameter_is_refused():
    blocks, scales = mxfp4_tensors(torch.randn(2, 32, 64))
    pool, (bo, so) = pool_of([blocks, scales], 2)
    spec = m.TensorSpec("down_proj", bo, [32, 2, 16], "uint8", "mxfp4", so, [32, 2], "uint8")
    with pytest.raises(RuntimeError, match=r"cannot make the model's \[32, 64\]"):
        QuantParam(spec, pool, (32, 64), torch.float32, capacity=2, transposed=True)


def test_dequantizer_caches_rows_and_forwards_like_the_scratch():
    blocks, scales = mxfp4_tensors(torch.randn(4, 32, 64))
    pool, (bo, so) = pool_of([blocks, scales], 4)
    spec = m.TensorSpec("gate_up_proj", bo, [32, 2, 16], "uint8", "mxfp4", so, [32, 2], "uint8")
    param = QuantParam(spec, pool, (64, 32), torch.float32, capacity=6, transposed=True)
    dq = Dequantizer({"gate_up_proj": param}, {}, 6)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    rows = dq.rows(0, [0, 3], [0, 3])
    assert dq.rows(0, [0, 3], [0, 3]) == rows and dq.cache.hits == 2
    for e, r in zip([0, 3], rows):
        assert torch.equal(dq.tensors["gate_up_proj"][r], want[e])


@pytest.mark.parametrize("weights_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [16, 23])
def test_experts_in_groups_give_the_bits_of_one_call(tokens, weights_dtype):
    """More routed experts than the scratch holds: each group of 2 runs its experts on all their tokens, and the
    layer's output is bit for bit transformers' one call (splitting an expert's tokens across calls, as grouping by
    tokens did, changed the last bits at this shape on AVX-512 CPUs)."""
    from transformers import MixtralConfig
    from transformers.integrations.moe import grouped_mm_experts_forward
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from services.worker.expert_groups import in_expert_groups

    torch.manual_seed(tokens)
    config = MixtralConfig(hidden_size=1024, intermediate_size=2048, num_local_experts=8, num_experts_per_tok=2)
    module = MixtralExperts(config).to(torch.bfloat16)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.03)
    hidden = torch.randn(tokens, 1024, dtype=torch.bfloat16)
    weights, index = torch.topk(torch.randn(tokens, 8).softmax(-1), 2)
    weights = weights.to(weights_dtype)
    calls = []

    def forward(group, h, i, w):
        calls.append(group.tolist())
        assert set(i.reshape(-1).tolist()) <= set(group.tolist()) and bool((w == 1).all())
        return grouped_mm_experts_forward(module, h, i, w)

    experts = torch.unique(index)
    got = in_expert_groups(forward, experts, 2, hidden, index, weights)
    assert torch.equal(got, grouped_mm_experts_forward(module, hidden, index, weights))
    assert sorted(e for c in calls for e in c) == experts.tolist() and max(map(len, calls)) == 2


def _param(fmt: str, shape, blocks=None):
    values = torch.empty(1, shape[0], shape[1] // 32, 16) if fmt == "mxfp4" else torch.empty(1, *shape)
    return types.SimpleNamespace(dtype=torch.bfloat16, format=fmt, values=values, shape=shape, blocks=blocks)


def test_direct_routes_each_format_and_order_to_the_kernel_that_sums_as_torch():
    """``QuantParam.direct``: oneDNN's order takes its own FP8/MXFP4 kernels; ATen's AVX2 order takes FP8 ``[out,
    in]`` and MXFP4 by layout (``[in, out]``: the ``x @ W`` kernel; ``[out, in]``: the dot kernel, K a multiple of
    64); exact without a found order, or a checked kernel missing, takes the dequantized rows."""
    every = dict(matvec_exact_onednn_fp8=True, matvec_exact_onednn_mxfp4=True, matvec_exact_fp8=True,
                 matvec_exact_mxfp4=True, matvec_exact_mxfp4_xw=True, matvec_fp8_fast=True, matvec_mxfp4_fast=True)
    fp8, mx, mx_odd = _param("fp8", (256, 512), (2, 128, 4, 128)), _param("mxfp4", (64, 512)), _param("mxfp4", (64, 96))

    def direct(param, order, transposed, exact=True, **off):
        kernels = types.SimpleNamespace(**(every | dict.fromkeys(off, False)), exact_order=order)
        return bool(QuantParam.direct(param, kernels, transposed, exact))
    assert direct(fp8, "onednn", False) and direct(mx, "onednn", True) and direct(mx, "onednn", False)
    assert direct(fp8, "aten-avx2", False) and not direct(fp8, "aten-avx2", True)
    assert not direct(fp8, "aten-avx2", False, matvec_exact_fp8=0)
    assert direct(mx, "aten-avx2", True) and not direct(mx, "aten-avx2", True, matvec_exact_mxfp4_xw=0)
    assert direct(mx, "aten-avx2", False) and not direct(mx, "aten-avx2", False, matvec_exact_mxfp4=0)
    assert not direct(mx_odd, "aten-avx2", False) and direct(mx_odd, "aten-avx2", True)
    assert not direct(fp8, None, False) and not direct(mx, None, True)
    assert direct(fp8, None, False, exact=False) and direct(mx, "aten-avx2", False, exact=False)
