"""The model's RMSNorms in one kernel call each (``rms_norm.c``), bit for bit what their own forwards compute.

A transformers RMSNorm is ~8 torch calls (widen, square, mean, add, rsqrt, multiply, round, weight), and in a decode
step each call pays to bring its code back into the caches the last product's weight streamed through: on the bench
preset's 33 norms per token, ~2.3 ms of a ~70 ms step at full residency (``bench profile``'s "norms"), ~0.9 ms
through the kernel. Where the CPU kernels are loaded (``--matvec-kernel`` other than ``off``), every module whose
class calls itself an RMSNorm and that holds a bfloat16 ``[width]`` weight and an epsilon (``variance_epsilon`` or
``eps``) is checked once per (class, width, epsilon). First the lane count of torch's float sum (ATen's vectors: 16
lanes or 8), from its own mean of squares on rows where the summation order shows (a norm's bfloat16 output seldom
does); then the module's own forward against the kernel on probe rows (one and several, large and tiny magnitudes,
so the epsilon shows too) in each output style: Llama's (rounded, then times the weight), or in float32 and rounded
once, Gemma's (times 1 + the weight) or GPT-OSS's (times the weight). The first style equal in every bit serves
that class; none leaves it as it is. A call the kernel does not take (another dtype or device, more than
``MAX_ROWS`` rows: a prompt's, which torch's threads share) runs the module's own forward.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import struct

import torch
from torch import nn

log = logging.getLogger("moeinf.worker")
_P, _I = ctypes.c_void_p, ctypes.c_int64
LANES = (16, 8)  # ATen's float vector widths: AVX-512, AVX2
STYLES = (0, 1, 2)  # rms_norm.c: 0 Llama's (round, then times the weight); in float32, then rounded once: 1 Gemma's
#                     (times 1 + the weight), 2 GPT-OSS's (times the weight)
PROBE_ROWS = (1, 3)
MAX_ROWS = 64  # rows the kernel takes in one call (a decode step's tokens); a prompt's run torch's threads


class NormKernel:
    """``rms_norm.c``'s entry in the kernels' library, with the verdicts of the checks so far."""

    def __init__(self, kernels):
        self.fn = kernels.lib.moeinf_rms_norm
        self.fn.argtypes = [_P, _I, _I, _I, _P, ctypes.c_float, _I, _I, _P]
        self.fn.restype = ctypes.c_int
        self.mean = kernels.lib.moeinf_rms_mean
        self.mean.argtypes = [_P, _I, _I]
        self.mean.restype = ctypes.c_float
        self.found: dict[tuple, tuple[int, int] | None] = {}  # (class, width, eps) -> (lanes, style) or None
        self.lanes: dict[int, int | None] = {}  # width -> the lane count torch's float sum uses there

    def run(self, x: torch.Tensor, weight: torch.Tensor, eps: float, lanes: int, style: int) -> torch.Tensor | None:
        """The norm of ``x``'s rows (bfloat16, last dimension contiguous, rows evenly spaced), or None."""
        width = weight.shape[0]
        rows = x.numel() // width if x.dim() else 0
        flat = x.reshape(rows, width) if rows else None
        if flat is None or flat.stride(1) != 1 or (rows > 1 and flat.stride(0) < width):
            return None
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        code = self.fn(flat.data_ptr(), rows, width, flat.stride(0) if rows > 1 else width, weight.data_ptr(), eps,
                       lanes, style, out.data_ptr())
        return out if code == 0 else None

    def verdict(self, module: nn.Module, weight: torch.Tensor, eps: float) -> tuple[int, int] | None:
        key = (type(module), weight.shape[0], eps)
        if key not in self.found:
            self.found[key] = self._find(module, weight, eps)
            if self.found[key] is None:
                log.info("%s (width %d) keeps its own forward: rms_norm.c does not give its bits",
                         type(module).__name__, weight.shape[0])
        return self.found[key]

    @torch.inference_mode()
    def _find(self, module: nn.Module, weight: torch.Tensor, eps: float) -> tuple[int, int] | None:
        gen = torch.Generator().manual_seed(0)
        width = weight.shape[0]
        probes = []
        for rows in PROBE_ROWS:
            for scale in (1.0, 30.0, 1e-3):  # tiny rows: the epsilon shows; large ones: the sum's rounding
                probes.append((torch.randn(1, rows, width, generator=gen) * scale).bfloat16())
        try:
            wants = [module.forward(p) for p in probes]
        except Exception:  # noqa: BLE001 - a norm that wants more arguments: not one the kernel replaces
            return None
        lanes = self.sum_lanes(width)
        for style in STYLES if lanes is not None else ():
            if all(_equal(self.run(p, weight, eps, lanes, style), want) for p, want in zip(probes, wants)):
                return lanes, style
        return None

    def sum_lanes(self, width: int) -> int | None:
        """The lane count whose order gives torch's own mean of squares, bit for bit, on rows where the order
        shows (a norm's bfloat16 output seldom does), or None."""
        if width not in self.lanes:
            gen = torch.Generator().manual_seed(1)
            rows = (torch.randn(16, width, generator=gen) * torch.logspace(-3, 3, 16)[:, None]).bfloat16()
            want = rows.float().pow(2).mean(-1).tolist()
            self.lanes[width] = next((lanes for lanes in LANES if all(
                _same_float(self.mean(row.data_ptr(), width, lanes), w) for row, w in zip(rows, want))), None)
        return self.lanes[width]


def _same_float(a: float, b: float) -> bool:
    return struct.pack("<f", a) == struct.pack("<f", b)


def _equal(got: torch.Tensor | None, want) -> bool:
    return isinstance(want, torch.Tensor) and got is not None and want.dtype == torch.bfloat16 \
        and want.shape == got.shape and torch.equal(want.view(torch.int16), got.view(torch.int16))


def candidate(module: nn.Module) -> tuple[torch.Tensor, float] | None:
    """``(weight, eps)`` of a module that may be an RMSNorm the kernel computes (the check decides), else None."""
    if "RMSNorm" not in type(module).__name__:
        return None
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.dtype != torch.bfloat16 \
            or weight.device.type != "cpu" or not weight.is_contiguous() or not isinstance(eps, float):
        return None
    return weight, eps


def wrap_norms(model: nn.Module, kernels) -> int:
    """Route every RMSNorm of ``model`` whose bits the kernel gives through it; returns how many."""
    norm = NormKernel(kernels)
    count = 0
    for module in model.modules():
        found = candidate(module)
        if found is None:
            continue
        verdict = norm.verdict(module, *found)
        if verdict is not None:
            module.forward = functools.partial(_forward, module, module.forward, norm, found[1], *verdict)
            count += 1
    return count


def _forward(module: nn.Module, own, norm: NormKernel, eps: float, lanes: int, style: int,
             hidden_states: torch.Tensor) -> torch.Tensor:
    weight = module.weight
    if hidden_states.dtype != torch.bfloat16 or hidden_states.device.type != "cpu" \
            or hidden_states.shape[-1] != weight.shape[0] or hidden_states.numel() > MAX_ROWS * weight.shape[0]:
        return own(hidden_states)
    out = norm.run(hidden_states, weight, eps, lanes, style)
    return own(hidden_states) if out is None else out
