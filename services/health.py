"""``moeinf health memd|worker|gateway``: exit 0 when the service answers and is ready, 1 otherwise.

Made for container healthchecks (compose.yaml): it asks the service over its own socket, exactly as
``moeinf serve`` probes its children, and prints one line saying what it found.
"""
from __future__ import annotations

import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common.config import (MEMD_SOCKET, MEMD_TRACE_SOCKET, default_state_dir, knob, resolve_worker_id, state_socket,
                           worker_socket)

SERVICES = ("memd", "worker", "gateway")


@dataclass(frozen=True, slots=True)
class HealthConfig:
    state_dir: Path = knob(default_state_dir(), "the services' state directory (memd and worker sockets)")
    host: str = knob("127.0.0.1", "gateway address to ask (0.0.0.0 asks this host)")
    port: int = knob(8000, "gateway HTTP port")
    timeout_s: float = knob(2.0, "seconds to wait for the answer (env MOEINF_TIMEOUT_S, which moeinf admin reads too)")
    worker_id: str = knob("", "the worker to ask: worker-<id>.sock (auto: the host name), as the worker's --worker-id")

    def __post_init__(self):
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        object.__setattr__(self, "worker_id", resolve_worker_id(self.worker_id))
        if not self.timeout_s > 0:
            raise ValueError("--timeout-s must be > 0")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port {self.port}: a TCP port is 1-65535")


def check_memd(cfg: HealthConfig) -> str:
    from services.worker.memd_client import MemdClient, MemdDeadError, MemdError

    state = cfg.state_dir.resolve()
    client = MemdClient(state_socket(state, MEMD_SOCKET), state_socket(state, MEMD_TRACE_SOCKET),
                        timeout_s=cfg.timeout_s)
    try:
        stats = client.stats()
    except MemdDeadError:
        raise Unhealthy(f"memd did not answer at {client.rpc_addr} within {cfg.timeout_s:g}s") from None
    except MemdError as exc:
        raise Unhealthy(str(exc)) from None
    finally:
        client.close()
    return f"memd pid {stats.pid}: {stats.resident}/{stats.num_slots} slots resident"


def check_worker(cfg: HealthConfig) -> str:
    from common.worker_client import WorkerClient, WorkerClientError

    client = WorkerClient(state_socket(cfg.state_dir, worker_socket(cfg.worker_id)))
    try:
        info = client.info(timeout_s=cfg.timeout_s)
    except (TimeoutError, WorkerClientError) as exc:
        raise Unhealthy(str(exc)) from None
    finally:
        client.close()
    if not info.ready:
        raise Unhealthy(f"worker pid {info.pid} is up but memd is not")
    return f"worker pid {info.pid}: {info.active} requests in progress"


def check_gateway(cfg: HealthConfig) -> str:
    url = f"http://{cfg.host}:{cfg.port}/health"
    try:
        with urllib.request.urlopen(url, timeout=cfg.timeout_s) as resp:
            return f"gateway {url}: {resp.status}"
    except urllib.error.HTTPError as exc:
        raise Unhealthy(f"gateway {url}: {exc.code} {exc.read().decode(errors='replace')}") from None
    except OSError as exc:
        raise Unhealthy(f"gateway {url}: {exc}") from None


class Unhealthy(Exception):
    pass


CHECKS = {"memd": check_memd, "worker": check_worker, "gateway": check_gateway}


def run(service: str, cfg: HealthConfig) -> int:
    try:
        print(f"healthy: {CHECKS[service](cfg)}")
        return 0
    except Unhealthy as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
