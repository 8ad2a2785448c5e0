"""A memory cgroup for one benchmarked system: a limit that counts the page cache as well as process memory.

Without it, a system that reads its offloaded weights through mmap (accelerate's disk offload) keeps them in the
page cache, which no process's RSS shows, and so runs with far more memory than its budget says. The bench makes
one cgroup per system, starts the system's processes inside it (``exec_prefix``: the process writes its own pid to
``cgroup.procs`` and then execs, so nothing it allocates is charged elsewhere) and removes it afterwards.

cgroup v1 (a ``memory`` hierarchy: ``memory.limit_in_bytes``) and v2 (``memory.max``, with the memory controller
enabled for the parent's children) are both handled. Creating one needs root (or a delegated subtree);
``MemoryCgroup.create`` raises ``CgroupUnavailable`` with the reason otherwise.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

MOUNTS = Path("/proc/mounts")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


class CgroupUnavailable(RuntimeError):
    """No memory cgroup can be made here; the message says why."""


def find_memory_hierarchy(mounts: Path = MOUNTS) -> tuple[Path, int]:
    """The directory new memory cgroups go in, and the cgroup version: a v1 ``memory`` mount first, else v2."""
    v2 = None
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mount_point, fstype, options = Path(fields[1]), fields[2], fields[3].split(",")
        if fstype == "cgroup" and "memory" in options:
            return mount_point, 1
        if fstype == "cgroup2" and v2 is None:
            v2 = mount_point
    if v2 is not None and "memory" in _read(v2 / "cgroup.controllers").split():
        return v2, 2
    raise CgroupUnavailable("no cgroup memory controller is mounted (neither a v1 'memory' hierarchy nor cgroup v2"
                            " with 'memory' in cgroup.controllers)")


class MemoryCgroup:
    def __init__(self, path: Path, version: int, limit_bytes: int):
        self.path, self.version, self.limit_bytes = path, version, limit_bytes

    @classmethod
    def create(cls, limit_bytes: int, name: str = "", root: Path | None = None,
               version: int | None = None) -> MemoryCgroup:
        """A new cgroup ``moeinf-bench-<name>-<random>`` limited to ``limit_bytes`` (memory + page cache, no swap)."""
        if root is None:
            root, version = find_memory_hierarchy()
        path = Path(root) / f"moeinf-bench-{name}-{uuid.uuid4().hex[:8]}".replace("--", "-")
        try:
            if version == 2:
                _enable_memory_controller(Path(root))
            path.mkdir()
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create {path}: {exc.strerror or exc} (root is needed)") from None
        group = cls(path, version, limit_bytes)
        try:
            group._set_limit()
        except OSError as exc:
            group.remove()
            raise CgroupUnavailable(f"cannot set the memory limit of {path}: {exc.strerror or exc}") from None
        return group

    def _set_limit(self) -> None:
        if self.version == 1:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
            _try_write(self.path / "memory.memsw.limit_in_bytes", str(self.limit_bytes))  # no swap either, if present
        else:
            (self.path / "memory.max").write_text(str(self.limit_bytes))
            _try_write(self.path / "memory.swap.max", "0")

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def exec_prefix(self) -> list[str]:
        """A command prefix that moves the process into this cgroup, then execs the rest of the command line."""
        return ["sh", "-c", f'echo $$ > "{self.procs_file}" && exec "$@"', "sh"]

    def add(self, pid: int) -> None:
        self.procs_file.write_text(str(pid))

    def pids(self) -> list[int]:
        return [int(p) for p in _read(self.procs_file).split()]

    def peak_bytes(self) -> int | None:
        """The most memory (process memory plus page cache) charged to the cgroup so far."""
        text = _read(self.path / ("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")).strip()
        return int(text) if text.isdigit() else None

    def unreclaimable_bytes(self) -> int | None:
        """Memory in use now that the page cache cannot give back: anonymous memory plus shared memory (memd's
        pool in /dev/shm); without swap, this is what a system needs under its limit."""
        names = ("total_rss", "total_shmem") if self.version == 1 else ("anon", "shmem")
        stat = dict(line.split() for line in _read(self.path / "memory.stat").splitlines() if line.count(" ") == 1)
        values = [int(stat[n]) for n in names if n in stat]
        return sum(values) if len(values) == 2 else None

    def oom_kills(self) -> int:
        """Processes the kernel killed because the cgroup hit its limit."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in _read(self.path / name).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self, timeout_s: float = 10.0) -> None:
        """Remove the cgroup once its processes are gone (they are stopped first by the caller). Idempotent."""
        deadline = time.monotonic() + timeout_s
        while self.path.exists():
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # a process in it is still exiting

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def drop_caches() -> str | None:
    """Write back dirty pages and drop the page cache, dentries and inodes; the reason when that is not possible."""
    os.sync()
    try:
        DROP_CACHES.write_text("3")
    except OSError as exc:
        return f"cannot drop the page cache ({DROP_CACHES}: {exc.strerror or exc}; root is needed)"
    return None


def _enable_memory_controller(root: Path) -> None:
    control = root / "cgroup.subtree_control"
    if "memory" not in _read(control).split():
        control.write_text("+memory")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _try_write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError:
        pass
