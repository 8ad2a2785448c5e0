"""The MoE routers' decode rows in one kernel call each (``router.c``), bit for bit what their own forwards compute.

A transformers top-k router is ~8 torch calls (the bfloat16 product, widen, softmax, top-k, sum, divide, round),
and in a decode step each call pays to bring its code back into the caches the last weights streamed through: ~150
us a layer on the bench preset at full residency, ~25 us through the kernel. Where the exact product kernel is
loaded (``--matvec-kernel auto`` or ``exact``: the logits must be F.linear's bits), a module is a candidate when its
class calls itself a router, its forward takes the hidden states alone, and it holds a bfloat16 ``[experts,
hidden]`` weight (no bias), an integer ``top_k`` and nothing the kernel does not compute (a score-correction bias,
expert groups). The kernel computes one recipe, softmax over every expert then the top k (Mixtral's, Qwen's,
OLMoE's, Jamba's, ...), its scores optionally divided by their sum (top 4 at most: ATen adds more in another
order) and kept in float32 or rounded to bfloat16, at the vector width torch's own kernels run at here (16 lanes on
an AVX-512 CPU, 8 on AVX2: ``torch.backends.cpu.get_cpu_capability``); each module is checked on its own against its
own forward (outputs' count, dtypes, shapes and bits, one and several rows, three magnitudes) for each variant, and
the variant's float32 scores against torch's own softmax, top-k and sum on the same logits (a bfloat16 output would
hide a last-bit difference there), and is served by the kernel only where both match in every bit. Routers that
compute something else (sigmoid scores, top-k before the softmax, grouped choice) keep their own forward, as does
any call the kernel does not take: a prompt's rows (more than ``MAX_ROWS``), another dtype or device, a product
shape the exact kernel does not reproduce, a logit that is not finite, or a tie among the largest probabilities
(torch orders equal values its own way).

Torch's softmax calls Sleef's ``exp`` (inside torch's own library); the kernel is handed the same function, found
by name there: a torch without it keeps every router's own forward.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch
from torch import nn

from services.worker.rms_norm import one_argument

log = logging.getLogger("moeinf.worker")
_P, _I = ctypes.c_void_p, ctypes.c_int64
MAX_ROWS = 16  # rows one call takes (a batch of decode steps, as the exact dense products); prompts take torch's
EXP = {16: "Sleef_expf16_u10", 8: "Sleef_expf8_u10"}  # the exp ATen's softmax calls at each vector width
LANES = {"AVX512": 16, "AVX2": 8}  # torch's CPU capability -> the float vector width its kernels run at
RENORM_MAX_K = 4  # router.c divides by the top k's sum only where ATen adds them one by one
VARIANTS = ((True, False), (True, True), (False, False), (False, True))  # (divided by their sum, bfloat16 scores)
PROBE_ROWS = (1, 3)
PROBE_SCALES = (1.0, 8.0, 0.25)
PROBE_SEEDS = 3
MIN_TAKEN = 6  # probes (of 18) the kernel must compute, all equal, where a probe is declined only for a tie
FLOAT_PROBES = 96  # single rows whose float32 scores must equal torch's ops (a third of them at least not a tie)


class RouterKernel:
    """``router.c``'s entry in the kernels' library, the exact product's column blocks, and Sleef's exp."""

    def __init__(self, mv):
        self.mv = mv
        self.fn = mv.kernels.lib.moeinf_route
        self.fn.argtypes = [_P, _I, _P, _I, _I, _I, _I, _I, _I, _P, _I, _I, _P, _P, _P, _P]
        self.fn.restype = ctypes.c_int
        built, lanes = mv.kernels.lib.moeinf_route_lanes(), LANES.get(torch.backends.cpu.get_cpu_capability())
        fn = torch_exp().get(lanes) if lanes else None  # (the width torch's softmax runs at here, and no other)
        self.exp = {lanes: fn} if fn and built & lanes else {}

    def run(self, weight: torch.Tensor, top_k: int, x: torch.Tensor, lanes: int, renorm: bool,
            bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(logits, scores, indices)`` for ``x``'s rows (bfloat16 ``[m, hidden]``, contiguous), or None where the
        kernel declines (the caller runs the module's own forward)."""
        m, (experts, cols) = x.shape[0], weight.shape
        block = 0
        if self.mv.blocks is not None:
            block = self.mv.blocks.of(weight, m, linear_only=True)
            if block is None:
                return None
        logits = torch.empty(m, experts, dtype=torch.bfloat16)
        scores = torch.empty(m, top_k, dtype=torch.bfloat16 if bf16 else torch.float32)
        indices = torch.empty(m, top_k, dtype=torch.int64)
        scratch = torch.empty(m, experts, dtype=torch.float32)
        code = self.fn(weight.data_ptr(), weight.stride(0), x.data_ptr(), m, cols, experts, block, top_k, lanes,
                       self.exp[lanes], int(renorm), int(bf16), scratch.data_ptr(), logits.data_ptr(),
                       scores.data_ptr(), indices.data_ptr())
        return (logits, scores, indices) if code == 0 else None

    @torch.inference_mode()
    def verdict(self, module: nn.Module) -> tuple[int, bool, bool] | None:
        """``(lanes, renorm, bf16)`` with which the kernel gives ``module``'s own outputs on every probe (and torch's
        ops' float32 scores: ``float_path_holds``), or None."""
        weight, top_k = module.weight, module.top_k
        gen = torch.Generator().manual_seed(weight.shape[0] * 131 + weight.shape[1])
        probes = [(torch.randn(rows, weight.shape[1], generator=gen) * scale).bfloat16()
                  for rows in PROBE_ROWS for scale in PROBE_SCALES for _ in range(PROBE_SEEDS)]
        try:
            wants = [module.forward(p) for p in probes]
        except Exception:  # noqa: BLE001 - a router that cannot run alone on these rows: not one the kernel replaces
            return None
        for lanes in self.exp:
            for renorm, bf16 in VARIANTS:
                if renorm and top_k > RENORM_MAX_K:
                    continue  # (router.c adds the top k one by one, as ATen does up to 4 values)
                gots = [self.run(weight, top_k, p, lanes, renorm, bf16) for p in probes]
                taken = [_same(got, want) for got, want in zip(gots, wants) if got is not None]  # (None: a tie)
                if len(taken) >= MIN_TAKEN and all(taken) and self.float_path_holds(weight, top_k, lanes, renorm):
                    return lanes, renorm, bf16
        log.info("%s (%d experts, top %d) keeps its own forward: router.c does not give its bits",
                 type(module).__name__, weight.shape[0], top_k)
        return None

    def float_path_holds(self, weight, top_k: int, lanes: int, renorm: bool) -> bool:
        """The kernel's float32 scores equal torch's own ops on its own logits, bit for bit, on ``FLOAT_PROBES``
        rows (bfloat16 scores round away a last-bit difference in a sum's order, which the module's outputs alone
        seldom show: a softmax summed at the wrong vector width differs on ~1 row in 5 in float32)."""
        gen = torch.Generator().manual_seed(weight.shape[0] * 7 + top_k)
        taken = 0
        for i in range(FLOAT_PROBES):
            x = (torch.randn(1, weight.shape[1], generator=gen) * PROBE_SCALES[i % len(PROBE_SCALES)]).bfloat16()
            got = self.run(weight, top_k, x, lanes, renorm, False)
            if got is None:
                continue  # (a tie)
            values, indices = torch.topk(torch.softmax(got[0].float(), dim=-1), top_k, dim=-1)
            if renorm:
                values /= values.sum(dim=-1, keepdim=True)
            if not (torch.equal(indices, got[2]) and torch.equal(values.view(torch.int32), got[1].view(torch.int32))):
                return False
            taken += 1
        return taken >= FLOAT_PROBES // 3


