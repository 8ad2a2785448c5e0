"""``--matvec-kernel``: decode steps' expert products as matrix-vector products at the memory's speed (opt-in).

A decode step routes one or a few tokens to each expert, so each expert product is a matrix-vector product whose
cost is reading the weight. On CPU, transformers' grouped matmul (torch's ``_grouped_mm``) and ``F.linear`` hand a
bfloat16 weight to oneDNN, which reorders it into its own layout at every call: the expert weights stream at ~8 GB/s
where the memory gives ~17 (``moeinf bench profile``). ``matvec.c`` reads the weight once, in place in its pool slot,
and sums in float32 with AVX-512 BF16 dot products (``dequant_kernel.Kernels.matvec``).

``forward`` is transformers' ``grouped_mm_experts_forward`` with its two grouped products replaced, and nothing else:
the same gating (the module's own ``_apply_gate``/``act_fn``), bias adds, optional post-expert norm, routing weights
and per-token sum, in the same dtypes and order. Only the products' own sums are added in another order than
oneDNN's, so a product's last bit can differ, and with it, rarely, a greedy token: off by default;
``moeinf bench overhead --matvec-kernel off on`` prints the token agreement and the logit error against eager.
Steps that route more than ``MAX_TOKENS`` tokens to one expert (prompts) and dtypes other than bfloat16 take the
grouped matmul, unchanged.

Quantized checkpoints: block-FP8 and MXFP4 experts are multiplied straight from their slots (``quantized_forward``:
the bytes turned into bfloat16 in registers with the dequantization's own bits, so nothing is dequantized or
written); layouts the kernels do not take go through the dequantized rows (``quant.Dequantizer``), then this kernel.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import grouped_mm_experts_forward

MAX_TOKENS = 4  # tokens routed to one expert that the kernel takes (more: a matmul, oneDNN's own ground)


class Matvec:
    """The compiled kernels (``dequant_kernel.Kernels``) as the two linears of an expert."""

    def __init__(self, kernels):
        if not kernels.matvec_fast:
            raise RuntimeError("--matvec-kernel: this CPU has no AVX-512 BF16 (avx512_bf16 in /proc/cpuinfo), where"
                               " the kernel would be slower than oneDNN; leave --matvec-kernel off")
        self.kernels = kernels

    def linear(self, weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, transposed: bool):
        """``x @ weight.T`` (``x @ weight`` when ``transposed``) rounded to bfloat16, then ``+ bias`` in bfloat16:
        what ``_grouped_linear`` computes for one expert."""
        rows = weight.shape[1] if transposed else weight.shape[0]
        out = torch.empty(x.shape[0], rows, dtype=torch.float32)
        if weight.stride(-1) != 1 and weight.stride(-2) == 1:  # a transposed view (MXFP4 rows): its rows are columns
            weight, transposed = weight.T, not transposed
        self.kernels.matvec(weight, x.contiguous(), out, transposed)
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
            return out
    return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)


def decode_forward(module, hidden_states, top_k_index, top_k_weights, linear):
    """The experts forward with ``linear(name, expert, x)`` for each product (``top_k_index`` holds what ``linear``
    takes as ``expert``), or None when the step routes more than ``MAX_TOKENS`` tokens to an expert or is not
    bfloat16."""
    if hidden_states.dtype != torch.bfloat16 or getattr(module, "_is_expert_parallel", False):
        return None
    num_tokens, k = top_k_index.shape
    samples: dict[int, list[int]] = {}  # expert (slot) -> its (token, k) pairs, flat
    for s, expert in enumerate(top_k_index.reshape(-1).tolist()):
        samples.setdefault(expert, []).append(s)
    if max(map(len, samples.values())) > MAX_TOKENS:
        return None
    gated = module.has_gate
    up = "gate_up_proj" if gated else "up_proj"
    out = torch.empty(num_tokens * k, hidden_states.shape[-1], dtype=hidden_states.dtype)
    for expert, flat in samples.items():
        index = torch.tensor(flat)
        h = linear(up, expert, hidden_states[index // k])
        h = module._apply_gate(h) if gated else module.act_fn(h)
        h = linear("down_proj", expert, h)
        if module.has_post_expert_norm:
            h = module.post_expert_norm(h)
        out[index] = h
    weighted = out * top_k_weights.reshape(-1).unsqueeze(-1)
    return weighted.view(num_tokens, k, -1).sum(dim=1).to(hidden_states.dtype)


class _Declined(Exception):
    """The MXFP4 kernel met a scale byte it does not compute: the layer takes the dequantized rows."""


def quantized_forward(module, quantized: dict, plain: dict, kernels, table: torch.Tensor, experts: torch.Tensor,
                      slots: list[int], hidden_states, top_k_index, top_k_weights):
    """``decode_forward`` on quantized experts in their pool slots (``quantized``: ``quant.QuantParam`` by name;
    ``plain``: the other parameters' slot views, biases): each product reads the slot's FP8 or MXFP4 bytes and
    scales, turns them into bfloat16 in registers with the dequantization's bits and multiplies
    (``Kernels.matvec_fp8`` / ``matvec_mxfp4``); nothing is dequantized. ``table``: ``quant.fp8_table()``. None for a
    prompt step, or when an MXFP4 scale is one the kernel does not compute."""
    slot_of = torch.zeros(module.num_experts, dtype=top_k_index.dtype)
    slot_of[experts] = torch.tensor(slots, dtype=top_k_index.dtype)

    def linear(name: str, slot: int, x: torch.Tensor) -> torch.Tensor:
        q = quantized[name]
        out = torch.empty(x.shape[0], q.values.shape[1], dtype=torch.float32)
        if q.format == "mxfp4":
            if not kernels.matvec_mxfp4(q.values[slot], q.scales[slot], x.contiguous(), out):
                raise _Declined
        elif not kernels.matvec_fp8(q.values[slot].view(torch.uint8), q.scales[slot].float().contiguous(), table,
                                    (q.blocks[1], q.blocks[3]), x.contiguous(), out):
            raise RuntimeError(f"the FP8 matrix-vector kernel refused {name} {list(q.shape)}")
        out = out.to(torch.bfloat16)
        return out.add_(plain[name + "_bias"][slot]) if module.has_bias else out
    try:
        return decode_forward(module, hidden_states, slot_of[top_k_index], top_k_weights, linear)
    except _Declined:
        return None


def wrap_dense(model: nn.Module, mv: Matvec) -> int:
    """The dense half of ``--matvec-kernel``: every bfloat16 ``nn.Linear`` that still holds its dense weight (those
    ``--prepack-dense`` packed keep oneDNN's packed kernel) multiplies inputs of up to ``MAX_TOKENS`` rows (a decode
    step's attention projections, the LM head's last position) by the kernel, reading its weight in place; larger
    inputs take ``F.linear``. Returns how many."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module) is nn.Linear and isinstance(weight, nn.Parameter) and weight.dtype == torch.bfloat16 \
                and weight.device.type == "cpu" and weight.is_contiguous():
            module.forward = functools.partial(_dense_forward, module, mv)
            count += 1
    return count


def _dense_forward(module: nn.Linear, mv: Matvec, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // module.in_features if x.dim() else 0
    if x.dtype != torch.bfloat16 or not 0 < rows <= MAX_TOKENS:
        return F.linear(x, module.weight, module.bias)
    out = torch.empty(rows, module.out_features, dtype=torch.float32)
    mv.kernels.matvec(module.weight, x.reshape(rows, module.in_features).contiguous(), out, False)
    if module.bias is not None:
        out.add_(module.bias)  # in float32, then one rounding, as a fused bias would
    return out.to(torch.bfloat16).view(*x.shape[:-1], module.out_features)
