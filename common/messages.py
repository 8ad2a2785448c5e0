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
    """One parameter of an expert inside a pool slot: ``slot_base + offset`` holds ``shape`` of ``dtype``.

    A quantized parameter (``format`` "mxfp4" or "fp8") holds its values there as the checkpoint stores them
    (MXFP4 blocks ``[rows, groups, 16]`` uint8, FP8 ``[rows, cols]`` float8_e4m3fn) and its scales at
    ``scale_offset``; the worker dequantizes them into the model's parameter shape and dtype."""

    name: str
    offset: int
    shape: list[int]
    dtype: str
    format: str = ""
    scale_offset: int = 0
    scale_shape: list[int] = field(default_factory=list)
    scale_dtype: str = ""


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
    control_name: str = ""  # /dev/shm name of the control page: its first int64 is the revoke epoch ("": no leases)


@dataclass(frozen=True, slots=True)
class ReadyRequest:
    pid: int


@dataclass(frozen=True, slots=True)
class ReadyReply:
    pass


@dataclass(frozen=True, slots=True)
class AcquireRequest:
    """Make ``experts`` of MoE ``layer`` resident and pin them: until released, or, with ``lease``, until memd
    revokes them (the worker then keeps using its slots with no message at all; see docs/protocol.md, Leases).

    ``requests``/``tokens`` attribute the routing: ``tokens[i][j]`` is how many tokens of ``requests[i]`` were
    routed to ``experts[j]`` in this layer (this is the activation trace memd learns from).
    """

    layer: int
    experts: list[int]
    requests: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    step: int = 0  # the worker's forward-step counter: memd places the layer in time (lookahead, stale prefetches)
    prefill: list[bool] = field(default_factory=list)  # per request: this step is (part of) its prompt
    speculated: list[int] = field(default_factory=list)  # next-gate guess: experts of the next MoE layer ...
    speculated_tokens: list[int] = field(default_factory=list)  # ... and how many tokens picked each
    lease: bool = False  # hold the experts as leases (one pin each, however often acquired) until memd revokes them
    # [layer, expert] the worker used from its leases since its last acquire, oldest first: memd refreshes their
    # recency before this acquire's, so eviction sees the order in which experts really ran
    touched: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AcquireReply:
    slots: list[int]  # one per requested expert, same order
    hits: int  # experts that were already resident
    revoked: list[list[int]] = field(default_factory=list)  # [layer, expert] leases memd took back: do not use them
    epoch: int = 0  # the revoke epoch this reply answers (the worker compares the control word against it)


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    layer: int
    experts: list[int]


@dataclass(frozen=True, slots=True)
class ReturnLeasesRequest:
    """The worker gives back every lease it holds (it went idle, or lost track after an error)."""


@dataclass(frozen=True, slots=True)
class StatsRequest:
    pass


@dataclass(frozen=True, slots=True)
class LayerStats:
    """One MoE layer's cache and prefetch counters (``StatsReply.layers``)."""

    layer: int
    hits: int
    misses: int  # on-demand loads
    prefetch_issued: int
    prefetch_used: int
    prefetch_wasted: int
    stall_seconds: float  # time acquires of this layer waited for loads
    bytes_read: int


@dataclass(frozen=True, slots=True)
class LookaheadStats:
    """Prediction quality ``distance`` layers ahead: precision = correct / predicted, recall = correct / routed."""

    distance: int
    predicted: int  # experts predicted for the target layer (summed over targets)
    correct: int  # of those, routed there
    routed: int  # experts routed at the target layers


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
    policy: str = "lru"
    prefetch: bool = False
    tokens: int = 0  # tokens the step traces reported (misses per token = misses / tokens)
    prefetch_issued: int = 0
    prefetch_used: int = 0  # acquired before being evicted
    prefetch_wasted: int = 0  # evicted or cancelled before any acquire
    prefetch_cancelled: int = 0  # of the wasted: cancelled because their layer had passed (or a load needed the slot)
    prefetch_late: int = 0  # of the used: still loading when acquired (the worker waited, but less)
    prefetch_precision: float = 0.0  # used / (used + wasted)
    prefetch_recall: float = 0.0  # used / (used + misses): the needed loads a prefetch had started
    eamc_size: int = 0
    eamc_capacity: int = 0
    match_similarity: float = 0.0  # mean cosine similarity of the best EAMC match
    trace_steps: int = 0  # step traces received
    trace_lost: int = 0  # step traces the worker sent that never arrived (gaps in its step numbers)
    read_bandwidth: float = 0.0  # bytes/s, measured
    layer_seconds: float = 0.0  # observed time per MoE layer
    layers: list[LayerStats] = field(default_factory=list)
    lookahead: list[LookaheadStats] = field(default_factory=list)
    next_gate: list[LookaheadStats] = field(default_factory=list)  # the worker's next-gate guess alone (distance 1)
    acquires: int = 0  # ACQUIRE messages received
    leased_layers: int = 0  # MoE layers a worker computed from its leases, with no message (told by step traces)


# ---------------------------------------------------------------- worker -> memd (trace stream, PUSH -> PULL)
@dataclass(frozen=True, slots=True)
class RequestStartEvent:
    request: str
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class RequestEndEvent:
    request: str
    generated_tokens: int


@dataclass(frozen=True, slots=True)
class LayerTrace:
    """One MoE layer of one step: ``tokens[r][j]`` tokens of request r went to ``experts[j]``, with router weights
    summing to ``weights[r][j]``; ``speculated`` is the next-gate guess for the next MoE layer (empty for the last);
    ``leased``: every expert was already leased, so no acquire told memd of this layer (it counts the hits here)."""

    layer: int
    experts: list[int]
    tokens: list[list[int]]
    weights: list[list[float]]
    speculated: list[int] = field(default_factory=list)
    leased: bool = False


@dataclass(frozen=True, slots=True)
class StepTraceEvent:
    """Everything one forward step routed, per request, sent once the step is over (batched, fire-and-forget)."""

    worker: int  # pid: step numbers are per worker
    step: int
    requests: list[str]
    tokens: list[int]  # tokens of each request in this step
    prefill: list[bool]  # per request
    layers: list[LayerTrace]


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
