"""A real ``moeinf worker`` process for a benchmark, attached to a ``MemdProcess``'s state directory."""
from __future__ import annotations

from pathlib import Path

from common.config import WORKER_SOCKET, state_socket
from services.bench.service_proc import ServiceProcess

READY_TEXT = "worker ready"


class WorkerProcess(ServiceProcess):
    def __init__(self, model: Path, state_dir: Path, extra: list[str] = (), *, ready_timeout_s: float = 600.0,
                 prefix: list[str] = ()):
        self.model, self.state_dir = Path(model), Path(state_dir)
        args = ["--model", str(self.model), "--state-dir", str(self.state_dir), *extra]
        super().__init__("worker", args, self.state_dir / "worker.log", READY_TEXT, ready_timeout_s=ready_timeout_s,
                         prefix=prefix)

    @property
    def addr(self) -> str:
        return state_socket(self.state_dir, WORKER_SOCKET)

