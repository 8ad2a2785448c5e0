"""services/worker/quant.py against transformers' own dequantization, bit for bit, in every parameter dtype:
MXFP4 against ``convert_moe_packed_tensors`` (integrations/mxfp4.py), block FP8 against ``Fp8Dequantize``
(integrations/finegrained_fp8.py); scratch rows are reused and bounded."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from common import messages as m
from common.quant_encode import fp8_encode, mxfp4_encode
from services.worker.quant import ALIGN, QuantParam

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
    blocks, scales = mxfp4_encode(weight)
    pool, (bo, so) = pool_of([blocks, scales], 4)
    spec = m.TensorSpec("gate_up_proj", bo, list(blocks.shape[1:]), "uint8", "mxfp4", so, list(scales.shape[1:]),
                        "uint8")
    param = QuantParam(spec, pool, (groups * 32, rows), dtype, capacity=4)
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
    pairs = [fp8_encode(torch.randn(rows, cols) * (e + 1), block) for e in range(3)]
    values, scales = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    pool, (vo, so) = pool_of([values, scales], 3)
    spec = m.TensorSpec("down_proj", vo, [rows, cols], "float8_e4m3fn", "fp8", so, list(grid), "float32")
    param = QuantParam(spec, pool, (rows, cols), dtype, capacity=3)
    got = param.dequantize([2, 0])
    for row, e in enumerate([2, 0]):
        want = Fp8Dequantize(None)._dequantize_one(values[e], scales[e], output_dtype=dtype)
        assert torch.equal(got[row], want)


def test_more_routed_experts_than_the_scratch_is_an_error_naming_the_bound():
    blocks, scales = mxfp4_encode(torch.randn(3, 32, 32))
    pool, (bo, so) = pool_of([blocks, scales], 3)
    spec = m.TensorSpec("w", bo, [32, 1, 16], "uint8", "mxfp4", so, [32, 1], "uint8")
    param = QuantParam(spec, pool, (32, 32), torch.float32, capacity=2)
    first = param.dequantize([0, 1]).clone()
    assert torch.equal(param.dequantize([1, 0]), first.flip(0))  # the same rows, reused
    with pytest.raises(RuntimeError, match=r"3 experts routed in one layer, the dequantization buffer holds 2"):
        param.dequantize([0, 1, 2])


def test_layout_that_cannot_make_the_parameter_is_refused():
    blocks, scales = mxfp4_encode(torch.randn(2, 32, 64))
    pool, (bo, so) = pool_of([blocks, scales], 2)
    spec = m.TensorSpec("down_proj", bo, [32, 2, 16], "uint8", "mxfp4", so, [32, 2], "uint8")
    with pytest.raises(RuntimeError, match=r"cannot make the model's \[32, 64\]"):
        QuantParam(spec, pool, (32, 64), torch.float32, capacity=2)
