"""``--matvec-kernel exact`` (the default through ``auto``): the kernel's products are torch's own, bit for bit, as
``F.linear`` and transformers' grouped matmul return them, on every kind of width (blocks of 64, a 16-column tail,
single columns), 1-4 and 16 input rows, strided weights and any thread count: ATen's order on an AVX2 CPU,
oneDNN's on an AVX-512 BF16 one (there, for the shapes where its column blocks are found: every decode-sized
shape of a real model; some tiny ones keep torch's product); ``check_exact`` refuses a torch that sums in another
order and a kernel whose bits differ."""
import logging
import types

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.moe import _grouped_mm

from services.worker import dequant_kernel as dk
from services.worker import matvec, matvec_checks, onednn_order

pytestmark = pytest.mark.skipif(dk.compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module")
def exact_kernels(kernel_cache):
    try:
        return dk.load("c", kernel_cache, 1, check=matvec_checks.check_exact)
    except dk.KernelError as exc:
        pytest.skip(f"torch here sums in another order than the kernel's: {exc}")


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("m,rows,cols", [(1, 300, 2048), (2, 70, 2816), (3, 129, 1000), (4, 64, 136), (1, 50, 77),
                                         (2, 33, 9), (1, 17, 5632), (16, 40, 2048), (9, 13, 200), (1, 4096, 4096),
                                         (2, 512, 14336), (1, 1100, 2048)])
def test_products_are_torchs_bit_for_bit(exact_kernels, kernel_cache, threads, m, rows, cols):
    kernels = dk.load("c", kernel_cache, threads, check=matvec_checks.check_exact)
    torch.set_num_threads(threads)  # oneDNN shares a narrow output's sums among torch's threads: part of the order
    try:
        gen = torch.Generator().manual_seed(rows * cols + m)
        slots, x = matvec_checks.order_probe(gen, m, rows, cols)  # sums in another order round differently in many rows
        weight = slots[1, :, :cols]  # a pool slot: rows strided
        out = matvec.Matvec(kernels, exact=True).product(weight, x)
        if out is None:  # oneDNN's order, not found for this shape: torch's product is used instead
            assert kernels.exact_order == "onednn" and (rows < 64 or cols < 256 or cols % 2), (m, rows, cols)
            with pytest.raises(matvec.Declined):  # what makes the caller take torch's product (not a wrong one)
                matvec.Matvec(kernels, exact=True).linear(weight, x, None, False)
            return
        got = out.to(torch.bfloat16)
        assert torch.equal(got, F.linear(x, weight))
        if cols % 8 == 0:  # torch's grouped matmul takes 16-byte strides only
            offs = torch.tensor([m], dtype=torch.int32)
            grouped = _grouped_mm(x, slots[1:, :, :cols].contiguous().transpose(-2, -1), offs)
            assert torch.equal(got, grouped)
        fast = torch.empty(m, rows)
        kernels.matvec(weight, x, fast)  # the fast kernel: another order, so some products' last bits differ
        assert not torch.equal(fast.to(torch.bfloat16), got), "the probe would not tell the two kernels apart"
    finally:
        torch.set_num_threads(1)


def test_onednn_order_blocks_are_found_once_per_shape(exact_kernels):
    """On an AVX-512 BF16 CPU: the column block is found once per shape (rows, width, stride, input rows, threads),
    and a shape oneDNN sums otherwise (a 64-column product of 16 rows, summed by another kernel) is declined."""
    if exact_kernels.exact_order != "onednn":
        pytest.skip("torch sums with ATen's AVX2 order here")
    mv = matvec.Matvec(exact_kernels, exact=True)
    weight = torch.randn(256, 2048).to(torch.bfloat16)
    one, two = mv.blocks.of(weight, 1), mv.blocks.of(weight, 2)  # (512 and 1024 here: oneDNN's choice per CPU)
    assert one in onednn_order.CANDIDATES and two in onednn_order.CANDIDATES
    assert mv.blocks.of(weight, 1) == one and len(mv.blocks.found) == 2
    assert mv.product(torch.randn(16, 64).to(torch.bfloat16), torch.randn(1, 64).to(torch.bfloat16)) is None
    with pytest.raises(matvec.Declined):
        mv.linear(torch.randn(16, 64).to(torch.bfloat16), torch.randn(1, 64).to(torch.bfloat16), None, False)


def test_a_torch_summing_with_other_vectors_is_refused(exact_kernels, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with pytest.raises(dk.KernelError, match="torch sums its bfloat16 products with DEFAULT vectors here"):
        matvec_checks.check_exact(exact_kernels)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    without = types.SimpleNamespace(matvec_exact_onednn=False, matvec_exact_avx2=True)
    with pytest.raises(dk.KernelError, match="AVX512 vectors here .oneDNN's kernels., and the exact kernel for"
                                             " their order was not built"):
        matvec_checks.check_exact(without)


def test_a_kernel_whose_bits_differ_is_refused(exact_kernels):
    other = types.SimpleNamespace(matvec_exact_avx2=True, matvec_exact_onednn=True,
                                  matvec=lambda w, x, out, exact, block=0: exact_kernels.matvec(w, x, out))
    with pytest.raises(dk.KernelError, match="products differ from torch's here"):
        matvec_checks.check_exact(other)


def test_auto_falls_back_to_torchs_products_with_a_reason(tmp_path, caplog):
    def refuse(kernels):
        raise dk.KernelError("torch sums its bfloat16 products with AVX512 vectors here")
    assert dk.load("auto", tmp_path, 1, check=refuse, fallback="multiplying with torch's own bfloat16 products") \
        is None
    assert "multiplying with torch's own bfloat16 products: torch sums" in caplog.text
    with pytest.raises(dk.KernelError, match="--matvec-kernel exact: torch sums.*, or pass --matvec-kernel off"):
        dk.load("c", tmp_path, 1, check=refuse, flag="--matvec-kernel exact", advice="pass --matvec-kernel off")


def test_weights_stored_in_out_are_exact_only_in_onednns_order(exact_kernels):
    """``x @ W`` for ``W`` stored ``[in, out]`` (GPT-OSS's experts; the kernel reads the dequantized ``[out, in]``
    rows behind a transposed view): ATen's AVX2 order sums it otherwise than its row dots, so there the exact mode
    leaves it to the grouped matmul; oneDNN sums both alike, so there the kernel gives ``x @ W``'s bits."""
    gen = torch.Generator().manual_seed(4)
    slots, x = matvec_checks.order_probe(gen, 1, 512, 2048)
    rows = slots[1, :, :2048].contiguous()  # [out, in]
    mv = matvec.Matvec(exact_kernels, exact=True)
    if exact_kernels.exact_order != "onednn":
        with pytest.raises(matvec.Declined):
            mv.linear(rows.T, x, None, True)
        return
    assert torch.equal(mv.linear(rows.T, x, None, True), x @ rows.T.contiguous())


def test_dense_linears_give_a_batch_of_decode_rows_to_the_exact_kernel(exact_kernels):
    """``wrap_dense`` with the exact kernel: up to ``EXACT_DENSE_ROWS`` rows (a batch of decode steps) by the kernel,
    with and without bias, bit for bit ``F.linear``; more rows (a prompt) by ``F.linear`` itself."""
    gen = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(136, 40), torch.nn.Linear(40, 72, bias=False)).to(torch.bfloat16)
    plain = [(layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
             for layer in model]
    mv = matvec.Matvec(exact_kernels, exact=True)
    assert matvec.wrap_dense(model, mv, skip_widths={8}) == 2
    for rows in (1, 8, matvec.EXACT_DENSE_ROWS, matvec.EXACT_DENSE_ROWS + 1):
        _, x = matvec_checks.order_probe(gen, rows, 1, 136)
        want = F.linear(F.linear(x, *plain[0]), *plain[1])
        with torch.inference_mode():
            got = model(x.unsqueeze(0))[0]
        assert torch.equal(got, want), rows
    assert "decode rows of the dense linears" in mv.noted


def test_dense_rows_a_multiple_of_2_kib_long_are_spread_and_keep_their_bits(exact_kernels):
    """``wrap_dense`` spreads the rows of a weight whose rows are 2 KiB long (1024 bfloat16) 64 bytes further apart:
    the same values, rows no longer 2 KiB apart, products bit for bit ``F.linear``'s on the weight as it was, for
    decode rows and a prompt; a weight of another row length, and one tied to another module, stay as they are."""
    gen = torch.Generator().manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 48, bias=False), torch.nn.Linear(48, 1024, bias=False),
                                torch.nn.Linear(1024, 40, bias=False)).to(torch.bfloat16)
    tied = torch.nn.Linear(1024, 40, bias=False).to(torch.bfloat16)
    tied.weight = model[2].weight
    holder = torch.nn.ModuleList([model, tied])
    plain = [layer.weight.detach().clone() for layer in model]
    matvec.wrap_dense(holder, matvec.Matvec(exact_kernels, exact=True), skip_widths=set())
    assert model[0].weight.stride() == (1024 + 32, 1) and torch.equal(model[0].weight, plain[0])
    assert model[1].weight.is_contiguous() and model[2].weight.is_contiguous()  # 96-byte rows; tied
    assert model[2].weight is tied.weight
    for rows in (1, 5, matvec.EXACT_DENSE_ROWS + 3):
        _, x = matvec_checks.order_probe(gen, rows, 1, 1024)
        want = F.linear(F.linear(F.linear(x, plain[0]), plain[1]), plain[2])
        with torch.inference_mode():
            got = model(x.unsqueeze(0))[0]
        assert torch.equal(got, want), rows


