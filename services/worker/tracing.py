"""The worker's per-step routing trace: buffered while a forward step runs, flushed once it is over.

``begin`` opens a step (``StepState.begin`` calls it once per forward, and it first flushes the step before);
each MoE layer adds what it routed; ``end_step`` sends one ``StepTraceEvent`` to memd on the fire-and-forget
trace socket (a full queue drops and counts, it never blocks decode) and, with ``--record-trace``, appends one
line per token per MoE layer to the trace file (docs/traces.md). A request's end flushes its last step first, so
memd always learns a request's last step before its end.

Positions and phases are what the engine says, or inferred: a request's first step is its prompt (prefill), the
later ones decode, and positions count the tokens the request has run so far. An engine that splits prompts
into chunks must pass ``phases`` (and may pass ``positions``) to ``StepState.begin``.

``StepState`` is the step as the engine declares it and every MoE layer's binding reads it: one object per
worker model, made by ``services.worker.main.attach`` and handed to ``experts.bind`` and to the ``Engine``.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from common import messages as m
from common.protocol import Op
from common.traces import TraceRecord, TraceWriter

log = logging.getLogger("moeinf.worker.tracing")


@dataclass(slots=True)
class RecordingStep:
    number: int
    requests: list[str]
    tokens: list[int]  # per request
    prefill: list[bool]  # per request
    owner: torch.Tensor  # [T] request index of every token
    positions: list[int]  # [T]
    layers: list[m.LayerTrace] = field(default_factory=list)
    routing: list[tuple] = field(default_factory=list)  # for the trace file: (layer, index, weights, guesses)


class StepRecorder:
    def __init__(self, client, writer: TraceWriter | None = None, *, max_requests: int = 4096):
        self.client = client
        self.writer = writer
        self.max_requests = max_requests
        self.step = 0
        self.open: RecordingStep | None = None
        self.seen: OrderedDict[str, int] = OrderedDict()  # request -> tokens it has run (the next position)

    # ---------------------------------------------------------------- step lifecycle
    def begin(self, requests: list[str], token_owner: torch.Tensor, positions=None, phases=None) -> RecordingStep:
        self.end_step()
        self.step += 1
        owner = token_owner.reshape(-1).to(torch.long)
        counts = torch.bincount(owner, minlength=len(requests)).tolist() if owner.numel() else [0] * len(requests)
        if phases is None:
            prefill = [self.seen.get(r, 0) == 0 for r in requests]
        else:
            prefill = [p == "prefill" if isinstance(p, str) else bool(p) for p in phases]
        if positions is None:
            positions = self._positions(requests, owner)
        elif isinstance(positions, torch.Tensor):
            positions = positions.reshape(-1).tolist()
        else:
            positions = list(positions)
        for request, n in zip(requests, counts):
            self._advance(request, n)
        self.open = RecordingStep(self.step, list(requests), counts, prefill, owner, positions)
        return self.open

    def _positions(self, requests: list[str], owner: torch.Tensor) -> list[int]:
        nxt = [self.seen.get(r, 0) for r in requests]
        out = []
        for r in owner.tolist():
            out.append(nxt[r])
            nxt[r] += 1
        return out

    def _advance(self, request: str, n: int) -> None:
        self.seen[request] = self.seen.get(request, 0) + n
        self.seen.move_to_end(request)
        if len(self.seen) > self.max_requests:
            old, _ = self.seen.popitem(last=False)
            log.warning("tracing %d requests (4 x --max-queued + 64): forgot %s's position (it never"
                        " ended?)", self.max_requests, old)

    def layer(self, layer: int, experts: list[int], tokens: list[list[int]], weights: list[list[float]],
              speculated: list[int], top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *,
              leased: bool = False, guesses: tuple[list[int], list[int], list[float]] | None = None) -> None:
        """One MoE layer of the open step; ``guesses`` (target layers, experts, confidences: every guess made at
        this layer, for the trace file) or None where the worker does not guess."""
        step = self.open
        if step is None or not step.requests or len(tokens) != len(step.requests):
            return
        step.layers.append(m.LayerTrace(layer, experts, tokens, weights, speculated, leased))
        if self.writer is not None:
            made = None if guesses is None else [(t - layer, e, c) for t, e, c in zip(*guesses)]
            step.routing.append((layer, top_k_index, top_k_weights, made))

    def abort(self) -> None:
        """Drop the open step's routing (its forward failed: its requests run it again, recorded then)."""
        step, self.open = self.open, None
        self._spent(step)

    def _spent(self, step: RecordingStep | None) -> None:
        """Tell memd that ``step``'s number carries nothing (else it counts a gap in the numbers as a lost trace)."""
        if step is not None:
            self.client.emit(Op.STEP_TRACE, m.step_trace(os.getpid(), step.number, [], [], [], []))

    def end_step(self) -> None:
        """Send the open step to memd (and to the trace file); a no-op when no step is open."""
        step, self.open = self.open, None
        if step is None or not step.layers:
            self._spent(step)
            return
        self.client.emit(Op.STEP_TRACE, m.step_trace(os.getpid(), step.number, step.requests, step.tokens,
                                                     step.prefill, step.layers))
        if self.writer is not None:
            try:
                self._write(step)
            except OSError as exc:  # a full or failing disk ends the trace file, not the requests
                log.error("--record-trace: writing the trace failed (%s); recording stops, serving goes on", exc)
                writer, self.writer = self.writer, None
                try:
                    writer.close()
                except OSError:
                    pass

    def _write(self, step: RecordingStep) -> None:
        owner = step.owner.tolist()
        phase = ["prefill" if p else "decode" for p in step.prefill]
        for layer, index, weights, made in step.routing:
            # a step's guesses are made for all its tokens at once: written once, on its first line of the layer
            nxt = None if made is None else sorted(e for d, e, _ in made if d == 1)
            for t, (experts, ws) in enumerate(zip(index.tolist(), weights.float().tolist())):
                r = owner[t]
                self.writer.write(TraceRecord(step.requests[r], step.positions[t], layer, experts, ws, phase[r],
                                              nxt if t == 0 else None, made if t == 0 else None))
        self.writer.flush()

    def request_ended(self, request: str) -> None:
        self.end_step()
        self.seen.pop(request, None)

    def close(self) -> None:
        self.end_step()
        if self.writer is not None:
            self.writer.close()


