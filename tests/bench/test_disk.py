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


def test_bench_disk_table_and_json(tmp_path):
    model = write_family("mixtral", tmp_path / "m")
    out = tmp_path / "disk.json"
    proc = subprocess.run(moeinf_cmd("bench", "disk", "--model", str(model), "--bytes", "256KiB", "--threads", "2",
                                     "--chunk", "64KiB", "--rounds", "2", "--experts", "5", "--json", str(out)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for row in ("probe, single stream", "probe, 2 streams", "fio libaio, same depth", "ExpertReader, 5 experts"):
        assert row in proc.stdout
    doc = json.loads(out.read_text())
    store = ExpertStore(Checkpoint(model))
    assert doc["reader_bytes"] == 5 * store.expert_bytes  # exactly the experts' bytes, once each
    assert doc["reader_direct_bytes"] + doc["reader_bounce_bytes"] == doc["reader_bytes"]
    assert len(doc["probe_multi_runs_gbps"]) == len(doc["reader_runs_gbps"]) == 2
    assert doc["probe_multi_gbps"] > 0 and doc["reader_gbps"] > 0
    assert (doc["fio_gbps"] is None) == (doc["fio_note"] is not None)
