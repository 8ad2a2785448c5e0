"""memd's STATS reply, the activation-aware part: hits and misses per layer, prefetch use, prediction quality by
lookahead distance, the step traces heard, from the core's counters."""
from __future__ import annotations

from common import messages as m


def stats_fields(core) -> dict:
    """The activation-aware part of ``StatsReply``, as keyword arguments."""
    c, mt, p = core.table.counters, core.metrics, core.predictor
    layers = [m.LayerStats(i, c.per_layer_hits[i], c.per_layer_misses[i], mt.prefetch_issued[i],
                           mt.prefetch_used[i], mt.prefetch_wasted[i], mt.stall_seconds[i], mt.bytes_read[i])
              for i in range(core.L)]
    lookahead = [m.LookaheadStats(d, s.predicted, s.correct, s.routed) for d, s in p.lookahead_stats()]
    gate = [m.LookaheadStats(1, p.next_gate.predicted, p.next_gate.correct, p.next_gate.routed)]
    spec = [m.LookaheadStats(d, s.predicted, s.correct, s.routed) for d, s in p.speculation_stats()]
    return dict(policy=core.policy_name, prefetch=core.prefetching, tokens=mt.tokens,
                prefetch_issued=sum(mt.prefetch_issued), prefetch_used=sum(mt.prefetch_used),
                prefetch_wasted=sum(mt.prefetch_wasted), prefetch_cancelled=mt.prefetch_cancelled,
                prefetch_late=mt.prefetch_late, prefetch_precision=mt.prefetch_precision(),
                prefetch_recall=mt.prefetch_recall(c.misses), eamc_size=len(core.eamc),
                eamc_capacity=core.eamc.capacity,
                match_similarity=p.match_similarity or 0.0, trace_steps=mt.trace_steps, trace_lost=mt.trace_lost,
                layer_seconds=p.layer_seconds or 0.0, layers=layers, lookahead=lookahead, next_gate=gate,
                acquires=mt.acquires, leased_layers=mt.leased_layers, speculation=spec,
                layer_notes=mt.layer_notes, notes_dropped=mt.notes_dropped,
                notes_unattached=mt.notes_unattached, speculate_layers=mt.speculate_layers,
                prefetch_deferred=mt.prefetch_deferred, prefetch_declined=mt.prefetch_declined,
                cancelled_bytes=c.cancelled_bytes)
