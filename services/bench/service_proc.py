"""One ``moeinf`` service as a child process of a benchmark: started in its own session, logged to a file,
ready when its log says so, stopped with SIGTERM (SIGKILL if it does not stop in time)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def exited_with(code: int) -> str:
    """How a child's exit status reads in a benchmark's error: SIGKILL is most likely the cgroup's OOM killer."""
    return f"exited with {code}" + (" (killed: out of memory under the limit?)" if code in (-9, 137) else "")


class ServiceProcess:
    def __init__(self, service: str, args: list[str], log_path: Path, ready_text: str, *, ready_timeout_s: float,
                 prefix: list[str] = ()):
        self.service, self.args, self.log_path = service, list(args), Path(log_path)
        self.ready_text, self.ready_timeout_s = ready_text, ready_timeout_s
        self.prefix = list(prefix)  # a command prefix, e.g. a memory cgroup's exec_prefix()
        self.proc: subprocess.Popen | None = None

    def start(self):
        """Start the service and wait until it serves; on any failure (or Ctrl-C) it is stopped (and cleaned up)."""
        try:
            self.launch()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.terminate(timeout_s)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def launch(self) -> None:
        """Start the service and wait until its log says it is ready; raises with the log's tail otherwise."""
        cmd = [*self.prefix, sys.executable, "-m", "services.cli", self.service, *self.args]
        with open(self.log_path, "wb") as log:
            # own session: a Ctrl-C in the terminal reaches only the bench, which then stops the service in order
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout_s
        while self.ready_text not in self.log_text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.what} {exited_with(self.proc.returncode)}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.what} not ready within {self.ready_timeout_s:g}s:\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def what(self) -> str:
        return f"moeinf {self.service}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def terminate(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, wait, SIGKILL if needed. Idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def gone(self) -> str | None:
        """Why the service is gone, or None while it runs (a client waiting on it can stop at once)."""
        code = self.proc.poll() if self.proc is not None else None
        return None if code is None else f"{self.what} {exited_with(code)}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None
