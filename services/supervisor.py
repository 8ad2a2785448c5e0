"""``moeinf serve``: start memd, worker(s) and gateway as child processes (all at once; each awaited in dependency
order), supervise.

With ``--workers N`` (N > 1) N workers attach to the one memd (one expert pool), each on its own socket
(``worker-<i>.sock``); the gateway finds them all in the state directory. Each is restarted on its own.

A crashed worker is restarted (the gateway answers 503 meanwhile); a crashed memd takes the worker with it
(its pool is gone), so both are restarted in order. A service that crashes ``--max-restarts`` times within
``--restart-window-s`` seconds (a sliding window: old crashes age out) brings serve down, removing the socket files
its dead children left behind. SIGINT/SIGTERM stop the three children at once (SIGTERM to all, then SIGKILL to any
still running after ``STOP_TIMEOUT_S``); each cleans up its own shared memory and socket files, and what a killed
child could not clean is removed by serve. Children die with the supervisor (PR_SET_PDEATHSIG). The API key
(``--api-key``, ``--api-key-file``, ``MOEINF_API_KEY``) reaches the gateway only, in its environment: never on a
command line, which every local user can read.
"""
from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common.config import (ADMIN_SOCKET, KV_AUTO_SHARE, MEMD_SOCKET, MEMD_TRACE_SOCKET, env_name, state_socket,
                           worker_socket)
from common.procs import die_with_parent
from common.serve_config import ServeConfig
from common.zmq_utils import remove_ipc_file
from services.memd.pool import SHM_DIR, owner_pid, pool_name

API_KEY_ENV = env_name("api_key")
STOP_TIMEOUT_S = 8.0  # SIGTERM to every child at once, SIGKILL after this: all are gone in < 10 s


@dataclass
class Child:
    name: str
    args: list[str]
    sockets: tuple[str, ...] = ()  # ipc:// files it binds: removed by serve when it cannot remove them itself
    cmd: list[str] | None = None  # the command line (default: ``python -m services.cli <args>``)
    env: dict[str, str] | None = None  # its environment (default: serve's)
    proc: subprocess.Popen | None = None
    crashes: collections.deque = field(default_factory=collections.deque)  # monotonic times, within the window
    started: float = field(default=0.0)
    was_ready: bool = False  # its files are its own (a child that failed to start may have met another's)
    total_crashes: int = 0

    def start(self) -> None:
        cmd = self.cmd or [sys.executable, "-m", "services.cli", *self.args]
        self.proc = subprocess.Popen(cmd, env=self.env, preexec_fn=die_with_parent)
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        stop_children([self], timeout)

    def crashed(self, window_s: float, now: float) -> int:
        """Count a crash; return the crashes within the last ``window_s`` seconds."""
        self.total_crashes += 1
        self.crashes.append(now)
        while self.crashes and self.crashes[0] <= now - window_s:
            self.crashes.popleft()
        return len(self.crashes)


def stop_children(children, timeout: float = STOP_TIMEOUT_S) -> list[str]:
    """SIGTERM every live child at once, wait for all of them together, SIGKILL what is left at ``timeout``.
    Returns the names of the children that had to be killed."""
    live = [c for c in children if c.alive()]
    for c in live:
        c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed = []
    for c in live:
        try:
            c.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()
            killed.append(c.name)
    return killed


