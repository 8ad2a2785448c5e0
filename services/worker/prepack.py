"""Dense linears with their weights packed once for oneDNN instead of at every call (bfloat16 on CPU; opt-in,
``--prepack-dense``).

A bfloat16 ``nn.Linear`` on CPU runs oneDNN's matmul, which first reorders the weight into its blocked layout, at
every call. In a decode step every linear is a matrix-vector product, and the reorder costs about as much as the
product. ``torch.ops.mkldnn._reorder_linear_weight`` packs a weight once (what torch.compile's CPU weight freezing
does) and ``torch.ops.mkldnn._linear_pointwise`` runs oneDNN on it: 1.2x to 2.5x faster per call on this
project's CPU, 7-11% of a decode step at full residency in two runs (docs/benchmarks.md, `bench overhead`).

Numerics: on random inputs its bits equal ``F.linear``'s (checked at load for every weight shape on three row
counts, dense and row-strided; a shape that differs stays unpacked, with a warning), but on real activations the
products sometimes break a rounding tie the other way (one bfloat16 ulp, seen in about one output in 64 of some
matrix-vector products of the tests' tiny models), so greedy tokens may leave transformers' eager ones. Hence off
by default; ``moeinf bench overhead --prepack-dense off on`` prints the token agreement and the logit error against
eager. The bf16 exactness test (tests/worker/test_exactness.py) holds on this project's CPU; on another (AMX, say)
oneDNN may pick other kernels.

The packed weight replaces the dense one, so memory is not doubled: ``module.weight`` becomes the opaque packed
tensor (same shape and dtype; arithmetic on it fails loudly instead of computing something else). A transposed or
expanded input, which no family's forward makes, gets the weight unpacked again for that call.

Left as they are: linears with a bias (``F.linear`` adds a bias through another path, whose ties differ more
often), weights shared with another module (an LM head tied to the embedding), weights that are not bfloat16
(float32 runs MKL, not oneDNN), modules that are not plain ``nn.Linear``, and the experts (in the pool).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("moeinf.worker.prepack")
CHECK_ROWS = (1, 5, 33)  # decode, a small batch, a prefill chunk


@dataclass(frozen=True, slots=True)
class Packed:
    modules: int  # linears packed
    nbytes: int  # their weights' bytes
    refused: int  # linears of shapes whose packed bits differed (left unpacked)


@functools.cache
def available() -> bool:
    """This torch has oneDNN's linear packing and this CPU runs it for bfloat16 (oneDNN needs AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT: an AVX2-only CPU raises at the first pack)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        pack(torch.zeros(16, 16, dtype=torch.bfloat16))
    except RuntimeError:
        return False
    return True


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` in oneDNN's blocked layout (an opaque tensor), for ``packed_mm``."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def packed_mm(rows: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``rows @ weight.T`` on a ``pack``-ed weight, with no reorder."""
    return torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")


def prepack_dense(model: nn.Module) -> Packed:
    """Pack every eligible ``nn.Linear`` of ``model`` in place (see the module docstring)."""
    if not available():
        log.warning("--prepack-dense: this torch or CPU has no oneDNN bfloat16 linear packing (it needs AVX-512"
                    " BW/VL/DQ or AVX-NE-CONVERT); dense linears stay as they are")
        return Packed(0, 0, 0)
    shared = _shared_tensors(model)
    verdicts: dict[tuple, bool] = {}  # (out, in) -> the packed kernel's bits equal F.linear's on random rows
    modules = nbytes = refused = 0
    for name, module in model.named_modules():
        if not _eligible(module, shared):
            continue
        key = tuple(module.weight.shape)
        packed = pack(module.weight) if verdicts.get(key, True) else None
        if key not in verdicts:
            verdicts[key] = _same_bits(module.weight.detach(), packed)
            if not verdicts[key]:
                log.warning("--prepack-dense: %s %s: the packed kernel's bits differ from F.linear's; left unpacked",
                            name, list(module.weight.shape))
        if not verdicts[key]:
            refused += 1
            continue
        nbytes += module.weight.numel() * module.weight.element_size()
        _install(module, packed)
        modules += 1
    log.info("packed %d dense linears (%.1f MiB) for oneDNN", modules, nbytes / 2**20)
    return Packed(modules, nbytes, refused)


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The packed module's forward, without the per-call weight reorder. The input is folded into rows as
    ``F.linear`` (``matmul``) folds it: a view where one exists, else a copy. Rows that are not each contiguous
    with a stride of at least a row (a transposed or expanded input, which oneDNN multiplies as it lies, with other
    bits) get the weight unpacked again for that call."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() >= 2 else x
    if x.dim() < 2 or rows.stride(1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]):
        return F.linear(x, module.weight.to_dense())
    if rows.is_contiguous():
        rows = rows.as_strided(rows.shape, (rows.shape[1], 1))  # canonical strides (a size-1 dimension's can be any)
    out = packed_mm(rows, module.weight)
    return out.view(*x.shape[:-1], out.shape[-1])


def _eligible(module: nn.Module, shared: set[int]) -> bool:
    if type(module) is not nn.Linear:
        return False
    weight = module.weight
    return (isinstance(weight, nn.Parameter) and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and not weight.is_meta and weight.untyped_storage().data_ptr() not in shared and module.bias is None)


def _shared_tensors(model: nn.Module) -> set[int]:
    """Storages that more than one parameter or buffer name refers to (tied weights)."""
    seen: dict[int, int] = {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for _, tensor in tensors:
        if tensor.is_meta or tensor.device.type != "cpu":
            continue
        ptr = tensor.untyped_storage().data_ptr()
        seen[ptr] = seen.get(ptr, 0) + 1
    return {ptr for ptr, count in seen.items() if count > 1}


def _same_bits(weight: torch.Tensor, packed: torch.Tensor) -> bool:
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in CHECK_ROWS:  # dense rows, and rows a row apart in a wider tensor (linear() passes both)
            wide = torch.randn(rows, 2 * weight.shape[1], generator=gen).to(weight.dtype)
            for x in (wide[:, :weight.shape[1]].contiguous(), wide[:, weight.shape[1]:]):
                if not torch.equal(packed_mm(x, packed), F.linear(x, weight)):
                    return False
    return True


def _install(module: nn.Module, packed: torch.Tensor) -> None:
    del module._parameters["weight"]
    module.weight = packed  # a plain attribute now: shape and dtype as before, the dense copy freed
    module.forward = linear.__get__(module)
