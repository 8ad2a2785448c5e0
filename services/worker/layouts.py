"""The layout of the worker's weights for its kernels: 4 KiB-aligned buffers for the dequantized rows
(``aligned_empty``), dense rows spread apart where their length would make the kernels' 16 row streams collide in
the cache (``spread_rows``), and whether a transposed view of ``[out, in]`` rows multiplies with the bits of the same
weight stored ``[in, out]``.

GPT-OSS holds its experts ``[in, out]``; the MXFP4 blocks dequantize into ``[out, in]`` rows (their own order), and
``quant.QuantParam`` hands the grouped matmul their transposed view. With oneDNN on AVX-512 CPUs that view and
transformers' contiguous ``[in, out]`` parameter give the same bits at the same speed. With AVX2 only, oneDNN takes
another kernel for the contiguous weight (~25x slower, measured on Zen 3) whose sums round differently, so the
worker's tokens would drift from transformers' ``dequantize=True`` model: there the rows are copied into
``[in, out]`` as transformers holds them (exact, and as slow as transformers). ``transposed_view_is_exact`` probes
this once per shape, on random weights, for the token counts a decode step or a prompt routes to one expert."""
from __future__ import annotations

import ctypes
import functools
import logging

import torch
from transformers.integrations.moe import _grouped_linear

log = logging.getLogger("moeinf.worker")
PROBE_TOKENS = (1, 2, 3, 4, 16, 64, 512)  # per call, split over two experts: decode steps and prompts (a tiny
# shape on Zen 3 first differed at 512; a prompt routing more than 256 tokens to one expert is beyond the probe)
ALIGN = 4096  # scratch rows start 4 KiB aligned, like pool slots: the matmul kernels take the same path
SPREAD_PERIOD, SPREAD_BYTES = 2048, 64  # dense rows this long (a multiple) are spread this much (``spread_rows``)


@functools.cache
def transposed_view_is_exact(shape: tuple[int, int], dtype: torch.dtype) -> bool:
    """Does ``_grouped_linear`` (transformers' expert product) give the same bits for an ``[in, out]`` weight of
    ``shape`` as a transposed view of ``[out, in]`` rows as it does contiguous, for every probed token count? (At the
    torch thread count of the moment: the worker's, set before the model loads.)"""
    k, n = shape
    gen = torch.Generator().manual_seed(0)
    stored, contiguous = aligned_empty((2, n, k), dtype), aligned_empty((2, k, n), dtype)  # as the rows lie
    stored.copy_(torch.randn(2, n, k, generator=gen))
    view = stored.transpose(1, 2)
    contiguous.copy_(view)
    for m in PROBE_TOKENS:
        x = torch.randn(m, k, generator=gen).to(dtype)
        offs = torch.tensor([m // 2, m], dtype=torch.int32)
        if not torch.equal(_grouped_linear(x, view, offs, is_transposed=True),
                           _grouped_linear(x, contiguous, offs, is_transposed=True)):
            log.warning("this CPU's grouped matmul rounds a transposed %s weight %s otherwise than a contiguous one"
                        " (%d tokens): dequantized MXFP4 rows are copied into [in, out] to keep transformers' bits,"
                        " as slowly as transformers multiplies them here (--matvec-kernel fast multiplies the blocks"
                        " themselves, in another summation order)", dtype, list(shape), m)
            return False
    return True


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    nbytes = n * dtype.itemsize
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip:skip + nbytes].view(dtype).view(shape)


def kernel_linear(module, skip_widths: set[int]) -> bool:
    """Is ``module`` a bfloat16 ``nn.Linear`` the CPU kernels multiply: not one ``skip_widths`` wide (the routers,
    the experts' count, and shared-expert gates, 1: they keep ``F.linear``, so routing is decided as transformers
    decides it)? Its rows are spread at load (``loader``) or after (``matvec.wrap_dense``) by this same rule."""
    weight = getattr(module, "weight", None)  # (a linear --prepack-dense packed may hold none)
    return type(module) is torch.nn.Linear and isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16 \
        and module.out_features not in skip_widths


def router_widths(layers) -> set[int]:
    """The widths ``kernel_linear`` leaves to ``F.linear``: 1 and every MoE layer's expert count."""
    return {1, *(layer.num_experts for layer in layers)}


def spreads(weight: torch.Tensor) -> bool:
    """Rows a multiple of ``SPREAD_PERIOD`` bytes long (where ``spread_rows`` pays), 2-D, contiguous."""
    return weight.dim() == 2 and weight.is_contiguous() \
        and weight.shape[1] * weight.element_size() % SPREAD_PERIOD == 0


def spread_rows(weight: torch.Tensor) -> torch.Tensor:
    """A copy of a 2-D ``weight`` whose rows lie ``SPREAD_BYTES`` further apart (a view of the first columns of a
    wider buffer: the same values, the same shape, rows contiguous). The kernels read 16 rows side by side; rows a
    multiple of 4 KiB apart fall into the same sets of the first-level cache, and the 16 streams evict each other's
    prefetched lines: ``[2048, 2048]`` bfloat16 read at 21.5 GB/s as stored and 29.6 spread, ``[1024, 4096]`` 23.3
    and 31.6, on one core here (docs/benchmarks.md, ``bench profile``). ``F.linear`` gives the same bits for it, at
    the same speed (oneDNN reads strided rows as they lie); memory grows by 64 bytes a row."""
    rows, cols = weight.shape
    pad = SPREAD_BYTES // weight.element_size()
    wide = torch.empty(rows, cols + pad, dtype=weight.dtype, device=weight.device)
    wide[:, cols:].zero_()
    view = wide[:, :cols]
    view.copy_(weight)
    return view


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing): the weights
    ``spread_rows`` replaced were freed, but glibc keeps freed chunks of its heap mapped, ~70-160 MiB of them here."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
