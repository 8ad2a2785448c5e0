"""memd's trace socket: what workers tell it one way (request starts and ends, each step's routing, and a note per
MoE layer with the hidden-state guesses), read by one task and handed to the learning parts (the EAMs and the
EAMC, the predictor, the prefetch planner). A frame that does not decode, or a handler that fails, is logged and
skipped: learning from traces never stops memd from serving."""
from __future__ import annotations

import logging
import time

from common import messages as m
from common.codec import ProtocolError, decode
from common.protocol import MEMD_TRACE_OPS, Op

log = logging.getLogger("moeinf.memd.traces")


class Traces:
    def __init__(self, server):
        self.server, self.core = server, server.core
        self.handlers = {Op.REQUEST_START: self.on_request_start, Op.REQUEST_END: self.on_request_end,
                         Op.STEP_TRACE: self.on_step_trace, Op.LAYER_NOTE: self.on_layer_note}

    async def read(self, sock) -> None:
        while True:
            frame = await sock.recv()
            try:
                op, _, event = decode(frame, MEMD_TRACE_OPS)
            except ProtocolError as exc:
                log.warning("rejected trace frame: %s", exc)
                continue
            try:
                self.handlers[op](None, event)
            except Exception:  # a bug in learning from traces must not stop memd from reading them
                log.exception("%s failed", op.name)

    def attached(self, pid: int) -> bool:
        return any(c.pid == pid for c in self.server.clients.values())

    def on_request_start(self, identity, event: m.RequestStartEvent) -> None:
        self.core.request_start(event.request)

    def on_request_end(self, identity, event: m.RequestEndEvent) -> None:
        self.core.request_end(event.request)

    def on_step_trace(self, identity, event: m.StepTraceEvent) -> None:
        """A step's routing: the requests' EAMs learn it whoever sent it (they are bounded by
        ``--max-traced-requests``); the per-worker step count only for an attached worker."""
        self.core.step_trace(event, attached=self.attached(event.worker))

    def on_layer_note(self, identity, event: m.LayerNoteEvent) -> None:
        """Every MoE layer of every step, leased or not: feed the predictor, then plan (coalesced, off this path).
        A note of a worker not attached (a dead one's, still queued on the trace socket) is counted and ignored:
        the predictor keeps state for attached workers only (at most ``--max-clients``), dropped when they leave."""
        if not self.attached(event.worker):
            self.core.metrics.layer_notes += 1
            self.core.metrics.notes_unattached += 1
            return
        self.server.host.moved_on(event.worker, event.step, event.layer)
        if self.core.note(event, time.perf_counter()):
            self.server.prefetcher.wake(event.worker)
