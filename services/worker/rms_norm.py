"""The model's RMSNorms in one kernel call each (``rms_norm.c``), bit for bit what their own forwards compute.

A transformers RMSNorm is ~8 torch calls (widen, square, mean, add, rsqrt, multiply, round, weight), and in a decode
step each call pays to bring its code back into the caches the last product's weight streamed through: on the bench
preset's 33 norms per token, ~2.3 ms of a ~70 ms step at full residency (``bench profile``'s "norms"), ~0.9 ms
through the kernel. Where the CPU kernels are loaded (``--matvec-kernel`` other than ``off``), a module is a
candidate when its class calls itself an RMSNorm, its forward takes the hidden states alone (a gated norm's gate
is not computed here) and it holds a bfloat16 ``[width]`` weight and a float epsilon (``variance_epsilon`` or
``eps``). Each is checked on its own (a class's behaviour may hang on attributes set per module): first the lane
count of torch's float sum for its width (ATen's vectors: 16 lanes or 8), from torch's own mean of squares on rows
where the summation order shows (a norm's bfloat16 output seldom does); then the output style, on a copy of the
module with a random weight, where the styles differ: Llama's (rounded, then times the weight), or in float32 and
rounded once, Gemma's (times 1 + the weight) or GPT-OSS's (times the weight); then the module itself, with its own
weight, on the same probe rows (one and several, large and tiny magnitudes, so the epsilon shows too). Equal in
every bit, it is served by the kernel; otherwise it keeps its own forward. A call the kernel does not take (a gate
or other argument, another dtype or device, a weight no longer bfloat16 on the CPU, more than ``MAX_ROWS`` rows: a
prompt's, which torch's threads share; rows ``MAX_WIDTH`` wide or wider, which torch may sum in two passes) runs the
module's own forward. NaN outputs are NaN either way, not always with torch's bits.
"""
from __future__ import annotations

import copy
import ctypes
import functools
import inspect
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
MAX_WIDTH = 32768  # ATen's grain: a wider row may be summed in two passes by torch's threads, in another order


class NormKernel:
    """``rms_norm.c``'s entry in the kernels' library, and the lane count of torch's sum per width."""

    def __init__(self, kernels):
        self.fn = kernels.lib.moeinf_rms_norm
        self.fn.argtypes = [_P, _I, _I, _I, _P, ctypes.c_float, _I, _I, _P]
        self.fn.restype = ctypes.c_int
        self.mean = kernels.lib.moeinf_rms_mean
        self.mean.argtypes = [_P, _I, _I]
        self.mean.restype = ctypes.c_float
        self.lanes: dict[int, int | None] = {}  # width -> the lane count torch's float sum uses there

    def run(self, x: torch.Tensor, weight: torch.Tensor, eps: float, lanes: int, style: int) -> torch.Tensor | None:
        """The norm of ``x``'s rows (bfloat16 on the CPU; a copy is made of rows not evenly spaced), or None."""
        width = weight.shape[0]
        rows = x.numel() // width if x.dim() else 0
        flat = x.reshape(rows, width) if rows else None
        if flat is None or flat.stride(1) != 1 or (rows > 1 and flat.stride(0) < width):
            return None
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        code = self.fn(flat.data_ptr(), rows, width, flat.stride(0) if rows > 1 else width, weight.data_ptr(), eps,
                       lanes, style, out.data_ptr())
        return out if code == 0 else None

    @torch.inference_mode()
    def verdict(self, module: nn.Module, weight: torch.Tensor, eps: float) -> tuple[int, int] | None:
        """``(lanes, style)`` for ``module``, each module on its own (a class's behaviour may hang on attributes
        set per module: a group size, a gate): the style from a copy of it with a random weight (where all three
        styles differ; a weight of ones gives Llama's and GPT-OSS's the same bits), then the module itself with its
        own weight, on the same probes; None when either differs anywhere."""
        width = weight.shape[0]
        lanes = self.sum_lanes(width) if width < MAX_WIDTH else None
        if lanes is None:
            return None
        gen = torch.Generator().manual_seed(0)
        probes = [(torch.randn(1, rows, width, generator=gen) * scale).bfloat16()  # tiny rows: the epsilon shows;
                  for rows in PROBE_ROWS for scale in (1.0, 30.0, 1e-3)]       # large ones: the sum's rounding
        try:
            twin = copy.deepcopy(module)
            twin.weight.data = (torch.randn(width, generator=gen) * 0.5 + 1.0).bfloat16()
            style = next((s for s in STYLES if self._same(twin, twin.weight, eps, lanes, s, probes)), None)
            if style is not None and self._same(module, weight, eps, lanes, style, probes):
                return lanes, style
        except Exception:  # noqa: BLE001 - a norm that cannot be copied or probed alone: not one the kernel replaces
            pass
        log.info("%s (width %d) keeps its own forward: rms_norm.c does not give its bits", type(module).__name__,
                 width)
        return None

    def _same(self, module: nn.Module, weight: torch.Tensor, eps: float, lanes: int, style: int, probes) -> bool:
        return all(_equal(self.run(p, weight, eps, lanes, style), module.forward(p)) for p in probes)

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
    """``(weight, eps)`` of a module that may be an RMSNorm the kernel computes (the check decides), else None: its
    class calls itself one, its forward takes the hidden states alone (a gated norm's gate is refused), and it holds
    a bfloat16 ``[width]`` weight on the CPU and a float epsilon."""
    if "RMSNorm" not in type(module).__name__ or not one_argument(type(module).forward):
        return None
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not _usable(weight) or not isinstance(eps, float):
        return None
    return weight, eps


def one_argument(forward) -> bool:
    """Does ``forward`` (a method) take exactly one argument besides ``self``, by position? (Also for
    ``router_kernel.candidate``.)"""
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]  # (self)
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _usable(weight) -> bool:
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.dtype == torch.bfloat16 \
        and weight.device.type == "cpu" and weight.is_contiguous()


def wrap_norms(model: nn.Module, kernels) -> int:
    """Route every RMSNorm of ``model`` whose bits the kernel gives through it; returns how many."""
    norm = NormKernel(kernels)
    count = 0
    for module in model.modules():
        found = candidate(module)
        verdict = None if found is None else norm.verdict(module, *found)
        if verdict is not None:
            module.forward = functools.partial(_forward, module, module.forward, norm, found[1], *verdict)
            count += 1
    return count


def _forward(module: nn.Module, own, norm: NormKernel, eps: float, lanes: int, style: int,
             hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    weight = module.weight
    if args or kwargs or not _usable(weight) or hidden_states.dtype != torch.bfloat16 \
            or hidden_states.device.type != "cpu" or hidden_states.shape[-1] != weight.shape[0] \
            or hidden_states.numel() > MAX_ROWS * weight.shape[0]:
        return own(hidden_states, *args, **kwargs)
    out = norm.run(hidden_states, weight, eps, lanes, style)
    return own(hidden_states) if out is None else out
