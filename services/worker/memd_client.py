"""The worker's link to memd: handshake, acquire/release, leases, trace events (request start/end, step traces).

Used only from the compute thread, so it is synchronous: the forward pass must wait for its experts anyway.
Waits poll in short slices and check memd's pid, so a dead daemon is reported at once, not after a timeout.

With ``leases`` the client keeps every expert memd granted (layer, expert -> slot) until memd revokes it: a layer
whose experts are all leased, while the revoke epoch on memd's control page has not moved, is served here with no
message (see services/memd/leases.py for memd's side of the contract).
"""
from __future__ import annotations

import itertools
import logging
import mmap
import os
import time
from collections import deque

import numpy as np
import zmq

from common import messages as m
from common.codec import ProtocolError, decode, encode
from common.config import PROTOCOL_VERSION
from common.procs import pid_alive
from common.protocol import Op
from common.zmq_utils import make_socket

log = logging.getLogger("moeinf.worker.memd")
TRACE_HWM = 256
MAX_LEASED_USES = 4096  # leased uses remembered between acquires (recency hints for memd; the oldest are dropped)
POLL_SLICE_MS = 200


class MemdError(RuntimeError):
    """memd answered with an error."""


class MemdDeadError(RuntimeError):
    """memd is gone or does not answer."""


