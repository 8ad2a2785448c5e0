"""Process liveness, for peers that watch each other by pid (memd its workers, a worker its memd), and children
that die with their parent."""
from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child before its exec (``Popen(preexec_fn=...)``): SIGTERM when its parent dies (Linux), so no child
    outlives the process that started it (serve's services, memd's indexer)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def pid_alive(pid: int) -> bool:
    """True while a process with ``pid`` exists and runs (one we may not signal counts as alive; a zombie, dead
    but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]  # the field after "(comm)": comm may hold spaces
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")
