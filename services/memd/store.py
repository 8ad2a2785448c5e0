"""The expert store: where every expert's bytes lie in the user's checkpoint, and how they fill a pool slot.

Built from the safetensors headers and transformers' conversion mapping (on a meta model: no memory): no
conversion step, no second copy. It imports transformers and torch, so memd never builds it in its own process:
its indexer child does (``services/memd/indexer.py``) and hands memd the result as an ``ExpertIndex``
(``common/expert_index.py``). A slot holds one expert's parameters in the model's runtime layout, each parameter
at a 4 KiB-aligned offset (O_DIRECT wants it, and aligned weights keep the matmuls bit-identical to transformers).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass

from common.checkpoint import (EXPERT_DTYPES, SAFETENSORS_DTYPES, Checkpoint, CheckpointError, KeyMapper, MoeLayer,
                               build_meta_model, expert_key_owner, expert_number, experts_per_token, find_moe_layers,
                               split_part, supported_formats)
from common.expert_index import ALIGN, ExpertIndex, Segment, align_up
from common.messages import TensorSpec
from common.quant_encode import MXFP4_BLOCK

__all__ = ["ALIGN", "ExpertStore", "Segment", "align_up"]
log = logging.getLogger("moeinf.memd.store")
SUPPORTED_KEYED = "unquantized (float32/float16/bfloat16), one tensor per expert parameter"

@dataclass(slots=True)
class _Part:
    """The bytes of one stored part (values or scales) of one expert parameter, per expert."""

    dtype: str  # safetensors dtype
    shape: tuple[int, ...]  # per expert, as stored (concatenated sources included)
    nbytes: int


class ExpertStore:
    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.format, self.block = checkpoint.quant_format()  # "" | "mxfp4" | "fp8"; refuses the others
        self.config = checkpoint.load_config()
        model = build_meta_model(self.config)
        self.model_type = self.config.model_type
        self.layers: list[MoeLayer] = find_moe_layers(model)
        self.num_experts = self.layers[0].num_experts
        self._by_module = {layer.module: layer for layer in self.layers if not layer.keyed}
        self._keyed = {layer.module: layer for layer in self.layers if layer.keyed}
        self.segments: dict[tuple[int, int], list[Segment]] = defaultdict(list)
        self._found: dict[tuple[str, str], list] = defaultdict(list)  # (param, part) -> [(layer, key, entry, ...)]
        self._collect(KeyMapper(model))
        self.parts = self._layout_parts()
        self.tensors, self.slot_bytes = self._slot_layout()
        self._place_segments()
        self._check_complete()
        self.dtype = SAFETENSORS_DTYPES[self.parts[(self.layers[0].params[0].name, "values")].dtype][0]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def prepare(self, key: tuple[int, int]) -> None:
        """Called by a reader thread before an expert's first piece; the checkpoint's bytes are read as they lie
        (``services/memd/compressed.py`` converts the expert into its cache file here)."""

    def ready(self, key: tuple[int, int]) -> bool:
        """``prepare`` has nothing to do for ``key`` (a prefetch never waits for a conversion: ``reader.py``)."""
        return True

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's parameters as stored (quantized values and scales; without slot padding)."""
        return sum(part.nbytes for part in self.parts.values())

    @property
    def total_expert_bytes(self) -> int:
        return self.expert_bytes * self.num_layers * self.num_experts

    @property
    def files(self) -> list[str]:
        """The files the segments read from (the compressed store reads its cache file instead)."""
        return [str(f) for f in self.checkpoint.files]

    @property
    def top_k(self) -> int:
        """Experts per token (2 where the config does not say)."""
        return experts_per_token(self.config)

    def index(self) -> ExpertIndex:
        """What memd needs of this store, without transformers (its ``key`` is stamped by memd)."""
        experts = [self.segments[(layer.index, e)] for layer in self.layers for e in range(self.num_experts)]
        return ExpertIndex("", self.model_type, self.format, self.dtype, self.top_k, [l.module for l in self.layers],
                           self.num_experts, self.tensors, self.slot_bytes, self.expert_bytes, self.files, experts,
                           self.layers[0].transposed)

    def _collect(self, mapper: KeyMapper) -> None:
        """Every checkpoint tensor of an experts module, by (parameter, part); quantized companions (``*_blocks``,
        ``*_scales``, ``*_scale_inv``) are mapped by the name of the weight they belong to."""
        for key, entry in self.checkpoint.tensors.items():
            base, part = split_part(key, self.format)
            target, converter, pattern = mapper.map(base)
            if owner := expert_key_owner(target, self._keyed):  # one tensor of one expert module (nn.ModuleDict)
                layer, expert, pname = owner
                self._keyed_tensor(layer, key, entry, converter, expert, pname, part)
                continue
            module, _, pname = target.rpartition(".")
            layer = self._by_module.get(module)
            if layer is None:
                continue
            param = next((p for p in layer.params if p.name == pname), None)
            if param is None and "scale" in pname:  # (an Inkling2 MXFP8 checkpoint without quantization_config)
                raise CheckpointError(f"{key}: maps to {target}, a quantization scale the experts module has no"
                                      f" parameter for: experts stored quantized in a format config.json does not"
                                      f" name; moeinf serves {supported_formats()}")
            if param is None:
                raise CheckpointError(f"{key}: maps to {target}, which the experts module has no parameter for")
            stacked = converter is not None and _stacked_ops(converter, key, pattern) is not None
            expert = None if converter is None or stacked else expert_number(mapper.renamed(base), pattern)
            self._found[(pname, part)].append((layer, key, entry, converter, pattern, expert))
        if not self._found:
            raise CheckpointError(f"{self.checkpoint.dir}: no expert tensors found for {self.layers[0].module}")

    def _keyed_tensor(self, layer: MoeLayer, key: str, entry, converter, expert: int, pname: str, part: str) -> None:
        if converter is not None or part != "values":
            raise CheckpointError(f"{key}: converted or quantized experts kept one module per expert are not"
                                  f" supported; moeinf serves them {SUPPORTED_KEYED}")
        if not any(p.name == pname for p in layer.params):
            raise CheckpointError(f"{key}: the experts of {layer.module} have no parameter {pname}")
        if not 0 <= expert < layer.num_experts:
            raise CheckpointError(f"{key}: expert {expert} is out of range (the model has {layer.num_experts})")
        self._found[(pname, part)].append((layer, key, entry, None, None, expert))

    def _param_format(self, pname: str) -> str:
        values = self._found.get((pname, "values"), [])
        has_scales = bool(self._found.get((pname, "scales")))
        if self._found.get((pname, "blocks")):
            if values:
                raise CheckpointError(f"{values[0][1]}: experts mix formats ({pname} is stored both as mxfp4 blocks and"
                                      f" unquantized); moeinf serves {supported_formats()}")
            return "mxfp4"
        by_dtype: dict[str, list[str]] = defaultdict(list)
        for v in values:
            by_dtype[v[2].dtype].append(v[1])
        if len(by_dtype) > 1:
            odd, common = sorted(by_dtype, key=lambda d: len(by_dtype[d]))[:2]
            verdict = "is not supported" if odd not in EXPERT_DTYPES else f"differs from the other experts' {common}"
            raise CheckpointError(f"{by_dtype[odd][0]}: expert dtype {odd} {verdict} (experts that mix formats are"
                                  f" refused; moeinf serves {supported_formats()})")
        dtype = next(iter(by_dtype), None)
        if dtype == "F8_E4M3" and has_scales:
            return "fp8"
        if dtype in EXPERT_DTYPES and not has_scales:
            return ""
        what = f"{dtype} with weight_scale_inv" if has_scales else f"{dtype}"
        hint = "" if self.format else " (config.json has no quantization_config)"
        raise CheckpointError(f"{values[0][1] if values else pname}: expert dtype {what} is not supported{hint};"
                              f" moeinf serves {supported_formats()}")

    def _layout_parts(self) -> dict[tuple[str, str], _Part]:
        parts: dict[tuple[str, str], _Part] = {}
        formats = {}
        for param in self.layers[0].params:
            fmt = formats[param.name] = self._param_format(param.name)
            if fmt == "mxfp4":
                parts[(param.name, "values")] = self._stacked_part(param, "blocks")
                parts[(param.name, "scales")] = self._stacked_part(param, "scales")
            elif fmt == "fp8":
                parts[(param.name, "values")] = self._per_expert_part(param, "values")
                parts[(param.name, "scales")] = self._per_expert_part(param, "scales")
            else:
                parts[(param.name, "values")] = self._plain_part(param)
        weights = {formats[p.name] for p in self.layers[0].params if len(p.shape) >= 2}
        if weights != {self.format}:
            named = ", ".join(f"{n}: {f or 'unquantized'}" for n, f in formats.items())
            raise CheckpointError(f"{self.checkpoint.dir}: experts mix formats ({named}; config.json says"
                                  f" {self.format or 'unquantized'}); moeinf serves {supported_formats()}")
        self.param_formats = formats
        return parts

    def _plain_part(self, param) -> _Part:
        dtype = self._found[(param.name, "values")][0][2].dtype
        return _Part(dtype, param.shape, math.prod(param.shape) * SAFETENSORS_DTYPES[dtype][1])

    def _stacked_part(self, param, part: str) -> _Part:
        """MXFP4 ``[num_experts, rows, groups(, 16)]``: expert e is the e-th slice; the values dequantize to
        ``[rows, groups * 32]``, transposed into the parameter (transformers' mxfp4 integration)."""
        found = self._found[(param.name, part)]
        layer, key, entry, converter = found[0][:4]
        if converter is not None:
            raise CheckpointError(f"{key}: per-expert mxfp4 tensors are not supported (transformers reads mxfp4"
                                  " experts stacked, as GPT-OSS stores them)")
        shape = entry.shape[1:]
        if part == "blocks":
            want = (param.shape[-1], param.shape[-2] // MXFP4_BLOCK, MXFP4_BLOCK // 2)
            if len(param.shape) != 2 or param.shape[-2] % MXFP4_BLOCK or shape != want:
                raise CheckpointError(f"{key}: mxfp4 blocks {list(entry.shape)} cannot make {param.name}"
                                      f" {list(param.shape)} (want [{layer.num_experts}, {', '.join(map(str, want))}])")
        elif shape != tuple(self._found[(param.name, "blocks")][0][2].shape[1:3]):
            raise CheckpointError(f"{key}: mxfp4 scales {list(entry.shape)} do not match their blocks")
        if entry.dtype != "U8":
            raise CheckpointError(f"{key}: mxfp4 {part} must be U8, got {entry.dtype}")
        return _Part("U8", shape, math.prod(shape))

    def _per_expert_part(self, param, part: str) -> _Part:
        """Block FP8 per-expert tensors merged by the converter: values and scales both concatenated on dim 0."""
        found = self._found[(param.name, part)]
        layer, key, entry, converter = found[0][:4]
        if converter is None:
            raise CheckpointError(f"{key}: stacked fp8 experts are not supported (transformers dequantizes fp8"
                                  " experts stored one tensor per expert)")
        sources = len(converter.source_patterns)
        shape = (entry.shape[0] * sources, *entry.shape[1:])
        if part == "values" and shape != param.shape:
            raise CheckpointError(f"{key}: shape {list(entry.shape)} does not make {param.name} {list(param.shape)}")
        if part == "scales":
            self._check_blocks(key, param, entry.shape, sources)
            dtypes = {f[2].dtype for f in found}
            if not dtypes <= FP8_SCALE_DTYPES or len(dtypes) > 1:  # (E8M0 exponents as U8 would multiply as bytes)
                raise CheckpointError(f"{key}: fp8 scales of dtype {', '.join(sorted(dtypes))}; moeinf takes one of"
                                      f" {', '.join(sorted(FP8_SCALE_DTYPES))} for every expert")
        return _Part(entry.dtype, shape, entry.nbytes * sources)

    def _check_blocks(self, key: str, param, scale_shape, sources: int) -> None:
        rows, cols = param.shape[0] // sources, param.shape[1]
        if len(scale_shape) != 2:
            raise CheckpointError(f"{key}: weight_scale_inv must be 2-D (one scale per block), got {list(scale_shape)}")
        for size, grid, block in ((rows, scale_shape[0], self.block[0]), (cols, scale_shape[1], self.block[1])):
            if size % grid or size // grid != min(block, size):
                raise CheckpointError(f"{key}: scales {list(scale_shape)} do not tile [{rows}, {cols}] in"
                                      f" weight_block_size {list(self.block)} blocks")

    def _slot_layout(self) -> tuple[list[TensorSpec], int]:
        specs, offset, self._offsets = [], 0, {}
        for p in self.layers[0].params:
            values = self.parts[(p.name, "values")]
            self._offsets[(p.name, "values")] = offset
            offset = align_up(offset + values.nbytes)
            fmt = self.param_formats[p.name]
            if not fmt:
                specs.append(TensorSpec(p.name, self._offsets[(p.name, "values")], list(values.shape), _torch(values)))
                continue
            scales = self.parts[(p.name, "scales")]
            self._offsets[(p.name, "scales")] = offset
            specs.append(TensorSpec(p.name, self._offsets[(p.name, "values")], list(values.shape), _torch(values),
                                    fmt, offset, list(scales.shape), _torch(scales)))
            offset = align_up(offset + scales.nbytes)
        return specs, offset

    def _place_segments(self) -> None:
        for (pname, part), found in self._found.items():
            slot_part = "values" if part in ("values", "blocks") else "scales"
            base = self._offsets[(pname, slot_part)]
            shape, per_expert = self.parts[(pname, slot_part)].shape, self.parts[(pname, slot_part)].nbytes
            for layer, key, entry, converter, pattern, expert in found:
                if layer.keyed:
                    self._add_own(layer, key, entry, expert, per_expert, base)
                elif converter is None:
                    self._add_stacked(layer, key, entry, per_expert, base)
                elif (ops := _stacked_ops(converter, key, pattern)) is not None:
                    rows = self._interleaved_rows(layer, key, entry, converter, part, shape) if ops else 0
                    self._add_stacked(layer, key, entry, per_expert, base, rows)
                else:
                    sources = len(converter.source_patterns)
                    if (entry.shape[0] * sources, *entry.shape[1:]) != tuple(shape):
                        raise CheckpointError(f"{key}: shape {list(entry.shape)} does not make {pname}"
                                              f" {list(shape)} ({part}) with the other experts")
                    self._add_per_expert(layer, key, entry, converter, pattern, expert, per_expert, base)

    def _add_stacked(self, layer, key, entry, per_expert, base, interleaved_rows: int = 0) -> None:
        """A tensor stored as ``[num_experts, ...]`` (e.g. GPT-OSS): expert e is the e-th contiguous slice; with
        ``interleaved_rows`` (their length in bytes), its rows are stored in interleaved pairs."""
        if entry.shape[0] != layer.num_experts or entry.nbytes != per_expert * layer.num_experts:
            raise CheckpointError(f"{key}: shape {list(entry.shape)} is not {layer.num_experts} experts of"
                                  f" {per_expert} bytes")
        for e in range(layer.num_experts):
            self.segments[(layer.index, e)].append(Segment(entry.file, entry.start + e * per_expert, per_expert, base,
                                                           interleaved_rows, 0, bool(interleaved_rows)))

    def _interleaved_rows(self, layer, key, entry, converter, part: str, shape) -> int:
        """A stacked ``[num_experts, rows, columns]`` tensor whose rows transformers' ``Interleave(dim=1)`` takes
        out of pairs (a fused gate and up projection stored gate 0, up 0, gate 1, ...): its row length in bytes,
        which the reader puts in the parameter's order (``Segment.interleaved``)."""
        op = next(op for op in converter.operations if type(op).__name__ == "Interleave")
        dim, inverse = getattr(op, "dim", None), getattr(op, "inverse", False)
        reasons = [(dim != 1, "another dimension than the rows"), (inverse, "the inverse order"),
                   (layer.transposed, "experts stored [in, out]"),
                   (part != "values" or self.format, "a quantized part"),
                   (tuple(entry.shape[1:]) != tuple(shape) or shape[0] % 2,
                    f"shape {list(entry.shape)}, not [experts, {', '.join(map(str, shape))}] with rows in pairs")]
        why = next((text for bad, text in reasons if bad), "")
        if why:
            raise CheckpointError(f"{key}: conversion Interleave(dim={dim}, inverse={inverse}) is not supported here"
                                  f" ({why}); moeinf reorders the rows of unquantized stacked [experts, rows,"
                                  " columns] experts")
        return entry.shape[2] * SAFETENSORS_DTYPES[entry.dtype][1]

    def _add_own(self, layer, key, entry, expert, per_expert, base) -> None:
        """One expert module's own tensor (an ``nn.ModuleDict`` of experts): the whole tensor is the part."""
        if entry.nbytes != per_expert:
            raise CheckpointError(f"{key}: shape {list(entry.shape)} ({entry.dtype}) differs from the other experts'"
                                  f" ({per_expert} bytes)")
        self.segments[(layer.index, expert)].append(Segment(entry.file, entry.start, entry.nbytes, base))

    def _add_per_expert(self, layer, key, entry, converter, pattern, expert, per_expert, base) -> None:
        """One tensor per expert (Mixtral's w1/w3/w2, Qwen's gate/up/down) merged by the converter's operations."""
        ops = [type(op).__name__ for op in converter.operations]
        dims = [getattr(op, "dim", None) for op in converter.operations]
        if ops == ["MergeModulelist"] and dims == [0]:
            position = 0
        elif ops == ["MergeModulelist", "Concatenate"] and dims == [0, 1]:
            position = converter.source_patterns.index(pattern)  # concatenated along the per-expert first dim
        else:
            raise CheckpointError(f"{key}: conversion {list(zip(ops, dims))} for {self.model_type} is not supported"
                                  " (moeinf reads stacked or first-dim-concatenated experts)")
        if entry.nbytes * len(converter.source_patterns) != per_expert:
            raise CheckpointError(f"{key}: {entry.nbytes} bytes, the other experts' tensors here have"
                                  f" {per_expert // len(converter.source_patterns)} (mixed shapes or formats)")
        if not 0 <= expert < layer.num_experts:
            raise CheckpointError(f"{key}: expert {expert} is out of range (the model has {layer.num_experts})")
        offset = base + position * entry.nbytes
        self.segments[(layer.index, expert)].append(Segment(entry.file, entry.start, entry.nbytes, offset))

    def _check_complete(self) -> None:
        want = self.expert_bytes
        for layer in self.layers:
            for e in range(layer.num_experts):
                segs = self.segments.get((layer.index, e), [])
                got = sum(s.nbytes for s in segs)
                if got != want:
                    raise CheckpointError(f"{self.checkpoint.dir}: expert {e} of {layer.module} has {got} of its"
                                          f" {want} bytes in the checkpoint (missing tensors, or experts that mix"
                                          " formats?)")
                segs.sort(key=lambda s: (s.file, s.file_offset))


# transformers ops that return a stacked experts tensor as it is when the checkpoint has none of its companions
DEQUANTIZE_IF_SCALED = {"Inkling2LoopDequantizeExperts"}  # (NVFP4 / MXFP8 scales; a bf16 checkpoint has none)


def _stacked_ops(converter, key: str, pattern: str) -> list[str] | None:
    """For a converter of one stacked experts tensor (no expert number in its source patterns), the operations that
    change its bytes: [] or ["Interleave"]; None for a converter of per-expert tensors. A stacked tensor's quantized
    companion (a source pattern after the first) is refused."""
    if any("*" in p for p in converter.source_patterns):
        return None
    ops = [type(op).__name__ for op in converter.operations]
    changing = [op for op in ops if op not in DEQUANTIZE_IF_SCALED]
    companion = pattern != converter.source_patterns[0]
    if companion and len(changing) < len(ops):  # a scale or an amax: the experts are stored quantized
        raise CheckpointError(f"{key}: experts stored in a quantized format that transformers converts with"
                              f" {', '.join(ops)} are not supported; moeinf serves {supported_formats()}")
    if companion or changing not in ([], ["Interleave"]):
        raise CheckpointError(f"{key}: conversion {ops} of stacked experts is not supported (moeinf reads them as"
                              " stored, or with their rows in interleaved pairs)")
    return changing


FP8_SCALE_DTYPES = frozenset({"F32", "BF16", "F16"})  # block scales the dequantization multiplies by


def _torch(part: _Part) -> str:
    return SAFETENSORS_DTYPES[part.dtype][0]