def torch_exp() -> dict[int, int]:
    """The addresses of the exp functions ATen's softmax calls, by vector width, from torch's own library."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return {}
    found = {}
    for lanes, name in EXP.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            found[lanes] = ctypes.cast(fn, ctypes.c_void_p).value
    return found


def _same(got, want) -> bool:
    if got is None or not isinstance(want, tuple) or len(want) != len(got):
        return False
    return all(isinstance(w, torch.Tensor) and w.dtype == g.dtype and w.shape == g.shape
               and torch.equal(w.contiguous().view(torch.uint8), g.view(torch.uint8)) for g, w in zip(got, want))


def candidate(module: nn.Module) -> bool:
    """A module the kernel may compute (the check decides): a router by its class's name, its forward taking the
    hidden states alone, a bfloat16 ``[experts, hidden]`` weight on the CPU with rows contiguous, no bias, an integer
    ``top_k``, and none of the attributes of routers that compute more (score-correction biases, expert groups)."""
    if "Router" not in type(module).__name__ or not one_argument(type(module).forward):
        return False
    weight, top_k = getattr(module, "weight", None), getattr(module, "top_k", None)
    if not _usable(weight) or not isinstance(top_k, int) or not 0 < top_k <= weight.shape[0]:
        return False
    extras = ("bias", "e_score_correction_bias", "n_group", "topk_group", "routed_scaling_factor")
    return all(getattr(module, name, None) is None for name in extras)


def _usable(weight) -> bool:
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.dtype == torch.bfloat16 \
        and weight.device.type == "cpu" and weight.stride(1) == 1


def wrap_routers(model: nn.Module, mv) -> int:
    """Route every router of ``model`` whose bits the kernel gives through it; returns how many. ``mv``: the exact
    ``Matvec`` (the fast kernel's logits are not F.linear's: nothing is wrapped)."""
    if not mv.exact:
        return 0
    kernel = RouterKernel(mv)
    if not kernel.exp:
        log.info("the routers keep their own forwards: torch's library has none of %s", ", ".join(EXP.values()))
        return 0
    count = 0
    for module in model.modules():
        verdict = kernel.verdict(module) if candidate(module) else None
        if verdict is not None:
            module.forward = functools.partial(_forward, module, module.forward, kernel, *verdict)
            count += 1
    return count


def _forward(module: nn.Module, own, kernel: RouterKernel, lanes: int, renorm: bool, bf16: bool,
             hidden_states: torch.Tensor, *args, **kwargs):
    weight = module.weight
    if args or kwargs or not _usable(weight) or hidden_states.dtype != torch.bfloat16 \
            or hidden_states.device.type != "cpu" or hidden_states.dim() != 2 \
            or hidden_states.shape[1] != weight.shape[1] or not 0 < hidden_states.shape[0] <= MAX_ROWS \
            or not hidden_states.is_contiguous():
        return own(hidden_states, *args, **kwargs)
    out = kernel.run(weight, module.top_k, hidden_states, lanes, renorm, bf16)
    if out is None:
        return own(hidden_states)
    kernel.mv.note("decode rows of the routers", by="router.c")  # (said once: a step's, not the check's)
    return out
