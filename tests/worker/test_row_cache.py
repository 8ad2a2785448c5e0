"""``row_cache.RowCache``: which expert each dequantized row holds, evicting the most recent row a call does not
need, never returning a row filled from another expert or slot."""
from hypothesis import given, settings
from hypothesis import strategies as st

from services.worker.row_cache import RowCache


def test_row_cache_in_a_layer_cycle_larger_than_its_rows_keeps_hitting():
    """4 rows, 3 layers x 2 experts routed the same way each step: evicting the least recent row would miss every
    time (each row's layer comes back after the others: 0 hits); evicting the most recent keeps rows that hit, at
    least one layer's pair in every step after the first."""
    cache = RowCache(4)
    for _ in range(5):
        for layer in range(3):
            cache.place(layer, [0, 1], [2 * layer, 2 * layer + 1])
    assert cache.hits >= 4 * 2 and cache.hits + cache.misses == 5 * 6


def test_row_cache_hits_evicts_most_recent_and_drops_a_reused_slot():
    cache = RowCache(3)
    rows, fill = cache.place(0, [1, 2], [10, 11])
    assert sorted(fill) == sorted(zip([10, 11], rows)) and len(set(rows)) == 2
    again, fill = cache.place(0, [1, 2], [10, 11])
    assert (again, fill, cache.hits) == (rows, [], 2)
    moved, fill = cache.place(0, [1], [12])  # expert 1 now in another slot: a miss, never the old row's copy
    assert fill == [(12, moved[0])] and moved[0] not in rows
    _, fill = cache.place(1, [5], [11])  # slot 11 reused by another expert: (0, 2, 11)'s row is dropped
    assert (0, 2, 11) not in cache.order and fill == [(11, rows[1])]
    assert cache.place(0, [2], [11])[1]  # so expert 2 is dequantized again
    assert len(cache.order) <= 3 and len(set(cache.order.values())) == len(cache.order)


@settings(max_examples=30, deadline=None)
@given(calls=st.lists(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7)), min_size=1, max_size=3),
                      min_size=1, max_size=30), rows=st.integers(3, 6))
def test_row_cache_rows_always_hold_the_routed_experts(calls, rows):
    """A model of memd: each call routes experts into slots (a slot holds one expert at a time); every row the
    cache returns must have been filled from that expert in that slot, and a call's rows are distinct."""
    cache, content, slot_of = RowCache(rows), {}, {}
    for call in calls:
        experts = sorted({e for e, _ in call})
        for e, s in call:
            if e in experts and s not in slot_of.values():
                slot_of[e] = s
        for e in experts:
            slot_of.setdefault(e, 8 + e)
        slots = [slot_of[e] for e in experts]
        got, fill = cache.place(0, experts, slots)
        for slot, row in fill:
            content[row] = (slot, next(e for e in experts if slot_of[e] == slot))
        assert len(set(got)) == len(got)
        assert [content[r] for r in got] == list(zip(slots, experts))
        for e in list(slot_of):  # memd moves an expert sometimes: its old slot may go to another
            if (e + len(call)) % 4 == 0:
                del slot_of[e]
