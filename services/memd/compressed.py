"""The compressed expert cache (opt-in, memd ``--expert-format fp8|mxfp4``): a bf16/fp16/fp32 checkpoint's experts
served in block FP8 or MXFP4, so the pool holds 2x (FP8) or ~3.8x (MXFP4) more experts per byte and reads that
many fewer bytes per miss. It is lossy (``moeinf bench quality`` measures how much).

Each expert is converted once, on its first read, by the reader thread that takes its first piece (the read then
goes on from the cache file), and kept in one cache file per (checkpoint, format) under
``--expert-cache-dir`` (default ``<state-dir>/expert-cache/``): expert ``(layer, e)`` is the slot image at ``(layer * experts + e) * slot_bytes``,
so a read is one aligned segment. ``done.bin`` has one byte per expert, set after the expert's bytes are on disk
(``fdatasync``): a crash mid-conversion leaves the expert to convert again. ``moeinf convert`` fills the whole
cache ahead, with a progress bar. The cache's name hashes the checkpoint's files (names, sizes, mtimes), the
format and the slot layout: a changed checkpoint gets a fresh cache.

The encoding (``common/quant_encode.py``) is the one the released checkpoints use; the worker dequantizes the
slots with the same code as a natively quantized checkpoint (``services/worker/quant.py``):

- ``fp8``: float8_e4m3fn values and one float32 ``weight_scale_inv`` per 128x128 block (smaller dimensions make
  one block), of the parameter as the experts module holds it;
- ``mxfp4``: 32-value blocks along the reduction (input) dimension, as the MX formats define them, stored
  ``[out, in / 32, 16]`` as GPT-OSS stores its ``*_blocks``/``*_scales``: the transpose of an ``[in, out]``
  parameter (GPT-OSS's, ``ExpertIndex.transposed``), the rows of an ``[out, in]`` one (Mixtral's) as they are. Either
  way a row of the slot is one output's weights, the order the worker's matrix-vector kernel reads in place.

Biases (1-D parameters) stay in the checkpoint's dtype. The conversion is NumPy: memd loads no torch for it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.access import OWNER_ONLY
from common.checkpoint import CheckpointError
from common.messages import TensorSpec
from common.quant_encode import MXFP4_BLOCK, fp8_encode, mxfp4_encode, numpy_dtype
from common.expert_index import ExpertIndex, Segment, align_up

log = logging.getLogger("moeinf.memd.compressed")
FORMATS = ("fp8", "mxfp4")
CACHE_DIR = "expert-cache"
# bump when the encoding or the file layout changes: old caches are then not reused (2: MXFP4 of [out, in] experts
# blocked along the input dimension)
LAYOUT_VERSION = 2
FP8_BLOCK = 128


@dataclass(frozen=True, slots=True)
class _Plan:
    """Where one parameter of the source slot lands in the compressed slot."""

    name: str
    source: TensorSpec
    fmt: str  # "" (copied as is), "fp8" or "mxfp4"
    values: tuple[int, tuple[int, ...], str]  # (offset, shape, torch dtype)
    scales: tuple[int, tuple[int, ...], str] | None


def fp8_block(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    block = (min(FP8_BLOCK, shape[0]), min(FP8_BLOCK, shape[1]))
    if shape[0] % block[0] or shape[1] % block[1]:
        raise CheckpointError(f"--expert-format fp8: {name} {list(shape)} does not tile into {FP8_BLOCK}x{FP8_BLOCK}"
                              " blocks (both dimensions must be multiples of 128, or smaller than 128)")
    return block


def encoded_parts(name: str, shape: tuple[int, ...], fmt: str, transposed: bool) -> tuple[tuple, tuple]:
    """``((values shape, dtype), (scales shape, dtype))`` of one 2-D expert parameter in ``fmt``; ``transposed``:
    the parameter is ``[in, out]``."""
    if fmt == "fp8":
        block = fp8_block(name, shape)
        return (shape, "float8_e4m3fn"), ((shape[0] // block[0], shape[1] // block[1]), "float32")
    out_dim, in_dim = (shape[1], shape[0]) if transposed else shape
    if in_dim % MXFP4_BLOCK:
        raise CheckpointError(f"--expert-format mxfp4: {name} {list(shape)}: the input dimension ({in_dim}) must be a"
                              f" multiple of {MXFP4_BLOCK} (MXFP4 blocks)")
    groups = in_dim // MXFP4_BLOCK
    return ((out_dim, groups, MXFP4_BLOCK // 2), "uint8"), ((out_dim, groups), "uint8")


def encode(weight: np.ndarray, fmt: str, transposed: bool) -> tuple[np.ndarray, np.ndarray]:
    """One expert parameter (as the experts module holds it; ``transposed``: ``[in, out]``) -> its stored values
    and scales."""
    if fmt == "fp8":
        return fp8_encode(weight, fp8_block("weight", tuple(weight.shape)))
    return mxfp4_encode(weight.T if transposed else weight)  # [out, in / 32, 16]: blocks along the input dimension


def cache_root(state_dir: Path | str, cache_dir: Path | str | None) -> Path:
    """memd's ``--expert-cache-dir``, by default ``<state-dir>/expert-cache``."""
    return Path(cache_dir) if cache_dir else Path(state_dir) / CACHE_DIR


