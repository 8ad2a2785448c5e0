"""``moeinf bench disk`` and the disk probe: every byte read exactly once at any queue depth, the reader reads
exactly the experts' bytes, and the table and the JSON carry the measures side by side; the probe into memory lands
every chunk in its own place of a ring larger than the CPU's cache."""
import mmap
import json
import os
import subprocess

import pytest
from helpers import moeinf_cmd, write_family

from common.checkpoint import Checkpoint
from services.bench import diskbw
from services.bench.diskbw import read_bandwidth
from services.memd.store import ExpertStore


@pytest.mark.parametrize("into", ["memory", "buffer"])
@pytest.mark.parametrize("streams", [1, 3])
def test_probe_reads_every_byte_once_at_any_depth(tmp_path, streams, into):
    path = tmp_path / "blob"
    size = 5 * (1 << 20) + 123  # the last O_DIRECT read comes back short
    path.write_bytes(os.urandom(size))
    bw = read_bandwidth([path], chunk=1 << 20, streams=streams, into=into)
    assert bw.bytes_read == size and bw.seconds > 0 and bw.streams == streams and bw.into == into
    two = read_bandwidth([path, path], max_bytes=6 << 20, chunk=1 << 20, streams=streams, into=into)
    assert two.bytes_read == 6 << 20  # crosses into the second file
    with pytest.raises(ValueError, match="into must be one of"):
        read_bandwidth([path], into="cache")


def test_the_ring_outgrows_the_cache_and_each_read_lands_in_its_own_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(diskbw, "RING_MIN", 1 << 20)
    monkeypatch.setattr(diskbw, "last_level_cache", lambda: 3 << 20)
    ring = diskbw._ring(1 << 20, 2)
    assert len(ring) == 12 << 20  # four times the cache, whole chunks
    ring.close()
    monkeypatch.setattr(diskbw, "last_level_cache", lambda: 0)
    ring = diskbw._ring(1 << 20, 3)
    assert len(ring) == 6 << 20  # at least two chunks per stream
    ring.close()
    chunk = mmap.PAGESIZE
    path = tmp_path / "blob"
    data = os.urandom(3 * chunk)
    path.write_bytes(data)
    ring = mmap.mmap(-1, 4 * chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        cursor = diskbw._Cursor([(fd, len(data))], chunk, len(data), ring)
        cursor.run()
        assert cursor.error is None and cursor.total == len(data)
        assert ring[:3 * chunk] == data and ring[3 * chunk:] == bytes(chunk)  # read k in chunk k, not one buffer
    finally:
        os.close(fd)
        ring.close()


def test_bench_disk_table_and_json(tmp_path):
    from services.memd.slot_images import CACHE_DIR, LosslessImages

    model = write_family("mixtral", tmp_path / "m")
    out = tmp_path / "disk.json"
    cache = tmp_path / "state" / CACHE_DIR
    proc = subprocess.run(moeinf_cmd("bench", "disk", "--model", str(model), "--bytes", "256KiB", "--threads", "2",
                                     "--chunk", "64KiB", "--rounds", "2", "--experts", "5", "--expert-cache-dir",
                                     str(cache), "--json", str(out)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for row in ("probe, single stream", "probe, 2 streams", "probe, 2 streams, reused buffer", "fio libaio, same depth",
                "ExpertReader, 5 experts", "probe, 2 streams, slot images", "ExpertReader, 5 slot images"):
        assert row in proc.stdout
    doc = json.loads(out.read_text())
    store = ExpertStore(Checkpoint(model))
    ckpt, images = doc["checkpoint"], doc["images"]
    assert ckpt["reader_bytes"] == 5 * store.expert_bytes  # exactly the experts' bytes, once each
    assert ckpt["reader_direct_bytes"] + ckpt["reader_bounce_bytes"] == ckpt["reader_bytes"]
    assert images["reader_bytes"] == images["reader_direct_bytes"] == 5 * store.slot_bytes  # whole slots, in place
    assert images["reader_bounce_bytes"] == 0 and images["reader_staged_segments"] == 0
    kept = LosslessImages.of(model, cache).open()
    try:
        assert len(kept.missing) == kept.num_layers * kept.num_experts - 5  # only the measured experts converted
    finally:
        kept.close()
    for part in (ckpt, images):
        assert len(part["probe_multi_runs_gbps"]) == len(part["reader_runs_gbps"]) == 2
        assert part["probe_multi_gbps"] > 0 and part["reader_gbps"] > 0
    assert (doc["fio_gbps"] is None) == (doc["fio_note"] is not None)
    assert doc["probe_buffer_gbps"] > 0
