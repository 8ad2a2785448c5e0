"""Compressed lossless slot images (memd ``--slot-compression zstd``): the images of ``--slot-cache``, in fewer bytes.

The same cache as ``LosslessImages`` (services/memd/slot_images.py: written behind an expert's first read from the
checkpoint, or ahead by ``moeinf convert``), but each image is stored as units packed by ``planes.py``: expert
``(layer, e)`` keeps its region of ``slot_bytes`` at ``(layer * experts + e) * slot_bytes`` of ``experts.bin``,
and its units' stored bytes lie in that region one after the other, each from a page boundary (so each is one
aligned O_DIRECT read). ``units.bin`` holds each unit's packed high-plane length (its low plane follows: half the
unit), or its length with ``RAW_FLAG`` set where it is stored as it is.
An expert counts as written once its units and their lengths are synced (``done.bin``, as for every image).

The reader (``reader.py``) reads a packed unit into its thread's bounce buffer and decodes it into the slot; a unit
stored as it is goes straight into the slot. Its byte counts are the disk's (packed bytes), so memd's read
bandwidth, ``bytes_read`` and the benchmarks' I/O floors stay the disk's; the planner's time estimates use the
expert bytes placed per second (``ExpertReader.expert_rate``). ``read_bytes``, the mean bytes read per written
expert, is what ``moeinf convert`` and the benchmarks report.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np

from common.access import OWNER_ONLY
from common.expert_index import ALIGN, ExpertIndex, align_up
from services.memd.planes import CODEC, KEEP_RAW, RAW_FLAG, PlaneCodec, unit_bytes
from services.memd.read_jobs import Piece
from services.memd.slot_images import PLACEMENT, LosslessImages

log = logging.getLogger("moeinf.memd.packed_images")


class PackedImages(LosslessImages):
    """``served``'s slots as images packed unit by unit (``planes.py``): the same bytes once decoded."""

    format = "slots-zstd"
    packs = True
    codec_identity = CODEC

    def __init__(self, served: ExpertIndex, model_dir: Path | str, cache_root: Path | str):
        super().__init__(served, model_dir, cache_root)
        self.codec = PlaneCodec()
        self.unit = min(unit_bytes(self.slot_bytes), align_up(self.slot_bytes, ALIGN))
        self.units = -(-self.slot_bytes // self.unit)
        self.lengths = np.zeros((self.num_layers * self.num_experts, self.units), dtype=np.uint32)
        self._units_fd = None

    def encoders(self) -> list[Path]:  # the codec's version and settings decide the packing (``codec_identity``),
        return [PLACEMENT]  # not planes.py's text; the rows' places are the lossless images' (place_rows)

    # ---------------------------------------------------------------- the files
    def open(self):
        super().open()
        count = self.num_layers * self.num_experts
        self._units_fd = OWNER_ONLY.create(self.directory / "units.bin", os.O_RDWR | os.O_CREAT)
        size = count * self.units * 4
        stored = os.pread(self._units_fd, size, 0)
        if len(stored) == size:
            self.lengths[:] = np.frombuffer(stored, dtype=np.uint32).reshape(count, self.units)
        else:
            os.ftruncate(self._units_fd, size)
            self.lengths[:] = 0
        self._forget([int(i) for i in np.flatnonzero(self._done_mask() & ~self._valid_rows())])
        return self

    def _valid_rows(self) -> np.ndarray:
        """Experts whose stored lengths describe units that fit their region: a raw unit its own length, a packed
        one a high plane the codec could have written (within ``KEEP_RAW``), all within the slot (a lost, cut or
        damaged units.bin never places bytes from elsewhere; one plausible but wrong fails its load: planes.py)."""
        words = self.lengths.astype(np.int64)
        units = np.array(self._unit_lengths(), dtype=np.int64)
        raw = (words & RAW_FLAG) != 0
        high = np.where(raw, 0, words)
        ok = np.where(raw, (words & ~RAW_FLAG) == units, (high > 0) & (high + units // 2 <= units * KEEP_RAW))
        return ok.all(axis=1) & (self._stored(self.lengths).sum(axis=1) <= self.slot_bytes)

    def _forget(self, indexes: list[int]) -> None:
        """Experts whose images cannot be trusted: not done, on disk too, before any is packed again (a crash while
        one is packed again must not leave ``done.bin`` saying done over half-new bytes)."""
        if not indexes:
            return
        log.warning("expert cache %s: %d experts' unit lengths are missing or inconsistent: they are packed again",
                    self.directory, len(indexes))
        for index in indexes:
            self.done[index] = 0
            os.pwrite(self._done_fd, b"\x00", index)
        os.fdatasync(self._done_fd)

    def _done_mask(self) -> np.ndarray:
        return np.frombuffer(bytes(self.done), dtype=np.uint8).astype(bool)

    def close(self) -> None:
        if self._units_fd is not None:
            os.close(self._units_fd)
            self._units_fd = None
        super().close()

    def store_image(self, key: tuple[int, int], image) -> None:
        """Pack ``image`` (a slot's bytes) unit by unit into expert ``key``'s region and its lengths into units.bin
        (not synced, not marked done)."""
        blob, lengths = self.pack(key, image)
        if os.pwrite(self._fd, blob, self.region(key)) != len(blob):
            raise OSError(errno.ENOSPC, f"{self.path}: short write of expert {key}'s packed image")
        self.store_lengths(key, lengths)

    def region(self, key: tuple[int, int]) -> int:
        return (key[0] * self.num_experts + key[1]) * self.slot_bytes

    def store_lengths(self, key: tuple[int, int], lengths: np.ndarray) -> None:
        index = key[0] * self.num_experts + key[1]
        if os.pwrite(self._units_fd, lengths.tobytes(), index * self.units * 4) != lengths.nbytes:
            raise OSError(errno.ENOSPC, f"{self.directory / 'units.bin'}: short write of expert {key}'s lengths")
        self.lengths[index] = lengths

    def pack(self, key: tuple[int, int], image) -> tuple[bytes, np.ndarray]:
        """``(the region's bytes, the units' stored lengths)`` for expert ``key``'s slot bytes ``image``."""
        view = memoryview(image)[:self.slot_bytes]
        parts, lengths = [], np.zeros(self.units, dtype=np.uint32)
        for u in range(self.units):
            unit = view[u * self.unit:(u + 1) * self.unit]
            packed = self.codec.encode(unit) if len(unit) % 2 == 0 else None
            if packed is not None and align_up(len(packed[0]), ALIGN) >= len(unit):
                packed = None  # (no page saved: decoding it would cost time for nothing)
            stored = bytes(unit) if packed is None else packed[0]
            lengths[u] = len(stored) | RAW_FLAG if packed is None else packed[1]
            parts.append(stored + bytes(align_up(len(stored), ALIGN) - len(stored)))
        blob = b"".join(parts)
        if len(blob) > self.slot_bytes:  # (slots are whole pages, units too: packed ones never outgrow theirs)
            raise ValueError(f"expert {key}: {len(blob)} packed bytes outgrow its {self.slot_bytes}-byte region")
        return blob, lengths

    def sync(self, keys: list[tuple[int, int]]) -> None:
        os.fdatasync(self._units_fd)
        super().sync(keys)

    # ---------------------------------------------------------------- reading
    def image(self, key: tuple[int, int]) -> bytes:
        """Expert ``key``'s slot image, decoded (converted first if missing)."""
        self.prepare_many([key])
        out = np.zeros(self.slot_bytes, dtype=np.uint8)
        for offset, stored, dest, length, high in self._units(key):
            data = os.pread(self._fd, stored, self.region(key) + offset)
            if high:
                self.codec.decode_into(data, high, out[dest:dest + length])
            else:
                out[dest:dest + length] = np.frombuffer(data, dtype=np.uint8)
        return out.tobytes()

    def packed_pieces(self, key: tuple[int, int], base: int, step: int, direct: bool) -> list[Piece] | None:
        """The reader's pieces for expert ``key`` into the slot at pool byte ``base`` (None: no image yet, read the
        checkpoint): a packed unit through the bounce buffer (``codec``: its packed high plane's length), a raw one
        straight into the slot where the file's ``step`` allows."""
        if not self.is_done(key):
            return None
        region, pieces = self.region(key), []
        for offset, stored, dest, length, high in self._units(key):
            at = region + offset
            start = at - at % step  # (units start on 4 KiB pages; a device may want larger blocks)
            if high:
                pieces.append(Piece(self.path_str, start, align_up(at + stored, step) - start, base + dest, at - start,
                                    length, True, codec=high))
            elif not direct or (at == start and length % step == 0):
                pieces.append(Piece(self.path_str, at, length, base + dest, 0, length))
            else:
                pieces.append(Piece(self.path_str, start, align_up(at + length, step) - start, base + dest, at - start,
                                    length, True))
        return pieces

    def _units(self, key: tuple[int, int]):
        """``(offset in the region, stored bytes, offset in the slot, unit bytes, packed high plane's length or 0)``
        for each unit."""
        offset = 0
        for u, length in enumerate(self._unit_lengths()):
            word = int(self.lengths[key[0] * self.num_experts + key[1], u])
            high = 0 if word & RAW_FLAG else word
            stored = high + length // 2 if high else word & ~RAW_FLAG
            yield offset, stored, u * self.unit, length, high
            offset += align_up(stored, ALIGN)

    def _unit_lengths(self) -> list[int]:
        return [min(self.unit, self.slot_bytes - u * self.unit) for u in range(self.units)]

    def _stored(self, rows: np.ndarray) -> np.ndarray:
        """Stored bytes (to their pages' ends) of each unit of ``lengths`` rows."""
        words = rows.astype(np.int64)
        raw = (words & RAW_FLAG) != 0
        stored = np.where(raw, words & ~RAW_FLAG, words + np.array(self._unit_lengths()) // 2)
        return (stored + ALIGN - 1) // ALIGN * ALIGN

    @property
    def read_bytes(self) -> int:
        """Bytes read per expert, on average over the written ones (raw units whole, to their pages' ends; the
        expert's bytes before any is written)."""
        done = self._done_mask()
        if not done.any():
            return self.expert_bytes
        return int(self._stored(self.lengths[done]).sum(axis=1).mean())

    @property
    def packed_share(self) -> float | None:
        """Bytes read over slot bytes, over the experts written (None before any)."""
        done = self._done_mask()
        if not done.any():
            return None
        return float(self._stored(self.lengths[done]).sum() / (done.sum() * self.slot_bytes))
