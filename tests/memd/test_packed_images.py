"""Compressed lossless slot images (memd --slot-compression zstd, services/memd/packed_images.py): the reader
places the same bytes as from the checkpoint, reads fewer from the disk, and memd serves transformers' tokens."""
from __future__ import annotations

import mmap
import os
import subprocess

import numpy as np
import pytest
import torch
from helpers import Stack, moeinf_cmd

from common.config import MemdConfig
from services.memd.main import slot_images as choose
from services.memd.packed_images import PackedImages
from services.memd.planes import RAW_FLAG
from services.memd.reader import ExpertReader
from services.memd.slot_images import CACHE_DIR, LosslessImages
from test_slot_images import read_all, reference, restarted, served, until, wide  # noqa: F401 (wide: a fixture)


def test_packed_images_place_the_checkpoints_bytes_and_read_fewer(wide, tmp_path):
    index = served(wide)
    want, _ = read_all(index)
    images = PackedImages(index, wide, tmp_path / CACHE_DIR).open()
    count = index.num_layers * index.num_experts
    try:
        assert images.directory != LosslessImages(index, wide, tmp_path / CACHE_DIR).directory
        assert images.read_bytes == images.expert_bytes and images.packed_share is None  # nothing packed yet
        first, reader = read_all(images, passes=20)  # from the checkpoint, packed behind the reads
        assert torch.equal(first, want) and images.missing == [] and reader.writer.written > 0
        again, reader = read_all(images)  # every expert from its packed units
        assert torch.equal(again, want) and reader.writer.written == 0
        disk = reader.stats.bounce_bytes + reader.stats.direct_bytes
        assert images.packed_share < 0.8  # random bf16 weights: their high bytes pack
        pages = sum(stored_pages(images, key) for key in images.images)
        assert disk == pages < count * images.expert_bytes  # the disk's bytes: each unit to its page's end
        assert images.read_bytes == int(pages / count)
        for key in [(0, 0), (index.num_layers - 1, index.num_experts - 1)]:
            assert images.image(key) == images.convert(key)
    finally:
        images.close()


def stored_pages(images, key) -> int:
    """What expert ``key``'s units take on disk, each to its page's end: a packed unit's high plane and then its low
    plane (half the unit), a raw unit whole."""
    total = 0
    for u, word in enumerate(images.lengths[key[0] * images.num_experts + key[1]].tolist()):
        unit = min(images.unit, images.slot_bytes - u * images.unit)
        stored = word & ~RAW_FLAG if word & RAW_FLAG else word + unit // 2
        total += -(-stored // 4096) * 4096
    return total


def test_a_load_counts_the_disks_bytes(wide, tmp_path):
    images = PackedImages(served(wide), wide, tmp_path).open()
    try:
        images.fill()
        pool = mmap.mmap(-1, images.slot_bytes)
        reader = ExpertReader(images, memoryview(pool), images.slot_bytes, direct_io=True)
        try:
            nbytes, _ = reader.read((1, 3), 0)
        finally:
            reader.close()
        assert nbytes == stored_pages(images, (1, 3)) < images.slot_bytes
        assert bytes(pool) == images.convert((1, 3))
    finally:
        images.close()


def test_images_survive_a_restart_and_lost_lengths_are_packed_again(wide, tmp_path):
    index = served(wide)
    image = restarted(PackedImages, index, wide, tmp_path)
    again = PackedImages(index, wide, tmp_path)
    os.truncate(again.directory / "units.bin", 0)  # the lengths lost: no expert may be read from its region
    third = PackedImages(index, wide, tmp_path).open()
    try:
        assert len(third.missing) == index.num_layers * index.num_experts
        assert third.image((1, 2)) == image  # (packed again first)
    finally:
        third.close()


def test_a_damaged_unit_fails_its_load(wide, tmp_path):
    images = PackedImages(served(wide), wide, tmp_path).open()
    try:
        images.fill()
        region = (0 * images.num_experts + 1) * images.slot_bytes
        with open(images.path, "r+b") as f:
            f.seek(region + 100)
            byte = f.read(1)
            f.seek(region + 100)
            f.write(bytes([byte[0] ^ 0x55]))
        pool = mmap.mmap(-1, images.slot_bytes)
        reader = ExpertReader(images, memoryview(pool), images.slot_bytes, direct_io=False)
        try:
            with pytest.raises(Exception, match="checksum|corrupt|decompress|decodes"):
                reader.read((0, 1), 0)
        finally:
            reader.close()
    finally:
        images.close()


def test_the_knob_picks_packed_images_and_needs_the_slot_cache(wide, tmp_path):
    cfg = MemdConfig(model=wide, state_dir=tmp_path, slot_cache="on", slot_compression="zstd")
    assert isinstance(choose(cfg, served(wide)), PackedImages)
    with pytest.raises(ValueError, match="needs --slot-cache auto or on"):
        MemdConfig(model=wide, state_dir=tmp_path, slot_cache="off", slot_compression="zstd")
    with pytest.raises(ValueError, match="no --expert-format"):
        MemdConfig(model=wide, state_dir=tmp_path, expert_format="fp8", slot_compression="zstd")
    with pytest.raises(ValueError, match="choose one of off, zstd"):
        MemdConfig(model=wide, state_dir=tmp_path, slot_compression="lz4")


def test_convert_cli_fills_the_packed_images(wide, tmp_path):
    proc = subprocess.run(moeinf_cmd("convert", "--model", str(wide), "--quiet"), capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MOEINF_STATE_DIR": str(tmp_path),
                                            "MOEINF_SLOT_COMPRESSION": "zstd"})
    assert proc.returncode == 0, proc.stderr
    images = PackedImages(served(wide), wide, tmp_path / CACHE_DIR).open()
    try:
        count = images.num_layers * images.num_experts
        assert f"{count} experts as compressed lossless slot images ({count} converted now)" in proc.stdout
        assert images.missing == [] and images.read_bytes < images.expert_bytes
    finally:
        images.close()


