"""``--matvec-kernel``: decode steps' products as matrix-vector products at the memory's speed.

A decode step routes one or a few tokens to each expert, so each expert product is a matrix-vector product whose
cost is reading the weight. torch's CPU bfloat16 product (behind transformers' grouped matmul and ``F.linear``)
widens both operands for every output row and streams the weight at ~10-18 GB/s on one core here; moeinf's kernels
read it once, in place in the pool slot (``dequant_kernel.Kernels.matvec``). Two of them:

* ``exact`` (``matvec_exact.c``, the default through ``auto``): each sum in torch's own order, so every product,
  and so every token, is bit for bit what transformers computes: ATen's on an AVX2 CPU (~1.8x torch's speed on a
  Zen 3), oneDNN's on an AVX-512 BF16 one, with the column blocks it picks found per shape
  (``onednn_order.py``; ~2-2.4x torch's speed there, which reorders each weight at every call). ``check_exact``
  compares it with torch's products on this machine before use; ``auto`` falls back to torch's path, with a log
  line, where they differ (another CPU, another torch) or nothing compiles.
* ``fast`` (``matvec.c``): float32 sums of AVX-512 BF16 dot products (or AVX2 FMA on 4 rows at once), ~20% faster
  again on AVX2 and ~2x on AVX-512 BF16; its sums are added in another order than torch's, so a product's last bit
  can differ, and with it, rarely, a greedy token; ``moeinf bench overhead --matvec-kernel exact fast`` prints
  the token agreement and the logit error against eager. Block-FP8 and MXFP4 experts are multiplied straight from
  their slots (``quantized_forward``: the bytes turned into bfloat16 in registers with the dequantization's own
  bits, so nothing is dequantized or written); layouts the kernels do not take go through the dequantized rows
  (``quant.Dequantizer``), then the bfloat16 kernel, as ``exact`` always does.

``forward`` is transformers' ``grouped_mm_experts_forward`` with its two grouped products replaced, and nothing else:
the same gating (the module's own ``_apply_gate``/``act_fn``), bias adds, optional post-expert norm, routing weights
and per-token sum, in the same dtypes and order. ``wrap_dense`` does the same for the dense linears' decode rows
(attention projections, LM head; not the routers). Steps that route more than ``MAX_TOKENS`` tokens to one expert
(prompts; but ``XW_MAX_TOKENS`` for ``[in, out]`` MXFP4 experts in ATen's AVX2 order) and dtypes other than
bfloat16 take the grouped matmul, unchanged.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import grouped_mm_experts_forward

from services.worker import layouts, onednn_order

log = logging.getLogger("moeinf.worker")
MAX_TOKENS = 4  # tokens routed to one expert that the kernel takes (more: a matmul, oneDNN's own ground)
XW_MAX_TOKENS = 1024  # ... for [in, out] MXFP4 experts in ATen's AVX2 x @ W order, prompts too: ATen's plain gemm
#                       sums every row alike, ~10x slower than the kernel (matvec_checks checks up to 1024 rows)
EXACT_DENSE_ROWS = 16  # rows a dense linear gives the exact kernel (a batch of decode steps; torch reads the weight
#                        once per row there, the kernel once in all; ``check_exact`` covers this many)


class Declined(Exception):
    """A product the kernels do not take (a weight not in bfloat16, an [in, out] weight, an MXFP4 scale outside
    2..252): the layer takes the path it would take without the kernel."""


class Matvec:
    """The checked kernels (``dequant_kernel.Kernels``) as the linears of an expert or a dense layer; ``exact``:
    torch's own summation order (``check_exact`` held), else the fast kernel (``check`` held)."""

    def __init__(self, kernels, exact: bool = False):
        self.kernels, self.exact = kernels, exact
        self.noted: set[str] = set()
        # oneDNN's order (an AVX-512 CPU): its column blocks, per shape; None: ATen's AVX2 order, or ``fast``
        if exact and kernels.exact_order is None:
            raise ValueError("an exact Matvec needs kernels that matvec_checks.check_exact accepted (whose order they"
                             " sum in)")
        self.blocks = onednn_order.Blocks(kernels) if exact and kernels.exact_order == "onednn" else None

    def product(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """``x @ weight.T`` in float32 sums (``Kernels.matvec``; ``x`` bfloat16, contiguous), or None for a shape
        whose order the exact kernel does not reproduce here."""
        block = 0
        if self.blocks is not None:
            block = self.blocks.of(weight, x.shape[0])
            if block is None:
                return None
        out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
        self.kernels.matvec(weight, x, out, exact=self.exact, block=block)
        return out

    def note(self, what: str, by: str = "") -> None:
        """Say once that the kernel (``by``: that file) computed ``what`` (a decode step's first use of each path)."""
        if what not in self.noted:
            self.noted.add(what)
            log.info("--matvec-kernel: %s by %s", what, by or ("matvec_exact.c" if self.exact else "matvec.c"))

    def linear(self, weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, transposed: bool):
        """``x @ weight.T`` (``x @ weight`` when ``transposed``) rounded to bfloat16, then ``+ bias`` in bfloat16:
        what ``_grouped_linear`` computes for one expert. ``Declined`` for what the kernel does not read."""
        if transposed:  # [in, out]: only a transposed view of [out, in] rows (the dequantized MXFP4 rows) is read,
            if (self.exact and self.blocks is None) or weight.stride(-2) != 1:  # and exactly only in oneDNN's order
                raise Declined  # (ATen's AVX2 x @ W sums in another order than its dots; oneDNN's are the same)
            weight = weight.T
        if weight.dtype != torch.bfloat16 or weight.stride(-1) != 1:
            raise Declined
        out = self.product(weight, x.to(torch.bfloat16).contiguous())
        if out is None:
            raise Declined
        out = out.to(torch.bfloat16)
        return out.add_(bias) if bias is not None else out

    def products(self, module):
        """``linear(name, expert, x)``: expert ``expert``'s parameter ``name`` (and its bias) applied to ``x``."""
        transposed = bool(module.is_transposed)

        def linear(name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
            bias = getattr(module, name + "_bias")[expert] if module.has_bias else None
            return self.linear(getattr(module, name)[expert], x, bias, transposed)
        return linear


def forward(module, hidden_states, top_k_index, top_k_weights, matvec: Matvec | None):
    """``grouped_mm_experts_forward(module, ...)``, by the matrix-vector kernel when ``matvec`` is set and the step
    suits it (see the module docstring)."""
    if matvec is not None:
        out = decode_forward(module, hidden_states, top_k_index, top_k_weights, matvec.products(module))
        if out is not None:
            matvec.note("decode steps' expert products")
            return out
    return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)


def decode_forward(module, hidden_states, top_k_index, top_k_weights, linear, max_tokens: int = MAX_TOKENS):
    """The experts forward with ``linear(name, expert, x)`` for each product (``top_k_index`` holds what ``linear``
    takes as ``expert``), or None when the step routes more than ``max_tokens`` tokens to an expert, is not
    bfloat16, or ``linear`` declines a product."""
    if hidden_states.dtype != torch.bfloat16 or getattr(module, "_is_expert_parallel", False):
        return None
    flat = top_k_index.reshape(-1)
    if flat.numel() > 2 * max_tokens and int(torch.bincount(flat).max()) > max_tokens:
        return None  # a prompt step: one tensor op decides, not a Python loop over its tokens
    num_tokens, k = top_k_index.shape
    samples: dict[int, list[int]] = {}  # expert (slot) -> its (token, k) pairs, flat
    for s, expert in enumerate(flat.tolist()):
        samples.setdefault(expert, []).append(s)
    if max(map(len, samples.values())) > max_tokens:
        return None
    out = torch.empty(num_tokens * k, hidden_states.shape[-1], dtype=hidden_states.dtype)
    try:
        if num_tokens == 1:  # one token (a lone decode step): its k experts, each writing its own row; no indexing
            x = hidden_states.reshape(1, -1)
            for expert, (s,) in samples.items():
                out[s] = expert_product(module, linear, expert, x)[0]
        else:
            for expert, pairs in samples.items():
                index = torch.tensor(pairs)
                out[index] = expert_product(module, linear, expert, hidden_states[index // k])
    except Declined:
        return None
    weighted = out * top_k_weights.reshape(-1).unsqueeze(-1)
    return weighted.view(num_tokens, k, -1).sum(dim=1).to(hidden_states.dtype)


def expert_product(module, linear, expert: int, x: torch.Tensor) -> torch.Tensor:
    """One expert's output for its rows ``x``, as ``grouped_mm_experts_forward`` computes it."""
    h = linear("gate_up_proj" if module.has_gate else "up_proj", expert, x)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    h = linear("down_proj", expert, h)
    return module.post_expert_norm(h) if module.has_post_expert_norm else h


def quantized_forward(module, quantized: dict, plain: dict, mv: Matvec, table: torch.Tensor, experts: torch.Tensor,
                      slots: list[int], hidden_states, top_k_index, top_k_weights):
    """``decode_forward`` on quantized experts in their pool slots (``quantized``: ``quant.QuantParam`` by name;
    ``plain``: the other parameters' slot views, biases): each product reads the slot's FP8 or MXFP4 bytes and
    scales, turns them into bfloat16 in registers with the dequantization's bits and multiplies
    (``Kernels.matvec_fp8`` / ``matvec_mxfp4``); nothing is dequantized. ``table``: ``quant.fp8_table()``. None for a
    prompt step (but ``[in, out]`` MXFP4 experts in ATen's AVX2 order, up to ``XW_MAX_TOKENS`` tokens to one), when
    an MXFP4 scale is one the kernel does not compute, or (exact) a shape whose order is not found."""
    kernels = mv.kernels
    blocks = {}  # exact: oneDNN's block per (parameter, input rows), all found before any product
    if mv.blocks is not None:
        blocks = _exact_blocks(mv.blocks, quantized, min(len(top_k_index), MAX_TOKENS))
        if blocks is None:
            return None  # (a step declined halfway would be computed twice)
    slot_of = torch.zeros(module.num_experts, dtype=top_k_index.dtype)
    slot_of[experts] = torch.tensor(slots, dtype=top_k_index.dtype)

    def linear(name: str, slot: int, x: torch.Tensor) -> torch.Tensor:
        q = quantized[name]
        out = torch.empty(x.shape[0], q.values.shape[1], dtype=torch.float32)
        x = x.to(torch.bfloat16).contiguous()
        block = blocks.get((name, len(x)), 0)
        if q.format == "mxfp4":
            if not kernels.matvec_mxfp4(q.values[slot], q.scales[slot], x, out, exact=mv.exact,
                                        xw=bool(module.is_transposed), exact_block=block,
                                        pairs=q.pairs.view(torch.int32)):
                raise Declined
        elif not kernels.matvec_fp8(q.values[slot].view(torch.uint8), q.scales[slot].float().contiguous(), table,
                                    (q.blocks[1], q.blocks[3]), x, out, exact=mv.exact, exact_block=block):
            raise RuntimeError(f"the FP8 matrix-vector kernel refused {name} {list(q.shape)}")
        out = out.to(torch.bfloat16)
        return out.add_(plain[name + "_bias"][slot]) if module.has_bias else out
    xw = mv.exact and mv.blocks is None and module.is_transposed \
        and all(q.format == "mxfp4" for q in quantized.values())
    out = decode_forward(module, hidden_states, slot_of[top_k_index], top_k_weights, linear,
                         XW_MAX_TOKENS if xw else MAX_TOKENS)
    if out is not None:
        many = xw and len(top_k_index) > MAX_TOKENS
        mv.note(f"products of steps of more than {MAX_TOKENS} tokens (prompts) on the quantized slots in place" if many
                else "decode steps' products on the quantized slots in place", "matvec_exact_xw.c" if xw else "")
    return out


def _exact_blocks(blocks: onednn_order.Blocks, quantized: dict, rows: int) -> dict[tuple[str, int], int] | None:
    """oneDNN's block for each parameter's product of 1..``rows`` input rows (the order of its product of the
    dequantized weight, stored ``[out, in]``: MXFP4 ``[in, out]`` parameters too, oneDNN sums ``x @ W`` alike), or
    None when one is not found or not one the in-place kernels take."""
    found = {}
    for name, q in quantized.items():
        out_rows, cols = (q.values.shape[1], q.values.shape[2] * 32) if q.format == "mxfp4" else tuple(q.shape)
        for m in range(1, rows + 1):
            block = blocks.of_shape(out_rows, cols, cols, m)
            if block is None or block % 64 or block > onednn_order.FP8_BLOCK_MAX:
                return None
            found[name, m] = block
    return found


def wrap_dense(model: nn.Module, mv: Matvec, skip_widths: set[int]) -> int:
    """The dense half of ``--matvec-kernel``: every bfloat16 ``nn.Linear`` that still holds its dense weight (those
    ``--prepack-dense`` packed keep oneDNN's packed kernel) multiplies inputs of up to ``MAX_TOKENS`` rows (exact:
    ``EXACT_DENSE_ROWS``; a decode step's attention projections, the LM head's last position) by the kernel,
    reading its weight in place; larger inputs take ``F.linear``. Linears ``skip_widths`` wide (the routers: the
    experts' count; shared-expert gates: 1) keep ``F.linear``, so that routing is decided as transformers decides
    it. Weights whose rows are a multiple of 2 KiB long and were not spread at load (``loader.load_dense``; an
    FP8 checkpoint's dequantized ones) get their rows spread here (``layouts.spread_rows``). Returns how many
    linears it wraps."""
    count, spread = 0, 0
    shared = _shared_weights(model)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if layouts.kernel_linear(module, skip_widths) and isinstance(weight, nn.Parameter) \
                and weight.device.type == "cpu" and weight.stride(1) == 1:  # rows contiguous (spread at load or packed)
            if weight.data_ptr() not in shared and layouts.spreads(weight):
                module.weight = nn.Parameter(layouts.spread_rows(weight.detach()), weight.requires_grad)
                spread += 1
            module.forward = functools.partial(_dense_forward, module, mv)
            count += 1
    if spread:
        layouts.return_freed_memory()
        log.info("--matvec-kernel: %d dense weights' rows spread %d bytes further apart (rows a multiple of %d"
                 " bytes long)", spread, layouts.SPREAD_BYTES, layouts.SPREAD_PERIOD)
    return count


def _shared_weights(model: nn.Module) -> set[int]:
    """Data pointers of the parameters held by more than one module (an LM head tied to the embedding): left as
    they are, since a copy would untie them and hold the weight twice."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[param.data_ptr()] = seen.get(param.data_ptr(), 0) + 1
    return {ptr for ptr, n in seen.items() if n > 1}


def _dense_forward(module: nn.Linear, mv: Matvec, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // module.in_features if x.dim() else 0
    if x.dtype != torch.bfloat16 or not 0 < rows <= (EXACT_DENSE_ROWS if mv.exact else MAX_TOKENS):
        return F.linear(x, module.weight, module.bias)
    out = mv.product(module.weight, x.reshape(rows, module.in_features).contiguous())
    if out is None:
        return F.linear(x, module.weight, module.bias)
    if module.bias is not None:
        out.add_(module.bias)  # in float32, then one rounding, as a fused bias would
    mv.note("decode rows of the dense linears")
    return out.to(torch.bfloat16).view(*x.shape[:-1], module.out_features)
