"""A real ``moeinf memd`` process for a benchmark: its own state directory, stopped and cleaned up on every exit.

Cleanup is belt and braces: SIGTERM (memd unlinks its pool and sockets itself), SIGKILL if it does not stop in
time, then the pool, the control page and the state directory are removed here too (memd is dead by then, so
nothing owns them).
"""
from __future__ import annotations

import shutil
import signal
import tempfile
import threading
from pathlib import Path

from services.bench.service_proc import ServiceProcess
from services.memd.pool import SHM_DIR, pool_name

READY_TEXT = "memd ready"


class MemdProcess(ServiceProcess):
    def __init__(self, model: Path, expert_memory: str, *, ready_timeout_s: float = 300.0, extra: list[str] = (),
                 prefix: list[str] = ()):
        self.model = Path(model)
        self.expert_memory = expert_memory
        # short, so the ipc:// socket paths stay under the 107 characters Unix sockets allow
        self.state_dir = Path(tempfile.mkdtemp(prefix="moeinf-bench-"))
        # a bench's memd reads the checkpoint as stored unless the bench asks for slot images (bench e2e fills them
        # ahead): a fresh state directory would otherwise get images written behind the timed reads
        cache = [] if "--slot-cache" in extra else ["--slot-cache", "off"]
        args = ["--model", str(self.model), "--state-dir", str(self.state_dir), "--expert-memory", expert_memory,
                *cache, *extra]  # extra: more memd flags (--policy lru, --prefetch off, ...)
        super().__init__("memd", args, self.state_dir / "memd.log", READY_TEXT, ready_timeout_s=ready_timeout_s,
                         prefix=prefix)

    @property
    def what(self) -> str:
        return f"memd --expert-memory {self.expert_memory}"

    def load_every_expert(self) -> None:
        """Read every expert into the pool once, as a client of its own that holds nothing after (a 100% run's
        residency then holds for any prompt, not only for what a warm-up's prompt routed to)."""
        from common.config import MEMD_SOCKET, MEMD_TRACE_SOCKET, state_socket
        from services.worker.memd_client import MemdClient

        client = MemdClient(state_socket(self.state_dir, MEMD_SOCKET), state_socket(self.state_dir, MEMD_TRACE_SOCKET),
                            timeout_s=300.0)
        try:
            hello = client.handshake(str(self.model), 60.0, "the bench's handshake timeout")
            client.ready()
            for layer in range(hello.num_layers):
                experts = list(range(hello.num_experts))
                client.acquire(layer, experts, [], [])
                client.release(layer, experts)
        finally:
            client.close()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, wait, SIGKILL if needed; then remove the pool, the control page and the state directory.
        Idempotent."""
        try:
            self.terminate(timeout_s)
        finally:
            for kind in ("pool", "control"):
                (SHM_DIR / pool_name(self.state_dir, kind)).unlink(missing_ok=True)
            shutil.rmtree(self.state_dir, ignore_errors=True)


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
