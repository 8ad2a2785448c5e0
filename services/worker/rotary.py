"""The model's ``apply_rotary_pos_emb`` in one kernel call per tensor (``rotary.c``), bit for bit what it computes.

transformers' rotary embedding of a decode step's queries and keys is ~10 small torch calls per layer (slices,
neg, cat, four multiplies, two adds: ~0.9 ms of a ~69 ms step at full residency on the bench preset), each paying
to bring its code back into the caches the last weight streamed through. Where the CPU kernels are loaded
(``--matvec-kernel`` other than ``off``), each modeling module the model's attention layers come from is checked:
its ``apply_rotary_pos_emb`` and the kernel, on random bfloat16 queries and keys laid out as the attention's
projections leave them (heads transposed), one row and several, must give the same bits (a family that rotates
only part of a head, or interleaved pairs, or in another dtype, differs and keeps its own); equal, the module's
function is replaced by one that calls the kernel for what it takes (bfloat16 on the CPU, one sequence, cos and sin
``[1, rows, head_dim]``, the default ``unsqueeze_dim``) and the module's own function for everything else.

The replacement is the modeling module's, so it would serve every model of that family in the process: it calls
the kernel only inside a moeinf step (``active``, which ``FlatStep.forward`` sets in its thread), so plain
transformers beside moeinf (the benches' reference) runs transformers' own code.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import logging
import sys

import torch
from torch import nn

log = logging.getLogger("moeinf.worker")
_P, _I = ctypes.c_void_p, ctypes.c_int64
ACTIVE = contextvars.ContextVar("moeinf_rotary_active", default=False)
PROBE_ROWS = (1, 5)
PROBE_HEADS = 4


@contextlib.contextmanager
def active():
    """The kernel serves the replaced functions in this thread meanwhile (a moeinf step)."""
    token = ACTIVE.set(True)
    try:
        yield
    finally:
        ACTIVE.reset(token)


class RotaryKernel:
    def __init__(self, kernels):
        self.fn = kernels.lib.moeinf_rotary
        self.fn.argtypes = [_P, _I, _I, _I, _I, _I, _P, _P, _I, _P, _I, _I]
        self.fn.restype = ctypes.c_int

    @staticmethod
    def takes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        return (x.dtype == cos.dtype == sin.dtype == torch.bfloat16 and x.device.type == "cpu" == cos.device.type
                and x.dim() == 4 and x.shape[0] == 1 and x.stride(3) == 1 and x.shape[3] % 2 == 0
                and cos.dim() == 3 and cos.shape[0] == 1 and tuple(cos.shape[1:]) == tuple(x.shape[2:])
                and cos.stride() == sin.stride() and cos.stride(2) == 1 and sin.device.type == "cpu")

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        out = torch.empty_like(x)  # (x's layout: heads transposed, as torch's elementwise result keeps it)
        if out.stride(3) != 1:
            return None
        code = self.fn(x.data_ptr(), x.shape[1], x.shape[2], x.shape[3], x.stride(1), x.stride(2), cos.data_ptr(),
                       sin.data_ptr(), cos.stride(1), out.data_ptr(), out.stride(1), out.stride(2))
        return out if code == 0 else None


def wrap_rotary(model: nn.Module, kernels) -> int:
    """Replace the ``apply_rotary_pos_emb`` of each modeling module ``model``'s attention layers come from, where
    the kernel gives its bits; returns how many were replaced."""
    kernel, count = RotaryKernel(kernels), 0
    dims: dict[object, set[int]] = {}
    for module in model.modules():
        if hasattr(module, "layer_idx") and isinstance(getattr(module, "head_dim", None), int):
            dims.setdefault(sys.modules[type(module).__module__], set()).add(module.head_dim)
    for source, head_dims in dims.items():
        own = getattr(source, "apply_rotary_pos_emb", None)
        if own is None or getattr(own, "_moeinf_rotary", False):
            continue
        if not all(same_bits(own, kernel, d) for d in head_dims):
            log.info("%s.apply_rotary_pos_emb keeps its own code: rotary.c does not give its bits", source.__name__)
            continue
        replacement = functools.wraps(own)(functools.partial(_rotate, own, kernel))
        replacement._moeinf_rotary = True
        source.apply_rotary_pos_emb = replacement
        count += 1
    return count


def _rotate(own, kernel: RotaryKernel, *args, **kwargs):
    """The kernel for the call ``same_bits`` checked, ``(q, k, cos, sin)`` with the default ``unsqueeze_dim``; any
    other (queries alone, as Qwen4-Exp calls it, tensors by keyword, more arguments) runs the model's own code."""
    plain = len(args) == 4 and all(name == "unsqueeze_dim" for name in kwargs) and kwargs.get("unsqueeze_dim", 1) == 1
    if not plain or not isinstance(args[1], torch.Tensor) or not ACTIVE.get():
        return own(*args, **kwargs)
    q, k, cos, sin = args
    if not kernel.takes(q, cos, sin) or not kernel.takes(k, cos, sin):
        return own(*args, **kwargs)
    q_out, k_out = kernel.run(q, cos, sin), kernel.run(k, cos, sin)
    return (q_out, k_out) if q_out is not None and k_out is not None else own(*args, **kwargs)


@torch.inference_mode()
def same_bits(own, kernel: RotaryKernel, head_dim: int) -> bool:
    """The kernel's bits equal ``own``'s on random probes (every bit: NaN payloads and signed zeros too)."""
    if head_dim % 2:
        return False
    gen = torch.Generator().manual_seed(0)
    for rows in PROBE_ROWS:
        q, k = ((torch.randn(1, rows, heads, head_dim, generator=gen) * 3).bfloat16().transpose(1, 2)
                for heads in (PROBE_HEADS, PROBE_HEADS // 2))
        angles = torch.rand(1, rows, head_dim, generator=gen) * 6.3
        cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
        try:
            expected = own(q, k, cos, sin)
        except Exception:  # (another signature, another shape it expects: not this kernel's function)
            return False
        got = (kernel.run(q, cos, sin), kernel.run(k, cos, sin))
        if not isinstance(expected, tuple) or len(expected) != 2 or any(g is None for g in got):
            return False
        for e, g in zip(expected, got):
            if e.shape != g.shape or e.dtype != torch.bfloat16 \
                    or not torch.equal(e.contiguous().view(torch.int16), g.contiguous().view(torch.int16)):
                return False
    return True
