"""The message vocabulary of every link (worker <-> memd, gateway <-> worker, memd trace stream).

Nothing else goes on a socket. A message is a frozen ``msgspec.Struct`` (``Message``); on the wire it is a
msgpack array of its fields in declaration order (see ``common/codec.py``), decoded and validated in C by one
cached ``msgspec`` decoder per type. Integers carry bounds (``Index``, ``Count``), floats must be finite and
non-negative where a negative value means nothing: a frame that breaks them is a ``ProtocolError`` naming the
message and the field. Naming: ``*Request`` asks, ``*Reply`` answers, ``*Event`` is fire-and-forget. Bulk data
never rides here: experts move as pool slot ids.
"""
from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct, field

from common.message_base import (COUNT_MAX, INDEX_MAX, READ_EVENTS_MAX, Count, ErrorReply, Index, Message,  # noqa: F401
                                 NonNeg, Ratio, Text, field_names, to_dict)
# gateway <-> worker (RPC, DEALER -> ROUTER): their own module, here too so every link's vocabulary is ``messages``
from common.worker_messages import (CancelReply, CancelRequest, GenerateRequest, TokensReply,  # noqa: F401
                                    WorkerInfoReply, WorkerInfoRequest)


# ---------------------------------------------------------------- worker <-> memd (RPC, DEALER -> ROUTER)
class TensorSpec(Message):
    """One parameter of an expert inside a pool slot: ``slot_base + offset`` holds ``shape`` of ``dtype``.

    A quantized parameter (``format`` "mxfp4" or "fp8") holds its values there as the checkpoint stores them
    (MXFP4 blocks ``[rows, groups, 16]`` uint8, FP8 ``[rows, cols]`` float8_e4m3fn) and its scales at
    ``scale_offset``; the worker dequantizes them into the model's parameter shape and dtype. ``row_stride``:
    bytes from one row (the last dimension) to the next, where memd spread them apart (services/memd/spread.py);
    0: rows packed."""

    name: Text
    offset: Count
    shape: list[Index]
    dtype: Text
    format: Text = ""
    scale_offset: Count = 0
    scale_shape: list[Index] = field(default_factory=list)
    scale_dtype: Text = ""
    row_stride: Count = 0


class HelloRequest(Message):
    protocol: Index
    pid: Index
    model: Text  # resolved checkpoint path, so a worker never attaches to a daemon serving another model
    device: Text  # "cpu" or a CUDA device UUID
    # a GPU worker's "done reading" events (CUDA IPC handles): it records one after a layer's expert matmuls, and
    # memd's copy stream waits on it before rewriting a slot the worker released (ReleaseRequest.read_done)
    read_events: Annotated[list[bytes], Meta(max_length=READ_EVENTS_MAX)] = field(default_factory=list)


class HelloReply(Message):
    protocol: Index
    pid: Index  # memd's, so the worker can tell a dead daemon from a slow one
    backend: Text  # "shm" (POSIX shared memory) or "cuda-ipc" (chunks of device memory: ``chunk_handles``)
    pool_name: Text  # /dev/shm name for "shm"; "" for "cuda-ipc"
    pool_bytes: Count
    slot_bytes: Count
    num_slots: Index
    num_layers: Index  # MoE layers, numbered 0.. in model order
    num_experts: Index
    tensors: list[TensorSpec]
    control_name: Text = ""  # /dev/shm name of the control page: its first int64 is the revoke epoch ("": no leases)
    device: Text = "cpu"  # where the pool is: "cpu" (shm) or the GPU's UUID ("cuda-ipc")
    chunk_bytes: Count = 0  # "cuda-ipc": the pool is chunks of this many bytes (whole slots); the last may be shorter
    chunk_handles: list[bytes] = field(default_factory=list)  # "cuda-ipc": one 64-byte CUDA IPC memory handle a chunk
    event_handles: list[bytes] = field(default_factory=list)  # "cuda-ipc": the copy-event ring, one IPC handle each
    # "cuda-ipc" with --cpu-experts on: the pinned host tier as a /dev/shm region of ``host_slots`` slots (same
    # layout), from which the worker computes on its CPU the experts memd tells it to (AcquireReply.host)
    host_pool_name: Text = ""
    host_slots: Index = 0


class ReadyRequest(Message):
    pid: Index
    # the worker computes host-tier experts on its CPU (HelloReply.host_pool_name): its measured cost of one expert,
    # [seconds fixed, seconds per token] (activations' round trip to the GPU included); empty: it does not
    cpu_expert_seconds: list[NonNeg] = field(default_factory=list)
    speculate_max: Index = 0  # the most MoE layers ahead it guesses (its --speculate-layers; 0: it guesses none)


