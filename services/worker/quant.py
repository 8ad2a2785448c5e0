"""Computing from quantized expert slots: dequantize a layer's routed experts into a reused scratch buffer.

memd's slots hold the experts as the checkpoint stores them (MXFP4 blocks + scales, or block FP8 values +
``weight_scale_inv``), so the pool holds 2-4x more experts per byte and reads that many fewer bytes. For each MoE
layer the worker dequantizes only the experts routed in the step, into one preallocated ``[capacity, *shape]``
buffer per parameter, and runs transformers' own grouped-matmul forward on it with expert ids remapped to buffer
rows. The capacity is the most experts a layer can hold at once, ``min(experts, pool slots)``, or
``--dequant-scratch-experts`` when lower (plus ``--dequant-cache-mb``): a step that routes more than it holds (a
prefill) runs its experts in groups that fit (``expert_groups.py``), each dequantized once, with the bits of one
call.

The arithmetic is transformers' own dequantization (``integrations/mxfp4.py`` ``convert_moe_packed_tensors``:
E2M1 table in the parameter dtype, ``ldexp`` by ``scale - 127``, transposed; ``integrations/finegrained_fp8.py``
``Fp8Dequantize``: FP8 and scales in float32, multiplied per block, cast to the parameter dtype), so the values are
bit-identical to a model loaded with ``dequantize=True``. MXFP4 rows are stored ``[out, in]`` (the blocks' order),
an ``[in, out]`` parameter being their transposed view (or their copy, where this CPU's matmul rounds a view
otherwise: ``layouts.py``). The slots may also come from memd's compressed cache of a
bf16 checkpoint (``--expert-format``), same encoding.

The lookups run in the compiled kernels of ``dequant_kernel.py`` when the worker could build them (one read per
quantized byte, one write per value; checked against this file's torch-op path, which stays the reference and the
fallback: an int32 index per value, the scales added, one gather).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from common import messages as m
from common.quant_encode import FP4_MAGNITUDES
from services.worker import matvec
from services.worker.expert_groups import in_expert_groups
from services.worker.layouts import aligned_empty, transposed_view_is_exact
from services.worker.matvec import Matvec
from services.worker.row_cache import RowCache

if TYPE_CHECKING:
    from services.worker.dequant_kernel import Kernels

log = logging.getLogger("moeinf.worker")
BATCH = 4  # experts whose index arithmetic runs as one op (the int32 index buffers hold this many)
_PAIR = {2: torch.int32, 4: torch.int64}  # a value pair of a 2- or 4-byte dtype as one integer


def mxfp4_table(dtype: torch.dtype) -> torch.Tensor:
    """``[256 scale bytes * 256 block bytes * 2]``: both E2M1 values (low nibble first) of every byte under every
    scale, computed with transformers' own ops (the value table in ``dtype``, then ``ldexp`` by ``scale - 127``), so
    one lookup per output value gives transformers' bits, edge cases (subnormals, overflow) included."""
    values = torch.tensor(list(FP4_MAGNITUDES) + [-v for v in FP4_MAGNITUDES], dtype=dtype)
    codes = torch.arange(256)
    pairs = torch.stack([values[codes & 0x0F], values[codes >> 4]], dim=1)  # [256 bytes, 2]
    table = pairs.unsqueeze(0).repeat(256, 1, 1)  # [256 scales, 256 bytes, 2]
    exponent = (torch.arange(256, dtype=torch.int32) - 127).view(256, 1, 1)
    torch.ldexp(table, exponent, out=table)
    return table.reshape(-1).contiguous()


def mxfp4_pairs(dtype: torch.dtype) -> torch.Tensor:
    """``mxfp4_table`` with both values of a byte as one 2x-wide integer: one gather writes two outputs."""
    return mxfp4_table(dtype).view(256 * 256, 2).view(_PAIR[dtype.itemsize]).view(-1)


def mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The torch-op path on ``blocks`` [n, 16] with one scale byte each: the reference the compiled kernel is
    checked against (``dequant_kernel.self_check``)."""
    index = blocks.to(torch.int32) + scales.to(torch.int32).mul(256).view(-1, 1)
    return pairs.index_select(0, index.view(-1))


def fp8_block_table(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[blocks, 256]``: every float8 byte's value times its block's scale, in float32, rounded once to ``dtype``:
    the same bits as transformers' ``(q.float() * s).to(dtype)``."""
    return torch.mul(fp8_table(), scales.float().view(-1, 1)).to(dtype)


