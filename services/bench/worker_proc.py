"""A real ``moeinf worker`` process for a benchmark, attached to a ``MemdProcess``'s state directory."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from common.config import WORKER_SOCKET, state_socket

READY_TEXT = "worker ready"


class WorkerProcess:
    def __init__(self, model: Path, state_dir: Path, extra: list[str] = (), *, ready_timeout_s: float = 600.0,
                 prefix: list[str] = ()):
        self.model, self.state_dir = Path(model), Path(state_dir)
        self.extra, self.prefix = list(extra), list(prefix)  # prefix: e.g. a memory cgroup's exec_prefix()
        self.ready_timeout_s = ready_timeout_s
        self.log_path = self.state_dir / "worker.log"
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return state_socket(self.state_dir, WORKER_SOCKET)

    def start(self) -> WorkerProcess:
        cmd = [*self.prefix, sys.executable, "-m", "common.cli", "worker", "--model", str(self.model), "--state-dir",
               str(self.state_dir), *self.extra]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout_s
        while READY_TEXT not in self.log_text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the worker was not ready within {self.ready_timeout_s:g}s")
            time.sleep(0.05)
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, wait, SIGKILL if needed. Idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