class Supervisor:
    def __init__(self, cfg: ServeConfig, model: Path):
        self.cfg, self.model = cfg, model
        common = ["--model", str(model), "--state-dir", str(cfg.state_dir), "--log-level", cfg.log_level]
        sock = lambda name: state_socket(cfg.state_dir, name)  # noqa: E731
        group = ["--group", cfg.group] if cfg.group else []
        self.memd = Child("memd", ["memd", *common, *group, "--expert-memory", cfg.expert_memory,
                                   "--policy", cfg.policy, "--prefetch", "on" if cfg.prefetch else "off",
                                   *(["--expert-format", cfg.expert_format] if cfg.expert_format else []),
                                   *(["--slot-compression", cfg.slot_compression] * (cfg.slot_compression != "off")),
                                   *gpu_memd_args(cfg.device)],
                          sockets=(sock(MEMD_SOCKET), sock(MEMD_TRACE_SOCKET), sock(ADMIN_SOCKET)), env=_child_env())
        worker = ["worker", *common, *group, "--max-queued", str(cfg.max_queued), "--device", cfg.device,
                  "--handshake-timeout-s", f"{cfg.startup_timeout_s:g}"]  # started with memd: wait as long for it
        if cfg.record_trace is not None:
            worker += ["--record-trace", str(cfg.record_trace)]
        if cfg.workers > 1 and env_name("kv_cache_memory") not in os.environ:  # each its share of the memory all see
            worker += ["--kv-cache-memory", f"{KV_AUTO_SHARE * 100 / cfg.workers:g}%"]
        ids = [str(i) for i in range(cfg.workers)] if cfg.workers > 1 else [""]  # one worker: worker.sock
        self.workers = [Child(f"worker {i}" if i else "worker", [*worker, f"--worker-id={i}"],  # (never the env's)
                              sockets=(sock(worker_socket(i)),), env=_child_env()) for i in ids]
        gateway = ["gateway", *common, "--host", cfg.host, "--port", str(cfg.port), "--max-queued", str(cfg.max_queued)]
        if cfg.served_model_name:
            gateway += ["--served-model-name", cfg.served_model_name]
        self.gateway = Child("gateway", gateway, env=_child_env(api_key=cfg.api_key))
        self.stopping = False

    @property
    def url(self) -> str:
        host = self.cfg.host
        return f"http://[{host}]:{self.cfg.port}" if ":" in host else f"http://{host}:{self.cfg.port}"  # (IPv6)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            self.start_all()
            say(f"moeinf is serving {self.model.name} at {self.url}/v1 (Ctrl-C stops it)")
            return self.supervise()
        except KeyboardInterrupt:
            if self.stopping:
                return 0  # a stop asked for during a start or a restart ends like one asked for later
            raise
        finally:
            self.stop_all()

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True

    def start_all(self) -> None:
        """Every child starts at once: a worker loads its model while memd indexes the checkpoint, then waits for
        memd's handshake (``--handshake-timeout-s``, given serve's ``--startup-timeout-s``), and the gateway answers
        503 until a worker is ready. Readiness is then awaited in dependency order, so memd's error comes first."""
        children = [(self.memd, self.memd_ready), *((w, self.worker_ready(w)) for w in self.workers),
                    (self.gateway, self.gateway_ready)]
        for child, _ in children:
            say(f"starting {child.name} ...")
            child.start()
        for child, ready in children:
            self.wait_ready(child, ready)

    def start(self, child: Child, ready, *, restarting: bool = False) -> bool:
        say(f"starting {child.name} ...")
        child.start()
        return self.wait_ready(child, ready, restarting=restarting)

    def wait_ready(self, child: Child, ready, *, restarting: bool = False) -> bool:
        """False when a ``restarting`` child, or memd that a worker or the gateway needs, exits before it is ready:
        a crash like any other, which the supervise loop restarts within the budget (only a first start's exit is
        fatal: its error is a setup error)."""
        deadline = child.started + self.cfg.startup_timeout_s
        gone = lambda: child if not child.alive() else (  # noqa: E731 (what died: the child, or memd under it)
            self.memd if child is not self.memd and self.memd.proc is not None and not self.memd.alive() else None)
        while not ready():
            if self.stopping:
                raise KeyboardInterrupt
            if (dead := gone()) is not None and restarting:
                say(f"{dead.name} exited with status {dead.proc.returncode} before {child.name} was ready again")
                return False
            if dead is not None:
                raise RuntimeError(f"{dead.name} exited with status {dead.proc.returncode} during start-up (its"
                                   " error is above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} was not ready within {self.cfg.startup_timeout_s:g}s; raise"
                                   " --startup-timeout-s (env MOEINF_STARTUP_TIMEOUT_S)")
            time.sleep(0.2)
        child.was_ready = True
        say(f"{child.name} ready ({time.monotonic() - child.started:.1f}s)")
        return True

    def supervise(self) -> int:
        while not self.stopping:
            time.sleep(0.5)
            dead = [w for w in self.workers if not w.alive()]
            if not self.memd.alive():
                self.restart(self.memd, self.memd_ready, then=[(w, self.worker_ready(w)) for w in self.workers])
            elif dead:  # one at a time: the others keep serving meanwhile
                self.restart(dead[0], self.worker_ready(dead[0]))
            elif not self.gateway.alive():
                self.restart(self.gateway, self.gateway_ready)
        return 0

    def restart(self, child: Child, ready, then=()) -> None:
        if self.stopping:
            return
        window = self.cfg.restart_window_s
        recent = child.crashed(window, time.monotonic())
        if recent > self.cfg.max_restarts:
            raise RuntimeError(f"{child.name} crashed {recent} times within {window:g}s; giving up (raise"
                               " --max-restarts or lower --restart-window-s)")
        say(f"{child.name} exited with status {child.proc.returncode}; restarting ({recent}/{self.cfg.max_restarts}"
            f" within {window:g}s)")
        stop_children([dependent for dependent, _ in then])
        if self.stopping:  # (asked to stop while the dependents stopped: start nothing)
            return
        if not self.start(child, ready, restarting=True):
            return  # (its dependents stay stopped: the next turn of the loop restarts it, and them)
        for dependent, dependent_ready in then:
            self.start(dependent, dependent_ready, restarting=True)

    def stop_all(self) -> None:
        """Stop the three children in parallel, then remove the socket files of those that could not (killed,
        crashed): a stale worker.sock must not outlive serve."""
        children = (self.gateway, *self.workers, self.memd)
        killed = stop_children(children)
        if killed:
            say(f"{', '.join(killed)} did not stop within {STOP_TIMEOUT_S:g}s of SIGTERM: killed")
        for child in children:
            if child.was_ready and child.proc.returncode != 0:
                for addr in child.sockets:
                    remove_ipc_file(addr)
        memd = self.memd.proc
        if memd is not None and memd.returncode != 0 and owner_pid(self.cfg.state_dir) == memd.pid:
            for kind in ("pool", "control", "host"):  # killed: its regions would outlive it (not another memd's)
                (SHM_DIR / pool_name(self.cfg.state_dir, kind)).unlink(missing_ok=True)

    # ---- readiness probes
    def memd_ready(self) -> bool:
        return _answered_by(self.memd, lambda: _memd_stats(self.cfg.state_dir))

    def worker_ready(self, worker: Child):
        addr = worker.sockets[0]
        return lambda: _answered_by(worker, lambda: _worker_info(addr))

    def gateway_ready(self) -> bool:
        """200 from /health while the gateway runs (``port_free`` made sure no other server held the port)."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                return resp.status == 200 and self.gateway.alive()
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


def _worker_info(addr: str):
    from common.worker_client import WorkerClient

    client = WorkerClient(addr)
    try:
        return client.info(timeout_s=0.5)
    finally:
        client.close()


def gpu_memd_args(device: str) -> list[str]:
    """memd's flags for ``serve --device``: on a GPU, the pool in its memory (the worker computes there)."""
    if device == "cpu":
        return []
    _, _, index = device.partition(":")
    return ["--pool-backend", "cuda", "--cuda-device", index or "0"]


