"""The lossless codec of compressed slot images (services/memd/planes.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard

from services.memd import planes
from services.memd.planes import KEEP_RAW, UNIT_MAX, UNIT_MIN, PlaneCodec, unit_bytes


def bf16_bytes(n: int, seed: int = 0, std: float = 0.02) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n // 2, generator=g) * std).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


def test_bf16_units_shrink_and_decode_to_the_same_bytes():
    codec = PlaneCodec()
    raw = bf16_bytes(1 << 20)
    stored, high = codec.encode(raw)
    assert len(stored) < 0.75 * len(raw) and len(stored) == high + len(raw) // 2  # the high bytes' few values
    out = np.full(len(raw), 0xAB, dtype=np.uint8)
    codec.decode_into(stored, high, out)
    assert out.tobytes() == raw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
def test_any_bytes_round_trip_exactly(dtype, monkeypatch):
    """The regrouping is a permutation of bytes: exact whatever they hold (here every unit is packed, even what
    would be kept raw for not shrinking)."""
    monkeypatch.setattr(planes, "KEEP_RAW", 2.0)
    codec = PlaneCodec()
    g = torch.Generator().manual_seed(3)
    values = (torch.randn(1 << 15, generator=g).mul(3).to(dtype) if dtype != torch.int8
              else torch.randint(-3, 4, (1 << 15,), generator=g, dtype=dtype))
    raw = values.view(torch.uint8).numpy().tobytes()
    out = np.empty(len(raw), dtype=np.uint8)
    codec.decode_into(*codec.encode(raw), out)
    assert out.tobytes() == raw


def test_noise_is_kept_raw():
    raw = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    assert PlaneCodec().encode(raw) is None  # > KEEP_RAW of the unit: stored as it is, read with no decoding
    assert 0 < KEEP_RAW < 1


def test_a_damaged_or_mismatched_unit_fails_instead_of_placing_other_bytes():
    codec = PlaneCodec()
    raw = bf16_bytes(1 << 16, seed=1)
    stored, high = codec.encode(raw)
    out = np.empty(len(raw), dtype=np.uint8)
    with pytest.raises(ValueError, match="not the"):
        codec.decode_into(stored, high, np.empty(len(raw) // 2, dtype=np.uint8))
    with pytest.raises(ValueError, match="not the"):
        codec.decode_into(stored[:-1], high, out)  # a low plane cut short
    damaged = bytearray(stored)
    damaged[high // 2] ^= 0x10
    with pytest.raises(zstandard.ZstdError):
        codec.decode_into(bytes(damaged), high, out)
    for wrong in (high + 1, high + 100):  # a stored length past the frame's end: never the low plane misplaced
        with pytest.raises(zstandard.ZstdError):
            codec.decode_into(stored, wrong, out)
    with pytest.raises(ValueError, match="whole 16-bit"):
        codec.encode(b"abc")


def test_units_spread_an_expert_over_the_reader_threads_in_whole_pages():
    assert unit_bytes(64 << 20) == UNIT_MAX
    assert unit_bytes(8 << 20) == UNIT_MAX  # (a quarter of it would be 2 MiB)
    assert unit_bytes(1 << 20) == 256 << 10
    assert unit_bytes(4096) == UNIT_MIN
    for size in (4096, 123 << 12, 5 << 20, 100 << 20):
        assert unit_bytes(size) % 4096 == 0 and UNIT_MIN <= unit_bytes(size) <= UNIT_MAX
