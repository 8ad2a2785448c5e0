"""The message vocabulary of every link (worker <-> memd, gateway <-> worker, memd trace stream).

Nothing else goes on a socket. A message is a frozen dataclass; on the wire it is a msgpack array of its
fields in declaration order (see ``common/codec.py``). Naming: ``*Request`` asks, ``*Reply`` answers,
``*Event`` is fire-and-forget. Bulk data never rides here: experts move as pool slot ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ErrorReply:
    code: str  # machine-readable: "bad_request", "capacity", "internal", "unknown_op", ...
    message: str  # says what to fix


# ---------------------------------------------------------------- worker <-> memd (RPC, DEALER -> ROUTER)
@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One parameter of an expert inside a pool slot: ``slot_base + offset`` holds ``shape`` of ``dtype``."""

    name: str
    offset: int
    shape: list[int]
    dtype: str


@dataclass(frozen=True, slots=True)
class HelloRequest:
    protocol: int
    pid: int
    model: str  # resolved checkpoint path, so a worker never attaches to a daemon serving another model
    device: str  # "cpu" or a CUDA device UUID


@dataclass(frozen=True, slots=True)
class HelloReply:
    protocol: int
    pid: int  # memd's, so the worker can tell a dead daemon from a slow one
    backend: str  # "shm" (POSIX shared memory) or "cuda-ipc"
    pool_name: str  # /dev/shm name for "shm"; hex IPC handle for "cuda-ipc"
    pool_bytes: int
    slot_bytes: int
    num_slots: int
    num_layers: int  # MoE layers, numbered 0.. in model order
    num_experts: int
    tensors: list[TensorSpec]


@dataclass(frozen=True, slots=True)
class ReadyRequest:
    pid: int


@dataclass(frozen=True, slots=True)
class ReadyReply:
    pass


@dataclass(frozen=True, slots=True)
class AcquireRequest:
    """Make ``experts`` of MoE ``layer`` resident and pin them until released.

    ``requests``/``tokens`` attribute the routing: ``tokens[i][j]`` is how many tokens of ``requests[i]`` were
    routed to ``experts[j]`` in this layer (this is the activation trace memd learns from).
    """

    layer: int
    experts: list[int]
    requests: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AcquireReply:
    slots: list[int]  # one per requested expert, same order
    hits: int  # experts that were already resident


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    layer: int
    experts: list[int]


@dataclass(frozen=True, slots=True)
class StatsRequest:
    pass


@dataclass(frozen=True, slots=True)
class StatsReply:
    pid: int
    pool_bytes: int
    num_slots: int
    resident: int
    pinned: int
    hits: int
    misses: int
    evictions: int
    bytes_read: int
    read_seconds: float
    stall_seconds: float
    direct_io: bool
    resident_per_layer: list[int]


# ---------------------------------------------------------------- worker -> memd (trace stream, PUSH -> PULL)
@dataclass(frozen=True, slots=True)
class RequestStartEvent:
    request: str
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class RequestEndEvent:
    request: str
    generated_tokens: int


# ---------------------------------------------------------------- gateway <-> worker (RPC, DEALER -> ROUTER)
@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request: str
    prompt: list[int]
    max_tokens: int
    stop_token_ids: list[int] = field(default_factory=list)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class TokensReply:
    """A step's output for one request; several arrive per GenerateRequest, the last with ``finish_reason``."""

    request: str
    tokens: list[int]
    finish_reason: str | None = None  # "stop", "length", "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class CancelRequest:
    request: str


@dataclass(frozen=True, slots=True)
class CancelReply:
    found: bool


@dataclass(frozen=True, slots=True)
class WorkerInfoRequest:
    pass


@dataclass(frozen=True, slots=True)
class WorkerInfoReply:
    pid: int
    model: str
    model_type: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    ready: bool  # memd is alive
    active: int = 0  # requests queued or running
    generated_tokens: int = 0  # since start