class ReadyReply(Message):
    pass


class AcquireRequest(Message):
    """Make ``experts`` of MoE ``layer`` resident and pin them: until released, or, with ``lease``, until memd
    revokes them (the worker then keeps using its slots with no message at all; see docs/protocol.md, Leases).

    ``requests``/``tokens`` attribute the routing: ``tokens[i][j]`` is how many tokens of ``requests[i]`` were
    routed to ``experts[j]`` in this layer (this is the activation trace memd learns from).
    """

    layer: Index
    experts: list[Index]
    requests: list[Text] = field(default_factory=list)
    tokens: list[list[Index]] = field(default_factory=list)
    step: Count = 0  # the worker's forward-step counter: memd places the layer in time (lookahead, stale prefetches)
    prefill: list[bool] = field(default_factory=list)  # per request: this step is (part of) its prompt
    speculated: list[Index] = field(default_factory=list)  # next-gate guess: experts of the next MoE layer ...
    speculated_tokens: list[Index] = field(default_factory=list)  # ... and how many tokens picked each
    lease: bool = False  # hold the experts as leases (one pin each, however often acquired) until memd revokes them
    # [layer, expert] the worker used from its leases since its last acquire, oldest first: memd refreshes their
    # recency before this acquire's, so eviction sees the order in which experts really ran
    leased_uses: list[list[Index]] = field(default_factory=list)
    counts: list[Index] = field(default_factory=list)  # tokens routed to each expert (only for --cpu-experts)
    # answer as soon as some of the experts are resident, listing in ``AcquireReply.loading`` those still loading:
    # the worker computes the others meanwhile and asks for the rest with AWAIT (a lone decode token's layer)
    partial: bool = False


class AcquireReply(Message):
    slots: list[Index]  # one per requested expert, same order
    hits: Count  # experts that were already resident
    revoked: list[list[Index]] = field(default_factory=list)  # [layer, expert] leases memd took back: do not use them
    epoch: Count = 0  # the revoke epoch this reply answers (the worker compares the control word against it)
    speculate_layers: Index = 0  # how many MoE layers ahead the worker should guess now (0: its own default)
    speculate_threshold: Ratio = 0.0  # the router probability below which a guess is not sent
    # False: memd has no use for guesses now (prefetch off, or the pool holds every expert): send none, spare the
    # router matmuls
    speculate: bool = True
    wait_events: list[Index] = field(default_factory=list)  # event-ring entries (HELLO) of copies into these slots
    # still in flight: the worker's stream waits on them before it reads the slots
    # positions in the request's experts the worker computes on its CPU from the host tier (--cpu-experts on): their
    # ``slots`` entries are host-tier slots, pinned until the worker's next message about a later layer
    host: list[Index] = field(default_factory=list)
    # a partial answer (``AcquireRequest.partial``): positions whose loads are still in flight; their ``slots``
    # entries mean nothing yet, and the worker must send AWAIT, whose reply gives every slot, before it reads them
    loading: list[Index] = field(default_factory=list)
    # False: memd decides nothing from per-layer notes (a pool of every expert never evicts; without --cpu-experts
    # no host slot waits for them either): send none, spare memd a message per layer (the step traces still go)
    notes: bool = True


class AwaitRequest(Message):
    """The rest of this worker's partly answered acquire of ``layer``: the reply (an ``AcquireReply``, ``loading``
    empty) comes once every one of its loads is done."""

    layer: Index


class ReleaseRequest(Message):
    layer: Index
    experts: list[Index]
    read_done: Annotated[list[Index], Meta(max_length=1)] = field(default_factory=list)  # the read event recorded after
    # the worker's GPU work on these experts' slots (HelloRequest.read_events): memd rewrites them only after it


class ReturnLeasesRequest(Message):
    """The worker gives back every lease it holds (it went idle, or lost track after an error)."""


class StatsRequest(Message):
    pass


class LayerStats(Message):
    """One MoE layer's cache and prefetch counters (``StatsReply.layers``)."""

    layer: Index
    hits: Count
    misses: Count  # on-demand loads
    prefetch_issued: Count
    prefetch_used: Count
    prefetch_wasted: Count
    stall_seconds: NonNeg  # time acquires of this layer waited for loads
    bytes_read: Count


class LookaheadStats(Message):
    """Prediction quality ``distance`` layers ahead: precision = correct / predicted, recall = correct / routed."""

    distance: Index
    predicted: Count  # experts predicted for the target layer (summed over targets)
    correct: Count  # of those, routed there
    routed: Count  # experts routed at the target layers