class StepState:
    """The forward step now running: whose tokens are whose (``requests``; ``owner[t]`` is the index in
    ``requests`` of flattened token t) and the recorder the layers' routing goes to. Requests start and end
    through it too, so memd hears a request's last step before its end."""

    def __init__(self, recorder: StepRecorder):
        self.recorder = recorder
        self.requests: list[str] = []
        self.token_owner: torch.Tensor | None = None  # [num_tokens]
        self.owner: list[int] = []  # the same, as a list
        self.lockstep = None  # several forwards meeting at each MoE layer (seq2seq.Lockstep), while they run

    def begin(self, requests: list[str], owner: list[int], *, positions=None, phases=None) -> None:
        """Declare the next forward; it ends (flushes to memd and the trace file) the step before. ``positions``
        (each token's position in its sequence) and ``phases`` (per request, "prefill" or "decode") default to: a
        request's first step is its prompt, later steps decode, positions count on from its earlier tokens."""
        self.requests, self.owner = requests, owner
        self.token_owner = torch.tensor(owner, dtype=torch.long)
        if self.recorder.client is not None:
            self.recorder.begin(requests, self.token_owner, positions, phases)

    def abort(self) -> None:
        """The step declared last failed: its routing is not sent (``StepRecorder.abort``)."""
        if self.recorder.client is not None:
            self.recorder.abort()

    def request_started(self, request: str, prompt_tokens: int) -> None:
        self.recorder.client.emit(Op.REQUEST_START, m.RequestStartEvent(request, prompt_tokens))

    def request_ended(self, request: str, generated: int) -> None:
        """Flush the request's last step, then tell memd it ended (memd adds its matrix to the EAMC)."""
        self.recorder.request_ended(request)
        self.recorder.client.emit(Op.REQUEST_END, m.RequestEndEvent(request, generated))

    def close(self) -> None:
        """The last step's trace, and the trace file's buffer."""
        self.recorder.close()