def _child_env(api_key: str = "") -> dict[str, str]:
    """serve's environment without its API key, which only the gateway gets, as MOEINF_API_KEY: a child's environment
    is readable by its owner only (/proc/PID/environ), its command line by every local user (ps)."""
    env = {k: v for k, v in os.environ.items() if k not in (API_KEY_ENV, API_KEY_ENV + "_FILE")}
    if api_key:
        env[API_KEY_ENV] = api_key
    return env


def say(text: str) -> None:
    print(f"moeinf serve: {text}", file=sys.stderr, flush=True)


def demo_model(cfg: ServeConfig) -> Path:
    """Build the demo model once (cached in --demo-dir) and return it."""
    from common.demo_model import MARKER, write_demo_model

    if not (cfg.demo_dir / MARKER).is_file():  # (written last: a build cut short is built again)
        say(f"building the demo model (random weights: its text is nonsense) in {cfg.demo_dir} ...")
        write_demo_model(cfg.demo_dir)
    return cfg.demo_dir


def port_free(host: str, port: int) -> None:
    """A clear error now, not a gateway that cannot bind (and a probe answered by whatever holds the port)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # (an IPv6 address: its family)
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        raise RuntimeError(f"cannot listen on {host}:{port} ({exc.strerror}): is another server there? pick another"
                           " --port") from None


def run(cfg: ServeConfig) -> int:
    port_free(cfg.host, cfg.port)
    model = cfg.model if cfg.model is not None else demo_model(cfg)
    return Supervisor(cfg, model).run()
