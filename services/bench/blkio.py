"""A disk of one fixed read speed for a whole benchmark run (``bench e2e --disk-read-limit``).

A VM's disk moves by 20-40% between runs, so two systems measured minutes apart may see different disks. With a
limit below the disk's slowest state, every system and every probe reads through the same throttle: the kernel's
block-layer throttle (cgroup v1 ``blkio.throttle.read_bps_device``) on the device that holds the checkpoint. The
bench moves its own process into the throttled cgroup, so its probes and every process it starts (whatever memory
cgroup they enter: v1 hierarchies are independent) read at most that many bytes per second, O_DIRECT and page
faults alike. It is a slower disk for everyone, not a speed-up for anyone; the report says the limit. It is not a
perfect slow disk: the throttle accounts in 100 ms slices, so the first read after an idle gap (up to about a slice's
bytes) goes through at the disk's own speed (measured: a 35 MiB read at 1.0 GB/s after a 50 ms gap under a 0.7 GB/s
limit, 0.5-0.6 GB/s back to back). Readers that idle between reads (on-demand loading) gain from it; one that keeps
the disk busy (prefetch) does not.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from services.bench.cgroup import MOUNTS, CgroupUnavailable

SYS_DEV_BLOCK = Path("/sys/dev/block")


def find_blkio_hierarchy(mounts: Path = MOUNTS) -> Path:
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup" and "blkio" in fields[3].split(","):
            return Path(fields[1])
    raise CgroupUnavailable("--disk-read-limit needs a cgroup v1 'blkio' hierarchy (none is mounted here); run"
                            " without it")


def whole_disk(path: Path, sys_dev_block: Path = SYS_DEV_BLOCK) -> str:
    """``major:minor`` of the disk holding ``path`` (a partition's parent: the throttle applies to whole disks)."""
    dev = os.stat(path).st_dev
    node = f"{os.major(dev)}:{os.minor(dev)}"
    entry = sys_dev_block / node
    if (entry / "partition").exists():
        node = (entry.resolve().parent / "dev").read_text().strip()
    elif not entry.exists():
        raise CgroupUnavailable(f"{path} is on device {node}, which is not a block device (tmpfs, overlay, a network"
                                " file system?): --disk-read-limit cannot throttle it")
    return node


class ReadThrottle:
    """This process (and every process it starts from now on) reads ``device`` at most ``bytes_per_s``."""

    def __init__(self, path: Path, root: Path, device: str, bytes_per_s: int):
        self.path, self.root, self.device, self.bytes_per_s = path, root, device, bytes_per_s

    @classmethod
    def create(cls, data: Path, bytes_per_s: int, root: Path | None = None) -> ReadThrottle:
        root = root or find_blkio_hierarchy()
        device = whole_disk(data)
        path = root / f"moeinf-bench-disk-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
            (path / "blkio.throttle.read_bps_device").write_text(f"{device} {bytes_per_s}")
            (path / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as exc:
            cls(path, root, device, bytes_per_s).remove()
            raise CgroupUnavailable(f"cannot throttle reads with {path}: {exc.strerror or exc} (root is needed)")
        return cls(path, root, device, bytes_per_s)

    def remove(self) -> None:
        """Move this process back to the hierarchy's root and remove the cgroup (its children must be gone)."""
        try:
            (self.root / "cgroup.procs").write_text(str(os.getpid()))
        except OSError:
            pass
        try:
            self.path.rmdir()
        except OSError:
            pass

    def __enter__(self) -> ReadThrottle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
