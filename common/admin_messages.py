"""The admin link's vocabulary (``moeinf admin`` -> memd's admin socket, DEALER -> ROUTER).

Same rules as ``common/messages.py``: frozen dataclasses, a msgpack array of their fields on the wire, decoded and
type-checked by ``common/codec.py`` against ``common/protocol.PROTOCOL`` (ops ``ADMIN_*``, ``MEMD_ADMIN_OPS``).
Every request starts with ``token``: the admin token memd's TCP admin listener demands (ignored on the Unix
socket, whose 0600 mode is the access control). Errors come back as ``ErrorReply``.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.messages import StatsReply


@dataclass(frozen=True, slots=True)
class ExpertKey:
    layer: int  # MoE layer
    expert: int


@dataclass(frozen=True, slots=True)
class AdminStatsRequest:
    token: str


@dataclass(frozen=True, slots=True)
class AdminStatsReply:
    stats: StatsReply  # what the worker link's STATS answers (num_slots, pool_bytes: the live size)
    capacity: int  # live slots (resize): slots at or above it are retired
    region_slots: int  # the slots the region was created with (the most ``resize`` can grow to)
    slot_bytes: int
    pool_resident_bytes: int  # memory the region holds now (/dev/shm blocks)
    loading: int
    admin_pinned: int
    leaving: int  # residents that leave once released (retired slot or dropped)


@dataclass(frozen=True, slots=True)
class AdminExpertsRequest:
    token: str


@dataclass(frozen=True, slots=True)
class LayerExperts:
    layer: int
    resident: list[int]
    pinned: list[int]  # by a worker or the admin
    loading: list[int]  # reads in flight
    admin_pinned: list[int]
    leaving: list[int]


@dataclass(frozen=True, slots=True)
class AdminExpertsReply:
    capacity: int
    num_slots: int
    layers: list[LayerExperts]


@dataclass(frozen=True, slots=True)
class ResizeRequest:
    token: str
    size: str  # bytes (512MiB) or a share of all expert bytes (25%), as --expert-memory


@dataclass(frozen=True, slots=True)
class ResizeReply:
    old_capacity: int
    capacity: int
    num_slots: int  # the most it can grow to
    slot_bytes: int
    evicted: int
    pending: int  # pinned or loading experts in retired slots: they leave when released
    pool_resident_bytes: int


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    token: str
    name: str


@dataclass(frozen=True, slots=True)
class PolicyReply:
    old: str
    policy: str


@dataclass(frozen=True, slots=True)
class PrefetchRequest:
    token: str
    on: bool


@dataclass(frozen=True, slots=True)
class PrefetchReply:
    was: bool
    prefetch: bool
    cancelled: int  # prefetches in flight that turning it off cancelled


@dataclass(frozen=True, slots=True)
class EamcSaveRequest:
    token: str
    path: str  # absolute (the CLI resolves it), on memd's file system


@dataclass(frozen=True, slots=True)
class EamcLoadRequest:
    token: str
    path: str


@dataclass(frozen=True, slots=True)
class EamcClearRequest:
    token: str


@dataclass(frozen=True, slots=True)
class EamcReply:
    size: int
    capacity: int
    path: str  # "" for clear


@dataclass(frozen=True, slots=True)
class EamcMatchRequest:
    """What the EAMC predicts for a request that routed ``experts`` (one token each)."""

    token: str
    experts: list[ExpertKey]


@dataclass(frozen=True, slots=True)
class EamcMatchReply:
    similarity: float  # of the best member; 0 with an empty collection
    predicted: list[list[float]]  # [MoE layer][expert]: probability of use (each layer's row sums to 1, or is 0)


@dataclass(frozen=True, slots=True)
class PinRequest:
    token: str
    experts: list[ExpertKey]


@dataclass(frozen=True, slots=True)
class PinReply:
    slots: list[int]  # one per expert, same order
    loaded: int  # experts that had to be read
    admin_pinned: int  # admin pins now


@dataclass(frozen=True, slots=True)
class UnpinRequest:
    token: str
    experts: list[ExpertKey]


@dataclass(frozen=True, slots=True)
class UnpinReply:
    unpinned: int
    admin_pinned: int


@dataclass(frozen=True, slots=True)
class DropRequest:
    token: str


@dataclass(frozen=True, slots=True)
class DropReply:
    evicted: int
    pending: int  # in use (pinned or loading): they leave when released
    resident: int


@dataclass(frozen=True, slots=True)
class AdminHealthRequest:
    token: str


@dataclass(frozen=True, slots=True)
class AdminHealthReply:
    pid: int
    uptime_s: float
    model: str
    pool_name: str
    workers: list[int]  # pids of the attached workers
