"""The gateway's link to the worker: one DEALER socket, one reader task routing replies to per-request queues.

A dead worker is noticed by its peer, not by a timeout: the socket's monitor reports the disconnect (the kernel
closes a killed process's ipc connection at once), and the worker's pid, learnt from its WORKER_INFO reply, is
polled while it is visible from here (not across pid namespaces, e.g. separate containers). Either way every
call in flight fails at once with ``WorkerUnavailable``, and ``lost`` says why until a worker answers again.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from common import messages as m
from common.codec import ProtocolError, decode, encode
from common.procs import pid_alive
from common.protocol import Op
from common.zmq_utils import make_socket

log = logging.getLogger("moeinf.gateway.link")
PID_POLL_S = 0.2


class WorkerUnavailable(RuntimeError):
    pass


class WorkerRejected(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class GatewayStopping(WorkerUnavailable):
    """The gateway is shutting down: its calls end, the worker lives on (and is told to cancel them)."""


class WorkerSilent(WorkerUnavailable):
    """No token for ``--step-timeout-s``, for this request or any other (a request waiting its turn behind others
    that stream is not silent, nor is a long prompt whose prefill reports each chunk): the request fails, and the
    worker, which may still be alive (a stalled step), is told to cancel it so it stops holding a slot for nobody."""


class _PeerLost:
    """Put in every pending queue when the worker goes away (or the gateway stops: ``stopping``)."""

    def __init__(self, reason: str, stopping: bool = False):
        self.reason, self.stopping = reason, stopping


class WorkerLink:
    def __init__(self, addr: str, max_pending: int):
        self.addr = addr
        self.ctx = zmq.asyncio.Context()
        self.sock = make_socket(self.ctx, zmq.DEALER, addr, bind=False, immediate=True)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
        self._ids = itertools.count(1)
        self.pending: dict[int, asyncio.Queue] = {}
        self.max_pending = max_pending
        self.worker_pid: int | None = None  # watched while visible from this process
        self.lost: str | None = None  # why the worker is gone, until it answers again
        self.stopping: str | None = None  # set by ``abort``: no new calls
        self.last_progress = time.monotonic()  # the last generation reply, any request's (not health answers)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch_socket()),
                       asyncio.create_task(self._watch_pid())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.disable_monitor()
        self.monitor.close()
        self.sock.close()
        self.ctx.term()

    # ------------------------------------------------------------------ watching the peer
    async def _read(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                _, rid, reply = decode(frame, reply=True)
            except ProtocolError as exc:
                log.warning("dropped a malformed worker reply: %s", exc)
                continue
            if isinstance(reply, m.TokensReply):
                self.last_progress = time.monotonic()
            queue = self.pending.get(rid)
            if queue is not None:
                queue.put_nowait(reply)

    async def _watch_socket(self) -> None:
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.peer_lost(f"the worker at {self.addr} disconnected")

    async def _watch_pid(self) -> None:
        while True:
            await asyncio.sleep(PID_POLL_S)
            if self.worker_pid is not None and not pid_alive(self.worker_pid):
                self.peer_lost(f"the worker (pid {self.worker_pid}) died")

    def peer_lost(self, reason: str) -> None:
        """Fail every call in flight now: the worker that had them is gone."""
        self.worker_pid = None
        self.lost = reason
        if self.pending:
            log.warning("%s: failing %d calls in flight", reason, len(self.pending))
        for queue in self.pending.values():
            queue.put_nowait(_PeerLost(reason))

    def abort(self, reason: str) -> None:
        """End every call in flight now (the gateway is stopping); the worker is alive and keeps its state."""
        self.stopping = reason
        for queue in self.pending.values():
            queue.put_nowait(_PeerLost(reason, stopping=True))

    def _note_worker(self, info: m.WorkerInfoReply) -> None:
        self.lost = None
        if info.pid != self.worker_pid:  # a pid that is not visible here (another pid namespace) is not polled
            self.worker_pid = info.pid if pid_alive(info.pid) else None

    # ------------------------------------------------------------------ calls
    def _open(self) -> tuple[int, asyncio.Queue]:
        if self.stopping:
            raise GatewayStopping(self.stopping)
        if len(self.pending) >= self.max_pending:
            raise WorkerRejected("capacity", f"{len(self.pending)} calls in flight to the worker (the gateway's"
                                               " --max-queued plus a few)")
        rid = next(self._ids)
        queue = self.pending[rid] = asyncio.Queue()
        return rid, queue

    async def _send(self, op: Op, rid: int, request) -> None:
        try:
            await self.sock.send(encode(op, rid, request), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise WorkerUnavailable(f"the worker is not connected at {self.addr}") from None

    async def call(self, op: Op, request, timeout_s: float):
        rid, queue = self._open()
        try:
            await self._send(op, rid, request)
            reply = await asyncio.wait_for(queue.get(), timeout_s)
        except asyncio.TimeoutError:
            raise WorkerUnavailable(f"the worker did not answer {op.name} within {timeout_s:g}s") from None
        finally:
            self.pending.pop(rid, None)
        _raise_error(reply)
        return reply

    async def info(self, timeout_s: float = 2.0) -> m.WorkerInfoReply:
        info = await self.call(Op.WORKER_INFO, m.WorkerInfoRequest(), timeout_s)
        self._note_worker(info)
        return info

    async def cancel(self, request: str) -> None:
        """Tell the worker to stop generating ``request``; fire and forget (its reply finds no queue)."""
        try:
            await self._send(Op.CANCEL, next(self._ids), m.CancelRequest(request))
        except WorkerUnavailable as exc:
            log.info("cancel of %s not sent: %s", request, exc)

    async def generate(self, request: m.GenerateRequest, step_timeout_s: float):
        """Yield ``TokensReply`` until the request finishes; raises on worker errors, its death or silence."""
        rid, queue = self._open()
        try:
            await self._send(Op.GENERATE, rid, request)
            wait = step_timeout_s
            while True:
                try:
                    reply = await asyncio.wait_for(queue.get(), wait)
                except asyncio.TimeoutError:
                    quiet = time.monotonic() - self.last_progress
                    if quiet < step_timeout_s:  # the worker generates for others: this request waits its turn,
                        wait = step_timeout_s - quiet  # until the worker has been quiet that long
                        continue
                    raise WorkerSilent(f"no token from the worker for {step_timeout_s:g}s (--step-timeout-s)") from None
                wait = step_timeout_s
                _raise_error(reply)
                yield reply
                if reply.finish_reason is not None:
                    return
        finally:
            self.pending.pop(rid, None)


def _raise_error(reply) -> None:
    if isinstance(reply, _PeerLost):
        raise (GatewayStopping if reply.stopping else WorkerUnavailable)(reply.reason)
    if isinstance(reply, m.ErrorReply):
        if reply.code == "unavailable":
            raise WorkerUnavailable(reply.message)
        raise WorkerRejected(reply.code, reply.message)
