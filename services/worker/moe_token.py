"""A lone decode token's routed experts in one kernel call (``moe_token.c``), bit for bit what the layer computes
otherwise (``matvec.decode_forward``: transformers' experts forward with the matrix-vector kernel's products).

Between two products of a decode step the CPU runs a dozen small torch calls per expert (selects, dtype casts, the
gate's chunk, activation and product, a row copy, the weighting and the sum) whose code the last product's weight
has just pushed out of the caches: measured on the bench preset, a step's work outside the kernels took ~21 ms per
token against ~12 ms when the weights do not stream (one or two threads alike), 6-7 ms of it in the experts module.
For one token whose experts use transformers' default gate (``act_fn(gate) * up``, the two halves concatenated),
no biases, no post-expert norm, no expert parallelism, ``[out, in]`` bfloat16 slots of a CPU pool whose widths are
multiples of 64 (the intermediate one at most 32768) and at most 16 experts, on one thread or torch's OpenMP
threads, the whole layer is one ctypes call instead: the same kernels in the same order, the activation looked up in
a table of ``act_fn`` on every bfloat16 value (its bits are torch's by construction), the roundings where torch
rounds. The first token of each layer is computed both ways and compared; a difference turns the path off for every
layer, with a log line."""
from __future__ import annotations

import ctypes
import logging

import numpy as np
import torch
from transformers.integrations.moe import _default_apply_gate

log = logging.getLogger("moeinf.worker")
ORDERS = {"fast": 0, "aten": 1, "onednn": 2}  # parallel.h's MOEINF_ORDER_*
_P, _I = ctypes.c_void_p, ctypes.c_int64
VECTOR = 64  # widths torch's elementwise kernels take whole vectors of (a scalar tail computes with std::exp, not
#              Sleef, and writes other NaN bits)
MAX_INTER = 32768  # ... and runs on one thread (ATen's grain: a wider activation is cut among threads off the vectors)
MAX_EXPERTS = 16  # experts a token's outputs are summed over in order (torch sums more in groups of 16)


