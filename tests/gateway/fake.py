"""A gateway in this process (its own event loop thread, a real port) in front of a fake worker that speaks the
worker's protocol on a real ipc socket: for the HTTP tests that need no model (auth, bodies, headers, fuzzing)."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import zmq

from common import messages as m
from common.codec import decode, encode
from common.config import GatewayConfig
from common.protocol import WORKER_OPS, Op
from common.zmq_utils import make_socket
from helpers import free_port
from services.gateway.app_keys import GATEWAY


class FakeWorker:
    """WORKER_INFO (as process ``pid``); GENERATE answered with one token per ``step_s`` (ids 1000, 1001, ...,
    or ``token`` each time), or an ``internal`` error after ``fail_after`` tokens, as a failed step ends, or nothing
    more after ``silent_after`` tokens, as a stalled step; ``max_running`` requests at a time, the rest waiting;
    ``prefill_chunks`` replies without tokens before the first; CANCEL (``cancelled`` lists the requests)."""

    def __init__(self, addr: str, vocab_size: int, max_model_len: int = 4096, step_s: float = 0.0,
                 fail_after: int | None = None, pid: int | None = None, token: int | None = None,
                 silent_after: int | None = None, info_s: float = 0.0, max_running: int | None = None,
                 prefill_chunks: int = 0):
        self.addr, self.vocab_size, self.max_model_len, self.step_s = addr, vocab_size, max_model_len, step_s
        self.silent_after, self.info_s = silent_after, info_s  # info_s: WORKER_INFO answered after this long
        self.max_running = max_running  # requests served at once (the rest wait their turn, silent), None: all
        self.prefill_chunks = prefill_chunks  # replies without tokens first (a long prompt's chunks, as the worker)
        self.infos = 0  # WORKER_INFO calls received
        self.token = token  # every token this id (one that shows no text, say), else 1000, 1001, ...
        self.cancelled: list[str] = []
        self.fail_after, self.pid = fail_after, pid or os.getpid()
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, zmq.ROUTER, addr, bind=True)
        self.live: dict[str, list] = {}  # request -> [identity, rid, req, produced]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            if self.sock.poll(self.step_s * 1000 if self.live else 50):
                identity, frame = self.sock.recv_multipart()
                op, rid, req = decode(frame, WORKER_OPS)
                self._on(identity, op, rid, req)
            self._step()
        self.sock.close()
        self.ctx.term()

    def _on(self, identity: bytes, op: Op, rid: int, req) -> None:
        if op is Op.WORKER_INFO:
            self.infos += 1
            time.sleep(self.info_s)
            info = m.WorkerInfoReply(self.pid, "fake", "mixtral", self.max_model_len, self.vocab_size, [2], True,
                                     len(self.live))
            self._send([identity, encode(op, rid, info)])
        elif op is Op.CANCEL:
            found = self.live.pop(req.request, None) is not None
            self.cancelled.append(req.request)
            self._send([identity, encode(op, rid, m.CancelReply(found))])
        elif op is Op.GENERATE:
            self.live[req.request] = [identity, rid, req, -self.prefill_chunks]

    def _step(self) -> None:
        for request, entry in list(self.live.items())[:self.max_running]:
            identity, rid, req, produced = entry
            if produced < 0:  # a prompt's chunk before its last: a reply without tokens
                entry[3] += 1
                self._send([identity, encode(Op.GENERATE, rid, m.TokensReply(request, [], None, len(req.prompt), 0))])
                continue
            if produced == self.silent_after:
                continue
            if produced == self.fail_after:
                error = m.ErrorReply("internal", "generation failed: a step of 2 requests failed")
                self._send([identity, encode(Op.ERROR, rid, error)])
                del self.live[request]
                continue
            entry[3] = produced = produced + 1
            done = "length" if produced >= req.max_tokens else None
            token = 1000 + produced if self.token is None else self.token
            reply = m.TokensReply(request, [token], done, len(req.prompt), produced)
            self._send([identity, encode(Op.GENERATE, rid, reply)])
            if done:
                del self.live[request]

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.sock.send_multipart(frames)
        except zmq.ZMQError:  # the gateway that asked is gone (ROUTER_MANDATORY)
            pass

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)


class LocalGateway:
    """``services.gateway`` on 127.0.0.1:<free port>, served by its own runner in a thread."""

    def __init__(self, cfg: GatewayConfig, codec):
        from services.gateway.app import build_app
        from services.gateway.errors import GatewayRunner

        self.cfg, self.port = cfg, cfg.port
        self.url = f"http://127.0.0.1:{cfg.port}"
        self.loop = asyncio.new_event_loop()
        self.app = build_app(cfg, codec)
        self.gateway = self.app[GATEWAY]
        self.runner = GatewayRunner(self.app, handler_cancellation=True, access_log=None)
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(30), "the gateway did not start"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start():
            from aiohttp import web

            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        self.loop.run_until_complete(start())
        ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.gateway.health_reason or self.gateway.info is None:
            assert time.monotonic() < deadline, f"gateway never ready: {self.gateway.health_reason}"
            time.sleep(0.05)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def gateway_config(model, state_dir, **knobs) -> GatewayConfig:
    return GatewayConfig(model=model, state_dir=state_dir, port=free_port(), **knobs)