class StatsReply(Message):
    pid: Index
    pool_bytes: Count
    num_slots: Index
    resident: Index
    pinned: Index
    hits: Count
    misses: Count
    evictions: Count
    bytes_read: Count
    read_seconds: NonNeg
    stall_seconds: NonNeg
    direct_io: bool
    resident_per_layer: list[Index]
    policy: Text = "lru"
    prefetch: bool = False
    tokens: Count = 0  # tokens the step traces reported (misses per token = misses / tokens)
    prefetch_issued: Count = 0
    prefetch_used: Count = 0  # acquired before being evicted
    prefetch_wasted: Count = 0  # evicted or cancelled before any acquire
    prefetch_cancelled: Count = 0  # of the wasted: cancelled because their layer had passed (or a load needed the slot)
    prefetch_late: Count = 0  # of the used: still loading when acquired (the worker waited, but less)
    prefetch_precision: Ratio = 0.0  # used / (used + wasted)
    prefetch_recall: Ratio = 0.0  # used / (used + misses): the needed loads a prefetch had started
    eamc_size: Count = 0
    eamc_capacity: Count = 0
    match_similarity: Ratio = 0.0  # mean cosine similarity of the best EAMC match
    trace_steps: Count = 0  # step traces received (a failed or empty step's empty one too)
    trace_lost: Count = 0  # step traces the worker sent that never arrived (gaps in its step numbers)
    read_bandwidth: NonNeg = 0.0  # bytes/s into the pool, measured (GPU pool: host-tier copies and disk reads)
    layer_seconds: NonNeg = 0.0  # observed time per MoE layer
    layers: list[LayerStats] = field(default_factory=list)
    lookahead: list[LookaheadStats] = field(default_factory=list)
    next_gate: list[LookaheadStats] = field(default_factory=list)  # the worker's next-gate guess alone (distance 1)
    acquires: Count = 0  # ACQUIRE messages received
    acquires_partial: Count = 0  # of them, answered while some of their loads ran (AcquireRequest.partial)
    leased_layers: Count = 0  # MoE layers a worker computed from its leases, with no message (told by step traces)
    speculation: list[LookaheadStats] = field(default_factory=list)  # the worker's hidden-state guesses, by distance
    layer_notes: Count = 0  # LAYER_NOTE events received (one per MoE layer per step, leased or not)
    notes_dropped: Count = 0  # layer notes that arrived after a later layer of their step (ignored)
    notes_unattached: Count = 0  # of them, notes of a worker not attached (a dead one's, still queued: ignored)
    speculate_layers: Index = 0  # how far ahead workers are told to guess (adapts to read time vs layer time)
    prefetch_deferred: Count = 0  # plans put off because on-demand reads were in flight or queued
    prefetch_declined: Count = 0  # candidates whose expected benefit did not beat the bandwidth and slot they cost
    reader_busy_seconds: NonNeg = 0.0  # wall seconds with at least one expert load in flight (the disk had work)
    host_hits: Count = 0  # GPU pool: loads served from the pinned host tier (one H2D copy)
    host_misses: Count = 0  # GPU pool: loads read from the disk into the host tier, then copied
    copy_bytes: Count = 0  # GPU pool: bytes copied host -> device
    copy_seconds: NonNeg = 0.0  # GPU pool: seconds from issuing each copy to its end, summed
    ring_reuse_waits: Count = 0  # GPU pool: copies that waited for a copy-event ring entry still in flight
    cpu_experts: Count = 0  # GPU pool, --cpu-experts: experts workers computed on their CPU from the host tier
    read_events: Count = 0  # GPU pool: released slots whose rewrite waits for a worker's "done reading" event
    slot_cache: bool = False  # memd reads experts from their slot images where written (--slot-cache)
    slot_images: Count = 0  # experts whose slot image is on disk
    images_written: Count = 0  # slot images this memd wrote behind its reads
    cancelled_bytes: Count = 0  # of bytes_read, what loads cancelled before they finished had read (version 5)
    slot_images_share: NonNeg = 0.0  # --slot-compression: the disk's bytes per slot byte of the written images


# ---------------------------------------------------------------- worker -> memd (trace stream, PUSH -> PULL)
class RequestStartEvent(Message):
    request: Text
    prompt_tokens: Index


class RequestEndEvent(Message):
    request: Text
    generated_tokens: Count


class LayerNoteEvent(Message):
    """One MoE layer of one step, sent as it runs (leased or not; never blocks, dropped under pressure), so memd's
    predictor, planner and policy follow every layer. Flat arrays: ``tokens`` is ``len(requests) x len(experts)``
    row-major (request r, expert j at ``r * len(experts) + j``); guess i says expert ``guess_experts[i]`` of MoE layer
    ``guess_layers[i]`` will run, with router probability ``guess_confidence[i]`` (hidden-state speculation)."""

    worker: Index  # pid: step numbers are per worker
    step: Count
    layer: Index
    experts: list[Index]
    requests: list[Text] = field(default_factory=list)
    tokens: list[Index] = field(default_factory=list)
    prefill: list[bool] = field(default_factory=list)  # per request
    guess_layers: list[Index] = field(default_factory=list)
    guess_experts: list[Index] = field(default_factory=list)
    guess_confidence: list[Ratio] = field(default_factory=list)


