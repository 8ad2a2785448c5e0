"""Who may open what a service creates: sockets, shared-memory regions and state files are the owner's alone
(0600), or also its group's (0660) with ``--group NAME`` -- whatever the umask. Access to the worker socket is
the right to generate and to memd's the right to read its pool, so nothing is left to the umask."""
from __future__ import annotations

import contextlib
import grp
import os
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Access:
    group: str = ""  # "": owner only
    gid: int = field(default=-1, init=False)

    def __post_init__(self):
        if self.group:
            try:
                object.__setattr__(self, "gid", grp.getgrnam(self.group).gr_gid)
            except KeyError:
                raise ValueError(f"--group {self.group!r}: no such group") from None

    @property
    def mode(self) -> int:
        return 0o660 if self.group else 0o600

    @property
    def dir_mode(self) -> int:
        return 0o770 if self.group else 0o700

    def apply(self, path: str | os.PathLike) -> None:
        """Give ``path`` this mode (and group)."""
        if self.gid >= 0:
            self._chown(lambda: os.chown(path, -1, self.gid))
        os.chmod(path, self.mode)

    def apply_fd(self, fd: int) -> None:
        if self.gid >= 0:
            self._chown(lambda: os.fchown(fd, -1, self.gid))
        os.fchmod(fd, self.mode)

    def _chown(self, call) -> None:
        try:
            call()
        except PermissionError:
            raise PermissionError(f"--group {self.group}: cannot give files to group {self.group} (is this user a"
                                  " member of it?)") from None

    def create(self, path: str | os.PathLike, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
        """``os.open`` with this mode (born owner-only, then opened to the group when asked)."""
        fd = os.open(path, flags, 0o600)
        try:
            self.apply_fd(fd)
        except OSError:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def umask(self):
        """Files created inside are born with at most this mode (for creators that take no mode: libzmq's bind).
        The umask is per process: keep the block short (a bind)."""
        old = os.umask(0o777 & ~self.mode)
        try:
            yield
        finally:
            os.umask(old)

    def makedirs(self, path: str | os.PathLike) -> None:
        """Create ``path`` (and parents) owner-only (or group too); an existing directory is left as it is."""
        if not os.path.isdir(path):
            os.makedirs(path, mode=self.dir_mode, exist_ok=True)
            if self.gid >= 0:
                self._chown(lambda: os.chown(path, -1, self.gid))
            os.chmod(path, self.dir_mode)


OWNER_ONLY = Access()
