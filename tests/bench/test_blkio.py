"""``bench e2e --disk-read-limit``: the blkio throttle (fake mounts and /sys trees; a real throttled read where root
and a v1 blkio hierarchy are here)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from services.bench.blkio import ReadThrottle, find_blkio_hierarchy, whole_disk
from services.bench.cgroup import CgroupUnavailable
from services.bench.diskbw import read_bandwidth
from services.bench.e2e import Options


def test_finds_the_v1_blkio_mount(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n"
                      "cgroup /sys/fs/cgroup/blkio cgroup rw,relatime,blkio 0 0\n")
    assert find_blkio_hierarchy(mounts) == Path("/sys/fs/cgroup/blkio")
    mounts.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")
    with pytest.raises(CgroupUnavailable, match="blkio"):
        find_blkio_hierarchy(mounts)


def test_a_partition_is_throttled_on_its_whole_disk(tmp_path):
    dev = os.stat(tmp_path).st_dev
    node = f"{os.major(dev)}:{os.minor(dev)}"
    sysfs = tmp_path / "sys"
    disk = sysfs / "devices" / "vda"
    (disk / "vda1").mkdir(parents=True)
    (disk / "dev").write_text("254:0\n")
    (disk / "vda1" / "partition").write_text("1\n")
    (sysfs / "block").mkdir()
    (sysfs / "block" / node).symlink_to(disk / "vda1")
    assert whole_disk(tmp_path, sysfs / "block") == "254:0"
    (sysfs / "block" / node).unlink()
    (sysfs / "block" / node).symlink_to(disk)
    assert whole_disk(tmp_path, sysfs / "block") == node
    (sysfs / "block" / node).unlink()
    with pytest.raises(CgroupUnavailable, match="not a block device"):
        whole_disk(tmp_path, sysfs / "block")


def test_the_rate_is_bytes_per_second():
    opts = Options(Path("."), ("25%",), 4, None, 1, (1,), 1, 1, None, disk_read_limit="600MB/s")
    assert opts.read_limit_bytes() == 600_000_000
    assert Options(Path("."), ("25%",), 4, None, 1, (1,), 1, 1, None).read_limit_bytes() is None
    with pytest.raises(ValueError, match="not a share"):
        Options(Path("."), ("25%",), 4, None, 1, (1,), 1, 1, None, disk_read_limit="50%").read_limit_bytes()


def _blkio_usable() -> bool:
    try:
        return os.geteuid() == 0 and os.access(find_blkio_hierarchy(), os.W_OK)
    except CgroupUnavailable:
        return False


@pytest.mark.skipif(not _blkio_usable(), reason="needs root and a cgroup v1 blkio hierarchy")
def test_reads_run_at_the_limit_then_the_process_goes_back(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(48 << 20))
    os.sync()
    limit = 64 << 20  # far below any disk: the O_DIRECT reads (no page cache) take ~0.75 s for 48 MiB
    with ReadThrottle.create(data, limit) as throttle:
        assert str(os.getpid()) in (throttle.path / "cgroup.procs").read_text().split()
        start = time.perf_counter()
        bw = read_bandwidth([data], 48 << 20)
        seconds = time.perf_counter() - start
    assert bw.direct, "O_DIRECT was refused here: the page cache would hide the throttle"
    assert seconds > 0.5 * (48 << 20) / limit, f"read 48 MiB in {seconds:.2f} s, faster than {limit} B/s allows"
    assert not throttle.path.exists()
