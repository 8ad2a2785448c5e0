"""services/worker/layouts.py: where this CPU's grouped matmul rounds a transposed view of ``[out, in]`` rows
otherwise than the contiguous ``[in, out]`` weight transformers holds (oneDNN on AVX2), GPT-OSS's MXFP4 rows are
copied into ``[in, out]``; elsewhere they stay a view. Either way the rows hold transformers' dequantized values."""
import logging

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from common import messages as m
from common.quant_write import mxfp4_tensors
from services.worker import layouts, quant
from services.worker.quant import QuantParam

from worker.test_quant import pool_of


@pytest.fixture
def probe_cache():
    layouts.transposed_view_is_exact.cache_clear()
    yield
    layouts.transposed_view_is_exact.cache_clear()


@pytest.mark.parametrize("exact", [True, False], ids=["view", "copied"])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_gpt_oss_rows_hold_transformers_values_as_a_view_or_a_copy(monkeypatch, kernel_cache, exact, kernel):
    from services.worker import dequant_kernel as dk
    if kernel and dk.compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(quant, "transposed_view_is_exact", lambda shape, dtype: exact)
    torch.manual_seed(0)
    blocks, scales = mxfp4_tensors(torch.randn(3, 96, 64))  # stored [out, in] = [96, 64] per expert
    pool, (bo, so) = pool_of([blocks, scales], 3)
    spec = m.TensorSpec("down_proj", bo, [96, 2, 16], "uint8", "mxfp4", so, [96, 2], "uint8")
    kernels = dk.load("c", kernel_cache, 1) if kernel else None
    param = QuantParam(spec, pool, (64, 96), torch.bfloat16, capacity=3, kernels=kernels, transposed=True)
    got = param.dequantize([2, 0])  # [2, in, out]
    assert param.copies is not exact
    assert got.is_contiguous() is not exact and (exact is False or got.stride(-2) == 1)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # transformers' [experts, in, out]
    assert torch.equal(got[0].float(), want[2].float()) and torch.equal(got[1].float(), want[0].float())


def test_the_probe_refuses_a_view_whose_sums_round_otherwise(monkeypatch, probe_cache, caplog):
    real = layouts._grouped_linear

    def rounding_by_layout(x, w, offs, is_transposed):  # a contiguous weight's sums one bf16 step up
        out = real(x, w, offs, is_transposed=is_transposed)
        return out.nextafter(torch.full_like(out, float("inf"))) if w.is_contiguous() else out
    monkeypatch.setattr(layouts, "_grouped_linear", rounding_by_layout)
    with caplog.at_level(logging.WARNING, logger="moeinf.worker"):
        assert layouts.transposed_view_is_exact((64, 96), torch.bfloat16) is False
    assert "copied into [in, out]" in caplog.text and "--matvec-kernel" in caplog.text


def test_the_probe_takes_a_view_whose_sums_are_the_same(monkeypatch, probe_cache):
    def by_value(x, w, offs, is_transposed):  # depends on the values only, not on the layout
        return (x.double() @ w[0].double()).to(x.dtype)
    monkeypatch.setattr(layouts, "_grouped_linear", by_value)
    assert layouts.transposed_view_is_exact((64, 96), torch.bfloat16) is True
