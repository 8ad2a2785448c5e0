"""Process liveness, for peers that watch each other by pid (memd its workers, a worker its memd)."""
from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while a process with ``pid`` exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