@pytest.mark.parametrize("m,rows,cols", [(1, 256, 2048), (2, 384, 2816), (4, 128, 1024), (5, 256, 5632)])
def test_fp8_slots_multiply_exactly_in_onednns_order(exact_kernels, m, rows, cols):
    """On an AVX-512 BF16 and VBMI CPU: block-FP8 slots multiplied in place give ``F.linear``'s bits on the
    dequantized weight (transformers' reference), on a probe where another order rounds otherwise (the fast FP8
    kernel's does)."""
    from services.worker.quant import fp8_table

    if exact_kernels.exact_order != "onednn" or not exact_kernels.matvec_exact_onednn_fp8:
        pytest.skip("no AVX-512 BF16 and VBMI, or torch sums with ATen's AVX2 order here")
    values, scales, weight, x = onednn_order.fp8_probe(torch.Generator().manual_seed(m), m, rows, cols)
    block = matvec.Matvec(exact_kernels, exact=True).blocks.of_shape(rows, cols, cols, m)
    out = torch.empty(m, rows)
    assert exact_kernels.matvec_fp8(values, scales, fp8_table(), (128, 128), x, out, exact_block=block)
    assert torch.equal(out.to(torch.bfloat16), F.linear(x, weight))
    if m <= 4:
        fast = torch.empty(m, rows)
        assert exact_kernels.matvec_fp8(values, scales, fp8_table(), (128, 128), x, fast)
        assert not torch.equal(fast.to(torch.bfloat16), F.linear(x, weight)), "the probe would not tell orders apart"


