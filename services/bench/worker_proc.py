"""A real ``moeinf worker`` process for a benchmark, attached to a ``MemdProcess``'s state directory."""
from __future__ import annotations

import os
from pathlib import Path

from common.config import default_state_dir, env_name, state_socket, worker_socket
from services.bench.service_proc import ServiceProcess

READY_TEXT = "worker ready"


def kernel_cache_dir() -> Path:
    """Where a bench's workers keep the kernels they compile (``--kernel-cache-dir``): as the environment says, else
    in the default state directory, as ``moeinf serve``'s workers do; a bench's own state directories are temporary,
    and each would compile them again (~7 s)."""
    return Path(os.environ.get(env_name("kernel_cache_dir")) or default_state_dir())


class WorkerProcess(ServiceProcess):
    def __init__(self, model: Path, state_dir: Path, extra: list[str] = (), *, ready_timeout_s: float = 600.0,
                 prefix: list[str] = (), worker_id: str = ""):
        self.model, self.state_dir, self.worker_id = Path(model), Path(state_dir), worker_id
        args = ["--model", str(self.model), "--state-dir", str(self.state_dir),
                "--kernel-cache-dir", str(kernel_cache_dir()), *extra]  # (a flag in extra wins: the last)
        args += ["--worker-id", worker_id] if worker_id else []
        log = self.state_dir / (f"worker-{worker_id}.log" if worker_id else "worker.log")
        super().__init__("worker", args, log, READY_TEXT, ready_timeout_s=ready_timeout_s, prefix=prefix)

    @property
    def addr(self) -> str:
        return state_socket(self.state_dir, worker_socket(self.worker_id))