class MemdClient:
    def __init__(self, rpc_addr: str, trace_addr: str, *, timeout_s: float, leases: bool = False):
        self.rpc_addr = rpc_addr
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, zmq.DEALER, rpc_addr, bind=False)
        self.trace = make_socket(self.ctx, zmq.PUSH, trace_addr, bind=False, hwm=TRACE_HWM)
        self._ids = itertools.count(1)
        self.memd_pid: int | None = None
        self.use_leases = leases
        self.leases: dict[tuple[int, int], int] = {}  # (layer, expert) -> slot, held until memd revokes it
        self._control: np.ndarray | None = None  # memd's revoke epoch (shared memory), when leasing
        self._seen_epoch = 0
        self.last_leased = False  # the last acquire was served from leases (no message)
        self.wait_events: list[int] = []  # the last acquire's copies in flight (event-ring entries; a GPU pool)
        self.host: list[int] = []  # the last acquire's positions computed on the CPU from the host tier
        self.loading: list[int] = []  # the last acquire's positions still loading (a partial answer: see rest())
        self.partial_layers = 0  # acquires answered in two parts (experts computed while others loaded)
        # [layer, expert] used from leases, oldest first
        self._leased_uses: deque[list[int]] = deque(maxlen=MAX_LEASED_USES)
        self.pid = os.getpid()
        self.speculate_layers = 0  # layers ahead to guess: memd's word (its last acquire reply), else bind()'s default
        self.speculate_threshold = 0.0  # the router probability a guess needs (memd's word)
        self.speculate = True  # memd's word: it acts on guesses (False: prefetch off, or a pool of every expert)
        self.notes = True  # memd's word: it decides from per-layer notes (False: a pool of every expert)
        self.notes_dropped = 0
        self.trace_dropped = 0
        self.acquire_seconds = 0.0  # time the forward pass waited for acquires (the worker's stall)

    def close(self) -> None:
        self._control = None
        self.sock.close()
        self.trace.close()
        self.ctx.term()

    def handshake(self, model: str, timeout_s: float, timeout_knob: str, device: str = "cpu",
                  read_events: list[bytes] = ()) -> m.HelloReply:
        """``device``: "cpu", or the UUID of the GPU the worker computes on (memd refuses a pool it cannot share);
        ``read_events``: the handles of its "done reading" events (a GPU worker, ``device.ReadEvents``)."""
        hello = self.call(Op.HELLO, m.HelloRequest(PROTOCOL_VERSION, os.getpid(), model, device, list(read_events)),
                          timeout_s=timeout_s, what=f"memd did not answer HELLO at {self.rpc_addr} within"
                          f" {timeout_s:g}s: start `moeinf memd --model {model}` with the same --state-dir first, or"
                          f" raise {timeout_knob}")
        if hello.protocol != PROTOCOL_VERSION:
            raise MemdError(f"memd speaks protocol {hello.protocol}, this worker {PROTOCOL_VERSION}: run one version of"
                            " moeinf for memd and its workers")
        self.memd_pid = hello.pid
        if self.use_leases and hello.control_name:
            self._control = _map_epoch(hello.control_name)
        return hello

    def memd_alive(self) -> bool:
        return self.memd_pid is not None and pid_alive(self.memd_pid)

    def ready(self, cpu_expert_seconds: list[float] = (), speculate_max: int = 0) -> None:
        """``cpu_expert_seconds``: [fixed, per token] when this worker computes host-tier experts on its CPU;
        ``speculate_max``: the most MoE layers ahead it guesses (0: none)."""
        self.call(Op.READY, m.ReadyRequest(os.getpid(), list(cpu_expert_seconds), speculate_max))

    def acquire(self, layer: int, experts: list[int], requests: list[str], tokens: list[list[int]], *, step: int = 0,
                prefill: list[bool] = (), speculated: list[int] = (), speculated_tokens: list[int] = (),
                counts=None, partial: bool = False) -> list[int]:
        """Slots of ``experts`` of ``layer``, pinned (explicit mode: until ``release``) or leased; at the positions
        in ``self.host`` (memd --cpu-experts, given ``counts()``: tokens per expert) host-tier slots, for the CPU.
        With ``partial``, memd may answer while some are still loading: their positions are in ``self.loading``,
        their slots are not to be read, and ``rest`` gives every slot once they are loaded."""
        slots = self._leased(layer, experts)
        self.last_leased = slots is not None
        self.wait_events, self.host, self.loading = [], [], []
        if slots is not None:
            self._leased_uses.extend([layer, expert] for expert in experts)
            return slots
        start = time.perf_counter()
        lease = self._control is not None
        request = m.AcquireRequest(layer, experts, requests, tokens, step, list(prefill), list(speculated),
                                   list(speculated_tokens), lease, list(self._leased_uses), counts() if counts else [],
                                   partial)
        self._leased_uses.clear()
        reply = self._ask(Op.ACQUIRE, request, start)
        if lease:
            self._update_leases(layer, experts, reply)
        self.speculate, self.notes, self.wait_events = reply.speculate, reply.notes, reply.wait_events
        self.host, self.loading = reply.host, reply.loading
        self.partial_layers += bool(reply.loading)
        if reply.speculate_layers:
            self.speculate_layers, self.speculate_threshold = reply.speculate_layers, reply.speculate_threshold
        return reply.slots

    def rest(self, layer: int, experts: list[int]) -> list[int]:
        """Every slot of the partly answered acquire of ``experts`` of ``layer``, once memd has loaded them all."""
        reply = self._ask(Op.AWAIT, m.AwaitRequest(layer), time.perf_counter())
        if self._control is not None:
            self._update_leases(layer, experts, reply)
        self.wait_events, self.loading = reply.wait_events, []
        return reply.slots

    def _ask(self, op: Op, request, start: float):
        """An acquire's round trip, its wait counted as the worker's stall; an error ends every lease."""
        try:
            return self.call(op, request)
        except BaseException:
            self.leases.clear()  # an error ends every lease (memd's side of the contract does the same)
            raise
        finally:
            self.acquire_seconds += time.perf_counter() - start

    def note(self, step: int, layer: int, experts: list[int], requests: list[str], tokens: list[list[int]],
             prefill: list[bool], guess_layers: list[int], guess_experts: list[int],
             guess_confidence: list[float]) -> None:
        """Tell memd this layer ran (every layer, leased or not, while memd wants notes): one-way, flat arrays; a
        full queue drops it."""
        if not self.notes:
            return
        flat = [count for row in tokens for count in row]
        event = m.LayerNoteEvent(self.pid, step, layer, experts, requests, flat, list(prefill), guess_layers,
                                 guess_experts, guess_confidence)
        try:
            self.trace.send(encode(Op.LAYER_NOTE, 0, event), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.notes_dropped += 1

    @property
    def leasing(self) -> bool:
        return self._control is not None

    def _leased(self, layer: int, experts: list[int]) -> list[int] | None:
        """The slots when every expert is leased and memd has not asked for leases back since; else None."""
        if self._control is None or self._control[0] != self._seen_epoch:
            return None
        leases = self.leases
        slots = []
        for expert in experts:
            slot = leases.get((layer, expert))
            if slot is None:
                return None
            slots.append(slot)
        return slots

    def _update_leases(self, layer: int, experts: list[int], reply: m.AcquireReply) -> None:
        for revoked_layer, expert in reply.revoked:
            self.leases.pop((revoked_layer, expert), None)
        for j, (expert, slot) in enumerate(zip(experts, reply.slots)):
            if j not in reply.host and j not in reply.loading:  # (a host-tier slot: the CPU's, for this acquire
                # only; a slot still loading: leased from AWAIT's reply)
                self.leases[(layer, expert)] = slot
        self._seen_epoch = reply.epoch

    def release(self, layer: int, experts: list[int], read_done: list[int] = ()) -> None:
        """Unpin ``experts`` acquired in explicit mode (leases are not released: memd revokes them); ``read_done``:
        the "done reading" event recorded after the GPU's work on their slots (memd rewrites them after it)."""
        self.sock.send(encode(Op.RELEASE, 0, m.ReleaseRequest(layer, experts, list(read_done))))

    def return_leases(self) -> None:
        """Give every lease back (the worker is idle): nothing stays pinned for a worker that computes nothing (nor
        a host-tier slot its last acquire had it compute from, ``host``)."""
        if self.leases or self.host:
            self.host = []
            self.leases.clear()
            self.sock.send(encode(Op.RETURN_LEASES, 0, m.ReturnLeasesRequest()))

    def stats(self) -> m.StatsReply:
        return self.call(Op.STATS, m.StatsRequest())

    def emit(self, op: Op, event) -> None:
        """Fire-and-forget trace event; a full queue drops and counts, it never blocks."""
        try:
            self.trace.send(encode(op, 0, event), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.trace_dropped += 1

    def call(self, op: Op, request, *, timeout_s: float | None = None, what: str | None = None):
        rid = next(self._ids)
        self.sock.send(encode(op, rid, request))
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            if self.sock.poll(POLL_SLICE_MS):
                reply = self._receive(rid)
                if reply is not None:
                    return reply
                continue
            if self.memd_pid is not None and not pid_alive(self.memd_pid):
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


def _map_epoch(name: str) -> np.ndarray:
    """memd's control page, read-only: element 0 is the revoke epoch (an aligned int64, read whole)."""
    with open(f"/dev/shm/{name}", "rb") as f:
        page = mmap.mmap(f.fileno(), mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)
    return np.frombuffer(page, dtype=np.int64, count=1)