@pytest.mark.parametrize("m,rows,cols", [(1, 256, 2048), (2, 384, 2880), (4, 128, 1024), (5, 256, 5760),
                                         (1, 200, 2816)])  # (the last: 8 rows past the last 16)
def test_mxfp4_slots_multiply_exactly_in_onednns_order(exact_kernels, m, rows, cols):
    """On an AVX-512 BF16 CPU: MXFP4 slots multiplied in place give ``F.linear``'s bits on the dequantized weight
    and ``x @ W`` for it stored ``[in, out]`` (GPT-OSS), every scale byte included, on a probe where another order
    rounds otherwise (the fast MXFP4 kernel's does)."""
    from services.worker.quant import mxfp4_pairs, mxfp4_reference

    if exact_kernels.exact_order != "onednn" or not exact_kernels.matvec_exact_onednn_mxfp4:
        pytest.skip("no AVX-512 BF16 and VBMI, or torch sums with ATen's AVX2 order here")
    blocks, scales, weight, x = onednn_order.mxfp4_probe(torch.Generator().manual_seed(m), m, rows, cols)
    block = matvec.Matvec(exact_kernels, exact=True).blocks.of_shape(rows, cols, cols, m)
    out = torch.empty(m, rows)
    assert exact_kernels.matvec_mxfp4(blocks, scales, x, out, exact_block=block,
                                      pairs=mxfp4_pairs(torch.bfloat16).view(torch.int32))
    got = out.to(torch.bfloat16)
    assert torch.equal(got, F.linear(x, weight)) and torch.equal(got, x @ weight.T.contiguous())
    scales[::7, 1] = 127  # the fast kernel computes only 2..252
    weight = mxfp4_reference(blocks.view(-1, 16), scales.view(-1), mxfp4_pairs(torch.bfloat16))
    fast = torch.empty(m, rows)
    assert exact_kernels.matvec_mxfp4(blocks, scales, x, fast)
    assert not torch.equal(fast.to(torch.bfloat16), F.linear(x, weight.view(torch.bfloat16).view(rows, cols))), \
        "the probe would not tell orders apart"


