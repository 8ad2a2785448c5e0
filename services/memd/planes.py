"""The lossless codec of compressed slot images (memd ``--slot-compression zstd``): fewer bytes per expert read.

A bfloat16 weight's high byte (its sign and the top of its exponent) takes few values in a trained (or randomly
initialised) matrix: ~2.7 bits of entropy where 8 are stored, while its low byte is noise. So a slot image is cut
into units (``unit_bytes``: up to 1 MiB, the reader's piece), and a unit is stored as its high bytes (every odd
byte: the high byte of a 16-bit value on a little-endian layout) coded by zstd with matching off in effect
(``min_match`` 7 finds nothing to match in weights; what is left is zstd's entropy coder), followed by its low
bytes as they are: ~0.34 of the high plane, ~0.67 of the unit on the bench preset's experts (the published
lossless bf16 coders, ZipNN and DFloat11, report ~0.67-0.70 on real checkpoints). One core of this VM decodes
~1.9 GB/s of expert bytes (zstd ~4.5 GB/s on the high plane, then NumPy's join and the checksum), two ~4.1 GB/s
(both without the GIL); this disk reads ~1.2-2.9 GB/s. A unit whose stored bytes would not save a page and
``1 - KEEP_RAW`` of it (FP8 or MXFP4 experts, float32 noise) is stored as it is and read straight into its slot,
with no decoding.

Grouping bytes is a permutation whatever they hold, so the codec is exact for every dtype: a decoded unit is the
image's bytes, bit for bit (``tests/memd/test_planes.py``). zstd's frame carries a checksum of the high plane, so
damage there fails the read (the load errs) instead of placing other bytes, as does a frame that does not end where
the unit's stored length says (``allow_extra_data=False``); the stored lengths are checked when the cache opens
(``PackedImages.open``); the low plane is checked no more than an uncompressed image is.
"""
from __future__ import annotations

import json
import threading

import numpy as np
import zstandard

UNIT_MAX = 1 << 20  # a unit: the reader's piece (reader.CHUNK)
UNIT_MIN = 64 << 10  # ... but an expert is spread over the reader's threads in units of at least this
UNIT_STEP = 4096  # units start on page boundaries of the slot, and their packed bytes on pages of the file
THREADS = 4  # the reader's default threads: a small expert is cut so that each of them takes a unit
KEEP_RAW = 0.9  # a unit whose packed bytes exceed this share of it is stored as it is
RAW_FLAG = 1 << 31  # in a unit's stored length: the unit is stored as it is
_PARAMS = dict(window_log=20, chain_log=6, hash_log=6, search_log=1, min_match=7, target_length=0)
_LE16 = np.dtype("<u2")
# what an image's reader must agree on (hashed into its cache's name): the layout and the units' size
CODEC = json.dumps(["planes-zstd", 1, UNIT_MAX, UNIT_MIN, THREADS])  # (zstd frames decode whatever made them)


def unit_bytes(slot_bytes: int) -> int:
    """The unit size for slots of ``slot_bytes``: at most 1 MiB, a page multiple, spread over the reader's threads."""
    spread = -(-slot_bytes // THREADS)
    spread = -(-spread // UNIT_STEP) * UNIT_STEP
    return min(UNIT_MAX, max(UNIT_MIN, spread))


class PlaneCodec:
    """Encode and decode units; safe to share between threads (each thread gets its own zstd contexts)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._params = zstandard.ZstdCompressionParameters(strategy=zstandard.STRATEGY_FAST, write_checksum=True,
                                                            **_PARAMS)

    def encode(self, unit: memoryview | bytes) -> tuple[bytes, int] | None:
        """``(stored bytes, the high plane's packed length)`` for ``unit``, or None where it does not shrink below
        ``KEEP_RAW`` (store it as it is)."""
        raw = np.frombuffer(unit, dtype=np.uint8)
        if raw.size % 2:
            raise ValueError(f"a unit of {raw.size} bytes: units are whole 16-bit values")
        high = self._compressor().compress(np.ascontiguousarray(raw[1::2]).data)
        if len(high) + raw.size // 2 > KEEP_RAW * raw.size:
            return None
        return high + np.ascontiguousarray(raw[0::2]).tobytes(), len(high)

    def decode_into(self, stored: memoryview | bytes, high: int, out: np.ndarray) -> None:
        """Decode a unit (its stored bytes, of which the first ``high`` are the packed high plane) into ``out``
        (uint8, the unit's length, even, 2-byte aligned)."""
        half = out.size // 2
        planes = self._decompressor().decompress(stored[:high], max_output_size=half, allow_extra_data=False)
        if len(planes) != half or len(stored) < high + half:
            raise ValueError(f"a packed unit holds {len(planes)} high and {len(stored) - high} low bytes, not the"
                             f" {half} each of its slot piece")
        words = out.view(_LE16)
        np.left_shift(np.frombuffer(planes, dtype=np.uint8), 8, out=words, dtype=_LE16)
        np.bitwise_or(words, np.frombuffer(stored, dtype=np.uint8, count=half, offset=high), out=words)

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(compression_params=self._params)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d
