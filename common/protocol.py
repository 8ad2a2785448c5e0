"""One table for every RPC: op byte -> (request type, reply type, handler kind).

Server dispatch and client typing are both derived from ``PROTOCOL``. Fire-and-forget ops have ``reply=None``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from common import admin_messages as a
from common import messages as m

PROTOCOL_VERSION = 6  # HELLO's first field: memd and its workers must speak the same


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
    RETURN_LEASES = 6
    AWAIT = 7
    # worker -> memd trace stream
    REQUEST_START = 32
    REQUEST_END = 33
    STEP_TRACE = 34
    LAYER_NOTE = 35
    # gateway -> worker
    GENERATE = 64
    CANCEL = 65
    WORKER_INFO = 66
    # moeinf admin -> memd (the admin socket)
    ADMIN_STATS = 96
    ADMIN_EXPERTS = 97
    ADMIN_RESIZE = 98
    ADMIN_POLICY = 99
    ADMIN_PREFETCH = 100
    ADMIN_EAMC_SAVE = 101
    ADMIN_EAMC_LOAD = 102
    ADMIN_EAMC_CLEAR = 103
    ADMIN_EAMC_MATCH = 104
    ADMIN_PIN = 105
    ADMIN_UNPIN = 106
    ADMIN_DROP = 107
    ADMIN_HEALTH = 108
    ADMIN_EAMC_EXPORT = 109


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
    Op.RETURN_LEASES: Rpc(m.ReturnLeasesRequest, None, Handler.INLINE),
    Op.AWAIT: Rpc(m.AwaitRequest, m.AcquireReply, Handler.ASYNC),  # the rest of a partial acquire
    Op.REQUEST_START: Rpc(m.RequestStartEvent, None, Handler.INLINE),
    Op.REQUEST_END: Rpc(m.RequestEndEvent, None, Handler.INLINE),
    Op.STEP_TRACE: Rpc(m.StepTraceEvent, None, Handler.INLINE),
    Op.LAYER_NOTE: Rpc(m.LayerNoteEvent, None, Handler.INLINE),
    Op.GENERATE: Rpc(m.GenerateRequest, m.TokensReply, Handler.STREAM),
    Op.CANCEL: Rpc(m.CancelRequest, m.CancelReply, Handler.INLINE),
    Op.WORKER_INFO: Rpc(m.WorkerInfoRequest, m.WorkerInfoReply, Handler.INLINE),
    Op.ADMIN_STATS: Rpc(a.AdminStatsRequest, a.AdminStatsReply, Handler.INLINE),
    Op.ADMIN_EXPERTS: Rpc(a.AdminExpertsRequest, a.AdminExpertsReply, Handler.INLINE),
    Op.ADMIN_RESIZE: Rpc(a.ResizeRequest, a.ResizeReply, Handler.ASYNC),  # growing allocates off the loop
    Op.ADMIN_POLICY: Rpc(a.PolicyRequest, a.PolicyReply, Handler.INLINE),
    Op.ADMIN_PREFETCH: Rpc(a.PrefetchRequest, a.PrefetchReply, Handler.INLINE),
    Op.ADMIN_EAMC_SAVE: Rpc(a.EamcSaveRequest, a.EamcReply, Handler.ASYNC),  # file I/O off the loop
    Op.ADMIN_EAMC_LOAD: Rpc(a.EamcLoadRequest, a.EamcReply, Handler.ASYNC),
    Op.ADMIN_EAMC_CLEAR: Rpc(a.EamcClearRequest, a.EamcReply, Handler.INLINE),
    Op.ADMIN_EAMC_MATCH: Rpc(a.EamcMatchRequest, a.EamcMatchReply, Handler.INLINE),
    Op.ADMIN_PIN: Rpc(a.PinRequest, a.PinReply, Handler.ASYNC),  # waits for the reads
    Op.ADMIN_UNPIN: Rpc(a.UnpinRequest, a.UnpinReply, Handler.INLINE),
    Op.ADMIN_DROP: Rpc(a.DropRequest, a.DropReply, Handler.INLINE),
    Op.ADMIN_HEALTH: Rpc(a.AdminHealthRequest, a.AdminHealthReply, Handler.INLINE),
    Op.ADMIN_EAMC_EXPORT: Rpc(a.EamcExportRequest, a.EamcExportReply, Handler.ASYNC),  # serialised off the loop
}

MEMD_RPC_OPS = frozenset({Op.HELLO, Op.READY, Op.ACQUIRE, Op.RELEASE, Op.STATS, Op.RETURN_LEASES, Op.AWAIT})
MEMD_TRACE_OPS = frozenset({Op.REQUEST_START, Op.REQUEST_END, Op.STEP_TRACE, Op.LAYER_NOTE})
WORKER_OPS = frozenset({Op.GENERATE, Op.CANCEL, Op.WORKER_INFO})
MEMD_ADMIN_OPS = frozenset(op for op in Op if op.name.startswith("ADMIN_"))
