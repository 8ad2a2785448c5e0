"""The worker's gateway link and its compute loop.

The event loop owns the ROUTER socket (one reader task, one writer task); the compute thread owns the model
and the memd client. They meet in two queues: requests in (bounded: beyond ``--max-queued`` a request is
refused with ``capacity``), replies out. The compute loop reads like the step it is:
admit -> forward -> publish -> retire.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading

import zmq
import zmq.asyncio

from common import messages as m
from common.codec import ProtocolError, decode, encode, peek
from common.protocol import WORKER_OPS, Op
from common.zmq_utils import make_socket, remove_ipc_file
from services.worker.engine import Engine, RequestError, Sequence
from services.worker.memd_client import MemdClient, MemdDeadError, MemdError

log = logging.getLogger("moeinf.worker")


class WorkerServer:
    def __init__(self, addr: str, engine: Engine, client: MemdClient, info: m.WorkerInfoReply, max_queued: int):
        self.addr, self.engine, self.client, self.info = addr, engine, client, info
        self.inbox: queue.Queue = queue.Queue(maxsize=max_queued)
        self.cancelled: set[str] = set()
        self.live: dict[str, bytes] = {}  # request id -> gateway identity, bounded by max_queued + 1
        self.max_live = max_queued + 1
        self.stopping = threading.Event()
        self.exit_code = 0
        self.generated_tokens = 0

    # ------------------------------------------------------------------ event loop side
    async def serve(self) -> int:
        self.loop = asyncio.get_running_loop()
        ctx = zmq.asyncio.Context()
        self.sock = make_socket(ctx, zmq.ROUTER, self.addr, bind=True)
        self.outbox: asyncio.Queue = asyncio.Queue()
        compute = threading.Thread(target=self.compute_loop, name="worker-compute", daemon=True)
        compute.start()
        tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._write()),
                 asyncio.create_task(self._watch_memd())]
        log.info("worker ready on %s", self.addr)
        try:
            await self.loop.run_in_executor(None, self.stopping.wait)
        finally:
            self.stopping.set()
            compute.join(timeout=30)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.sock.close()
            ctx.term()
            remove_ipc_file(self.addr)
        return self.exit_code

    def stop(self) -> None:
        self.stopping.set()

    async def _watch_memd(self) -> None:
        """A worker without memd cannot compute: exit (status 3) so the supervisor restarts both."""
        while not self.stopping.is_set():
            await asyncio.sleep(1.0)
            if not self.client.memd_alive():
                log.error("memd (pid %s) is gone; the worker stops", self.client.memd_pid)
                self.exit_code = 3
                self.stopping.set()

    async def _read(self) -> None:
        while True:
            parts = await self.sock.recv_multipart()
            if len(parts) != 2:
                continue
            identity, frame = parts
            try:
                op, rid, req = decode(frame, WORKER_OPS)
            except ProtocolError as exc:
                self._reply(identity, Op.ERROR, _rid(frame), m.ErrorReply("bad_request", str(exc)))
                continue
            self.on_request(identity, op, rid, req)

    def on_request(self, identity: bytes, op: Op, rid: int, req) -> None:
        if op is Op.WORKER_INFO:
            info = dataclasses.replace(self.info, ready=self.client.memd_alive(), active=len(self.live),
                                       generated_tokens=self.generated_tokens)
            self._reply(identity, op, rid, info)
        elif op is Op.CANCEL:
            found = req.request in self.live
            if found:
                self.cancelled.add(req.request)
            self._reply(identity, op, rid, m.CancelReply(found))
        elif op is Op.GENERATE:
            self.admit_request(identity, rid, req)

    def admit_request(self, identity: bytes, rid: int, req: m.GenerateRequest) -> None:
        if req.request in self.live:
            self._reply(identity, Op.ERROR, rid, m.ErrorReply("bad_request", f"request id {req.request!r} is in use"))
            return
        if len(self.live) >= self.max_live:
            self._reply(identity, Op.ERROR, rid, m.ErrorReply("capacity", f"{len(self.live)} requests queued or"
                                                                          " running; raise --max-queued"))
            return
        self.live[req.request] = identity
        self.inbox.put_nowait((identity, rid, req))

    async def _write(self) -> None:
        while True:
            identity, frame = await self.outbox.get()
            try:
                await self.sock.send_multipart([identity, frame])
            except zmq.ZMQError as exc:
                log.info("reply to a vanished gateway dropped: %s", exc)

    def _reply(self, identity: bytes, op: Op, rid: int, msg) -> None:
        self.outbox.put_nowait((identity, encode(op, rid, msg)))

    def _reply_threadsafe(self, identity: bytes, op: Op, rid: int, msg) -> None:
        self.loop.call_soon_threadsafe(self._reply, identity, op, rid, msg)

    # ------------------------------------------------------------------ compute thread
    def compute_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                identity, rid, req = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.generate(identity, rid, req)
            except MemdDeadError as exc:
                log.error("%s", exc)
                self._fail(identity, rid, req, "unavailable", str(exc))
                self.exit_code = 3
                self.stopping.set()
            except (MemdError, RequestError) as exc:
                self._fail(identity, rid, req, "bad_request" if isinstance(exc, RequestError) else "memd", str(exc))
            except Exception as exc:
                log.exception("generation of %s failed", req.request)
                self._fail(identity, rid, req, "internal", f"generation failed: {exc}")

    def generate(self, identity: bytes, rid: int, req: m.GenerateRequest) -> None:
        seq = self.engine.start(req)
        self.client.emit(Op.REQUEST_START, m.RequestStartEvent(req.request, len(req.prompt)))
        while seq.finish_reason is None:
            if req.request in self.cancelled or self.stopping.is_set():
                seq.finish_reason = "cancelled"
                break
            token = self.engine.step(seq)
            self.generated_tokens += 1
            self.publish(identity, rid, seq, [token])
        if seq.finish_reason == "cancelled":
            self.publish(identity, rid, seq, [])
        self.retire(req, seq)

    def publish(self, identity: bytes, rid: int, seq: Sequence, tokens: list[int]) -> None:
        reply = m.TokensReply(seq.req.request, tokens, seq.finish_reason, len(seq.req.prompt), len(seq.generated))
        self._reply_threadsafe(identity, Op.GENERATE, rid, reply)

    def retire(self, req: m.GenerateRequest, seq: Sequence | None) -> None:
        generated = len(seq.generated) if seq else 0
        self.client.emit(Op.REQUEST_END, m.RequestEndEvent(req.request, generated))
        self.loop.call_soon_threadsafe(self._forget, req.request)

    def _forget(self, request: str) -> None:
        self.live.pop(request, None)
        self.cancelled.discard(request)

    def _fail(self, identity, rid, req, code: str, message: str) -> None:
        self._reply_threadsafe(identity, Op.ERROR, rid, m.ErrorReply(code, message))
        self.retire(req, None)


def _rid(frame: bytes) -> int:
    try:
        return peek(frame)[1]
    except ProtocolError:
        return 0
