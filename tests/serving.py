"""A running ``moeinf serve`` (memd + worker + gateway as real processes), for the gateway and fault tests."""
import http.client
import json
import os
import socket
import threading
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers import free_port, free_ports, moeinf_cmd  # noqa: F401 (free_port: imported from here)


class Served:
    """A running ``moeinf serve`` (memd + worker + gateway as real processes)."""

    def __init__(self, model: Path, state_dir: Path, max_queued: int = 4, expert_memory: str = "25%", workers: int = 1):
        self.port, memd_metrics = free_ports(2)  # memd's own Prometheus endpoint (serve's children inherit the env)
        self.state_dir = state_dir
        self.url = f"http://127.0.0.1:{self.port}"
        self.memd_metrics_url = f"http://127.0.0.1:{memd_metrics}/metrics"
        self.log = state_dir.parent / f"serve-{self.port}.log"
        state_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            moeinf_cmd("serve", "--model", str(model), "--state-dir", str(state_dir), "--port", str(self.port),
                       "--expert-memory", expert_memory, "--max-queued", str(max_queued), "--workers", str(workers)),
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MOEINF_METRICS_PORT": str(memd_metrics)})
        self.wait_health(200, timeout=180)
        self.wait_serving(timeout=60)

    def wait_serving(self, timeout: float) -> None:
        """Until serve itself has seen every child ready: the gateway answers 200 as soon as a worker answers it,
        which can be a moment before the supervisor's own poll does, and a worker killed in that moment is a
        start-up failure to serve (it exits) rather than a crash to restart."""
        deadline = time.monotonic() + timeout
        while "moeinf is serving" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"moeinf serve exited {self.proc.returncode}:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"serve never said it was serving:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.1)

    def health(self) -> int:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def wait_health(self, status: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health() == status:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"moeinf serve exited {self.proc.returncode}:\n{self.log.read_text()}")
            time.sleep(0.2)
        raise TimeoutError(f"/health never returned {status}:\n{self.log.read_text(errors='replace')}")

    def worker_info(self, sock: str = "worker.sock"):
        from common.worker_client import WorkerClient

        client = WorkerClient(f"ipc://{self.state_dir.resolve()}/{sock}")
        try:
            return client.info(timeout_s=10)
        finally:
            client.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # Ctrl-C
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class SseStream:
    """A streaming completion read by a thread: its events (dicts, or "[DONE]") and when its response closed (a
    broken chunked response, as when the gateway is killed, closes it too)."""

    def __init__(self, port: int, model: str, max_tokens: int, prompt="the quick brown fox", timeout: float = 120):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
        self.conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.read()
        self.events, self.closed_at = [], None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def wait_closed(self, timeout: float) -> float | None:
        """When the response closed, waiting up to ``timeout`` seconds (None: still open)."""
        self.thread.join(timeout)
        return self.closed_at

    def close(self) -> None:
        """Hang up, as a client that goes away (the gateway then stops generating for it)."""
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()

    def _read(self):
        try:
            for line in self.resp:
                if line.startswith(b"data: "):
                    data = line[6:].strip()
                    self.events.append(data.decode() if data == b"[DONE]" else json.loads(data))
        except json.JSONDecodeError:
            raise  # a malformed event from the gateway is a finding
        except (http.client.HTTPException, OSError, ValueError, AttributeError):
            pass  # the stream ended early; ``close`` from the test's thread races http.client's reads (ValueError on
            # a cut chunk header, AttributeError closing a response whose file it already dropped)
        finally:
            self.closed_at = time.monotonic()
