"""One table for every RPC: op byte -> (request type, reply type, handler kind).

Server dispatch and client typing are both derived from ``PROTOCOL``. Fire-and-forget ops have ``reply=None``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from common import messages as m


class Handler(enum.Enum):
    INLINE = "inline"  # runs on the event loop, must not block
    ASYNC = "async"  # a coroutine (may await reads that run in the reader thread pool)
    STREAM = "stream"  # produces several replies (generation)


class Op(enum.IntEnum):
    ERROR = 0
    # worker -> memd
    HELLO = 1
    READY = 2
    ACQUIRE = 3
    RELEASE = 4
    STATS = 5
    # worker -> memd trace stream
    REQUEST_START = 32
    REQUEST_END = 33
    STEP_TRACE = 34
    # gateway -> worker
    GENERATE = 64
    CANCEL = 65
    WORKER_INFO = 66


@dataclass(frozen=True, slots=True)
class Rpc:
    request: type
    reply: type | None
    handler: Handler


PROTOCOL: dict[Op, Rpc] = {
    Op.HELLO: Rpc(m.HelloRequest, m.HelloReply, Handler.INLINE),
    Op.READY: Rpc(m.ReadyRequest, m.ReadyReply, Handler.INLINE),
    Op.ACQUIRE: Rpc(m.AcquireRequest, m.AcquireReply, Handler.ASYNC),
    Op.RELEASE: Rpc(m.ReleaseRequest, None, Handler.INLINE),
    Op.STATS: Rpc(m.StatsRequest, m.StatsReply, Handler.INLINE),
    Op.REQUEST_START: Rpc(m.RequestStartEvent, None, Handler.INLINE),
    Op.REQUEST_END: Rpc(m.RequestEndEvent, None, Handler.INLINE),
    Op.STEP_TRACE: Rpc(m.StepTraceEvent, None, Handler.INLINE),
    Op.GENERATE: Rpc(m.GenerateRequest, m.TokensReply, Handler.STREAM),
    Op.CANCEL: Rpc(m.CancelRequest, m.CancelReply, Handler.INLINE),
    Op.WORKER_INFO: Rpc(m.WorkerInfoRequest, m.WorkerInfoReply, Handler.INLINE),
}

MEMD_RPC_OPS = frozenset({Op.HELLO, Op.READY, Op.ACQUIRE, Op.RELEASE, Op.STATS})
MEMD_TRACE_OPS = frozenset({Op.REQUEST_START, Op.REQUEST_END, Op.STEP_TRACE})
WORKER_OPS = frozenset({Op.GENERATE, Op.CANCEL, Op.WORKER_INFO})
