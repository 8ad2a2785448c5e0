"""The expert index: where every expert's bytes lie in a checkpoint and how they fill one pool slot.

It is the vocabulary between memd and its indexer (``python -m services.memd.indexer``, a short-lived child that
imports transformers to map checkpoint keys to the model's experts; memd itself never imports torch). memd
caches the index in its state directory, keyed by the checkpoint's identity (``checkpoint_key``), so a restart
does not index again. A slot holds one expert's parameters in the model's runtime layout, each part at a
4 KiB-aligned offset (O_DIRECT wants it, and aligned weights keep the matmuls bit-identical to transformers).
"""
from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from msgspec import Struct

from common.messages import TensorSpec

ALIGN = 4096


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


class Segment(Struct, frozen=True, array_like=True):
    """Copy ``nbytes`` from ``file`` at ``file_offset`` to ``slot base + slot_offset``; with ``row_stride``, as
    rows of ``row_bytes`` laid that many bytes apart (services/memd/spread.py); ``interleaved``: its rows (of
    ``row_bytes``) are stored in pairs, as transformers' ``Interleave`` conversion reads them (a fused gate and up
    projection stored gate 0, up 0, gate 1, ...): stored row ``2 i + s`` is the parameter's row ``s * rows / 2 + i``
    (``place_rows``)."""

    file: str
    file_offset: int
    nbytes: int
    slot_offset: int
    row_bytes: int = 0
    row_stride: int = 0
    interleaved: bool = False

    @property
    def placed(self) -> bool:
        """Its bytes go into the slot row by row (spread apart or reordered), never as one copy or read."""
        return bool(self.row_stride or self.interleaved)

    def rows(self, dest: int) -> tuple[int, int, int, int]:
        """``place_rows``' ``rows`` for this segment placed from pool byte ``dest``."""
        half = self.nbytes // self.row_bytes // 2 if self.interleaved else 0
        return dest, self.row_bytes, self.row_stride or self.row_bytes, half


class ExpertIndex(Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Everything memd needs of the checkpoint: the experts' layout, not the model."""

    key: str  # the checkpoint identity it was built from ("" until memd stamps it)
    model_type: str
    format: str  # "" | "mxfp4" | "fp8"
    dtype: str  # torch dtype name of the first parameter's values
    top_k: int  # experts per token (the config's num_experts_per_tok, 2 where it has none)
    modules: list[str]  # qualified name of each MoE layer's experts module, in model order
    num_experts: int
    tensors: list[TensorSpec]  # the slot layout
    slot_bytes: int
    expert_bytes: int  # bytes of one expert as stored (quantized values and scales; without slot padding)
    files: list[str]  # the checkpoint's safetensors files, absolute
    experts: list[list[Segment]]  # layer * num_experts + expert -> its segments, by file and offset
    transposed: bool = False  # the experts module holds its 2-D parameters [in, out] (GPT-OSS), else [out, in]

    @property
    def num_layers(self) -> int:
        return len(self.modules)

    @property
    def total_expert_bytes(self) -> int:
        return self.expert_bytes * self.num_layers * self.num_experts

    def prepare(self, key: tuple[int, int]) -> None:
        """Called by a reader thread before an expert's first piece: the checkpoint's bytes are read as they lie
        (``services/memd/compressed.py`` converts the expert into its cache file here)."""

    def ready(self, key: tuple[int, int]) -> bool:
        """``prepare`` has nothing to do for ``key`` (a prefetch never waits for a conversion: ``reader.py``)."""
        return True

    @property
    def segments(self) -> dict[tuple[int, int], list[Segment]]:
        """``(layer, expert) -> segments`` (built on each call: read it once)."""
        e = self.num_experts
        return {(i // e, i % e): segs for i, segs in enumerate(self.experts)}


class IndexResult(Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What the indexer writes on its stdout: the index, or the checkpoint error to show the user."""

    index: ExpertIndex | None = None
    error: str = ""


def file_stats(paths, name=lambda p: p.name) -> list[tuple[str, int, int]]:
    """(``name(path)``, size, mtime in ns) of each path that exists: what says a file is still the one seen."""
    return [(name(p), st.st_size, st.st_mtime_ns) for p in map(Path, paths) if p.exists() and (st := p.stat())]


def checkpoint_key(directory: Path, files: list[Path], code: list[Path]) -> str:
    """The identity of a checkpoint as indexed: its directory, config and safetensors files (name, size, mtime),
    the transformers version that mapped it and the indexing code itself (``code``: its source files)."""
    try:
        transformers = version("transformers")
    except PackageNotFoundError:
        transformers = "absent"
    stats = file_stats([directory / "config.json", directory / "model.safetensors.index.json", *files], str)
    digest = hashlib.sha256(json.dumps([str(directory.resolve()), transformers, stats]).encode())
    for path in code:
        digest.update(path.read_bytes())
    return digest.hexdigest()