class StepTraceEvent(Message):
    """Everything one forward step routed, per request, sent once the step is over (batched, fire-and-forget).

    Flat arrays, one entry per traced MoE layer in ``layers`` (in the order they ran). Layer i routed to
    ``experts[a:a + n]``, where ``n = expert_counts[i]`` and ``a`` is the sum of the counts before it; request r sent
    ``routed[len(requests) * a + r * n + j]`` tokens to its expert j, with router weights summing to the same entry
    of ``weights`` (a ``len(requests) x n`` row-major block per layer). ``speculated`` holds, the same way by
    ``speculated_counts``, each layer's next-gate guess for the next MoE layer (none for the last). ``leased[i]``:
    every expert of layer i was already leased, so no acquire told memd of it (memd counts its hits here)."""

    worker: Index  # pid: step numbers are per worker
    step: Count
    requests: list[Text]
    tokens: list[Index]  # tokens of each request in this step
    prefill: list[bool]  # per request
    layers: list[Index] = field(default_factory=list)
    leased: list[bool] = field(default_factory=list)
    expert_counts: list[Index] = field(default_factory=list)
    experts: list[Index] = field(default_factory=list)
    routed: list[Index] = field(default_factory=list)
    weights: list[NonNeg] = field(default_factory=list)
    speculated_counts: list[Index] = field(default_factory=list)
    speculated: list[Index] = field(default_factory=list)

    def layer_traces(self) -> list[LayerTrace]:
        """The flat arrays read back per layer (``routed`` and ``weights`` as rows per request). The caller checks
        the lengths first (``layout_problem``)."""
        out, a, s, rows = [], 0, 0, len(self.requests)
        for i, layer in enumerate(self.layers):
            n, g = self.expert_counts[i], self.speculated_counts[i]
            base = rows * a
            out.append(LayerTrace(layer, self.experts[a:a + n],
                                  [self.routed[base + r * n:base + (r + 1) * n] for r in range(rows)],
                                  [self.weights[base + r * n:base + (r + 1) * n] for r in range(rows)],
                                  self.speculated[s:s + g], self.leased[i]))
            a, s = a + n, s + g
        return out

    def layout_problem(self) -> str | None:
        """Why the flat arrays do not fit together (None: they do)."""
        count, n = len(self.requests), len(self.layers)
        if len(self.tokens) != count or len(self.prefill) != count:
            return f"{count} requests but {len(self.tokens)} token counts, {len(self.prefill)} phases"
        if not len(self.leased) == len(self.expert_counts) == len(self.speculated_counts) == n:
            return (f"{n} layers but {len(self.leased)} leased flags, {len(self.expert_counts)} expert counts,"
                    f" {len(self.speculated_counts)} speculated counts")
        experts = sum(self.expert_counts)
        if len(self.experts) != experts or len(self.speculated) != sum(self.speculated_counts):
            return f"{len(self.experts)} experts for counts summing to {experts}, or speculated likewise"
        if len(self.routed) != count * experts or len(self.weights) != count * experts:
            return f"routed/weights hold {len(self.routed)}/{len(self.weights)} entries, not {count} x {experts}"
        return None


class LayerTrace(Struct, frozen=True):
    """One layer of a ``StepTraceEvent``, read back (``layer_traces``; never on the wire): ``tokens[r][j]`` tokens of
    request r went to ``experts[j]``, router weights summing to ``weights[r][j]``."""

    layer: int
    experts: list[int]
    tokens: list[list[int]]
    weights: list[list[float]]
    speculated: list[int] = field(default_factory=list)
    leased: bool = False


def step_trace(worker: int, step: int, requests: list[str], tokens: list[int], prefill: list[bool],
               layers: list[LayerTrace]) -> StepTraceEvent:
    """A ``StepTraceEvent`` from per-layer rows (the flat arrays built here, in one place)."""
    flat = lambda rows: [v for row in rows for v in row]  # noqa: E731
    return StepTraceEvent(worker, step, requests, tokens, prefill, [t.layer for t in layers],
                          [t.leased for t in layers], [len(t.experts) for t in layers], flat(t.experts for t in layers),
                          [v for t in layers for v in flat(t.tokens)], [v for t in layers for v in flat(t.weights)],
                          [len(t.speculated) for t in layers], flat(t.speculated for t in layers))
