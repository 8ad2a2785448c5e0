"""What ``--matvec-kernel`` needs before the worker uses it (``dequant_kernel.load``'s ``check``): ``check`` for
``fast`` (within float32 rounding of float64 products; FP8 and MXFP4 weights the dequantization's bits), and
``check_exact`` for ``exact`` (torch's own products, bit for bit, in the order this torch sums them here; FP8
slots too, where the order is ATen's AVX2 one). ``order_probe`` makes inputs on which a sum in another order
rounds differently."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from services.worker import onednn_order
from services.worker.dequant_kernel import KernelError
from services.worker.matvec import EXACT_DENSE_ROWS

log = logging.getLogger("moeinf.worker")


def check(kernels) -> None:
    """What ``--matvec-kernel`` needs of the compiled library (``dequant_kernel.load``'s ``check``): AVX-512 BF16
    or AVX2 with FMA, and each kernel's products and weights as the checks below say."""
    if not kernels.matvec_fast:
        raise KernelError("this CPU has neither AVX-512 BF16 nor AVX2 with FMA (avx512_bf16, avx2, fma in"
                          " /proc/cpuinfo), where the kernel would be slower than oneDNN")
    _check_bf16(kernels)
    if kernels.matvec_fp8_fast:
        _check_fp8(kernels)
    if kernels.matvec_mxfp4_fast:
        _check_mxfp4(kernels)


def check_exact(kernels) -> None:
    """What ``--matvec-kernel exact`` (and ``auto``'s choice of it) needs: torch running its bfloat16 products with
    the AVX2 order the kernel reproduces, and the kernel giving torch's products bit for bit, as ``F.linear``
    (bias or none) and transformers' grouped matmul return them: 1-4 and ``EXACT_DENSE_ROWS`` input rows, widths
    with each kind of tail, a strided weight (a pool slot), on ``order_probe``'s inputs, where a sum in another
    order rounds differently."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        onednn_order.check(kernels)
        kernels.exact_order = "onednn"
        return
    if not kernels.matvec_exact_avx2 or capability != "AVX2":
        raise KernelError(f"torch sums its bfloat16 products with {capability} vectors here, and the exact kernel"
                          " reproduces ATen's AVX2 order and oneDNN's AVX-512 BF16 one"
                          f"{'' if kernels.matvec_exact_avx2 else ' (not built: no AVX2)'}")
    try:  # what transformers' experts forward multiplies with (a private name: a release may move it)
        from transformers.integrations.moe import _grouped_mm
    except ImportError as exc:
        raise KernelError(f"transformers has no grouped matmul to compare the exact kernel with ({exc})") from exc

    gen = torch.Generator().manual_seed(0)
    shapes = ((1, 96, 2048), (2, 40, 1000), (3, 33, 77), (4, 64, 2816), (1, 9, 8), (2, 17, 136),
              (EXACT_DENSE_ROWS, 24, 1024))
    for m, rows, cols in shapes:
        slots, x = order_probe(gen, m, rows, cols)
        weight, bias = slots[1, :, :cols], torch.randn(rows, generator=gen).to(torch.bfloat16)
        out = torch.empty(m, rows)
        kernels.matvec(weight, x, out, exact=True)
        got = out.to(torch.bfloat16)
        wants = [F.linear(x, weight)]
        if cols % 8 == 0:  # (torch's grouped matmul takes strides of 16 bytes; transformers multiplies others by mm)
            offs = torch.tensor([m], dtype=torch.int32)
            wants.append(_grouped_mm(x, slots[1:, :, :cols].contiguous().transpose(-2, -1), offs))
        if not all(torch.equal(got, want) for want in wants) \
                or not torch.equal((out + bias.float()).to(torch.bfloat16), F.linear(x, weight, bias)):
            raise KernelError(f"the exact matrix-vector kernel's products differ from torch's here ({m} x {rows} x"
                              f" {cols}): torch sums in another order")
    kernels.exact_order = "aten-avx2"
    try:
        _check_exact_fp8(kernels)
    except KernelError as exc:
        log.warning("%s: block-FP8 experts are dequantized into rows first", exc)
    else:
        kernels.matvec_exact_fp8 = True
    for xw in (False, True):
        try:
            _check_exact_mxfp4(kernels, xw)
        except KernelError as exc:
            log.warning("%s: MXFP4 experts%s are dequantized into rows first", exc, " held [in, out]" if xw else "")
        else:
            setattr(kernels, "matvec_exact_mxfp4_xw" if xw else "matvec_exact_mxfp4", True)


def _check_exact_fp8(kernels) -> None:
    """The AVX2 exact kernel on FP8 slots gives, bit for bit, the exact kernel's products of the dequantized weight
    (checked against torch above): every byte (zero, subnormals and the largest values among them), scales from
    1e-31 to 3e30 (beyond what its shortcut takes too), blocks of 64 and 128 columns, 1-4 and 16 input rows, on
    ``order_probe``'s kind of input (a large product at the first column cancelled at the last)."""
    from services.worker.quant import fp8_block_table, fp8_table

    gen = torch.Generator().manual_seed(0)
    table = fp8_table()
    for m, rows, cols, block_r, block_c in ((1, 24, 512, 8, 128), (2, 12, 256, 3, 64), (3, 48, 1024, 16, 128),
                                            (4, 24, 384, 8, 64), (EXACT_DENSE_ROWS, 12, 256, 4, 128)):
        grid_r, grid_c = rows // block_r, cols // block_c
        values = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=gen)
        values[: rows // 2] |= 0x08  # no zero or subnormal byte in the first half: the shortcut's rows
        values[(values & 0x7F) == 0x7F] = 0x7E  # no NaN: a NaN weight makes every sum NaN
        values[:, 0], values[:, -1] = 0x38, 0xB8  # +-1 times the scale, the same at both ends of a row
        scales = (1 + torch.rand(grid_r, grid_c, generator=gen)) * 2.0 ** -7
        scales[0], scales[-1] = 1e-31, 3e30  # beyond 2^-100..2^100: decoded by the table
        scales[:, -1] = scales[:, 0]
        index = values.long() + 256 * ((torch.arange(rows) // block_r).view(-1, 1) * grid_c
                                       + (torch.arange(cols) // block_c).view(1, -1))
        weight = fp8_block_table(scales, torch.bfloat16).view(-1)[index]
        x = torch.randn(m, cols, generator=gen)
        x[:, 0] = x[:, -1] = 2.0 ** 25  # 2^18 times a product or so: about half the rows round otherwise in
        x = x.to(torch.bfloat16)  # another order
        got, want = torch.empty(m, rows), torch.empty(m, rows)
        kernels.matvec(weight, x, want, exact=True)
        if not kernels.matvec_fp8(values, scales, table, (block_r, block_c), x, got, exact=True) \
                or not torch.equal(got, want):
            raise KernelError(f"the exact FP8 matrix-vector kernel's products differ from those of the dequantized"
                              f" weight ({m} x {rows} x {cols}, {block_r} x {block_c} blocks)")


def _check_exact_mxfp4(kernels, xw: bool) -> None:
    """The AVX2 exact kernels on MXFP4 slots give, bit for bit, torch's products of the dequantized weight: ``xw``,
    ``x @ W`` for the ``[in, out]`` weight (as transformers holds GPT-OSS's experts; and its grouped matmul), else
    ``F.linear`` for the ``[out, in]`` one; 1-4 and 16 input rows (``xw``: up to 1024), GPT-OSS's width, on
    inputs where another order rounds otherwise (a large product at the first input cancelled at the last); and
    with one-hot inputs each output is the dequantization's weight, for every code under scale bytes 2..252."""
    from services.worker.quant import mxfp4_pairs, mxfp4_reference

    gen = torch.Generator().manual_seed(0)
    from transformers.integrations.moe import _grouped_mm

    shapes = ((1, 64, 512), (2, 40, 192), (3, 16, 1024), (4, 24, 256), (EXACT_DENSE_ROWS, 8, 128), (1, 128, 2880))
    for m, rows, cols in shapes + (((64, 32, 2880), (256, 16, 256), (1024, 8, 64)) if xw else ()):  # (prompts')
        blocks = torch.randint(0, 256, (rows, cols // 32, 16), dtype=torch.uint8, generator=gen)
        blocks[:, 0, 0] = (blocks[:, 0, 0] & 0xF0) | 0x2  # +1 (code 2) at the first input, -1 (code 10) at the last
        blocks[:, -1, -1] = (blocks[:, -1, -1] & 0x0F) | 0xA0
        scales = torch.randint(118, 136, (rows, cols // 32), dtype=torch.uint8, generator=gen)
        scales[:, -1] = scales[:, 0]
        scales[0, 1], scales[-1, 1] = 2, 240  # (sums within float32's range)
        weight = mxfp4_reference(blocks.view(-1, 16), scales.view(-1), mxfp4_pairs(torch.bfloat16))
        weight = weight.view(torch.bfloat16).view(rows, cols)
        x = torch.randn(m, cols, generator=gen)
        x[:, 0] = x[:, -1] = 2.0 ** 20
        x = x.to(torch.bfloat16)
        out = torch.empty(m, rows)
        wants = [x @ weight.T.contiguous(), _grouped_mm(x, weight.T.contiguous()[None],
                                                        torch.tensor([m], dtype=torch.int32))] if xw \
            else [F.linear(x, weight)]
        if not kernels.matvec_mxfp4(blocks, scales, x, out, exact=True, xw=xw) \
                or not all(torch.equal(out.to(torch.bfloat16), want) for want in wants):
            raise KernelError(f"the exact MXFP4 matrix-vector kernel's products differ from torch's"
                              f" {'x @ W' if xw else 'F.linear'} here ({m} x {rows} x {cols})")
    blocks, scales = _mxfp4_codes()
    if not _mxfp4_one_hot(blocks, scales, lambda x, out: kernels.matvec_mxfp4(blocks, scales, x, out, exact=True,
                                                                            xw=xw)):
        raise KernelError("the exact MXFP4 matrix-vector kernel's weights differ from the dequantization's")


def order_probe(gen: torch.Generator, m: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slots [2, rows, cols + 24], x [m, cols])``, bfloat16: normal values, but for the first and last column
    (inputs 1, weights +-2^18), which cancel only as the sum ends; meanwhile the small products added next to
    2^18 lose their low bits, so a sum in another order than torch's gives another bfloat16 in about half the rows
    (random inputs alone round alike in almost every order)."""
    slots = torch.randn(2, rows, cols + 24, generator=gen)
    x = torch.randn(m, cols, generator=gen)
    if cols >= 2:
        slots[1, :, 0], slots[1, :, cols - 1] = 2.0 ** 18, -2.0 ** 18
        x[:, 0] = x[:, cols - 1] = 1.0
    return slots.to(torch.bfloat16), x.to(torch.bfloat16)


def _check_bf16(kernels) -> None:
    """The bf16 kernel within float32 rounding of float64 products: 1-5 input rows, widths with and without a tail,
    row counts that are no multiple of the kernel's 8, a strided weight (a pool slot)."""
    gen = torch.Generator().manual_seed(0)
    for m, rows, cols in ((1, 8, 32), (2, 13, 40), (3, 67, 1000), (4, 24, 33), (5, 130, 256)):
        slots = torch.randn(2, rows, cols + 8, generator=gen).to(torch.bfloat16)
        weight = slots[1, :, :cols]  # row stride cols + 8
        x = torch.randn(m, cols, generator=gen).to(torch.bfloat16)
        ref = x.double() @ weight.double().T
        out = torch.empty(m, rows)
        kernels.matvec(weight, x, out)
        bound = 1e-5 * (x.double().abs() @ weight.double().abs().T) + 1e-30
        if not bool(((out.double() - ref).abs() <= bound).all()):
            raise KernelError(f"the built matrix-vector kernel is wrong ({m} x {rows} x {cols}): not used")


def _check_fp8(kernels) -> None:
    """The block-FP8 kernel's weights are the dequantization's bits: with one-hot inputs each output is one weight
    exactly (scales from 1e-3 to 7e35; subnormal weights excepted, which AVX-512 BF16 reads as zero, like the bf16
    kernel; AVX2 keeps them), and on random inputs it is a float32 sum of the products."""
    from services.worker.quant import fp8_block_table, fp8_table

    gen = torch.Generator().manual_seed(0)
    table = fp8_table()
    values = torch.randint(0, 256, (128, 256), dtype=torch.uint8, generator=gen)
    values[(values & 0x7F) == 0x7F] = 0  # no NaN bytes: a NaN weight makes every sum NaN
    scales = torch.tensor([[1e-3, 3.0], [7.3e35, 0.37]], dtype=torch.float32)
    index = values.view(2, 64, 2, 128).long() + (torch.arange(4) * 256).view(2, 1, 2, 1)
    weight = fp8_block_table(scales, torch.bfloat16).view(-1)[index].view(128, 256)
    x = torch.eye(256, dtype=torch.bfloat16)
    for lo in range(0, 256, 4):
        out = torch.empty(4, 128)
        if not kernels.matvec_fp8(values, scales, table, (64, 128), x[lo:lo + 4], out) \
                or not torch.equal(out, weight[:, lo:lo + 4].T.float()):
            raise KernelError("the built FP8 matrix-vector kernel's weights differ from the dequantization's: not used")
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    out = torch.empty(3, 128)
    scales = torch.tensor([[1e-3, 3.0], [0.5, 0.37]], dtype=torch.float32)  # sums within float32's range
    weight = fp8_block_table(scales, torch.bfloat16).view(-1)[index].view(128, 256)
    kernels.matvec_fp8(values, scales, table, (64, 128), x, out)
    want = x.double() @ weight.double().T
    if not bool(((out.double() - want).abs() <= 1e-5 * (x.double().abs() @ weight.double().abs().T)).all()):
        raise KernelError("the built FP8 matrix-vector kernel's sums are wrong: not used")


def _check_mxfp4(kernels) -> None:
    """The MXFP4 kernel's weights are the dequantization's bits (one-hot inputs, every code under scales 2..252),
    and a scale outside that range is declined."""
    blocks, scales = _mxfp4_codes()
    if not _mxfp4_one_hot(blocks, scales, lambda x, out: kernels.matvec_mxfp4(blocks, scales, x, out)):
        raise KernelError("the built MXFP4 matrix-vector kernel's weights differ from the dequantization's: not"
                          " used")
    scales[3, 1] = 253
    if kernels.matvec_mxfp4(blocks, scales, torch.eye(1, 128, dtype=torch.bfloat16), torch.empty(1, 8)):
        raise KernelError("the built MXFP4 matrix-vector kernel took a scale it cannot compute: not used")


def _mxfp4_codes() -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 ``(blocks [8, 4, 16], scales [8, 4])``: every byte twice, under scale bytes 2..252."""
    blocks = torch.arange(256, dtype=torch.uint8).repeat(2).view(8, 4, 16)
    scales = torch.tensor([2, 60, 126, 127, 128, 200, 251, 252] * 4, dtype=torch.uint8).view(8, 4)
    return blocks, scales


def _mxfp4_one_hot(blocks: torch.Tensor, scales: torch.Tensor, product) -> bool:
    """Does ``product(x, out)`` (x: 4 one-hot bfloat16 rows of 128) give each weight of ``blocks`` under ``scales``
    exactly as the dequantization does, for all 128 columns?"""
    from services.worker.quant import mxfp4_pairs, mxfp4_reference

    weight = mxfp4_reference(blocks.view(-1, 16), scales.view(-1), mxfp4_pairs(torch.bfloat16))
    weight = weight.view(torch.bfloat16).view(8, 128).float()
    x = torch.eye(128, dtype=torch.bfloat16)
    for lo in range(0, 128, 4):
        out = torch.empty(4, 8)
        if not product(x[lo:lo + 4], out) or not torch.equal(out, weight[:, lo:lo + 4].T):
            return False
    return True
