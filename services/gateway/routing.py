"""Several workers behind one gateway: which worker sockets there are, which answer, where a request goes.

The workers are found in the state directory: ``worker.sock`` (always linked, as with one worker) and every
``worker-<id>.sock`` (``moeinf serve --workers N``, compose ``--scale worker=N`` with ``--worker-id auto``),
looked for again at each health poll; a link whose socket file is gone, or left behind with nobody listening on it
(a killed worker's: compose keeps the state volume), and which has no call in flight is closed, and such a file is
not linked (so they cannot pile up).
Each worker has its own ``WorkerLink``: a dead worker fails only its own requests (with an error event), the
others keep serving.

A request goes to the ready worker with the fewest outstanding tokens (prompt + max_tokens of its requests in
flight, less what they have generated), except that a conversation returns to the worker that served it: the
same ``user`` field, or else the same prompt prefix (the first ``PREFIX_TOKENS`` tokens: a chat's next turn
repeats the earlier ones). Affinity yields to load when that worker has more than ``--affinity-slack-tokens``
outstanding tokens above the least-loaded one. ``--affinity-entries`` conversations are remembered (LRU).
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

from common import messages as m
from common.config import WORKER_SOCKET, GatewayConfig, state_socket
from services.gateway.worker_link import WorkerLink, WorkerRejected, WorkerUnavailable

log = logging.getLogger("moeinf.gateway.routing")
WORKER_GLOB = "worker-*.sock"
PREFIX_TOKENS = 32  # prompt tokens hashed into a conversation's key when it has no ``user``
LINK_SLACK = 64  # calls in flight to one worker beyond --max-queued (health polls, cancels)


def affinity_key(user: str | None, prompt_ids: list[int]) -> str:
    if user:
        return "user:" + user
    prefix = ",".join(map(str, prompt_ids[:PREFIX_TOKENS])).encode()
    return "prefix:" + hashlib.blake2b(prefix, digest_size=12).hexdigest()


@dataclass(eq=False)
class Worker:
    """One worker socket: its link, what it last said about itself, and its outstanding tokens."""

    addr: str
    link: WorkerLink
    info: m.WorkerInfoReply | None = None
    reason: str = "it has not answered yet"
    outstanding: int = 0
    in_flight: int = 0

    @property
    def name(self) -> str:
        return Path(self.addr).name

    @property
    def ready(self) -> bool:
        return not self.reason and self.info is not None and self.link.lost is None

    def why_not(self) -> str:
        return f"the worker is not answering ({self.link.lost})" if self.link.lost else self.reason


@dataclass(eq=False)
class Dispatch:
    """A request on its worker: its outstanding tokens count against that worker until it ends."""

    worker: Worker
    remaining: int
    _ended: bool = field(default=False)

    def progress(self, tokens: int) -> None:
        tokens = min(tokens, self.remaining)
        self.remaining -= tokens
        self.worker.outstanding -= tokens

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self.worker.outstanding -= self.remaining
            self.worker.in_flight -= 1
            self.remaining = 0


class Router:
    """Least outstanding tokens, with bounded conversation affinity (no I/O: ``WorkerSet`` owns the links)."""

    def __init__(self, entries: int, slack_tokens: int):
        self.entries, self.slack = entries, slack_tokens
        self.affinity: collections.OrderedDict[str, str] = collections.OrderedDict()  # key -> worker addr

    def pick(self, ready: list[Worker], key: str) -> Worker:
        least = min(ready, key=lambda w: (w.outstanding, w.in_flight))
        addr = self.affinity.get(key)
        chosen = next((w for w in ready if w.addr == addr), None)
        if chosen is None or chosen.outstanding > least.outstanding + self.slack:
            chosen = least
        self.remember(key, chosen.addr)
        return chosen

    def remember(self, key: str, addr: str) -> None:
        self.affinity[key] = addr
        self.affinity.move_to_end(key)
        while len(self.affinity) > self.entries:
            self.affinity.popitem(last=False)

    def dispatch(self, worker: Worker, tokens: int) -> Dispatch:
        worker.outstanding += tokens
        worker.in_flight += 1
        return Dispatch(worker, tokens)


def listening(addr: str) -> bool:
    """Does a process listen on the ipc socket ``addr`` (a killed worker's file stays, with nobody on it)? A
    non-blocking connect to its path: refused (or gone) when nobody does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(addr.removeprefix("ipc://"))
        except BlockingIOError:  # (a full backlog: someone listens)
            return True
        except OSError:
            return False
    return True


class WorkerSet:
    """The gateway's workers: discovery, health, routing."""

    def __init__(self, cfg: GatewayConfig, on_gone=lambda name: None):
        self.cfg = cfg
        self.on_gone = on_gone  # (a worker's name) when its socket is gone: its per-worker metrics go with it
        self.state_dir = Path(cfg.state_dir)
        self.workers: dict[str, Worker] = {}
        self.router = Router(cfg.affinity_entries, cfg.affinity_slack_tokens)
        self.stopping: str | None = None
        self._add(cfg.worker_addr)  # the single worker's socket is always linked, found or not

    def _add(self, addr: str) -> Worker:
        worker = self.workers[addr] = Worker(addr, WorkerLink(addr, max_pending=self.cfg.max_queued + LINK_SLACK))
        if self.stopping:
            worker.link.abort(self.stopping)
        return worker

    async def discover(self) -> None:
        """Link every ``worker-*.sock`` someone listens on in the state directory; close the links of vanished or
        abandoned ones with no calls."""
        found = {state_socket(self.state_dir, p.name) for p in self.state_dir.glob(WORKER_GLOB)}
        default = state_socket(self.state_dir, WORKER_SOCKET)
        for addr in sorted(found - self.workers.keys()):
            if listening(addr):
                log.info("found a worker socket: %s", addr)
                self._add(addr)
        for addr in [a for a in self.workers if a != default]:
            worker = self.workers[addr]
            if addr in found and (worker.ready or listening(addr)):
                continue
            if not worker.link.pending:
                log.info("worker socket %s is %s", addr, "gone" if addr not in found else "abandoned (nobody on it)")
                worker = self.workers.pop(addr)
                self.on_gone(worker.name)
                await worker.link.close()

    async def refresh(self, timeout_s: float) -> None:
        await self.discover()
        await asyncio.gather(*(self._ask(w, timeout_s) for w in list(self.workers.values())))

    async def _ask(self, worker: Worker, timeout_s: float) -> None:
        try:
            worker.info = await worker.link.info(timeout_s=timeout_s)
            worker.reason = "" if worker.info.ready else "the worker is up but memd is not"
        except (WorkerUnavailable, WorkerRejected) as exc:
            worker.reason = f"the worker is not answering ({exc})"

    def ready(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.ready]

    def health_reason(self) -> str:
        """Empty when at least one worker is ready; else why none is (each worker's reason)."""
        if self.ready():
            return ""
        reasons = sorted({w.why_not() for w in self.workers.values()})
        return "; ".join(reasons) if len(self.workers) > 1 else reasons[0]

    def info(self) -> m.WorkerInfoReply | None:
        """What a ready worker says (every worker serves the one model: memd refuses any other)."""
        return next((w.info for w in self.ready()), None)

    def route(self, user: str | None, prompt_ids: list[int], max_tokens: int) -> Dispatch:
        ready = self.ready()
        if not ready:
            raise WorkerUnavailable(self.health_reason() or "no worker is ready")
        worker = self.router.pick(ready, affinity_key(user, prompt_ids))
        return self.router.dispatch(worker, len(prompt_ids) + max_tokens)

    def abort(self, reason: str) -> None:
        self.stopping = reason
        for worker in self.workers.values():
            worker.link.abort(reason)

    async def close(self) -> None:
        await asyncio.gather(*(w.link.close() for w in self.workers.values()))
