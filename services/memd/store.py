"""The expert store: where every expert's bytes lie in the user's checkpoint, and how they fill a pool slot.

Built once at start from the safetensors headers and transformers' conversion mapping: no conversion step,
no second copy. A slot holds one expert's parameters in the model's runtime layout, each parameter at a
4 KiB-aligned offset (O_DIRECT wants it, and aligned weights keep the matmuls bit-identical to transformers).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

from common.checkpoint import (EXPERT_DTYPES, SAFETENSORS_DTYPES, Checkpoint, CheckpointError, KeyMapper, MoeLayer,
                               build_meta_model, expert_number, find_moe_layers)
from common.messages import TensorSpec

log = logging.getLogger("moeinf.memd.store")
ALIGN = 4096


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True, slots=True)
class Segment:
    """Copy ``nbytes`` from ``file`` at ``file_offset`` to ``slot base + slot_offset``."""

    file: str
    file_offset: int
    nbytes: int
    slot_offset: int


class ExpertStore:
    def __init__(self, checkpoint: Checkpoint):
        from services.memd.testhooks import install_from_env  # TEST ONLY: MOEINF_TEST_READ_LATENCY_MS (tests/fault)
        install_from_env()
        self.checkpoint = checkpoint
        self.config = checkpoint.load_config()
        model = build_meta_model(self.config)
        self.model_type = self.config.model_type
        self.layers: list[MoeLayer] = find_moe_layers(model)
        self.num_experts = self.layers[0].num_experts
        self._by_module = {layer.module: layer for layer in self.layers}
        self.segments: dict[tuple[int, int], list[Segment]] = defaultdict(list)
        self.dtype = self._index(KeyMapper(model))
        self.tensors, self.slot_bytes = self._slot_layout()
        self._check_complete()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's parameters (without slot padding)."""
        return sum(s.nbytes for s in self.segments[(0, 0)])

    @property
    def total_expert_bytes(self) -> int:
        return self.expert_bytes * self.num_layers * self.num_experts

    def _slot_layout(self) -> tuple[list[TensorSpec], int]:
        specs, offset = [], 0
        for p in self.layers[0].params:
            specs.append(TensorSpec(p.name, offset, list(p.shape), self.dtype))
            offset = align_up(offset + _numel(p.shape) * self._itemsize)
        return specs, offset

    @property
    def _itemsize(self) -> int:
        return SAFETENSORS_DTYPES[self._disk_dtype][1]

    def _index(self, mapper: KeyMapper) -> str:
        self._disk_dtype = None
        self._param_offsets: dict[str, int] = {}
        for key, entry in self.checkpoint.tensors.items():
            target, converter, pattern = mapper.map(key)
            module, _, pname = target.rpartition(".")
            layer = self._by_module.get(module)
            if layer is None:
                continue
            self._check_dtype(key, entry.dtype)
            param = next((p for p in layer.params if p.name == pname), None)
            if param is None:
                raise CheckpointError(f"{key}: maps to {target}, which the experts module has no parameter for")
            if converter is None:
                self._add_stacked(layer, param, key, entry)
            else:
                self._add_per_expert(layer, param, key, entry, converter, pattern, mapper)
        if self._disk_dtype is None:
            raise CheckpointError(f"{self.checkpoint.dir}: no expert tensors found for {self.layers[0].module}")
        return SAFETENSORS_DTYPES[self._disk_dtype][0]

    def _check_dtype(self, key: str, dtype: str) -> None:
        if dtype not in EXPERT_DTYPES:
            raise CheckpointError(f"{key}: expert dtype {dtype} is not supported (float32, float16 and bfloat16 are;"
                                  " quantized experts are not served yet)")
        if self._disk_dtype not in (None, dtype):
            raise CheckpointError(f"{key}: expert dtype {dtype} differs from the other experts' {self._disk_dtype}")
        self._disk_dtype = dtype

    def _param_slot_offset(self, layer: MoeLayer, pname: str) -> int:
        offset = 0
        for p in layer.params:
            if p.name == pname:
                return offset
            offset = align_up(offset + _numel(p.shape) * SAFETENSORS_DTYPES[self._disk_dtype][1])
        raise KeyError(pname)

    def _add_stacked(self, layer, param, key, entry) -> None:
        """A tensor stored as ``[num_experts, ...]`` (e.g. GPT-OSS): expert e is the e-th contiguous slice."""
        if entry.shape != (layer.num_experts, *param.shape):
            raise CheckpointError(f"{key}: shape {list(entry.shape)} != expected {[layer.num_experts, *param.shape]}")
        per_expert = entry.nbytes // layer.num_experts
        base = self._param_slot_offset(layer, param.name)
        for e in range(layer.num_experts):
            self.segments[(layer.index, e)].append(Segment(entry.file, entry.start + e * per_expert, per_expert, base))

    def _add_per_expert(self, layer, param, key, entry, converter, pattern, mapper) -> None:
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
        sources = len(converter.source_patterns)
        param_bytes = _numel(param.shape) * SAFETENSORS_DTYPES[entry.dtype][1]
        if entry.nbytes * sources != param_bytes:
            raise CheckpointError(f"{key}: shape {list(entry.shape)} does not make {param.name} {list(param.shape)}")
        expert = expert_number(mapper.renamed(key), pattern)
        if not 0 <= expert < layer.num_experts:
            raise CheckpointError(f"{key}: expert {expert} is out of range (the model has {layer.num_experts})")
        offset = self._param_slot_offset(layer, param.name) + position * entry.nbytes
        self.segments[(layer.index, expert)].append(Segment(entry.file, entry.start, entry.nbytes, offset))

    def _check_complete(self) -> None:
        want = sum(_numel(p.shape) for p in self.layers[0].params) * self._itemsize
        for layer in self.layers:
            for e in range(layer.num_experts):
                segs = self.segments.get((layer.index, e), [])
                got = sum(s.nbytes for s in segs)
                if got != want:
                    raise CheckpointError(f"{self.checkpoint.dir}: expert {e} of {layer.module} has {got} of its"
                                          f" {want} bytes in the checkpoint (missing tensors?)")
                segs.sort(key=lambda s: (s.file, s.file_offset))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
