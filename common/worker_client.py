"""A synchronous client of the worker's generation socket (for the CLI, benchmarks and tests)."""
from __future__ import annotations

import itertools
import time
import uuid

import zmq

from common import messages as m
from common.codec import decode, encode
from common.protocol import Op
from common.zmq_utils import make_socket


class WorkerClientError(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(f"{message} [{code}]")
        self.code = code


class WorkerClient:
    def __init__(self, addr: str, timeout_s: float = 120.0, gone=None):
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, zmq.DEALER, addr, bind=False)
        self.addr = addr
        self.timeout_s = timeout_s
        self.gone = gone  # () -> why the worker is gone, or None while it lives: a wait ends at once when it is
        self._ids = itertools.count(1)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def _recv(self, rid: int, op: Op, timeout_s: float | None = None):
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while time.monotonic() < deadline:
            if not self.sock.poll(100):
                if self.gone is not None and (why := self.gone()):
                    raise ConnectionError(f"the worker at {self.addr} is gone: {why}")
                continue
            got_op, got, reply = decode(self.sock.recv(), reply=True)
            if got != rid:
                continue
            if isinstance(reply, m.ErrorReply):
                raise WorkerClientError(reply.code, reply.message)
            return reply
        raise TimeoutError(f"the worker at {self.addr} did not answer {op.name}"
                           f" within {timeout_s or self.timeout_s:g}s")

    def info(self, timeout_s: float | None = None) -> m.WorkerInfoReply:
        rid = next(self._ids)
        self.sock.send(encode(Op.WORKER_INFO, rid, m.WorkerInfoRequest()))
        return self._recv(rid, Op.WORKER_INFO, timeout_s)

    def stream(self, prompt: list[int], max_tokens: int, **params):
        """Yield ``TokensReply`` messages until the request finishes."""
        rid = next(self._ids)
        request = params.pop("request", None) or uuid.uuid4().hex
        self.sock.send(encode(Op.GENERATE, rid, m.GenerateRequest(request, prompt, max_tokens, **params)))
        while True:
            reply = self._recv(rid, Op.GENERATE)
            yield reply
            if reply.finish_reason is not None:
                return

    def generate(self, prompt: list[int], max_tokens: int, **params) -> tuple[list[int], str]:
        tokens, reason = [], None
        for reply in self.stream(prompt, max_tokens, **params):
            tokens.extend(reply.tokens)
            reason = reply.finish_reason
        return tokens, reason

    def cancel(self, request: str) -> bool:
        rid = next(self._ids)
        self.sock.send(encode(Op.CANCEL, rid, m.CancelRequest(request)))
        return self._recv(rid, Op.CANCEL).found
