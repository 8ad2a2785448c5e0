"""A real ``moeinf memd`` process for a benchmark: its own state directory, stopped and cleaned up on every exit.

Cleanup is belt and braces: SIGTERM (memd unlinks its pool and sockets itself), SIGKILL if it does not stop in
time, then the pool file and the state directory are removed here too (memd is dead by then, so nothing owns them).
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from services.memd.pool import SHM_DIR, pool_name

READY_TEXT = "memd ready"


class MemdProcess:
    def __init__(self, model: Path, expert_memory: str, *, ready_timeout_s: float = 300.0, extra: list[str] = (),
                 prefix: list[str] = ()):
        self.model = Path(model)
        self.expert_memory = expert_memory
        self.extra = list(extra)  # more memd flags (--policy lru, --prefetch off, ...)
        self.prefix = list(prefix)  # a command prefix, e.g. a memory cgroup's exec_prefix()
        self.ready_timeout_s = ready_timeout_s
        # short, so the ipc:// socket paths stay under the 107 characters Unix sockets allow
        self.state_dir = Path(tempfile.mkdtemp(prefix="moeinf-bench-"))
        self.log_path = self.state_dir / "memd.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MemdProcess:
        """Start memd and wait until it serves; on any failure (or Ctrl-C) it is stopped and cleaned up here."""
        cmd = [*self.prefix, sys.executable, "-m", "common.cli", "memd", "--model", str(self.model), "--state-dir",
               str(self.state_dir), "--expert-memory", self.expert_memory, *self.extra]
        try:
            with open(self.log_path, "wb") as log:
                # own session: a Ctrl-C in the terminal reaches only the bench, which then stops memd in order
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if READY_TEXT in self.log_text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"memd --expert-memory {self.expert_memory} exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"memd --expert-memory {self.expert_memory} not ready within {self.ready_timeout_s:g}s:\n"
                           f"{self.log_tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, wait, SIGKILL if needed; then remove the pool and the state directory. Idempotent."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            (SHM_DIR / pool_name(self.state_dir)).unlink(missing_ok=True)
            shutil.rmtree(self.state_dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def __enter__(self) -> MemdProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class TerminateAsInterrupt:
    """While active, SIGTERM and SIGHUP raise KeyboardInterrupt, so ``finally`` blocks stop the memd processes."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, _raise_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
