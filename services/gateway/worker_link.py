"""The gateway's link to the worker: one DEALER socket, one reader task routing replies to per-request queues."""
from __future__ import annotations

import asyncio
import itertools
import logging

import zmq
import zmq.asyncio

from common import messages as m
from common.codec import ProtocolError, decode, encode
from common.protocol import Op
from common.zmq_utils import make_socket

log = logging.getLogger("moeinf.gateway.link")


class WorkerUnavailable(RuntimeError):
    pass


class WorkerRejected(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class WorkerLink:
    def __init__(self, addr: str, max_pending: int):
        self.addr = addr
        self.ctx = zmq.asyncio.Context()
        self.sock = make_socket(self.ctx, zmq.DEALER, addr, bind=False, immediate=True)
        self._ids = itertools.count(1)
        self.pending: dict[int, asyncio.Queue] = {}
        self.max_pending = max_pending
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        self.sock.close()
        self.ctx.term()

    async def _read(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                _, rid, reply = decode(frame, reply=True)
            except ProtocolError as exc:
                log.warning("dropped a malformed worker reply: %s", exc)
                continue
            queue = self.pending.get(rid)
            if queue is not None:
                queue.put_nowait(reply)

    def _open(self) -> tuple[int, asyncio.Queue]:
        if len(self.pending) >= self.max_pending:
            raise WorkerRejected("capacity", f"{len(self.pending)} calls in flight to the worker")
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
        return await self.call(Op.WORKER_INFO, m.WorkerInfoRequest(), timeout_s)

    async def cancel(self, request: str) -> None:
        try:
            await self.call(Op.CANCEL, m.CancelRequest(request), 5.0)
        except (WorkerUnavailable, WorkerRejected) as exc:
            log.info("cancel of %s not confirmed: %s", request, exc)

    async def generate(self, request: m.GenerateRequest, step_timeout_s: float):
        """Yield ``TokensReply`` until the request finishes; raises on worker errors or silence."""
        rid, queue = self._open()
        try:
            await self._send(Op.GENERATE, rid, request)
            while True:
                try:
                    reply = await asyncio.wait_for(queue.get(), step_timeout_s)
                except asyncio.TimeoutError:
                    raise WorkerUnavailable(f"no token from the worker for {step_timeout_s:g}s") from None
                _raise_error(reply)
                yield reply
                if reply.finish_reason is not None:
                    return
        finally:
            self.pending.pop(rid, None)


def _raise_error(reply) -> None:
    if isinstance(reply, m.ErrorReply):
        if reply.code == "unavailable":
            raise WorkerUnavailable(reply.message)
        raise WorkerRejected(reply.code, reply.message)