def fp8_table() -> torch.Tensor:
    """Every float8_e4m3fn byte as float32 (exact): a lookup is ~8x faster than torch's CPU float8 conversion."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


class QuantParam:
    """One quantized expert parameter: zero-copy ``[num_slots, ...]`` views of its values and scales in the pool,
    and the scratch rows its dequantized experts go to."""

    def __init__(self, spec: m.TensorSpec, by_slot: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                 capacity: int, kernels: Kernels | None = None, *, transposed: bool):
        self.name, self.format, self.shape, self.dtype = spec.name, spec.format, shape, dtype
        # the compiled kernels (dequant_kernel.py) for the layouts and dtypes they take, else None: torch's ops
        self.kernels = kernels if dtype in (torch.bfloat16, torch.float16, torch.float32) else None
        self.values = _view(by_slot, spec.offset, spec.shape, getattr(torch, spec.dtype))
        self.scales = _view(by_slot, spec.scale_offset, spec.scale_shape, getattr(torch, spec.scale_dtype))
        if self.format == "mxfp4":
            rows, groups, half = spec.shape
            if half != 16:  # the kernels take MXFP4's 32-value blocks only
                self.kernels = None
            if ((groups * half * 2, rows) if transposed else (rows, groups * half * 2)) != shape:
                raise RuntimeError(f"memd's mxfp4 slot has {spec.name} blocks {spec.shape}, which cannot make the"
                                   f" model's {list(shape)}: memd and the worker must serve the same checkpoint")
            # rows stored [out, in]; an [in, out] parameter (``transposed``, GPT-OSS) is their transposed view where
            # the matmul reads it with the same bits, else each row is copied into [in, out] rows (layouts.py)
            self.copies = transposed and not transposed_view_is_exact((groups * half * 2, rows), dtype)
            self.stored = aligned_empty((1 if self.copies else capacity, rows, groups * half * 2), dtype)
            self.scratch = aligned_empty((capacity, groups * half * 2, rows), dtype) if self.copies else \
                self.stored.transpose(1, 2) if transposed else self.stored
            # both values of a byte under a scale, as one 2x-wide integer: one gather writes two outputs
            self.pairs = mxfp4_pairs(dtype)
            self.index = None if self.kernels else torch.empty(min(capacity, BATCH), rows, groups * half,
                                                                  dtype=torch.int32)
        elif self.format == "fp8":
            if tuple(spec.shape) != shape:
                raise RuntimeError(f"memd's fp8 slot has {spec.name} {spec.shape}, the model wants {list(shape)}")
            self.scratch = aligned_empty((capacity, *shape), dtype)
            grid_r, grid_c = spec.scale_shape
            if not (0 < grid_r <= shape[0] and 0 < grid_c <= shape[1]) or shape[0] % grid_r or shape[1] % grid_c:
                raise RuntimeError(f"memd's fp8 slot has {spec.name} scales {spec.scale_shape} that do not tile its"
                                   f" {list(shape)} values into equal blocks")
            self.blocks = (grid_r, shape[0] // grid_r, grid_c, shape[1] // grid_c)
            self.index = None if self.kernels else torch.empty(min(capacity, BATCH), *shape, dtype=torch.int32)
            # block b's 256 byte values times its scale, in float32 then rounded once: the same bits as
            # transformers' (q.float() * s).to(dtype), looked up straight into the output
            batch, blocks = min(capacity, BATCH), grid_r * grid_c
            self.block_base = (torch.arange(batch * blocks, dtype=torch.int32) * 256).view(batch, grid_r, 1, grid_c, 1)
            self.table = fp8_table()
            self.scaled = torch.empty(batch, blocks, 256, dtype=torch.float32)
            self.block_table = torch.empty(batch, blocks * 256, dtype=dtype)
        else:
            raise RuntimeError(f"memd's slot holds {spec.name} in format {spec.format!r}, which this worker cannot"
                               " dequantize (mxfp4 and fp8 are supported)")

    def direct(self, kernels, transposed: bool, exact: bool = False) -> bool:
        """Can ``kernels``' FP8 or MXFP4 matrix-vector kernel read this bfloat16 parameter from its slots (FP8 ``[out,
        in]`` in 8 x 64 multiples; MXFP4 as stored)? ``exact``: in the order ``matvec_checks.check_exact`` found
        (oneDNN's: FP8 in 16 x 64 multiples, MXFP4; ATen's AVX2 one: FP8 in 64-column multiples, ``[in, out]``
        MXFP4)."""
        order = kernels.exact_order if exact else None
        if self.dtype != torch.bfloat16:
            return False
        if self.format == "mxfp4":  # (ATen's: its x @ W order for [in, out] parameters, its dots for [out, in])
            rows, groups = self.values.shape[-3:-1]
            aten = kernels.matvec_exact_mxfp4_xw and rows % 2 == 0 and groups * 32 <= 16384 if transposed else \
                kernels.matvec_exact_mxfp4 and groups % 2 == 0
            usable = kernels.matvec_exact_onednn_mxfp4 if order == "onednn" else aten if order == "aten-avx2" \
                else not exact and kernels.matvec_mxfp4_fast
            return usable and self.values.shape[-1] == 16
        grid_r, block_r, grid_c, block_c = self.blocks
        cols = self.shape[1]
        if transposed or cols % 64 or block_c % 64:
            return False
        if order == "onednn":
            return kernels.matvec_exact_onednn_fp8 and block_r % 16 == 0 and grid_c <= 256
        if exact:
            return order == "aten-avx2" and kernels.matvec_exact_fp8
        return kernels.matvec_fp8_fast and block_r % 8 == 0 and grid_c <= 64 and cols <= 16384

    def dequantize(self, slots: list[int]) -> torch.Tensor:
        """The experts in ``slots``, dequantized into scratch rows ``0..len(slots)-1``."""
        if len(slots) > self.scratch.shape[0]:
            raise RuntimeError(f"{len(slots)} experts routed in one layer, the dequantization buffer holds"
                               f" {self.scratch.shape[0]} (min(experts, pool slots))")
        self.fill([(slot, row) for row, slot in enumerate(slots)])
        return self.scratch[:len(slots)]

    def dequantize_into(self, slot: int, row: int) -> None:
        self.fill([(slot, row)])

    def fill(self, pairs: list[tuple[int, int]]) -> None:
        """Dequantize expert ``slot`` into scratch ``row`` for each pair: the index arithmetic runs once per
        ``BATCH`` experts (a layer's misses in one go), the gathers write each row in place."""
        for start in range(0, len(pairs), BATCH):
            chunk = pairs[start:start + BATCH]
            if self.format == "mxfp4":
                self._mxfp4(chunk)
            else:
                self._fp8(chunk)

    def _mxfp4(self, pairs: list[tuple[int, int]]) -> None:
        index = None if self.kernels is not None else self._mxfp4_index(pairs)
        for i, (slot, row) in enumerate(pairs):
            stored = self.stored[0 if self.copies else row].view(self.pairs.dtype)
            if index is None:
                self.kernels.mxfp4(self.values[slot], self.scales[slot], self.pairs, stored,
                                   self.dtype == torch.bfloat16)
            else:
                torch.index_select(self.pairs, 0, index[i].view(-1), out=stored.view(-1))
            if self.copies:
                self.scratch[row].copy_(stored.view(self.dtype).T)

    def _mxfp4_index(self, pairs: list[tuple[int, int]]) -> torch.Tensor:
        """The torch path's gather index: ``256 * scale + byte`` for every byte of each pair's slot."""
        n = len(pairs)
        slots = torch.tensor([slot for slot, _ in pairs])
        index = self.index[:n]  # [n, rows, K / 2]
        for i, (slot, _) in enumerate(pairs):
            index[i].copy_(self.values[slot].flatten(1))  # bytes -> int32, in the blocks' own order
        scale = self.scales.index_select(0, slots).to(torch.int32).mul_(256)  # [n, rows, groups]
        index.unflatten(2, (scale.shape[2], -1)).add_(scale.unsqueeze(3))  # 256 * scale + byte, same dtype
        return index

    def _fp8(self, pairs: list[tuple[int, int]]) -> None:
        n = len(pairs)
        grid_r, block_r, grid_c, block_c = self.blocks
        slots = torch.tensor([slot for slot, _ in pairs])
        if self.kernels is not None and self.kernels.fp8_direct and self.dtype == torch.bfloat16 \
                and block_c % 16 == 0:  # computed, no table (AVX2 without VBMI's shuffles)
            scales = self.scales.index_select(0, slots).float()
            for i, (slot, row) in enumerate(pairs):
                self.kernels.fp8_bf16(self.values[slot].view(torch.uint8), scales[i], self.scratch[row], block_r,
                                      block_c)
            return
        scaled = self.scaled[:n]  # [n, blocks, 256]: every byte's value times its block's scale, float32
        torch.mul(self.table, self.scales.index_select(0, slots).float().view(n, -1, 1), out=scaled)
        self.block_table[:n].copy_(scaled.view(n, -1))  # one rounding to the parameter dtype
        if self.kernels is not None:
            for i, (slot, row) in enumerate(pairs):
                self.kernels.fp8(self.values[slot].view(torch.uint8), self.block_table[i], self.scratch[row], block_r,
                                 block_c)
            return
        index = self.index[:n]
        for i, (slot, _) in enumerate(pairs):
            index[i].copy_(self.values[slot].view(torch.uint8))
        index.view(n, grid_r, block_r, grid_c, block_c).add_(self.block_base[:n])  # 256 * (n * blocks + block) + byte
        table = self.block_table[:n].view(-1)
        for i, (_, row) in enumerate(pairs):
            torch.index_select(table, 0, index[i].view(-1), out=self.scratch[row].view(-1))


def _view(by_slot: torch.Tensor, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    return by_slot[:, offset:offset + n * dtype.itemsize].view(dtype).unflatten(1, list(shape))


def quantized_params(hello: m.HelloReply, by_slot: torch.Tensor, module, capacity: int,
                     kernels: Kernels | None = None) -> dict[str, QuantParam]:
    """The quantized parameters of the experts modules (all layers share one layout and one scratch)."""
    params = dict(module.named_parameters(recurse=False))
    out = {}
    for spec in hello.tensors:
        if spec.format:
            param = params[spec.name]
            out[spec.name] = QuantParam(spec, by_slot, tuple(param.shape[1:]), param.dtype, capacity, kernels,
                                        transposed=bool(module.is_transposed))
    return out


class Dequantizer:
    """Per worker (the layers run one at a time and share it): dequantizes a layer's routed slots into cached rows
    and runs transformers' grouped-matmul forward on them."""

    def __init__(self, quantized: dict[str, QuantParam], plain: dict[str, torch.Tensor], rows: int):
        self.quantized = quantized
        self.plain = plain  # unquantized parameters (GPT-OSS's biases): slot views, copied into rows on a miss
        self.plain_rows = {n: torch.empty((rows, *v.shape[1:]), dtype=v.dtype) for n, v in plain.items()}
        self.cache = RowCache(rows)
        self.tensors = {name: q.scratch for name, q in quantized.items()} | self.plain_rows
        self.matvec: Matvec | None = None  # --matvec-kernel: decode steps' products by matvec.c (``use``)
        self.direct = False  # ... straight from the FP8 slots, nothing dequantized
        self.fp8_values = fp8_table()

    @classmethod
    def build(cls, hello: m.HelloReply, by_slot: torch.Tensor, plain_views: dict[str, torch.Tensor], module,
              capacity: int, cache_bytes: int = 0, kernels: Kernels | None = None) -> "Dequantizer":
        """``capacity``: the most experts a layer can route at once; ``cache_bytes``: room for more rows;
        ``kernels``: the compiled dequantization kernels (None: torch's ops)."""
        rows = capacity + cache_bytes // max(1, row_bytes(hello, plain_views, module))
        quantized = quantized_params(hello, by_slot, module, rows, kernels)
        return cls(quantized, {n: v for n, v in plain_views.items() if n not in quantized}, rows)

    def use(self, mv: Matvec | None, module) -> None:
        """``--matvec-kernel``: decode steps' products by the kernel, straight from the slots for block-FP8 experts
        in layouts the FP8 kernel takes (nothing dequantized, nothing written; ``exact``: in oneDNN's order,
        ``matvec_onednn.c``, FP8 and MXFP4, or ATen's AVX2 ones, ``matvec_exact.c`` and ``matvec_exact_xw.c``, FP8
        and MXFP4), else on the dequantized rows."""
        self.matvec = mv
        names = {"gate_up_proj" if module.has_gate else "up_proj", "down_proj"}
        exact = mv is not None and mv.exact
        self.direct = mv is not None and names <= set(self.quantized) \
            and all(q.direct(mv.kernels, bool(module.is_transposed), exact) for q in self.quantized.values())
        if mv is not None:
            log.info("--matvec-kernel: decode steps multiply the %s", "quantized slots in place (nothing"
                     " dequantized)" if self.direct else "dequantized rows")

    def rows(self, layer: int, experts: list[int], slots: list[int]) -> list[int]:
        """The rows holding the routed experts, dequantizing those the cache lacks."""
        rows, fill = self.cache.place(layer, experts, slots)
        for slot, row in fill:
            for name, view in self.plain.items():
                self.plain_rows[name][row].copy_(view[slot])
        for q in self.quantized.values():
            q.fill(fill)
        return rows

    def params(self, layer: int, experts: list[int], slots: list[int]) -> dict[str, torch.Tensor]:
        """Copies of the routed experts' parameters, in the order given (for checks; forward uses the rows)."""
        index = torch.tensor(self.rows(layer, experts, slots))
        return {name: tensor.index_select(0, index) for name, tensor in self.tensors.items()}

    def forward(self, module, layer: int, experts: torch.Tensor, slots: list[int], hidden_states, top_k_index,
                top_k_weights):
        """``experts`` (sorted unique routed ids) live in ``slots``; they become their cached rows. When more are
        routed than the scratch holds (a prefill: the scratch is sized for a decode step), the experts run in groups
        that fit, each once on all its tokens, with the bits of one call (``expert_groups.py``)."""
        if self.direct:
            out = self._direct(module, experts, slots, hidden_states, top_k_index, top_k_weights)
            if out is not None:
                return out
        if len(experts) <= self.cache.rows:
            return self._forward(module, layer, experts, slots, hidden_states, top_k_index, top_k_weights)
        slot_of = dict(zip(experts.tolist(), slots))

        def group_forward(group, hidden, index, weights):  # never the matvec kernel: one call might not choose it
            return self._forward(module, layer, group, [slot_of[e] for e in group.tolist()], hidden, index, weights,
                                 use_matvec=False)

        return in_expert_groups(group_forward, experts, self.cache.rows, hidden_states, top_k_index, top_k_weights)

    def _forward(self, module, layer: int, experts: torch.Tensor, slots: list[int], hidden_states, top_k_index,
                 top_k_weights, use_matvec: bool = True):
        rows = self.rows(layer, experts.tolist(), slots)
        remap = torch.empty(module.num_experts, dtype=top_k_index.dtype)
        remap[experts] = torch.tensor(rows, dtype=top_k_index.dtype)
        proxy = _Experts(module, self.tensors)  # grouped_mm skips the rows no token is routed to
        return matvec.forward(proxy, hidden_states, remap[top_k_index], top_k_weights,
                              self.matvec if use_matvec else None)

    def _direct(self, module, experts: torch.Tensor, slots: list[int], hidden_states, top_k_index, top_k_weights):
        """The decode forward on the quantized slots themselves, or None (a prompt step, but GPT-OSS's on AVX2; an
        MXFP4 scale the kernel does not compute)."""
        return matvec.quantized_forward(module, self.quantized, self.plain, self.matvec, self.fp8_values, experts,
                                        slots, hidden_states, top_k_index, top_k_weights)


def row_bytes(hello: m.HelloReply, plain_views: dict[str, torch.Tensor], module) -> int:
    """Bytes of one dequantized expert (every parameter, in the model's dtype)."""
    params = dict(module.named_parameters(recurse=False))
    quantized = {spec.name for spec in hello.tensors if spec.format}
    return sum(params[n][0].numel() * params[n].dtype.itemsize for n in quantized) + sum(
        v[0].numel() * v.dtype.itemsize for n, v in plain_views.items() if n not in quantized)


class _Experts:
    """Stands in for the experts module inside transformers' forward: the dequantized rows as its parameters."""

    def __init__(self, module, params: dict[str, torch.Tensor]):
        self._module = module
        self.num_experts = next(iter(params.values())).shape[0]
        for name, tensor in params.items():
            setattr(self, name, tensor)

    def __getattr__(self, name):  # act_fn, _apply_gate, has_bias, is_transposed, ... come from the real module
        return getattr(self._module, name)
