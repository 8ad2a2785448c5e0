"""``moeinf bench disk`` and the disk probe: every byte read exactly once at any queue depth, the reader reads
exactly the experts' bytes, and the table and the JSON carry the four measures side by side."""
import json
import os
import subprocess

import pytest
from helpers import moeinf_cmd, write_family

from common.checkpoint import Checkpoint
from services.bench.diskbw import read_bandwidth
from services.memd.store import ExpertStore


@pytest.mark.parametrize("streams", [1, 3])
def test_probe_reads_every_byte_once_at_any_depth(tmp_path, streams):
    path = tmp_path / "blob"
    size = 5 * (1 << 20) + 123  # the last O_DIRECT read comes back short
    path.write_bytes(os.urandom(size))
    bw = read_bandwidth([path], chunk=1 << 20, streams=streams)
    assert bw.bytes_read == size and bw.seconds > 0 and bw.streams == streams
    two = read_bandwidth([path, path], max_bytes=6 << 20, chunk=1 << 20, streams=streams)
    assert two.bytes_read == 6 << 20  # crosses into the second file


def test_a_probe_of_several_passes_keeps_the_fastest(tmp_path, monkeypatch):
    """The benchmarks' probes read the same bytes twice and keep the faster pass (a host that caches what was read
    lately makes the second faster, as memd's re-reads of hot experts are)."""
    import services.bench.diskbw as diskbw

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 << 20))
    seconds = iter([2.0, 0.5, 1.0])
    real = diskbw._one_pass
    monkeypatch.setattr(diskbw, "_one_pass", lambda *a: diskbw.Bandwidth(real(*a).bytes_read, next(seconds), True))
    bw = read_bandwidth([path], chunk=1 << 20, streams=2, passes=3)
    assert (bw.bytes_read, bw.seconds, bw.passes, bw.streams) == (3 << 20, 0.5, 3, 2)
    assert "the best of 3 passes" in bw.describe()
    with pytest.raises(ValueError, match="passes must be >= 1"):
        read_bandwidth([path], chunk=1 << 20, passes=0)


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
    for row in ("probe, single stream", "probe, 2 streams", "fio libaio, same depth", "ExpertReader, 5 experts",
                "probe, 2 streams, slot images", "ExpertReader, 5 slot images"):
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
    packed = doc["packed"]  # the compressed images: the same slots from fewer (or as many) of the disk's bytes
    assert "ExpertReader, 5 compressed" in proc.stdout and "placed (vs the images' probe)" in proc.stdout
    assert 0 < packed["reader_bytes"] <= 5 * store.slot_bytes and 0 < doc["packed_share"] <= 1
    for part in (ckpt, images, packed):
        assert len(part["probe_multi_runs_gbps"]) == len(part["reader_runs_gbps"]) == 2
        assert part["probe_multi_gbps"] > 0 and part["reader_gbps"] > 0
    assert (doc["fio_gbps"] is None) == (doc["fio_note"] is not None)


def test_the_target_is_judged_per_round_and_never_above_the_probe():
    from services.bench.disk import verdict

    assert [verdict(f) for f in (0.95, 0.85, None)] == ["met", "NOT met", "n/a"]
    assert verdict(1.03).startswith("not counted")


@pytest.mark.parametrize("streams", [1, 3])
def test_the_probe_reads_a_sparse_files_data_not_its_holes(tmp_path, streams):
    """memd's slot images are sparse (experts not read yet; compressed images short of their slots): a hole reads
    as zeros without the disk, so the probe skips it instead of counting it as the disk's speed."""
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        for i in range(4):  # 1 MiB of data, then a 3 MiB hole, four times
            f.seek(i * (4 << 20))
            f.write(os.urandom(1 << 20))
        f.truncate(16 << 20)
    bw = read_bandwidth([path], chunk=1 << 20, streams=streams)
    assert bw.bytes_read == 4 << 20  # the data only
    assert read_bandwidth([path], max_bytes=3 << 20, chunk=1 << 20, streams=streams).bytes_read == 3 << 20