def test_served_tokens_equal_transformers_from_packed_images(wide, tmp_path):
    prompts = [[1, 5, 9, 22, 7], list(range(2, 40, 3))]
    with Stack(wide, tmp_path / "s", extra_memd=["--slot-cache", "on", "--slot-compression", "zstd"]) as stack:
        first = stack.generate_all(prompts, 8)
        until(lambda: stack.memd_stats().images_written > 0, timeout=30)
        again = stack.generate_all(prompts, 8)  # later misses read packed images
        stats = stack.memd_stats()
    assert 0 < stats.images_written <= stats.slot_images <= stats.misses
    assert 0 < stats.slot_images_share < 0.8  # what `admin stats` and the metrics report
    assert first == again == reference(wide, prompts, 8)


def test_the_share_reaches_memds_stats_and_admin_stats(wide, tmp_path):
    from common import messages as m
    from services.admin_format import _packed
    from services.memd.slot_images import image_fields

    index = served(wide)
    images, plain = PackedImages(index, wide, tmp_path).open(), LosslessImages(index, wide, tmp_path).open()
    try:
        assert image_fields(images, None)["slot_images_share"] == 0.0  # nothing written yet
        images.fill()
        plain.fill()
        fields = image_fields(images, None)
        assert fields["slot_images_share"] == images.packed_share < 0.8
        assert image_fields(plain, None)["slot_images_share"] == 0.0  # stored as the slots hold them
        stats = m.StatsReply(1, 4096, 4, 2, 0, 0, 2, 0, 4096, 0.1, 0.0, False, [1, 0], **fields)
        assert _packed(stats) == f" (compressed to {images.packed_share:.3f} of their bytes)"
        assert _packed(m.StatsReply(1, 4096, 4, 2, 0, 0, 2, 0, 4096, 0.1, 0.0, False, [1, 0])) == ""
    finally:
        images.close()
        plain.close()


def test_the_cache_is_named_by_its_codec_so_another_codec_never_reads_old_images(wide, tmp_path, monkeypatch):
    index = served(wide)
    first = PackedImages(index, wide, tmp_path).directory
    assert PackedImages(index, wide, tmp_path).directory == first  # (a restart finds its images)
    monkeypatch.setattr(PackedImages, "codec_identity", '["planes-zstd", 2]')
    assert PackedImages(index, wide, tmp_path).directory != first


def _set_word(images, key, unit, word):
    with open(images.directory / "units.bin", "r+b") as f:
        f.seek(((key[0] * images.num_experts + key[1]) * images.units + unit) * 4)
        f.write(int(word).to_bytes(4, "little"))


def test_unit_lengths_that_cannot_be_right_are_packed_again_and_wrong_ones_fail_the_load(wide, tmp_path):
    index = served(wide)
    key, other = (1, 2), (0, 3)
    first = PackedImages(index, wide, tmp_path).open()
    try:
        first.fill()
        want = first.image(key)
        packed = {k: next((u, w) for u, w in enumerate(first.lengths[k[0] * first.num_experts + k[1]].tolist())
                          if not w & RAW_FLAG) for k in (key, other)}  # a packed unit of each
    finally:
        first.close()
    _set_word(first, key, packed[key][0], RAW_FLAG | 4096)  # "raw" but not its unit's length: never trusted
    _set_word(first, other, packed[other][0], packed[other][1] + 8)  # plausible, but past the frame's end
    again = PackedImages(index, wide, tmp_path).open()
    try:
        assert key in again.missing and other not in again.missing
        assert open(again.directory / "done.bin", "rb").read()[key[0] * again.num_experts + key[1]] == 0  # on disk
        assert again.image(key) == want  # packed again from the checkpoint
        pool = mmap.mmap(-1, again.slot_bytes)
        reader = ExpertReader(again, memoryview(pool), again.slot_bytes, direct_io=True)
        try:
            with pytest.raises(Exception, match="data|frame|decompress|checksum"):
                reader.read(other, 0)  # the load fails: the low plane is never read from the wrong place
        finally:
            reader.close()
    finally:
        again.close()


def test_pieces_start_on_the_devices_blocks_where_it_wants_more_than_a_page(wide, tmp_path):
    """Units start on 4 KiB pages; a device whose O_DIRECT wants 8 KiB blocks gets pieces from the block before,
    the unit ``skip`` bytes in, and they still decode to the image."""
    images = PackedImages(served(wide), wide, tmp_path).open()
    try:
        images.fill()
        key = (1, 1)
        out = np.zeros(images.slot_bytes, dtype=np.uint8)
        pieces = images.packed_pieces(key, 0, 8192, True)
        assert any(p.skip for p in pieces)  # (some unit starts off an 8 KiB block here)
        with open(images.path, "rb") as f:
            for p in pieces:
                assert p.file_offset % 8192 == 0 and p.length % 8192 == 0
                f.seek(p.file_offset)
                data = f.read(p.length)
                if p.codec:
                    images.codec.decode_into(data[p.skip:], p.codec, out[p.dest:p.dest + p.keep])
                else:
                    out[p.dest:p.dest + p.keep] = np.frombuffer(data[p.skip:p.skip + p.keep], dtype=np.uint8)
        assert out.tobytes() == images.convert(key)
    finally:
        images.close()
