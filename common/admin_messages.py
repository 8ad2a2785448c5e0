"""The admin link's vocabulary (``moeinf admin`` -> memd's admin socket, DEALER -> ROUTER).

Same rules as ``common/messages.py``: frozen ``Message`` structs, a msgpack array of their fields on the wire, decoded
and validated by ``common/codec.py`` against ``common/protocol.PROTOCOL`` (ops ``ADMIN_*``, ``MEMD_ADMIN_OPS``).
Every request starts with ``token``: the admin token memd's TCP admin listener demands (ignored on the Unix
socket, whose 0600 mode is the access control). Errors come back as ``ErrorReply``.
"""
from __future__ import annotations

from common.messages import Count, Index, Message, NonNeg, Ratio, StatsReply, Text


class ExpertKey(Message):
    layer: Index  # MoE layer
    expert: Index


class AdminStatsRequest(Message):
    token: Text


class AdminStatsReply(Message):
    stats: StatsReply  # what the worker link's STATS answers (num_slots, pool_bytes: the live size)
    capacity: Index  # live slots (resize): slots at or above it are retired
    region_slots: Index  # the slots the region was created with (the most ``resize`` can grow to)
    slot_bytes: Count
    pool_resident_bytes: Count  # memory the region holds now (/dev/shm blocks)
    loading: Index
    admin_pinned: Index
    leaving: Index  # residents that leave once released (retired slot or dropped)


class AdminExpertsRequest(Message):
    token: Text


class LayerExperts(Message):
    layer: Index
    resident: list[Index]
    pinned: list[Index]  # by a worker or the admin
    loading: list[Index]  # reads in flight
    admin_pinned: list[Index]
    leaving: list[Index]


class AdminExpertsReply(Message):
    capacity: Index
    num_slots: Index
    layers: list[LayerExperts]


class ResizeRequest(Message):
    token: Text
    size: Text  # bytes (512MiB) or a share of all expert bytes (25%), as --expert-memory


class ResizeReply(Message):
    old_capacity: Index
    capacity: Index
    num_slots: Index  # the most it can grow to
    slot_bytes: Count
    evicted: Index
    pending: Index  # pinned or loading experts in retired slots: they leave when released
    pool_resident_bytes: Count


class PolicyRequest(Message):
    token: Text
    name: Text


class PolicyReply(Message):
    old: Text
    policy: Text


class PrefetchRequest(Message):
    token: Text
    on: bool


class PrefetchReply(Message):
    was: bool
    prefetch: bool
    cancelled: Index  # prefetches in flight that turning it off cancelled


class EamcSaveRequest(Message):
    token: Text
    path: Text  # absolute (the CLI resolves it), on memd's file system


class EamcLoadRequest(Message):
    token: Text
    path: Text


class EamcClearRequest(Message):
    token: Text


class EamcReply(Message):
    size: Index
    capacity: Index
    path: Text  # "" for clear


class EamcExportRequest(Message):
    """A peer's EAMC, for a replica starting cold (``memd --eamc-from tcp://...``)."""

    token: Text


class EamcExportReply(Message):
    """Followed by one raw frame of ``nbytes``: the EAMC in its file format (bulk data never rides in msgpack)."""

    size: Index
    capacity: Index
    nbytes: Count


class EamcMatchRequest(Message):
    """What the EAMC predicts for a request that routed ``experts`` (one token each)."""

    token: Text
    experts: list[ExpertKey]


class EamcMatchReply(Message):
    similarity: Ratio  # of the best member; 0 with an empty collection
    predicted: list[list[NonNeg]]  # [MoE layer][expert]: probability of use (each layer's row sums to 1, or is 0)


class PinRequest(Message):
    token: Text
    experts: list[ExpertKey]


class PinReply(Message):
    slots: list[Index]  # one per expert, same order
    loaded: Index  # experts that had to be read
    admin_pinned: Index  # admin pins now


class UnpinRequest(Message):
    token: Text
    experts: list[ExpertKey]


class UnpinReply(Message):
    unpinned: Index
    admin_pinned: Index


class DropRequest(Message):
    token: Text


class DropReply(Message):
    evicted: Index
    pending: Index  # in use (pinned or loading): they leave when released
    resident: Index


class AdminHealthRequest(Message):
    token: Text


class AdminHealthReply(Message):
    pid: Index
    uptime_s: NonNeg
    model: Text
    pool_name: Text
    workers: list[Index]  # pids of the attached workers