class CompressedStore:
    """The expert index of the same checkpoint whose slots hold its experts in ``fmt``, read from the cache file."""

    def __init__(self, source: ExpertIndex, model_dir: Path | str, fmt: str, cache_root: Path | str):
        """``source``: the checkpoint's own index (memd's indexer child builds it: no torch here); ``cache_root``:
        the expert-cache directory (``cache_root(state_dir, None)`` by default)."""
        if fmt not in FORMATS:
            raise ValueError(f"--expert-format {fmt!r}: choose one of {', '.join(FORMATS)} (or leave it unset)")
        if source.format:
            raise CheckpointError(f"--expert-format {fmt}: {model_dir} stores its experts in {source.format}"
                                  " already; the compressed cache is for bf16/fp16/fp32 checkpoints")
        self.source, self.format, self.model_dir = source, fmt, Path(model_dir).resolve()
        self.model_type, self.modules, self.num_experts = source.model_type, source.modules, source.num_experts
        self.num_layers, self.top_k = source.num_layers, source.top_k
        self._source_segments = source.segments
        self.plans, self.tensors, self.slot_bytes, self.expert_bytes = self._layout()
        self.directory = Path(cache_root) / self._name()
        self.path = self.directory / "experts.bin"
        self._fd = self._done_fd = None
        self.segments = {(layer, e): [Segment(str(self.path), (layer * self.num_experts + e) * self.slot_bytes,
                                              self.slot_bytes, 0)]
                         for layer in range(self.num_layers) for e in range(self.num_experts)}
        self._lock = threading.Lock()
        self.converted_now = 0

    @classmethod
    def of(cls, model_dir: Path | str, fmt: str, cache_root: Path | str) -> "CompressedStore":
        """Index ``model_dir`` in this process (imports transformers: the CLI and the benchmarks, not memd)."""
        from common.checkpoint import Checkpoint
        from services.memd.store import ExpertStore

        return cls(ExpertStore(Checkpoint(model_dir)).index(), model_dir, fmt, cache_root)

    @property
    def files(self) -> list[Path]:
        return [self.path]

    @property
    def total_expert_bytes(self) -> int:
        return self.expert_bytes * self.num_layers * self.num_experts

    @property
    def missing(self) -> list[tuple[int, int]]:
        return [(i // self.num_experts, i % self.num_experts) for i, d in enumerate(self.done) if not d]

    def prepare(self, key: tuple[int, int]) -> None:
        """Convert expert ``key`` into the cache file unless it is there (reader threads, before its first read)."""
        if not self.done[key[0] * self.num_experts + key[1]]:  # set once, never cleared: no lock on the hot path
            self.prepare_many([key])

    def prepare_many(self, keys: list[tuple[int, int]]) -> None:
        """Convert the missing experts of ``keys``: their bytes are written and synced before they count as done."""
        with self._lock:  # one conversion at a time: a second reader of the same expert waits, then finds it done
            todo = [k for k in keys if not self.done[k[0] * self.num_experts + k[1]]]
            for key in todo:
                os.pwrite(self._fd, self.convert(key), (key[0] * self.num_experts + key[1]) * self.slot_bytes)
            if not todo:
                return
            os.fdatasync(self._fd)
            for key in todo:
                index = key[0] * self.num_experts + key[1]
                os.pwrite(self._done_fd, b"\x01", index)
                self.done[index] = 1
            self.converted_now += len(todo)

    def image(self, key: tuple[int, int]) -> bytes:
        """Expert ``key``'s slot image as memd reads it from the cache file (converted first if missing)."""
        self.prepare(key)
        return os.pread(self._fd, self.slot_bytes, (key[0] * self.num_experts + key[1]) * self.slot_bytes)

    def convert(self, key: tuple[int, int]) -> bytes:
        """Expert ``key``'s compressed slot image, from its bytes in the checkpoint."""
        source = np.frombuffer(self._read_source(key), dtype=np.uint8)
        out = np.zeros(self.slot_bytes, dtype=np.uint8)
        for plan in self.plans:
            spec = plan.source
            tensor = _view(source, spec.offset, tuple(spec.shape), spec.dtype)
            if not plan.fmt:
                _put(out, plan.values, tensor)
                continue
            values, scales = encode(tensor, plan.fmt, self.source.transposed)
            _put(out, plan.values, values)
            _put(out, plan.scales, scales)
        return out.tobytes()

    def close(self) -> None:
        for fd in (self._fd, self._done_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._done_fd = None

    # ---------------------------------------------------------------- layout and files
    def _layout(self) -> tuple[list[_Plan], list[TensorSpec], int, int]:
        plans, specs, offset, nbytes = [], [], 0, 0
        for spec in self.source.tensors:
            shape = tuple(spec.shape)
            if len(shape) != 2:  # biases: as stored
                size = _nbytes(shape, spec.dtype)
                plans.append(_Plan(spec.name, spec, "", (offset, shape, spec.dtype), None))
                specs.append(TensorSpec(spec.name, offset, list(shape), spec.dtype))
                offset, nbytes = align_up(offset + size), nbytes + size
                continue
            (vshape, vdtype), (sshape, sdtype) = encoded_parts(spec.name, shape, self.format, self.source.transposed)
            values_at = offset
            offset = align_up(offset + _nbytes(vshape, vdtype))
            plans.append(_Plan(spec.name, spec, self.format, (values_at, vshape, vdtype), (offset, sshape, sdtype)))
            specs.append(TensorSpec(spec.name, values_at, list(vshape), vdtype, self.format, offset, list(sshape),
                                    sdtype))
            nbytes += _nbytes(vshape, vdtype) + _nbytes(sshape, sdtype)
            offset = align_up(offset + _nbytes(sshape, sdtype))
        return plans, specs, offset, nbytes

    def _name(self) -> str:
        files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(map(Path, self.source.files))]
        identity = json.dumps([LAYOUT_VERSION, str(self.model_dir), files, self.format,
                               [list(map(str, (s.name, s.offset, s.shape, s.dtype))) for s in self.tensors]])
        digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
        return f"{self.model_dir.name}-{self.format}-{digest}"

    def open(self) -> "CompressedStore":
        """Create or reopen the cache files (after the state directory exists; memd holds its lock)."""
        count = self.num_layers * self.num_experts
        for missing in reversed([p for p in (self.directory, *self.directory.parents) if not p.exists()]):
            missing.mkdir(mode=0o700, exist_ok=True)  # owner-only whatever the umask (parents too)
        os.chmod(self.directory, 0o700)  # ours, even when an older memd made it under another umask
        self._fd = OWNER_ONLY.create(self.path, os.O_RDWR | os.O_CREAT)
        if os.fstat(self._fd).st_size != count * self.slot_bytes:
            os.ftruncate(self._fd, count * self.slot_bytes)  # sparse: only converted experts take disk space
        self._done_fd = OWNER_ONLY.create(self.directory / "done.bin", os.O_RDWR | os.O_CREAT)
        done = os.pread(self._done_fd, count, 0)
        if len(done) != count:
            os.ftruncate(self._done_fd, count)
            done = done.ljust(count, b"\x00")
        self.done = bytearray(done)
        manifest = {"checkpoint": str(self.model_dir), "format": self.format,
                    "layers": self.num_layers, "experts": self.num_experts, "slot_bytes": self.slot_bytes,
                    "layout_version": LAYOUT_VERSION}
        with os.fdopen(OWNER_ONLY.create(self.directory / "manifest.json"), "w") as f:
            f.write(json.dumps(manifest, indent=2))
        log.info("expert cache %s (%s): %d of %d experts converted", self.directory, self.format, sum(self.done),
                 count)
        return self

    def _read_source(self, key: tuple[int, int]) -> bytearray:
        """The expert's bytes as the plain store lays them into a slot (buffered reads: converted once)."""
        buf = bytearray(self.source.slot_bytes)
        view = memoryview(buf)
        for seg in self._source_segments[key]:
            fd = os.open(seg.file, os.O_RDONLY)
            try:
                n = os.preadv(fd, [view[seg.slot_offset:seg.slot_offset + seg.nbytes]], seg.file_offset)
            finally:
                os.close(fd)
            if n != seg.nbytes:
                raise CheckpointError(f"{seg.file}: short read at {seg.file_offset} ({n} of {seg.nbytes} bytes)")
        return buf


def _view(flat: np.ndarray, offset: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return flat[offset:offset + _nbytes(shape, dtype)].view(numpy_dtype(dtype)).reshape(shape)


def _put(out: np.ndarray, where: tuple[int, tuple[int, ...], str], array: np.ndarray) -> None:
    offset, shape, dtype = where
    if tuple(array.shape) != shape or array.dtype != numpy_dtype(dtype):
        raise RuntimeError(f"encoded {list(array.shape)} {array.dtype}, the layout says {list(shape)} {dtype}")
    raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    out[offset:offset + raw.size] = raw


def _nbytes(shape, dtype: str) -> int:
    n = numpy_dtype(dtype).itemsize
    for d in shape:
        n *= d
    return n


def run_convert(args) -> int:
    """``moeinf convert``: fill the whole cache ahead of memd, with a progress bar; a rerun converts what is left."""
    from tqdm import tqdm

    from common.config import default_state_dir
    from common.sizes import format_bytes

    root = cache_root(args.state_dir or default_state_dir(), args.expert_cache_dir)
    store = CompressedStore.of(args.model, args.expert_format, root).open()
    try:
        missing = store.missing
        total = store.num_layers * store.num_experts
        with tqdm(total=len(missing), desc=f"{args.expert_format} experts", unit="expert", disable=args.quiet) as bar:
            for start in range(0, len(missing), store.num_experts):  # one sync per layer's worth
                batch = missing[start:start + store.num_experts]
                store.prepare_many(batch)
                bar.update(len(batch))
        print(f"{store.directory}: {total} experts in {args.expert_format} ({len(missing)} converted now), "
              f"{format_bytes(store.total_expert_bytes)} against {format_bytes(store.source.total_expert_bytes)}"
              f" as stored ({store.source.total_expert_bytes / store.total_expert_bytes:.2f}x fewer bytes per read)")
    finally:
        store.close()
    return 0


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a bf16 checkpoint's experts into memd's compressed cache (fp8, mxfp4)",
                       description="Fill <state-dir>/expert-cache/ with every expert in the format, as memd"
                                   " --expert-format does on first read; memd then reads them from the cache.")
    p.add_argument("--model", required=True, help="a bf16/fp16/fp32 checkpoint directory")
    p.add_argument("--expert-format", required=True, choices=list(FORMATS))
    p.add_argument("--state-dir", help="memd's --state-dir (default ~/.local/state/moeinf)")
    p.add_argument("--expert-cache-dir", help="memd's --expert-cache-dir (default <state-dir>/expert-cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)
