"""The compiled matrix-vector kernels' calls (``matvec.c``, ``matvec_exact.c``, ``matvec_exact_xw.c``,
``matvec_onednn.c``, entered through ``matvec_threads.c``), as methods of ``dequant_kernel.Kernels``: each checks its
tensors' layout and calls the library (``self.lib``) with the GIL released, once, the kernel sharing the output rows
among the threads itself (``Kernels.rows``; without OpenMP on torch's runtime, Python's threads split the call)."""
from __future__ import annotations

import torch


class MatvecCalls:
    """Mixed into ``dequant_kernel.Kernels``, which provides ``lib`` and ``rows``."""

    def matvec(self, weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor, exact: bool = False,
               block: int = 0) -> None:
        """``out[j] = weight @ x[j]`` (float32 sums, ``matvec.c``; ``exact``: in torch's order, ``matvec_exact.c``:
        ATen's AVX2 order, or with ``block`` oneDNN's, in blocks of that many columns, ``onednn_order.py``):
        ``weight`` bfloat16 ``[out, in]``, rows contiguous (any row stride: a pool slot's view); ``x`` ``[m, in]``
        bfloat16 and ``out`` ``[m, out]`` float32, both contiguous. The weight streams from memory once."""
        rows, cols = weight.shape
        m = x.shape[0]
        if weight.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or out.dtype != torch.float32 \
                or weight.stride(1) != 1 or not x.is_contiguous() or not out.is_contiguous() \
                or x.shape[1] != cols or tuple(out.shape) != (m, rows):
            raise ValueError(f"matvec kernel: {list(weight.shape)} {weight.dtype} weight (strides {weight.stride()}),"
                             f" {list(x.shape)} {x.dtype} input, {list(out.shape)} {out.dtype} output")
        w, ld, xp, o = weight.data_ptr(), weight.stride(0), x.data_ptr(), out.data_ptr()
        if not exact:
            fn = self.lib.moeinf_mv_bf16_nt
            self.rows(rows, lambda lo, hi, t: fn(w, ld, xp, m, cols, lo, hi, o, rows, t), align=64)
            return
        failed: list[int] = []
        if block:
            fn = self.lib.moeinf_mv_onednn_nt
            self.rows(rows, lambda lo, hi, t: fn(w, ld, xp, m, cols, lo, hi, o, rows, block, t) and failed.append(lo),
                      align=16)
        else:
            fn = self.lib.moeinf_mv_exact_nt
            self.rows(rows, lambda lo, hi, t: fn(w, ld, xp, m, cols, lo, hi, o, rows, t) and failed.append(lo))
        if failed:
            raise MemoryError(f"matvec_exact.c: no memory for a {m} x {cols} input copy, no AVX2 (AVX-512 BF16 with"
                              f" a block) in this build, or a {cols}-column product in {block}-column blocks")

    def matvec_fp8(self, values: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, block: tuple[int, int],
                   x: torch.Tensor, out: torch.Tensor, exact: bool = False, exact_block: int = 0) -> bool:
        """``out[j] = W @ x[j]`` for a block-FP8 weight ``W`` = ``values`` ``[out, in]`` (bytes, rows contiguous) under
        ``scales`` (``[out / block_r, in / block_c]`` float32, contiguous), each value ``table[byte] * scale``
        rounded to bfloat16 as the dequantization does, but in registers: nothing is written but ``out``. False when
        the layout is not one the kernel takes (AVX-512 VBMI and BF16: widths multiples of 64, ``block_r`` of 8, at
        most 64 column blocks; AVX2: ``block_c`` a multiple of 32; up to 4 rows of ``x``), or the CPU has neither.
        ``exact``: summed in ATen's AVX2 order (``matvec_exact.c``: ``cols`` and ``block_c`` multiples of 64, any
        number of rows of ``x``), or with ``exact_block`` in oneDNN's order in blocks of that many columns
        (``matvec_onednn.c``: AVX-512 BF16 and VBMI; ``block_r`` a multiple of 16, up to 256 column blocks)."""
        rows, cols = values.shape
        m = x.shape[0]
        if values.element_size() != 1 or values.stride(1) != 1 or scales.dtype != torch.float32 \
                or not scales.is_contiguous() or x.dtype != torch.bfloat16 or not x.is_contiguous() \
                or x.shape[1] != cols or out.dtype != torch.float32 or tuple(out.shape) != (m, rows) \
                or not out.is_contiguous() or table.dtype != torch.float32 or table.numel() != 256 \
                or min(block) < 1 or rows % block[0] or cols % block[1] \
                or scales.numel() != (rows // block[0]) * (cols // block[1]):
            raise ValueError(f"fp8 matvec kernel: {list(values.shape)} {values.dtype} values, {list(scales.shape)}"
                             f" {scales.dtype} scales, {list(x.shape)} {x.dtype} input, {list(out.shape)} output")
        v, ld, s, t, xp, o = values.data_ptr(), values.stride(0), scales.data_ptr(), table.data_ptr(), \
            x.data_ptr(), out.data_ptr()
        codes = []
        if exact and not exact_block:
            self._aten_order()
            fn = self.lib.moeinf_mv_exact_fp8_nt
            self.rows(rows, lambda lo, hi, n: codes.append(fn(v, ld, s, t, block[0], block[1], xp, m, cols, lo, hi, o,
                                                              rows, n)))
        elif exact_block:
            fn = self.lib.moeinf_mv_onednn_fp8_nt
            self.rows(rows, lambda lo, hi, n: codes.append(fn(v, ld, s, t, block[0], block[1], xp, m, cols, lo, hi, o,
                                                              rows, exact_block, n)), align=16)
        else:
            fn = self.lib.moeinf_mv_fp8_nt
            self.rows(rows, lambda lo, hi, n: codes.append(fn(v, ld, s, t, block[0], block[1], xp, m, cols, lo, hi, o,
                                                              rows, n)), align=64)
        return all(code == 0 for code in codes)

    def matvec_mxfp4(self, blocks: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, out: torch.Tensor,
                     exact: bool = False, xw: bool = False, exact_block: int = 0,
                     pairs: torch.Tensor | None = None) -> bool:
        """``out[j] = W @ x[j]`` for an MXFP4 weight ``W`` ``[rows, K]`` stored as ``blocks`` ``[rows, K / 32, 16]``
        and ``scales`` ``[rows, K / 32]`` (bytes; each row contiguous), decoded into bfloat16 in registers with
        the dequantization's bits. False when a scale byte is outside 2..252 (the kernel computes only those; the
        caller dequantizes instead) or the CPU has neither AVX-512 BF16 nor AVX2 with FMA. ``exact``: summed in
        ATen's AVX2 dot order (``matvec_exact.c``; K a multiple of 64) or, ``xw``, as ATen sums ``x @ W`` for the
        ``[K, rows]`` dequantized weight (``matvec_exact_xw.c``; an even number of rows); or with ``exact_block``
        in oneDNN's order in blocks of that many columns (``matvec_onednn.c``; every scale, ``pairs`` being
        ``quant.mxfp4_pairs(torch.bfloat16)``)."""
        rows, groups, half = blocks.shape
        m = x.shape[0]
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or half != 16 or tuple(scales.shape) != (
                rows, groups) or blocks.stride(2) != 1 or blocks.stride(1) != 16 or scales.stride(1) != 1 \
                or x.dtype != torch.bfloat16 or not x.is_contiguous() or x.shape[1] != groups * 32 \
                or out.dtype != torch.float32 or tuple(out.shape) != (m, rows) or not out.is_contiguous() \
                or (exact_block and (pairs is None or pairs.dtype != torch.int32 or pairs.numel() != 65536)):
            raise ValueError(f"mxfp4 matvec kernel: {list(blocks.shape)} blocks, {list(scales.shape)} scales,"
                             f" {list(x.shape)} {x.dtype} input, {list(out.shape)} output")
        b, ld, s, lds, xp, o = blocks.data_ptr(), blocks.stride(0), scales.data_ptr(), scales.stride(0), \
            x.data_ptr(), out.data_ptr()
        codes = []
        if exact and not exact_block:  # ATen's orders: its dots, or x @ W for the [in, out] dequantized weight
            self._aten_order()
            fn = self.lib.moeinf_mv_exact_xw_mxfp4 if xw else self.lib.moeinf_mv_exact_mxfp4_nt
            self.rows(rows, lambda lo, hi, t: codes.append(fn(b, ld, s, lds, xp, m, groups * 32, lo, hi, o, rows, t)),
                      align=8 if xw else 1)
        elif exact_block:
            fn, t = self.lib.moeinf_mv_onednn_mxfp4_nt, pairs.data_ptr()
            self.rows(rows, lambda lo, hi, n: codes.append(fn(b, ld, s, lds, t, xp, m, groups * 32, lo, hi, o, rows,
                                                              exact_block, n)), align=16)
        else:
            fn = self.lib.moeinf_mv_mxfp4_nt
            self.rows(rows, lambda lo, hi, t: codes.append(fn(b, ld, s, lds, xp, m, groups * 32, lo, hi, o, rows, t)),
                      align=64)
        return all(code == 0 for code in codes)

    def _aten_order(self) -> None:
        """``exact`` without a block is ATen's AVX2 order: refused where torch sums in oneDNN's (a block is needed)."""
        if getattr(self, "exact_order", None) == "onednn":
            raise ValueError("an exact product without oneDNN's column block, where torch sums in oneDNN's order")
