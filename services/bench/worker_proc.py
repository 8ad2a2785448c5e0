"""A real ``moeinf worker`` process for a benchmark, attached to a ``MemdProcess``'s state directory."""
from __future__ import annotations

import os
from pathlib import Path

from common.config import default_state_dir, env_name, state_socket, worker_socket
from services.bench.service_proc import ServiceProcess

READY_TEXT = "worker ready"


def kernel_cache_dir() -> Path | None:
    """Where a bench's workers keep the kernels they compile (``--kernel-cache-dir``), since a bench's own state
    directories are temporary and each would compile them again (~7 s): as ``MOEINF_KERNEL_CACHE_DIR`` says, else in
    the state directory ``moeinf serve`` would use (``MOEINF_STATE_DIR``, else the default) when it is this user's
    (under ``sudo`` with another user's home it is not: a directory root made there would lock its user out); None:
    a temporary one, compiled each time."""
    if explicit := os.environ.get(env_name("kernel_cache_dir")):
        return Path(explicit)
    state = Path(os.environ.get(env_name("state_dir")) or default_state_dir())
    try:
        existing = next(p for p in (state, *state.parents) if p.exists())
        return state if existing.stat().st_uid == os.geteuid() else None
    except OSError:  # (a parent this user may not look into)
        return None


class WorkerProcess(ServiceProcess):
    def __init__(self, model: Path, state_dir: Path, extra: list[str] = (), *, ready_timeout_s: float = 600.0,
                 prefix: list[str] = (), worker_id: str = ""):
        self.model, self.state_dir, self.worker_id = Path(model), Path(state_dir), worker_id
        kernels = kernel_cache_dir()
        args = ["--model", str(self.model), "--state-dir", str(self.state_dir),
                *(["--kernel-cache-dir", str(kernels)] if kernels else []), *extra]  # (a flag in extra wins)
        args += ["--worker-id", worker_id] if worker_id else []
        log = self.state_dir / (f"worker-{worker_id}.log" if worker_id else "worker.log")
        super().__init__("worker", args, log, READY_TEXT, ready_timeout_s=ready_timeout_s, prefix=prefix)

    @property
    def addr(self) -> str:
        return state_socket(self.state_dir, worker_socket(self.worker_id))

