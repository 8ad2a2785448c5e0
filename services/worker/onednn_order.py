"""The exact matrix-vector kernel on an AVX-512 BF16 CPU: oneDNN's summation order, found per product shape.

There torch gives its bfloat16 linears and grouped matmuls to oneDNN's brgemm matmul, which sums each output over
the input's columns in pairs (one ``vdpbf16ps`` each: the odd column's product added first), in blocks of columns
that each start from zero, the blocks' sums added in order (``matvec_onednn.c``'s ``moeinf_mv_onednn_nt`` does the
same, 16 outputs at a time). The block's width is oneDNN's choice, from the number of input rows and the width
(measured here: 512 columns for one row; 512 or 1024 for more); and where the output is too narrow to share among
torch's threads, oneDNN splits the sum among them too, which the kernel does not. So ``Blocks.of`` finds the width
once per shape (output rows, input columns, row stride, input rows, torch's threads): on a probe of that shape
where a sum in another order rounds differently (``matvec_checks.order_probe`` tiled to the real width, or to
``PROBE_ROWS`` rows plus the width's last partial 64 for a wider one: measured, a wider output was summed in the
same blocks, having only more to share among the threads), the first of ``CANDIDATES`` whose products equal
``F.linear``'s (with and without a bias), ``x @ W`` for the weight stored ``[in, out]`` and transformers' grouped
matmul's, bit for bit. A shape where none does keeps torch's own product.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

try:  # what transformers' experts forward multiplies with (a private name: a release may move it; check() says so)
    from transformers.integrations.moe import _grouped_mm
except ImportError:  # pragma: no cover - depends on the installed transformers
    _grouped_mm = None

log = logging.getLogger("moeinf.worker")
CANDIDATES = (512, 1024, 256, 2048, 4096, 128, 64, 32)  # column blocks tried, most likely first (multiples of 32)
PROBE_ROWS = 1024  # output rows of a probe at most (the shapes measured gave a wider output the same block)
MAX_SHAPES = 512  # shapes remembered: a model has a few dozen (linears' shapes x input rows)
FP8_BLOCK_MAX = 1024  # the widest block the FP8 kernel's buffer takes (matvec_onednn.c's MVO_STAGE)


class Blocks:
    """The column block oneDNN sums each product shape in, found on first use (``None``: not one the kernel
    reproduces; torch's product then)."""

    def __init__(self, kernels):
        self.kernels = kernels
        self.found: dict[tuple[int, int, int, int, int, bool], int | None] = {}
        self.full_noted = False

    def of(self, weight: torch.Tensor, m: int, linear_only: bool = False) -> int | None:
        return self.of_shape(*weight.shape, weight.stride(0), m, linear_only)

    def of_shape(self, rows: int, cols: int, ld: int, m: int, linear_only: bool = False) -> int | None:
        """The block for ``m`` input rows times a ``[rows, cols]`` weight whose rows lie ``ld`` apart (``linear_only``:
        as ``F.linear`` without a bias sums it, the only product a router's weight meets)."""
        key = (rows, cols, ld, m, torch.get_num_threads(), linear_only)
        if key not in self.found:
            if len(self.found) >= MAX_SHAPES:
                if not self.full_noted:
                    self.full_noted = True
                    log.warning("the exact kernel has met %d product shapes (onednn_order.MAX_SHAPES); new ones keep"
                                " torch's products", MAX_SHAPES)
                return None
            self.found[key] = discover(self.kernels, *key[:4], linear_only=linear_only)
            if self.found[key] is None:
                log.info("the exact kernel leaves %d x %d x %d products to torch: oneDNN sums them in another order",
                         m, rows, cols)
        return self.found[key]


def discover(kernels, rows: int, cols: int, ld: int, m: int, linear_only: bool = False) -> int | None:
    """The first of ``CANDIDATES`` with which the kernel gives torch's products on a probe of this shape (with
    ``linear_only``, ``F.linear``'s alone: oneDNN may sum the other calls of a narrow shape otherwise), or None."""
    from services.worker.matvec_checks import order_probe

    if cols % 2 or cols < 2:
        return None
    rows = rows if rows <= PROBE_ROWS else PROBE_ROWS + rows % 64
    gen = torch.Generator().manual_seed(rows * 65537 + cols * 17 + m)
    tile, x = order_probe(gen, m, min(rows, 64), cols)
    storage = torch.empty(rows, max(ld, cols), dtype=torch.bfloat16)  # the real row stride (a pool slot's)
    weight = storage[:, :cols]
    weight.copy_(tile[1, :, :cols].repeat((rows + 63) // 64, 1)[:rows])
    bias = torch.randn(rows, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        wants = [F.linear(x, weight), x @ weight.T.contiguous()]  # [in, out] weights too (GPT-OSS's experts)
        biased = F.linear(x, weight, bias)  # oneDNN adds a bias to the float32 sum, then rounds once
        if linear_only:
            wants, biased, bias = wants[:1], None, None
        elif cols % 8 == 0 and storage.stride(0) % 8 == 0:  # transformers' experts' call (16-byte strides only)
            wants.append(_grouped_mm(x, weight.unsqueeze(0).transpose(-2, -1), torch.tensor([m], dtype=torch.int32)))
    out = torch.empty(m, rows)
    for block in CANDIDATES:
        kernels.matvec(weight, x, out, exact=True, block=block)
        got = out.to(torch.bfloat16)
        if all(torch.equal(got, want) for want in wants) \
                and (biased is None or torch.equal((out + bias.float()).to(torch.bfloat16), biased)):
            return block
    return None


def check(kernels) -> None:
    """What the oneDNN order needs: the kernel built (AVX-512 BF16) and finding torch's products on decode-sized
    shapes (1, 2 and 16 input rows, a pool slot's strided rows); a CPU where oneDNN multiplies otherwise (AMX, say)
    fails here, with the shape."""
    from services.worker.dequant_kernel import KernelError

    if _grouped_mm is None:
        raise KernelError("transformers has no grouped matmul (transformers.integrations.moe._grouped_mm) to compare"
                          " the exact kernel with")
    if not kernels.matvec_exact_onednn:
        raise KernelError("torch sums its bfloat16 products with AVX512 vectors here (oneDNN's kernels), and the"
                          " exact kernel for their order was not built (no AVX-512 BF16)")
    for m, rows, cols, ld in ((1, 256, 2048, 2048 + 64), (2, 256, 2816, 2816), (16, 256, 1024, 1024)):
        if discover(kernels, rows, cols, ld, m) is None:
            raise KernelError(f"the exact matrix-vector kernel's products differ from torch's here ({m} x {rows} x"
                              f" {cols}): oneDNN sums them in an order it does not reproduce")
    if kernels.matvec_exact_onednn_fp8 and not fp8_is_exact(kernels):
        log.warning("the exact FP8 kernel's products differ from torch's on the dequantized weight: FP8 experts are"
                    " dequantized, then multiplied")
        kernels.matvec_exact_onednn_fp8 = False
    if kernels.matvec_exact_onednn_mxfp4 and not mxfp4_is_exact(kernels):
        log.warning("the exact MXFP4 kernel's products differ from torch's on the dequantized weight: MXFP4 experts"
                    " are dequantized, then multiplied")
        kernels.matvec_exact_onednn_mxfp4 = False


def fp8_probe(gen: torch.Generator, m: int, rows: int, cols: int):
    """``(values, scales, weight, x)``: a block-FP8 ``[rows, cols]`` weight in 128 x 128 blocks (``weight``: its
    dequantization, as transformers computes it) whose first and last columns hold +-448 x 512 and nothing else in
    their column blocks, so that, as in ``matvec_checks.order_probe``, a sum in another order rounds differently."""
    from services.worker.quant import fp8_block_table

    values = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=gen)
    values[(values & 0x7F) == 0x7F] = 0  # no NaN
    scales = torch.rand(rows // 128, cols // 128, generator=gen) * 0.02 + 1e-3
    values[:, :128] = values[:, -128:] = 0
    values[:, 0], values[:, -1] = 0x7E, 0xFE  # +448, -448
    scales[:, 0] = scales[:, -1] = 512.0
    table = fp8_block_table(scales, torch.bfloat16).view(-1)
    block = (torch.arange(rows).view(-1, 1) // 128) * (cols // 128) + torch.arange(cols).view(1, -1) // 128
    weight = table[block * 256 + values.long()]
    x = torch.randn(m, cols, generator=gen)
    x[:, 0] = x[:, -1] = 1.0
    return values, scales, weight, x.to(torch.bfloat16)


def fp8_is_exact(kernels) -> bool:
    """The FP8 kernel gives ``F.linear``'s bits on the dequantized weight, on ``fp8_probe``'s, 1, 2 and 5 input
    rows."""
    from services.worker.quant import fp8_table

    gen = torch.Generator().manual_seed(0)
    for m in (1, 2, 5):
        values, scales, weight, x = fp8_probe(gen, m, 256, 1024)
        block = discover(kernels, 256, 1024, 1024, m)
        out = torch.empty(m, 256)
        if block is None or not kernels.matvec_fp8(values, scales, fp8_table(), (128, 128), x, out, exact_block=block) \
                or not torch.equal(out.to(torch.bfloat16), F.linear(x, weight)):
            return False
    return True


def mxfp4_probe(gen: torch.Generator, m: int, rows: int, cols: int):
    """``(blocks, scales, weight, x)``: an MXFP4 ``[rows, cols]`` weight (``weight``: its dequantization) whose first
    and last columns hold +-6 x 2^16 and nothing else in their 32-column blocks, scale bytes 110..134 elsewhere but
    for every 7th row's second block (1: outside the computed 2..252, from the table), so that another summation
    order rounds otherwise and both of the kernel's paths run."""
    from services.worker.quant import mxfp4_pairs, mxfp4_reference

    blocks = torch.randint(0, 256, (rows, cols // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 135, (rows, cols // 32), dtype=torch.uint8, generator=gen)
    scales[::7, 1] = 1
    blocks[:, 0], blocks[:, -1] = 0, 0
    blocks[:, 0, 0], blocks[:, -1, 15] = 0x07, 0xF0  # column 0: +6, the last column: -6
    scales[:, 0] = scales[:, -1] = 127 + 16
    weight = mxfp4_reference(blocks.view(-1, 16), scales.view(-1), mxfp4_pairs(torch.bfloat16))
    x = torch.randn(m, cols, generator=gen)
    x[:, 0] = x[:, -1] = 1.0
    return blocks, scales, weight.view(torch.bfloat16).view(rows, cols), x.to(torch.bfloat16)


def mxfp4_is_exact(kernels) -> bool:
    """The MXFP4 kernel gives ``F.linear``'s bits on the dequantized weight, on ``mxfp4_probe``'s, 1, 2 and 5 input
    rows, 200 output rows (the last 8 past a group of 16) and 2880 columns (a short last column block)."""
    from services.worker.quant import mxfp4_pairs

    gen = torch.Generator().manual_seed(0)
    pairs = mxfp4_pairs(torch.bfloat16).view(torch.int32)
    for m in (1, 2, 5):
        blocks, scales, weight, x = mxfp4_probe(gen, m, 200, 2880)
        block = discover(kernels, 200, 2880, 2880, m)
        out = torch.empty(m, 200)
        if block is None or not kernels.matvec_mxfp4(blocks, scales, x, out, exact_block=block, pairs=pairs) \
                or not torch.equal(out.to(torch.bfloat16), F.linear(x, weight)):
            return False
    return True
