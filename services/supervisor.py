"""``moeinf serve``: start memd, worker and gateway as child processes, wait for each to be ready, supervise.

A crashed worker is restarted (the gateway answers 503 meanwhile); a crashed memd takes the worker with it
(its pool is gone), so both are restarted in order. SIGINT/SIGTERM stop gateway, worker, memd in that order;
each cleans up its own shared memory and socket files. Children die with the supervisor (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common.config import MEMD_SOCKET, MEMD_TRACE_SOCKET, WORKER_SOCKET, ServeConfig, state_socket

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    args: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started: float = field(default=0.0)

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "common.cli", *self.args], preexec_fn=_die_with_parent)
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Supervisor:
    def __init__(self, cfg: ServeConfig, model: Path):
        self.cfg, self.model = cfg, model
        common = ["--model", str(model), "--state-dir", str(cfg.state_dir), "--log-level", cfg.log_level]
        self.memd = Child("memd", ["memd", *common, "--expert-memory", cfg.expert_memory, "--policy", cfg.policy,
                                   "--prefetch", "on" if cfg.prefetch else "off"])
        worker = ["worker", *common, "--max-queued", str(cfg.max_queued)]
        if cfg.record_trace is not None:
            worker += ["--record-trace", str(cfg.record_trace)]
        self.worker = Child("worker", worker)
        gateway = ["gateway", *common, "--host", cfg.host, "--port", str(cfg.port), "--max-queued", str(cfg.max_queued)]
        if cfg.served_model_name:
            gateway += ["--served-model-name", cfg.served_model_name]
        self.gateway = Child("gateway", gateway)
        self.stopping = False

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}"

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            self.start_all()
            say(f"moeinf is serving {self.model.name} at {self.url}/v1 (Ctrl-C stops it)")
            return self.supervise()
        finally:
            self.stop_all()

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True

    def start_all(self) -> None:
        self.start(self.memd, self.memd_ready)
        self.start(self.worker, self.worker_ready)
        self.start(self.gateway, self.gateway_ready)

    def start(self, child: Child, ready) -> None:
        say(f"starting {child.name} ...")
        child.start()
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while not ready():
            if self.stopping:
                raise KeyboardInterrupt
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with status {child.proc.returncode} during start-up (its"
                                   " error is above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} was not ready within {self.cfg.startup_timeout_s:g}s; raise"
                                   " --startup-timeout-s (env MOEINF_STARTUP_TIMEOUT_S)")
            time.sleep(0.2)
        say(f"{child.name} ready ({time.monotonic() - child.started:.1f}s)")

    def supervise(self) -> int:
        while not self.stopping:
            time.sleep(0.5)
            if not self.memd.alive():
                self.restart(self.memd, self.memd_ready, then=[(self.worker, self.worker_ready)])
            elif not self.worker.alive():
                self.restart(self.worker, self.worker_ready)
            elif not self.gateway.alive():
                self.restart(self.gateway, self.gateway_ready)
        return 0

    def restart(self, child: Child, ready, then=()) -> None:
        if self.stopping:
            return
        child.restarts += 1
        if child.restarts > self.cfg.max_restarts:
            raise RuntimeError(f"{child.name} crashed {child.restarts} times; giving up (raise --max-restarts)")
        say(f"{child.name} exited with status {child.proc.returncode}; restarting ({child.restarts}/"
            f"{self.cfg.max_restarts})")
        for dependent, _ in then:
            dependent.stop()
        self.start(child, ready)
        for dependent, dependent_ready in then:
            self.start(dependent, dependent_ready)

    def stop_all(self) -> None:
        for child in (self.gateway, self.worker, self.memd):
            child.stop()

    # ---- readiness probes
    def memd_ready(self) -> bool:
        return _answered_by(self.memd, lambda: _memd_stats(self.cfg.state_dir))

    def worker_ready(self) -> bool:
        return _answered_by(self.worker, lambda: _worker_info(self.cfg.state_dir))

    def gateway_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False


def _answered_by(child: Child, call) -> bool:
    """Ready when *this* child answers (not a stray process on the same socket)."""
    try:
        return call().pid == child.proc.pid
    except (TimeoutError, RuntimeError, OSError):
        return False


def _memd_stats(state_dir: Path):
    from services.worker.memd_client import MemdClient

    client = MemdClient(state_socket(state_dir, MEMD_SOCKET), state_socket(state_dir, MEMD_TRACE_SOCKET),
                        timeout_s=0.5)
    try:
        return client.stats()
    finally:
        client.close()


def _worker_info(state_dir: Path):
    from common.worker_client import WorkerClient

    client = WorkerClient(state_socket(state_dir, WORKER_SOCKET))
    try:
        return client.info(timeout_s=0.5)
    finally:
        client.close()


def say(text: str) -> None:
    print(f"moeinf serve: {text}", file=sys.stderr, flush=True)


def demo_model(cfg: ServeConfig) -> Path:
    """Build the demo model once (cached in --demo-dir) and return it."""
    from common.demo_model import write_demo_model

    if not (cfg.demo_dir / "config.json").is_file():
        say(f"building the demo model (random weights: its text is nonsense) in {cfg.demo_dir} ...")
        write_demo_model(cfg.demo_dir)
    return cfg.demo_dir


def run(cfg: ServeConfig) -> int:
    model = cfg.model if cfg.model is not None else demo_model(cfg)
    return Supervisor(cfg, model).run()