def test_quantized_kernels_whose_bits_differ_are_turned_off(exact_kernels, monkeypatch, caplog):
    """The start-up check keeps the in-place FP8 and MXFP4 kernels only while they give ``F.linear``'s bits on the
    dequantized weight; one that does not is turned off with a warning (its experts take the dequantized rows)."""
    if exact_kernels.exact_order != "onednn" or not exact_kernels.matvec_exact_onednn_mxfp4:
        pytest.skip("no AVX-512 BF16 and VBMI, or torch sums with ATen's AVX2 order here")
    assert onednn_order.mxfp4_is_exact(exact_kernels) and onednn_order.fp8_is_exact(exact_kernels)
    kernels = dk.Kernels(exact_kernels.lib, 1)
    right = kernels.matvec_mxfp4

    def one_output_wrong(blocks, scales, x, out, **kw):
        done = right(blocks, scales, x, out, **kw)
        out[0, 0] = out[0, 0] * 2 + 1  # (a bfloat16 apart: the check compares the rounded products)
        return done
    monkeypatch.setattr(kernels, "matvec_mxfp4", one_output_wrong)
    monkeypatch.setattr(kernels, "matvec_fp8", lambda *a, **kw: False)
    with caplog.at_level(logging.WARNING, logger="moeinf.worker"):
        onednn_order.check(kernels)
    assert not kernels.matvec_exact_onednn_mxfp4 and not kernels.matvec_exact_onednn_fp8
    assert "exact MXFP4 kernel's products differ" in caplog.text and "exact FP8 kernel's products differ" in caplog.text


def test_an_exact_quantized_product_without_onednns_block_is_refused(exact_kernels):
    """Where torch sums in oneDNN's order, ``exact`` without its column block would be ATen's AVX2 order: refused."""
    if exact_kernels.exact_order != "onednn":
        pytest.skip("torch sums with ATen's AVX2 order here")
    x, out = torch.zeros(1, 64, dtype=torch.bfloat16), torch.empty(1, 16)
    with pytest.raises(ValueError, match="without oneDNN's column block"):
        exact_kernels.matvec_fp8(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(1, 1), torch.zeros(256),
                                 (16, 64), x, out, exact=True)
    with pytest.raises(ValueError, match="without oneDNN's column block"):
        exact_kernels.matvec_mxfp4(torch.zeros(16, 2, 16, dtype=torch.uint8), torch.full((16, 2), 127,
                                   dtype=torch.uint8), x, out, exact=True)
