"""Experts kept as slot images in one cache file, so that every read is one aligned O_DIRECT read into its slot.

A checkpoint's safetensors place each parameter at a file offset that is only 8-byte aligned, and memd lays the
rows of most bfloat16 parameters apart in its slots (``services/memd/spread.py``); neither can be read by O_DIRECT
straight into the slot behind a 512-byte-aligned device, so the reader stages those bytes through a bounce buffer
and copies them (``services/memd/reader.py``): a core's worth of copying at a few GB/s, taken from the worker.
A slot-image cache holds expert ``(layer, e)`` exactly as its slot holds it, at ``(layer * experts + e) *
slot_bytes`` of ``experts.bin``: one page-aligned segment per expert, read straight into the slot in pieces.

Two caches share this file format and its bookkeeping (``SlotImageCache``):

- ``LosslessImages`` (memd ``--slot-cache``, this module): the bytes the reader would place from the checkpoint,
  unchanged (the worker's views, products and tokens are the same; ``tests/memd/test_slot_images.py``);
- ``CompressedStore`` (``--expert-format fp8|mxfp4``, ``services/memd/compressed.py``): the experts re-encoded.

A compressed expert is converted once, on its first read, by the reader thread that takes its first piece; a
lossless one is read from the checkpoint as before and its slot is written to the image behind that read
(``services/memd/image_writer.py``: the load waits for nothing); either way ``moeinf convert`` fills the cache
ahead. ``done.bin`` has one byte per expert, set after the expert's bytes are on disk (``fdatasync``): a crash
mid-conversion leaves the expert to convert again. The cache's name hashes the checkpoint's files (names, sizes,
mtimes) and its identity as memd's index keys it (transformers version and indexing code included), the format, the
slot layout and the code placing its rows: a changed or differently mapped checkpoint gets a fresh cache, which
removes those it supersedes (``superseded.py``). The file is sparse: only converted experts take disk space."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from common.access import OWNER_ONLY
from common.checkpoint import CheckpointError
from common.expert_index import ExpertIndex, Segment
from common.messages import TensorSpec
from services.memd import superseded
from services.memd.spread import place_rows

log = logging.getLogger("moeinf.memd.slot_images")
CACHE_DIR = "expert-cache"
LAYOUT_VERSION = 2  # bumped when an encoding or the file layout changes (2: [out, in] MXFP4 blocked along the input)
_DIO_PROBE_BYTES = 64 * 1024  # the scratch file dio_alignment probes
PLACEMENT = Path(__file__).with_name("spread.py")  # place_rows: where a slot's rows go (in every image's name)
FREE_SHARE = 0.1  # auto: the file system keeps at least this share of its size free once every expert is cached


def cache_root(state_dir: Path | str, cache_dir: Path | str | None) -> Path:
    """memd's ``--expert-cache-dir``, by default ``<state-dir>/expert-cache``."""
    return Path(cache_dir) if cache_dir else Path(state_dir) / CACHE_DIR