class TokenPath:
    """What the layers share: the kernels, the activation tables (one per distinct function), and whether the
    path still holds (``off`` after a token computed both ways differed)."""

    def __init__(self, mv, early: bool = True):
        self.mv, self.kernels = mv, mv.kernels
        self.early = early  # --early-experts: layers may compute their resident experts while others load
        self.fn = mv.kernels.lib.moeinf_moe_token
        self.fn.argtypes = [_I, _P, _I, _P, _I, _I, _I, _P, _P, _I, _P, _I, _I, _I, _P, _I]
        self.fn.restype = ctypes.c_int
        self.parts_fn = mv.kernels.lib.moeinf_moe_parts  # some of a token's experts (Staged)
        self.parts_fn.argtypes = [_I, _P, _P, _I, _P, _I, _I, _I, _P, _P, _I, _P, _I, _I, _I, _P, _I]
        self.parts_fn.restype = ctypes.c_int
        self.sum_fn = mv.kernels.lib.moeinf_moe_sum
        self.sum_fn.argtypes = [_I, _P, _I, _I, _P]
        self.sum_fn.restype = None
        self.order = ORDERS["onednn"] if mv.blocks is not None else ORDERS["aten" if mv.exact else "fast"]
        self.tables: dict[bytes, torch.Tensor] = {}
        self.off = False

    def table(self, act_fn) -> torch.Tensor | None:
        """``act_fn`` of every bfloat16 value, indexed by its bits (int16), or None when ``act_fn`` is not one value
        at a time (on the finite values shuffled, in two unequal parts, it does not give the table's values)."""
        values = torch.from_numpy(np.arange(65536, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)
        with torch.inference_mode():
            try:
                table = act_fn(values)
                order = torch.randperm(65536, generator=torch.Generator().manual_seed(0))
                order = order[torch.isfinite(values[order])]  # (one NaN would make a sum or a softmax NaN everywhere)
                got = torch.cat([act_fn(values[part]) for part in order.split([20000, len(order) - 20000])])
            except Exception:  # noqa: BLE001 - (one that wants its own shape: per-channel parameters): not taken
                return None
            if table.dtype != torch.bfloat16 or table.shape != values.shape or got.dtype != torch.bfloat16 \
                    or not torch.equal(got.view(torch.int16), table.view(torch.int16)[order]):
                return None
        table = table.view(torch.int16).contiguous()
        return self.tables.setdefault(table.numpy().tobytes(), table)

    def disable(self, layer: int) -> None:
        if not self.off:
            self.off = True
            log.warning("the one-call token path differed from the experts forward at layer %d: every layer computes"
                        " its experts call by call from now on", layer)


class TokenExperts:
    """One MoE layer's experts for a lone token in one kernel call; ``of`` says whether the layer takes it."""

    def __init__(self, path: TokenPath, layer: int, module, params: dict, table: torch.Tensor, inter: int,
                 hidden: int):
        self.path, self.layer, self.table = path, layer, table
        gate_up, down = params["gate_up_proj"], params["down_proj"]
        self.inter, self.hidden = inter, hidden
        self.views = gate_up, down  # (held: the pointers below are into them)
        self.gate_up = (gate_up.data_ptr(), gate_up.stride(0) * 2, gate_up.stride(1))  # base, slot bytes, row stride
        self.down = (down.data_ptr(), down.stride(0) * 2, down.stride(1))
        self.module = module
        self.checked = False

    @classmethod
    def of(cls, path: TokenPath | None, layer: int, module, params: dict) -> "TokenExperts | None":
        """The layer's token path, or None where its experts are not ones the call computes (see the module
        docstring) or ``params`` (the pool's ``[slots, ...]`` views) are not bfloat16 rows in place."""
        if path is None or not (path.kernels.openmp or path.kernels.threads == 1):
            return None  # (without OpenMP on torch's runtime only Python's threads split a product)
        gate = getattr(module, "_apply_gate", None)  # transformers' default, bound to this module
        if getattr(gate, "__func__", None) is not _default_apply_gate or getattr(gate, "__self__", None) is not module \
                or not module.has_gate \
                or module.has_bias or module.has_post_expert_norm or module.is_transposed \
                or not getattr(module, "is_concatenated", True) or getattr(module, "_is_expert_parallel", False):
            return None
        gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
        if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
            return None
        two_inter, hidden = gate_up.shape[1:]
        inter = two_inter // 2
        if tuple(down.shape[1:]) != (hidden, inter) or inter % VECTOR or hidden % VECTOR or inter > MAX_INTER \
                or any(p.dtype != torch.bfloat16 or p.stride(2) != 1 or p.device.type != "cpu"
                       for p in (gate_up, down)):
            return None
        table = path.table(module.act_fn)
        return None if table is None else cls(path, layer, module, params, table, inter, hidden)

    def takes(self, hidden_states: torch.Tensor, k: int, top_k_weights: torch.Tensor) -> bool:
        return not self.path.off and hidden_states.dtype == torch.bfloat16 and k <= MAX_EXPERTS \
            and top_k_weights.dtype in (torch.float32, torch.bfloat16) \
            and not getattr(self.module, "_is_expert_parallel", False)

    def forward(self, hidden_states: torch.Tensor, slots: list[int], top_k_weights: torch.Tensor,
                reference) -> torch.Tensor | None:
        """The layer's output for one token whose experts sit in ``slots`` (top-k order), or None (the path is
        off, or this token is not one it takes): the caller computes it as before. ``reference()``: that
        computation, run too on the layer's first token and compared."""
        if not self.takes(hidden_states, len(slots), top_k_weights):
            return None
        out = self._call(hidden_states.contiguous(), slots, top_k_weights)
        if out is None or self.checked:
            return out
        want = reference()
        if want.dtype != out.dtype or want.shape != out.shape \
                or not torch.equal(want.view(torch.int16), out.view(torch.int16)):
            self.path.disable(self.layer)
        self.checked = True
        return want

    def staged(self, hidden_states: torch.Tensor, k: int, top_k_weights: torch.Tensor) -> "Staged | None":
        """The layer's output for one token built expert by expert (``Staged``: the resident ones while memd
        loads the others), or None: the path is off, this token is not one it takes, or the layer's first token
        has not been checked against the experts forward yet (that one goes through ``forward``)."""
        if not self.checked or not self.takes(hidden_states, k, top_k_weights):
            return None
        blocks = self._blocks()
        return None if blocks is None else Staged(self, hidden_states.contiguous(), top_k_weights, k, blocks)

    def _blocks(self) -> tuple[int, int] | None:
        """oneDNN's column block for each product's shape (one input row), (0, 0) for the other orders; None
        where oneDNN's order has none."""
        blocks = self.path.mv.blocks
        if blocks is None:
            return 0, 0
        kb_gu = blocks.of_shape(2 * self.inter, self.hidden, self.gate_up[2], 1)
        kb_d = blocks.of_shape(self.hidden, self.inter, self.down[2], 1)
        return None if kb_gu is None or kb_d is None else (kb_gu, kb_d)

    def _call(self, x: torch.Tensor, slots: list[int], top_k_weights: torch.Tensor) -> torch.Tensor | None:
        path, k = self.path, len(slots)
        blocks = self._blocks()
        if blocks is None:
            return None
        kb_gu, kb_d = blocks
        weights = top_k_weights.reshape(-1).float().contiguous()  # (bfloat16 -> float32 is exact)
        gate_up = (ctypes.c_int64 * k)(*(self.gate_up[0] + s * self.gate_up[1] for s in slots))
        down = (ctypes.c_int64 * k)(*(self.down[0] + s * self.down[1] for s in slots))
        out = torch.empty(1, self.hidden, dtype=torch.bfloat16)
        threads = path.kernels.threads if path.kernels.openmp else 1
        code = path.fn(k, ctypes.addressof(gate_up), self.gate_up[2], ctypes.addressof(down), self.down[2],
                       self.inter, self.hidden, x.data_ptr(), weights.data_ptr(),
                       int(top_k_weights.dtype == torch.bfloat16), self.table.data_ptr(), path.order, kb_gu, kb_d,
                       out.data_ptr(), threads)
        return out if code == 0 else None


class Staged:
    """One token's pass through a layer's experts in parts: ``experts`` computes some of them (those resident now,
    then the others once memd has loaded them) into float32 parts, ``out`` sums the parts in top-k order. The same
    kernels and the same sum as ``TokenExperts.forward``'s one call, so the same bits whatever came first."""

    def __init__(self, token: TokenExperts, x: torch.Tensor, top_k_weights: torch.Tensor, k: int,
                 blocks: tuple[int, int]):
        self.token, self.x, self.k, self.blocks = token, x, k, blocks
        self.weights = top_k_weights.reshape(-1).float().contiguous()  # (bfloat16 -> float32 is exact)
        self.round = int(top_k_weights.dtype == torch.bfloat16)
        self.parts = torch.empty(k, token.hidden, dtype=torch.float32)
        self.done = [False] * k

    def experts(self, which: list[int], slots: list[int]) -> bool:
        """Compute the token's experts at top-k positions ``which``, sitting in ``slots``; False: the kernel
        refused (nothing computed is usable: the caller computes the layer as before)."""
        token, path, n = self.token, self.token.path, len(which)
        if n == 0:
            return True
        gate_up = (ctypes.c_int64 * n)(*(token.gate_up[0] + s * token.gate_up[1] for s in slots))
        down = (ctypes.c_int64 * n)(*(token.down[0] + s * token.down[1] for s in slots))
        positions = (ctypes.c_int64 * n)(*which)
        threads = path.kernels.threads if path.kernels.openmp else 1
        code = path.parts_fn(n, ctypes.addressof(positions), ctypes.addressof(gate_up), token.gate_up[2],
                             ctypes.addressof(down), token.down[2], token.inter, token.hidden, self.x.data_ptr(),
                             self.weights.data_ptr(), self.round, token.table.data_ptr(), path.order, *self.blocks,
                             self.parts.data_ptr(), threads)
        for i in which:
            self.done[i] = code == 0
        return code == 0

    def out(self) -> torch.Tensor:
        """The layer's output (``[1, hidden]`` bfloat16), once every expert is computed."""
        if not all(self.done):
            raise RuntimeError("Staged.out before every expert was computed")
        out = torch.empty(1, self.token.hidden, dtype=torch.bfloat16)
        self.token.path.sum_fn(self.k, self.parts.data_ptr(), self.token.hidden, self.round, out.data_ptr())
        return out
