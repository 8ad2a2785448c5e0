"""Which expert each of the worker's dequantized rows holds (``quant.Dequantizer``'s cache of dequantized experts)."""
from __future__ import annotations

from collections import OrderedDict


class RowCache:
    """Which expert each dequantized row holds: a layer call dequantizes only the experts it does not find, and at
    full residency a warm cache dequantizes nothing. The victim is the most recently used row the call does not
    need: the layers run in a cycle, so when the rows hold less than a step's experts, least-recently-used would
    evict exactly the row whose layer comes next (no hit, ever), while most-recently-used keeps the others for their
    layers' next turn; and the rows rewritten are the ones still in the CPU's cache.

    A row is keyed by ``(layer, expert, slot)`` and only looked up right after memd's acquire (or a held lease)
    said that ``slot`` holds ``(layer, expert)`` now. Its contents were dequantized from that slot while memd said
    the same, and an expert's bytes are the checkpoint's (immutable), so a hit is that expert's exact values even
    if memd evicted and reloaded it in between; an expert that moved to another slot misses (dequantized again),
    and when a slot is seen holding another expert, its old row is dropped at once (no copy outlives its slot's
    reuse by more than the call that reveals it). Rows: at least the most experts a layer can route (so a call
    always finds victims outside its own experts), plus ``--dequant-cache-mb``."""

    def __init__(self, rows: int):
        self.rows = rows
        self.order: OrderedDict[tuple[int, int, int], int] = OrderedDict()  # (layer, expert, slot) -> row, oldest first
        self.by_slot: dict[int, tuple[int, int, int]] = {}
        self.free = list(range(rows - 1, -1, -1))
        self.hits = self.misses = 0

    def place(self, layer: int, experts: list[int], slots: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """The row of each routed expert, and the ``(slot, row)`` pairs that must be dequantized first."""
        if len(experts) > self.rows:
            raise RuntimeError(f"{len(experts)} experts routed in one layer, the dequantization buffer holds"
                               f" {self.rows} (min(experts, pool slots, --dequant-scratch-experts)"
                               " + --dequant-cache-mb)")
        keys = [(layer, e, s) for e, s in zip(experts, slots)]
        pinned = {self.order[k] for k in keys if k in self.order}
        rows, fill = [], []
        for key in keys:
            row = self.order.get(key)
            if row is not None:
                self.order.move_to_end(key)
                self.hits += 1
            else:
                row = self._claim(key[2], pinned)
                pinned.add(row)
                self.order[key] = row
                self.by_slot[key[2]] = key
                fill.append((key[2], row))
                self.misses += 1
            rows.append(row)
        return rows, fill

    def _claim(self, slot: int, pinned: set[int]) -> int:
        stale = self.by_slot.pop(slot, None)  # the slot holds another expert now: its old copy goes
        if stale is not None:
            self.free.append(self.order.pop(stale))
        if self.free:
            return self.free.pop()
        victim = next(k for k, row in reversed(self.order.items()) if row not in pinned)
        del self.by_slot[victim[2]]
        return self.order.pop(victim)
