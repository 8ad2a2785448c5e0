"""memd's lossless slot-image cache (``--slot-cache``, services/memd/slot_images.py): an image holds exactly the
bytes the reader places from the checkpoint (rows spread apart included), the reader then reads every byte
straight into its slot (nothing staged, nothing copied), ``auto`` keeps images only where they pay and fit, and a
served model gives transformers' tokens either way."""
import mmap
import os
import subprocess
import time
from pathlib import Path

import msgspec
import pytest
import torch
from helpers import Stack, moeinf_cmd, write_family

from common.checkpoint import Checkpoint
from common.config import MemdConfig
from services.memd import slot_images
from services.memd.main import slot_images as choose
from services.memd.reader import ExpertReader
from services.memd.slot_images import CACHE_DIR, LosslessImages, auto_reason, staged_bytes
from services.memd.spread import spread_rows
from services.memd.store import ExpertStore


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Mixtral whose gate/up rows are 2 KiB (spread apart in the slots), sharded: two files, two file offsets."""
    return write_family("mixtral", tmp_path_factory.mktemp("wide") / "m", dtype="bfloat16", shard=True,
                        hidden_size=1024, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def served(path):
    return spread_rows(ExpertStore(Checkpoint(path)).index())


def read_all(store, passes: int = 1) -> tuple[torch.Tensor, ExpertReader]:
    """Every expert read into its own slot of a fresh page-aligned pool, ``passes`` times (slot images: until every
    image is written behind the reads; the writer drops what it cannot keep up with)."""
    keys = [(layer, e) for layer in range(store.num_layers) for e in range(store.num_experts)]
    pool = mmap.mmap(-1, len(keys) * store.slot_bytes)  # page-aligned, as memd's shared-memory pool is
    reader = ExpertReader(store, memoryview(pool), store.slot_bytes, direct_io=True)
    try:
        for _ in range(passes):
            for slot, key in enumerate(keys):
                reader.read(key, slot)
            if reader.writer is not None:
                until(reader.writer.idle)
                if not store.missing:
                    break
    finally:
        reader.close()
    return torch.frombuffer(bytearray(pool), dtype=torch.uint8).view(len(keys), store.slot_bytes), reader


def until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("family", ["wide", "mixtral"])
def test_slots_read_from_the_checkpoint_are_written_behind_then_read_in_place(family, request, tmp_path):
    path = request.getfixturevalue(family)
    index = served(path)
    want, staged = read_all(index)
    assert staged.stats.bounce_bytes > 0  # the checkpoint as stored is copied through the bounce buffer
    images = LosslessImages(index, path, tmp_path / CACHE_DIR).open()
    count = index.num_layers * index.num_experts
    try:
        assert images.tensors == index.tensors and images.slot_bytes == index.slot_bytes
        first, reader = read_all(images)  # from the checkpoint; slots written behind the reads as the writer can
        assert torch.equal(first, want) and reader.stats.bounce_bytes == staged.stats.bounce_bytes
        assert 0 < reader.writer.written == images.converted_now == count - len(images.missing)
        first, reader = read_all(images, passes=20)  # what is left, behind later reads
        assert torch.equal(first, want) and images.missing == [] and images.converted_now == count
        again, reader = read_all(images)
        assert torch.equal(again, want)
        assert reader.stats.bounce_bytes == 0 and reader.stats.staged_segments == 0
        assert reader.stats.direct_bytes == images.file_bytes  # every byte of every slot read in place
        assert reader.writer.written == 0  # nothing left to write
        for key in [(0, 0), (index.num_layers - 1, index.num_experts - 1)]:  # what `moeinf convert` writes
            assert images.convert(key) == images.image(key)
    finally:
        images.close()


def test_a_slot_reused_before_its_image_is_written_is_not_kept(wide, tmp_path, monkeypatch):
    index = served(wide)
    images = LosslessImages(index, wide, tmp_path).open()
    pool = mmap.mmap(-1, 2 * index.slot_bytes)
    reader = ExpertReader(images, memoryview(pool), index.slot_bytes, direct_io=True)
    writer = reader.writer
    try:
        busy = [True]
        monkeypatch.setattr(reader, "demand_pending", lambda: busy[0])  # on-demand reads queued: no write starts
        reader.read((0, 1), 0)
        time.sleep(0.2)
        assert not images.is_done((0, 1)) and writer.written == 0
        reader.read((0, 2), 0)  # the slot is loaded again before the first expert's image was written
        reader.read((0, 3), 1)
        reader.settle(1)  # and slot 1's memory given back (an admin shrink) after its load
        busy[0] = False
        until(lambda: writer.written + writer.discarded == 3)
        assert images.is_done((0, 2)) and not images.is_done((0, 1)) and not images.is_done((0, 3))
        assert writer.written == 1 and writer.discarded == 2
        assert images.image((0, 2)) == images.convert((0, 2))
    finally:
        reader.close()
        images.close()


def restarted(kind, index, path, tmp_path) -> bytes:
    """Fill a ``kind`` cache, reopen it: nothing is converted again and an image reads the same; returns it."""
    first = kind(index, path, tmp_path).open()
    try:
        assert first.fill() == index.num_layers * index.num_experts
        image = first.image((1, 2))
    finally:
        first.close()
    again = kind(index, path, tmp_path).open()
    try:
        assert again.missing == [] and again.fill() == 0 and again.image((1, 2)) == image
    finally:
        again.close()
    return image


def test_images_convert_once_and_survive_a_restart(wide, tmp_path):
    index = served(wide)
    restarted(LosslessImages, index, wide, tmp_path)
    again = LosslessImages(index, wide, tmp_path)
    packed = LosslessImages(ExpertStore(Checkpoint(wide)).index(), wide, tmp_path)
    assert packed.directory != again.directory  # another slot layout (rows not spread): another cache
    from services.memd import indexer
    indexer.CODE, code = indexer.CODE[:1], indexer.CODE
    try:  # other indexing code (or another transformers) may map the same tensors differently: another cache
        assert LosslessImages(index, wide, tmp_path).directory != again.directory
    finally:
        indexer.CODE = code


def test_a_removed_or_cut_cache_file_is_converted_again_not_served_as_zeros(wide, tmp_path):
    """done.bin says which experts experts.bin holds: a user who deletes experts.bin (or a disk that cut it) must
    not get every expert served as the zeros of a new sparse file."""
    index = served(wide)
    first = LosslessImages(index, wide, tmp_path).open()
    try:
        first.fill()
        image, path = first.image((1, 2)), first.path
    finally:
        first.close()
    for damage in (lambda: path.unlink(), lambda: os.truncate(path, path.stat().st_size // 2)):
        damage()
        again = LosslessImages(index, wide, tmp_path).open()
        try:
            assert len(again.missing) == index.num_layers * index.num_experts  # (none taken as done)
            again.fill()
            assert again.image((1, 2)) == image
        finally:
            again.close()


def on_a_disk(path) -> None:
    if slot_images._in_memory(path):
        pytest.skip(f"{path} is on tmpfs: --slot-cache auto rightly declines there")


def test_auto_keeps_images_only_where_the_checkpoint_would_be_copied_and_they_fit(wide, tmp_path, monkeypatch):
    on_a_disk(tmp_path)
    on_a_disk(wide)
    index = served(wide)
    images = LosslessImages(index, wide, tmp_path / CACHE_DIR)
    assert staged_bytes(index, 512) == index.total_expert_bytes  # 8-byte aligned offsets, spread rows: all copied
    assert auto_reason(images, direct_io=True) == ""
    assert auto_reason(images, direct_io=False) == "--direct-io is off"
    if slot_images._in_memory(Path("/dev/shm")):  # images in memory would take memory, not disk
        in_shm = LosslessImages(index, wide, Path("/dev/shm") / "moeinf-test-nope")
        assert "is on a memory file system (tmpfs)" in auto_reason(in_shm, True)
    monkeypatch.setattr(slot_images, "direct_io_refused", lambda d: f"{d}: the file system refuses O_DIRECT")
    assert "refuses O_DIRECT" in auto_reason(images, True)
    with pytest.raises(ValueError, match="--slot-cache on: .* refuses O_DIRECT; give --expert-cache-dir"):
        choose(MemdConfig(model=wide, state_dir=tmp_path, slot_cache="on"), index)
    monkeypatch.undo()
    assert "cannot create a file there" in slot_images.direct_io_refused(tmp_path / "missing")
    aligned = msgspec.structs.replace(index, experts=[[msgspec.structs.replace(
        s, file_offset=s.slot_offset, row_bytes=0, row_stride=0) for s in segs] for segs in index.experts])
    assert staged_bytes(aligned, 512) == 0
    assert "reads straight into its slot already" in auto_reason(LosslessImages(aligned, wide, tmp_path), True)
    full = slot_images.shutil.disk_usage(tmp_path)._replace(free=images.file_bytes)
    monkeypatch.setattr(slot_images.shutil, "disk_usage", lambda _: full)
    assert "--slot-cache on uses it anyway" in auto_reason(images, direct_io=True)


def test_the_knob_picks_the_store(wide, tmp_path):
    on_a_disk(tmp_path)
    on_a_disk(wide)
    index = served(wide)
    cfg = dict(model=wide, state_dir=tmp_path)
    assert choose(MemdConfig(**cfg, slot_cache="off"), index) is index
    assert isinstance(choose(MemdConfig(**cfg, slot_cache="auto"), index), LosslessImages)
    assert isinstance(choose(MemdConfig(**cfg, slot_cache="on", direct_io=False), index), LosslessImages)
    assert choose(MemdConfig(**cfg, slot_cache="auto", direct_io=False), index) is index
    with pytest.raises(ValueError, match="--slot-cache 'yes': choose one of auto, on, off"):
        MemdConfig(**cfg, slot_cache="yes")


def written_behind(images, key, mutate):
    """Read ``key`` into slot 0 of a fresh reader over ``images`` with ``mutate(writer)`` applied first; returns the
    writer once it is idle."""
    pool = mmap.mmap(-1, images.slot_bytes)
    reader = ExpertReader(images, memoryview(pool), images.slot_bytes, direct_io=True)
    try:
        mutate(reader.writer)
        reader.read(key, 0)
        until(reader.writer.idle)
        return reader.writer
    finally:
        reader.close()


def test_a_torn_or_short_write_is_never_marked_done(wide, tmp_path, monkeypatch):
    from services.memd import image_writer

    images = LosslessImages(served(wide), wide, tmp_path).open()
    try:
        monkeypatch.setattr(image_writer, "WRITE_PIECE", 64 * 1024)  # several pieces per image

        def reuse_mid_write(writer):
            put = writer._put

            def first_then_reuse(data, offset):
                put(data, offset)
                writer.reader.settle(0)  # the slot changes hands after the first piece
            writer._put = first_then_reuse
        torn = written_behind(images, (1, 1), reuse_mid_write)
        assert (torn.written, torn.discarded, images.is_done((1, 1))) == (0, 1, False)

        def full_disk(writer):
            monkeypatch.setattr(image_writer.os, "pwrite", lambda fd, data, offset: len(data) // 2)
        short = written_behind(images, (1, 2), full_disk)
        monkeypatch.undo()
        assert (short.written, short.failed, images.is_done((1, 2))) == (0, 1, False)
        fine = written_behind(images, (1, 2), lambda writer: None)
        assert (fine.written, images.is_done((1, 2))) == (1, True) and images.image((1, 2)) == images.convert((1, 2))
    finally:
        images.close()


def test_convert_cli_fills_the_lossless_images(wide, tmp_path):
    """The state directory as memd finds it: MOEINF_STATE_DIR (the image's /state), not only a flag."""
    proc = subprocess.run(moeinf_cmd("convert", "--model", str(wide), "--quiet"), capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MOEINF_STATE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    images = LosslessImages(served(wide), wide, tmp_path / CACHE_DIR).open()
    try:
        count = images.num_layers * images.num_experts
        assert f"{count} experts as lossless slot images ({count} converted now)" in proc.stdout
        assert images.missing == []
    finally:
        images.close()


@pytest.mark.parametrize("slot_cache", ["on", "off"])
def test_served_tokens_equal_transformers_with_and_without_images(wide, slot_cache, tmp_path):
    prompts = [[1, 5, 9, 22, 7], list(range(2, 40, 3))]
    state = tmp_path / "s"
    with Stack(wide, state, extra_memd=["--slot-cache", slot_cache]) as stack:
        got = stack.generate_all(prompts, 8)
        until(lambda: stack.memd_stats().images_written > 0 or slot_cache == "off", timeout=30)
        stats = stack.memd_stats()
    log = (state / "memd.log").read_text()
    assert ("slot cache: each expert is kept as its slot image" in log) == (slot_cache == "on")
    assert stats.slot_cache == (slot_cache == "on")
    if slot_cache == "on":  # a 25% pool reloads experts: images written behind the first reads serve later ones
        assert 0 < stats.images_written <= stats.slot_images <= stats.misses
    else:
        assert stats.images_written == stats.slot_images == 0
    assert got == reference(wide, prompts, 8)


def reference(path, prompts, new_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    model.generation_config.eos_token_id = None
    return [model.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, len(p):]
            .tolist() for p in prompts]
