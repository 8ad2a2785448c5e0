"""Answering on a ROUTER socket, shared by memd's RPC server and its admin server: one handler call becomes a
reply or an ``ErrorReply`` (a ``CodedError`` with its code, anything else "internal" and logged), and a reply to a
peer that went away (``ROUTER_MANDATORY``) is dropped with a line in the log, never raised into the reader."""
from __future__ import annotations

import asyncio
import logging
import time

import zmq

from common import messages as m
from common.codec import encode
from common.protocol import Op

log = logging.getLogger("moeinf.memd")


class CodedError(Exception):
    """A request memd refuses: ``code`` is the ``ErrorReply`` code ("bad_request", "capacity", ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


async def send(sock: zmq.Socket, identity: bytes, frame: bytes, *bulk: bytes) -> None:
    try:
        await sock.send_multipart([identity, frame, *bulk])
    except zmq.ZMQError as exc:  # ROUTER_MANDATORY: the peer went away
        log.info("reply to a vanished peer dropped: %s", exc)


async def send_error(sock: zmq.Socket, identity: bytes, rid: int, code: str, message: str) -> None:
    await send(sock, identity, encode(Op.ERROR, rid, m.ErrorReply(code, message)))


async def answer(sock: zmq.Socket, identity: bytes, op: Op, rid: int, call) -> None:
    """Run ``call()`` (a reply, None for no reply, ``(reply, bulk)`` for a reply followed by one raw frame, or a
    coroutine of one of these) and send what it gives or raises."""
    try:
        reply = call()
        if asyncio.iscoroutine(reply):
            reply = await reply
    except CodedError as exc:
        await send_error(sock, identity, rid, exc.code, str(exc))
        return
    except Exception as exc:  # a bug: report it to the peer and keep serving
        log.exception("%s failed", op.name)
        await send_error(sock, identity, rid, "internal", f"{op.name} failed in memd: {exc}")
        return
    if reply is None:
        return
    reply, bulk = reply if isinstance(reply, tuple) else (reply, None)  # bulk: bytes never ride in msgpack
    await send(sock, identity, encode(op, rid, reply), *([bulk] if bulk is not None else []))


class Refusals:
    """Wrong-token refusals on memd's TCP admin socket: a peer is answered its first ``ANSWERED`` times, then its
    frames are dropped unanswered; the log counts them at most once per ``LOG_EVERY_S``. (A flood of bad frames cost
    a warning line and a queued reply each on memd's loop: an audit saw a completion take 10 s instead of 0.4.)"""
    ANSWERED, LOG_EVERY_S, PEERS = 3, 10.0, 1024  # PEERS: the strike table's bound (then it starts over)

    def __init__(self, log):
        self.log, self.strikes, self.count, self.logged = log, {}, 0, float("-inf")

    def refuse(self, identity: bytes, what: str) -> bool:
        """Count one refusal; True when it is to be answered."""
        self.count += 1
        now = time.monotonic()
        if now - self.logged >= self.LOG_EVERY_S:
            self.log.warning("refused %d admin request(s) over TCP: wrong token (the last: %s)", self.count, what)
            self.count, self.logged = 0, now
        if len(self.strikes) >= self.PEERS and identity not in self.strikes:
            self.strikes.clear()
        self.strikes[identity] = strikes = self.strikes.get(identity, 0) + 1
        return strikes <= self.ANSWERED
