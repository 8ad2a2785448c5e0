"""The expert pool: one POSIX shared-memory region divided into equal slots, created once per memd.

The region is a file under /dev/shm, fully allocated at start (``posix_fallocate``) so a pool that does not fit
fails now, with a message, instead of a SIGBUS later. Its name is derived from the state directory; memd holds
an exclusive lock on ``<state-dir>/memd.lock`` while it lives, so a region whose lock is free is stale (a crashed
run) and is removed at the next start.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
from pathlib import Path

from common.sizes import format_bytes

SHM_DIR = Path("/dev/shm")


def pool_name(state_dir: Path, kind: str = "pool") -> str:
    """The /dev/shm name of this state directory's ``kind`` of region ("pool", or "control": the lease page)."""
    digest = hashlib.sha1(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    return f"moeinf-{digest}-{kind}"


def owner_pid(state_dir: Path) -> int | None:
    """The pid the state directory's lock names: its memd, or the last one (the file outlives it)."""
    try:
        return int((Path(state_dir) / "memd.lock").read_text().strip())
    except (OSError, ValueError):
        return None


class StateLock:
    """Exclusive ownership of a state directory: one memd per directory (the file holds its pid)."""

    def __init__(self, state_dir: Path):
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "memd.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise RuntimeError(f"another memd (pid {owner}) is running with state directory {state_dir}; stop it or"
                               " use another --state-dir (env MOEINF_STATE_DIR)") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


class SharedPool:
    """``nbytes`` of shared memory, mapped read-write in memd."""

    def __init__(self, name: str, nbytes: int):
        self.name = name
        self.nbytes = nbytes
        self.path = SHM_DIR / name
        if self.path.exists():
            self.path.unlink()  # stale: our caller holds the state lock, so no live memd owns it
        free = _free_bytes(SHM_DIR)
        if free < nbytes:
            raise RuntimeError(f"/dev/shm has {format_bytes(free)} free, the expert pool needs {format_bytes(nbytes)}:"
                               " lower --expert-memory or enlarge /dev/shm (docker: shm_size)")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            self.mmap = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException as exc:  # (Ctrl-C during the allocation too: no region is left behind)
            os.close(fd)
            self.path.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise RuntimeError(f"/dev/shm cannot hold a {format_bytes(nbytes)} pool:"
                                   " lower --expert-memory") from None
            raise
        os.close(fd)
        self.view = memoryview(self.mmap)

    def close(self) -> None:
        """Unmap and unlink; idempotent, safe to call from a signal-driven shutdown."""
        if self.view is not None:
            self.view.release()
            self.view = None
            try:
                self.mmap.close()
            except BufferError:
                pass  # a reader thread still holds a view; the unlink below still frees the name
        self.path.unlink(missing_ok=True)


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def release_range(path: Path, offset: int, length: int) -> None:
    """Give the memory of ``[offset, offset + length)`` of a region back to the OS: the file keeps its size (and
    every mapping its layout), the range reads as zeros and holds no pages until written again."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"releasing {format_bytes(length)} of {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def allocate_range(path: Path, offset: int, length: int) -> None:
    """Allocate ``[offset, offset + length)`` of a region again (after ``release_range``), so a later write cannot
    fail with SIGBUS. Raises RuntimeError when /dev/shm cannot hold it."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise RuntimeError(f"/dev/shm cannot hold {format_bytes(length)} more of the expert pool") from None
        raise
    finally:
        os.close(fd)


def resident_bytes(path: Path) -> int:
    """Memory a region holds now (its allocated blocks)."""
    return os.stat(path).st_blocks * 512
