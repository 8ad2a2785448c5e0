"""The worker's link to memd: handshake, acquire/release, trace events (request start/end, per-step traces).

Used only from the compute thread, so it is synchronous: the forward pass must wait for its experts anyway.
Waits poll in short slices and check memd's pid, so a dead daemon is reported at once, not after a timeout.
"""
from __future__ import annotations

import itertools
import logging
import os
import time

import zmq

from common import messages as m
from common.codec import ProtocolError, decode, encode
from common.config import PROTOCOL_VERSION
from common.protocol import Op
from common.zmq_utils import make_socket

log = logging.getLogger("moeinf.worker.memd")
TRACE_HWM = 256
POLL_SLICE_MS = 200


class MemdError(RuntimeError):
    """memd answered with an error."""


class MemdDeadError(RuntimeError):
    """memd is gone or does not answer."""


class MemdClient:
    def __init__(self, rpc_addr: str, trace_addr: str, *, timeout_s: float):
        self.rpc_addr = rpc_addr
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, zmq.DEALER, rpc_addr, bind=False)
        self.trace = make_socket(self.ctx, zmq.PUSH, trace_addr, bind=False, hwm=TRACE_HWM)
        self._ids = itertools.count(1)
        self.memd_pid: int | None = None
        self._pending_release: tuple[int, list[int]] | None = None
        self.trace_dropped = 0
        self.acquire_seconds = 0.0  # time the forward pass waited for acquires (the worker's stall)
        self.on_request_end = None  # called with the request id before REQUEST_END goes out (flushes its last step)

    def close(self) -> None:
        self.sock.close()
        self.trace.close()
        self.ctx.term()

    def handshake(self, model: str, timeout_s: float, timeout_knob: str) -> m.HelloReply:
        hello = self.call(Op.HELLO, m.HelloRequest(PROTOCOL_VERSION, os.getpid(), model, "cpu"),
                          timeout_s=timeout_s, what=f"memd did not answer HELLO at {self.rpc_addr} within {timeout_s:g}s:"
                          f" start `moeinf memd --model {model}` with the same --state-dir first, or raise {timeout_knob}")
        self.memd_pid = hello.pid
        return hello

    def memd_alive(self) -> bool:
        return self.memd_pid is not None and _alive(self.memd_pid)

    def ready(self) -> None:
        self.call(Op.READY, m.ReadyRequest(os.getpid()))

    def acquire(self, layer: int, experts: list[int], requests: list[str], tokens: list[list[int]], *, step: int = 0,
                prefill: list[bool] = (), speculated: list[int] = (), speculated_tokens: list[int] = ()) -> list[int]:
        start = time.perf_counter()
        release_layer, release_experts = self._pending_release or (-1, [])
        self._pending_release = None
        request = m.AcquireRequest(layer, experts, requests, tokens, step, list(prefill), list(speculated),
                                   list(speculated_tokens), release_layer, release_experts)
        try:
            return self.call(Op.ACQUIRE, request).slots
        finally:
            self.acquire_seconds += time.perf_counter() - start

    def release(self, layer: int, experts: list[int], *, defer: bool = False) -> None:
        """Unpin ``experts``; with ``defer`` the release rides on the next acquire (memd applies it first)."""
        self.flush_release()
        if defer:
            self._pending_release = (layer, experts)
        else:
            self.sock.send(encode(Op.RELEASE, 0, m.ReleaseRequest(layer, experts)))

    def flush_release(self) -> None:
        if self._pending_release is not None:
            layer, experts = self._pending_release
            self._pending_release = None
            self.sock.send(encode(Op.RELEASE, 0, m.ReleaseRequest(layer, experts)))

    def stats(self) -> m.StatsReply:
        return self.call(Op.STATS, m.StatsRequest())

    def emit(self, op: Op, event) -> None:
        """Fire-and-forget trace event; a full queue drops and counts, it never blocks."""
        if op is Op.REQUEST_END and self.on_request_end is not None:
            self.on_request_end(event.request)
        try:
            self.trace.send(encode(op, 0, event), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.trace_dropped += 1

    def call(self, op: Op, request, *, timeout_s: float | None = None, what: str | None = None):
        rid = next(self._ids)
        self.sock.send(encode(op, rid, request))
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            if self.sock.poll(POLL_SLICE_MS):
                reply = self._receive(rid)
                if reply is not None:
                    return reply
                continue
            if self.memd_pid is not None and not _alive(self.memd_pid):
                raise MemdDeadError(f"memd (pid {self.memd_pid}) died; the worker cannot get experts")
            if time.monotonic() > deadline:
                raise MemdDeadError(what or f"memd did not answer {op.name} within {timeout_s or self.timeout_s:g}s"
                                    f" at {self.rpc_addr}; raise --memd-timeout-s (env MOEINF_MEMD_TIMEOUT_S) if it is"
                                    " only slow")

    def _receive(self, rid: int):
        frame = self.sock.recv()
        try:
            op, got, reply = decode(frame, reply=True)
        except ProtocolError as exc:
            raise MemdError(f"memd sent a malformed reply: {exc}") from None
        if got != rid:
            log.warning("dropped a stale memd reply %d (waiting for %d)", got, rid)
            return None
        if isinstance(reply, m.ErrorReply):
            raise MemdError(f"memd: {reply.message} [{reply.code}]")
        return reply


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