class SlotImageCache:
    """The expert index of a checkpoint whose slots are read from the cache file; subclasses give the layout
    (``tensors``, ``slot_bytes``, ``expert_bytes``) and ``convert``."""

    format: str  # a directory-name label: "fp8", "mxfp4" or "slots" (lossless)
    codec_identity = ""  # what decides a packed image's bytes besides the code ``encoders`` names (in the name)
    tensors: list[TensorSpec]
    slot_bytes: int
    expert_bytes: int

    def __init__(self, source: ExpertIndex, model_dir: Path | str, cache_root: Path | str):
        """``source``: the checkpoint's own index (memd's indexer child builds it: no torch here)."""
        self.source, self.model_dir = source, Path(model_dir).resolve()
        self.model_type, self.modules, self.num_experts = source.model_type, source.modules, source.num_experts
        self.num_layers, self.top_k = source.num_layers, source.top_k
        self.directory = Path(cache_root) / self._name()
        self.path = self.directory / "experts.bin"
        self.path_str = str(self.path)  # as the reader's pieces name it
        self._fd = self._done_fd = None
        self.segments = {(layer, e): [Segment(str(self.path), (layer * self.num_experts + e) * self.slot_bytes,
                                              self.slot_bytes, 0)]
                         for layer in range(self.num_layers) for e in range(self.num_experts)}
        self._lock = threading.Lock()
        self.converted_now = 0
        self.done = bytearray()

    @property
    def files(self) -> list[Path]:
        return [self.path]

    @property
    def total_expert_bytes(self) -> int:
        return self.expert_bytes * self.num_layers * self.num_experts

    @property
    def file_bytes(self) -> int:
        """The cache file's size once every expert is converted."""
        return self.slot_bytes * self.num_layers * self.num_experts

    @property
    def where(self) -> Path:
        """The cache directory, or its nearest parent that exists (before ``open`` makes it): its file system."""
        return next(p for p in (self.directory, *self.directory.parents) if p.exists())

    @property
    def missing(self) -> list[tuple[int, int]]:
        return [(i // self.num_experts, i % self.num_experts) for i, d in enumerate(self.done) if not d]

    def convert(self, key: tuple[int, int]) -> bytes:
        """Expert ``key``'s slot image, from its bytes in the checkpoint."""
        raise NotImplementedError

    def prepare(self, key: tuple[int, int]) -> None:
        """Convert expert ``key`` into the cache file unless it is there (reader threads, before its first read)."""
        if not self.done[key[0] * self.num_experts + key[1]]:  # set once, never cleared: no lock on the hot path
            self.prepare_many([key])

    def prepare_many(self, keys: list[tuple[int, int]]) -> None:
        """Convert the missing experts of ``keys``: their bytes are written and synced before they count as done."""
        with self._lock:  # one conversion at a time: a second reader of the same expert waits, then finds it done
            todo = [k for k in keys if not self.done[k[0] * self.num_experts + k[1]]]
            for key in todo:
                self.store_image(key, self.convert(key))
            if not todo:
                return
            self.sync(todo)
            self._mark_done(todo)

    def store_image(self, key: tuple[int, int], image) -> None:
        """Write expert ``key``'s slot image into the cache file (not synced, not marked done)."""
        at = (key[0] * self.num_experts + key[1]) * self.slot_bytes
        if os.pwrite(self._fd, image, at) != len(image):  # a full disk: never marked done half written
            raise OSError(errno.ENOSPC, f"{self.path}: short write of expert {key}'s image")

    def sync(self, keys: list[tuple[int, int]]) -> None:
        """The written images of ``keys`` on disk (before they are marked done), out of the page cache."""
        os.fdatasync(self._fd)
        for key in keys:
            index = key[0] * self.num_experts + key[1]
            os.posix_fadvise(self._fd, index * self.slot_bytes, self.slot_bytes, os.POSIX_FADV_DONTNEED)

    def ready(self, key: tuple[int, int]) -> bool:
        return self.is_done(key)

    def is_done(self, key: tuple[int, int]) -> bool:
        return bool(self.done[key[0] * self.num_experts + key[1]])

    def _mark_done(self, keys: list[tuple[int, int]]) -> None:
        """``keys``' images are on disk (synced): say so in ``done.bin`` (callers hold ``_lock``)."""
        for key in keys:
            index = key[0] * self.num_experts + key[1]
            os.pwrite(self._done_fd, b"\x01", index)
            self.done[index] = 1
        self.converted_now += len(keys)

    def fill(self, progress=None) -> int:
        """Convert every missing expert (one sync per layer's worth); returns how many were converted now.
        ``progress(n)`` is called after each batch."""
        missing = self.missing
        for start in range(0, len(missing), self.num_experts):
            batch = missing[start:start + self.num_experts]
            self.prepare_many(batch)
            if progress is not None:
                progress(len(batch))
        return len(missing)

    def image(self, key: tuple[int, int]) -> bytes:
        """Expert ``key``'s slot image as memd reads it from the cache file (converted first if missing)."""
        self.prepare(key)
        return os.pread(self._fd, self.slot_bytes, (key[0] * self.num_experts + key[1]) * self.slot_bytes)

    def open(self):
        """Create or reopen the cache files (after the state directory exists; memd holds its lock)."""
        count = self.num_layers * self.num_experts
        for missing in reversed([p for p in (self.directory, *self.directory.parents) if not p.exists()]):
            missing.mkdir(mode=0o700, exist_ok=True)  # owner-only whatever the umask (parents too)
        os.chmod(self.directory, 0o700)  # ours, even when an older memd made it under another umask
        self._fd = OWNER_ONLY.create(self.path, os.O_RDWR | os.O_CREAT)
        whole = os.fstat(self._fd).st_size == count * self.slot_bytes
        self._done_fd = OWNER_ONLY.create(self.directory / "done.bin", os.O_RDWR | os.O_CREAT)
        done = os.pread(self._done_fd, count, 0)
        if len(done) != count or not whole:  # (experts.bin new, removed or cut: what done.bin says is gone with it)
            if any(done) and not whole:
                log.warning("expert cache %s: %s was missing or of another size: every expert is converted again",
                            self.directory, self.path.name)
            done = bytes(count)
            os.pwrite(self._done_fd, done, 0)
            os.ftruncate(self._done_fd, count)
            os.fdatasync(self._done_fd)  # (on disk before experts.bin grows: a crash never pairs zeros with "done")
        if not whole:
            os.ftruncate(self._fd, count * self.slot_bytes)  # sparse: only converted experts take disk space
        self.done = bytearray(done)
        manifest = {"checkpoint": str(self.model_dir), "format": self.format,
                    "layers": self.num_layers, "experts": self.num_experts, "slot_bytes": self.slot_bytes,
                    "layout_version": LAYOUT_VERSION}
        with os.fdopen(OWNER_ONLY.create(self.directory / "manifest.json"), "w") as f:
            f.write(json.dumps(manifest, indent=2))
        superseded.sweep(self.directory, manifest)
        log.info("expert cache %s (%s): %d of %d experts converted", self.directory, self.format, sum(self.done),
                 count)
        return self

    def close(self) -> None:
        for fd in (self._fd, self._done_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._done_fd = None

    def _name(self) -> str:
        """The cache's directory name: what decides every byte of an image (the checkpoint's identity as memd's
        index keys it, with the transformers version and the indexing code, and a compressed cache's encoders' code;
        the format; the slot layout)."""
        from common.checkpoint import Checkpoint
        from common.expert_index import checkpoint_key, file_stats
        from services.memd.indexer import CODE

        checkpoint = Checkpoint(self.model_dir)
        files = file_stats(sorted(map(Path, self.source.files)))
        tensors = [list(map(str, (s.name, s.offset, s.shape, s.dtype))) + ([str(s.row_stride)] if s.row_stride else [])
                   for s in self.tensors]
        key = checkpoint_key(checkpoint.dir, checkpoint.files, CODE + self.encoders())
        parts = [LAYOUT_VERSION, str(self.model_dir), files, self.format, tensors, key, self.codec_identity]
        identity = json.dumps(parts if self.codec_identity else parts[:-1])
        digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
        return f"{self.model_dir.name}-{self.format}-{digest}"

    def encoders(self) -> list[Path]:  # the code deciding an image's bytes beyond the indexer's (in its name): the
        return [PLACEMENT]  # checkpoint's bytes, each row where place_rows puts it

    def _read_source(self, key: tuple[int, int]) -> bytearray:
        """The expert's bytes as the checkpoint's own index lays them into a slot (buffered reads: converted once)."""
        buf = bytearray(self.source.slot_bytes)
        _fill(np.frombuffer(buf, np.uint8), self.source.experts[key[0] * self.num_experts + key[1]])
        return buf


class LosslessImages(SlotImageCache):
    """``served``'s slots (the checkpoint's layout, rows spread apart for a CPU worker) as images: the same bytes."""

    format = "slots"
    packs = False  # the images are stored as the slots hold them (``PackedImages``: packed unit by unit)

    def __init__(self, served: ExpertIndex, model_dir: Path | str, cache_root: Path | str):
        self.served = served
        self.tensors, self.slot_bytes, self.expert_bytes = served.tensors, served.slot_bytes, served.expert_bytes
        super().__init__(served, model_dir, cache_root)
        self.images, self.segments = self.segments, _Either(self)

    @property
    def files(self) -> list[Path]:
        """The checkpoint's files (first: the reader takes its O_DIRECT alignment from them), then the images."""
        return [*map(Path, self.served.files), self.path]

    def prepare(self, key: tuple[int, int]) -> None:
        """Nothing on the read path: an expert without its image is read from the checkpoint and written behind."""

    def ready(self, key: tuple[int, int]) -> bool:
        return True

    def write_behind(self, reader):
        """The writer that keeps the slots ``reader`` fills from the checkpoint as images (``ExpertReader``)."""
        from services.memd.image_writer import ImageWriter

        return ImageWriter(self, reader)

    @classmethod
    def of(cls, model_dir: Path | str, cache_root: Path | str) -> "LosslessImages":
        """Index ``model_dir`` in this process and lay it out as memd does for a CPU worker (imports transformers:
        the CLI and the benchmarks, not memd)."""
        from common.checkpoint import Checkpoint
        from services.memd.spread import spread_rows
        from services.memd.store import ExpertStore

        return cls(spread_rows(ExpertStore(Checkpoint(model_dir)).index()), model_dir, cache_root)

    def convert(self, key: tuple[int, int]) -> bytes:
        out = np.zeros(self.slot_bytes, dtype=np.uint8)
        _fill(out, self.served.experts[key[0] * self.num_experts + key[1]])
        return out.tobytes()


class _Either(Mapping):
    """``(layer, expert) -> segments``: its image once written (one aligned segment), else the checkpoint's."""

    def __init__(self, images: LosslessImages):
        self.of = images

    def __getitem__(self, key: tuple[int, int]) -> list[Segment]:
        if self.of.is_done(key):
            return self.of.images[key]
        return self.of.served.experts[key[0] * self.of.num_experts + key[1]]

    def __iter__(self):
        return iter(self.of.images)

    def __len__(self) -> int:
        return len(self.of.images)


def image_fields(store, reader) -> dict:
    """The slot cache's counters for memd's StatsReply (none when memd reads the checkpoint as stored)."""
    if not isinstance(store, LosslessImages):
        return {}
    writer = getattr(getattr(reader, "reader", reader), "writer", None)  # (a GPU pool: its host tier's reader)
    return {"slot_cache": True, "slot_images": sum(store.done),
            "images_written": writer.written if writer is not None else 0,
            "slot_images_share": (store.packed_share or 0.0) if store.packs else 0.0}


def staged_bytes(index: ExpertIndex, mem_align: int) -> int:
    """Bytes of ``index``'s experts that the reader cannot read straight into their slots with O_DIRECT: rows
    spread apart, and segments whose file offset and slot offset differ modulo the memory alignment."""
    return sum(seg.nbytes for segs in index.experts for seg in segs
               if seg.placed or (seg.slot_offset - seg.file_offset) % mem_align)


def auto_reason(images: LosslessImages, direct_io: bool) -> str:
    """Why ``--slot-cache auto`` leaves the experts in the checkpoint ("" when it keeps slot images)."""
    from services.memd.dio import dio_alignment

    served = images.served
    if not direct_io:
        return "--direct-io is off"
    if _in_memory(Path(served.files[0])):
        return f"{served.files[0]} is on a memory file system already (tmpfs): no disk read to speed up"
    align = dio_alignment(served.files[0])
    if align is None:
        return f"{served.files[0]}: the file system refuses O_DIRECT (reads go through the page cache)"
    if not images.packs and not staged_bytes(served, align.mem):
        return "every expert byte reads straight into its slot already"
    existing = images.where
    if _in_memory(existing):
        return f"{existing} is on a memory file system (tmpfs): images there would take memory, not disk"
    held = images.path.stat().st_blocks * 512 if images.path.exists() else 0
    needed = max(0, images.file_bytes - held)
    usage = shutil.disk_usage(existing)
    if usage.free - needed < FREE_SHARE * usage.total:
        return (f"{existing}: {usage.free >> 20} MiB free; the cache needs {needed >> 20} MiB more and must leave"
                f" {FREE_SHARE:.0%} of the file system free (--slot-cache on uses it anyway)")
    return direct_io_refused(existing)


def direct_io_refused(directory: Path) -> str:
    """Why files in ``directory`` cannot be read with O_DIRECT ("" when they can): a scratch file, removed at
    once."""
    from services.memd.dio import dio_alignment

    try:
        fd, name = tempfile.mkstemp(prefix=".moeinf-dio-", dir=directory)
    except OSError as exc:
        return f"{directory}: cannot create a file there ({exc.strerror})"
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(_DIO_PROBE_BYTES))
        if dio_alignment(name) is None:
            return f"{directory}: the file system refuses O_DIRECT (a cache there would be read through the page cache)"
        return ""
    except OSError as exc:
        return f"{directory}: cannot write a scratch file there ({exc.strerror})"
    finally:
        os.unlink(name)


def _in_memory(path: Path) -> bool:
    """Whether ``path`` lies on tmpfs or ramfs (the longest mount point above it in /proc/self/mounts)."""
    try:
        mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return False
    path = path.resolve()
    above = [(len(str(point)), fields[2]) for fields in mounts if len(fields) >= 3
             and (path == (point := Path(fields[1].replace("\\040", " "))) or point in path.parents)]
    return max(above, default=(0, ""))[1] in ("tmpfs", "ramfs")


def _fill(slot: np.ndarray, segments) -> None:
    """One slot's bytes from its segments, each row where ``place_rows`` puts it (spread, or interleaved pairs)."""
    for seg in segments:
        data = memoryview(_pread(seg.file, seg.file_offset, seg.nbytes))
        if seg.placed:
            place_rows(slot, data, seg.slot_offset, seg.rows(seg.slot_offset))
        else:
            slot[seg.slot_offset:seg.slot_offset + seg.nbytes] = np.frombuffer(data, dtype=np.uint8)


def _pread(path: str, offset: int, nbytes: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, nbytes, offset)
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)  # converted once: leave no page cache behind
    finally:
        os.close(fd)
    if len(data) != nbytes:
        raise CheckpointError(f"{path}: short read at {offset} ({len(data)} of {nbytes} bytes)")
    return data
