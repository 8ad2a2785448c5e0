"""Rows spread apart in the slots (services/memd/spread.py): which parameters, where everything moves, and the
reader placing every row where the worker's views look for it, bit for bit the checkpoint's."""
import math

import numpy as np
import pytest
import torch
from helpers import write_family

from common.checkpoint import Checkpoint
from common.expert_index import ALIGN
from services.memd.reader import ExpertReader
from services.memd.spread import place_rows
from services.memd.spread import SPREAD_BYTES, spread_rows
from services.memd.store import ExpertStore
from services.worker.pool_views import slot_params


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Mixtral with 2 KiB rows in its gate/up experts (hidden 1024, bfloat16) and 256-byte ones in down."""
    return write_family("mixtral", tmp_path_factory.mktemp("wide") / "m", dtype="bfloat16", hidden_size=1024,
                        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def read_all(index, direct_io: bool) -> tuple[torch.Tensor, dict]:
    keys = [(layer, e) for layer in range(index.num_layers) for e in range(index.num_experts)]
    pool = bytearray(len(keys) * index.slot_bytes)
    reader = ExpertReader(index, memoryview(pool), index.slot_bytes, direct_io=direct_io)
    try:
        for slot, key in enumerate(keys):
            assert reader.read(key, slot)[0] == index.expert_bytes
    finally:
        reader.close()
    return (torch.frombuffer(pool, dtype=torch.uint8).view(len(keys), index.slot_bytes),
            dict(zip(keys, range(len(keys)))))


def test_only_rows_a_multiple_of_2_kib_long_are_spread_and_the_rest_moves_up(wide):
    packed = ExpertStore(Checkpoint(wide)).index()
    spread = spread_rows(packed)
    before, after = {s.name: s for s in packed.tensors}, {s.name: s for s in spread.tensors}
    assert before["gate_up_proj"].shape == [256, 1024] and before["down_proj"].shape == [1024, 128]
    assert after["gate_up_proj"].row_stride == 2048 + SPREAD_BYTES and after["down_proj"].row_stride == 0
    assert all(s.offset % ALIGN == 0 for s in spread.tensors) and spread.slot_bytes % ALIGN == 0
    grown = math.ceil(256 * (2048 + SPREAD_BYTES) / ALIGN) * ALIGN - 256 * 2048
    assert spread.slot_bytes == packed.slot_bytes + grown and spread.expert_bytes == packed.expert_bytes
    assert after["down_proj"].offset == before["down_proj"].offset + grown
    for old, new in zip(packed.experts, spread.experts):  # w1 and w3 (half of gate_up each), then w2
        assert [s.nbytes for s in old] == [s.nbytes for s in new]
        moved = {(s.row_bytes, s.row_stride) for s in new if s.slot_offset < after["down_proj"].offset}
        assert moved == {(2048, 2048 + SPREAD_BYTES)}


def test_nothing_is_spread_where_no_row_is_2_kib_long(mixtral):
    packed = ExpertStore(Checkpoint(mixtral)).index()
    assert spread_rows(packed) is packed


@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct"])
def test_the_reader_places_spread_rows_where_the_worker_views_them(wide, direct_io):
    packed = ExpertStore(Checkpoint(wide)).index()
    spread = spread_rows(packed)
    want_pool, slots = read_all(packed, direct_io)
    got_pool, _ = read_all(spread, direct_io)
    want, got = slot_params(want_pool, packed.tensors), slot_params(got_pool, spread.tensors)
    assert got["gate_up_proj"].stride(-2) == 1024 + SPREAD_BYTES // 2
    for name in want:
        assert got[name].shape == want[name].shape and torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("start,length", [(0, 4 * 96), (5, 96), (40, 7), (95, 200), (96, 96 * 3 + 1)])
def test_place_rows_copies_any_piece_of_packed_rows(start, length):
    """A piece that starts and ends anywhere in a row (a bounce buffer's worth cuts rows anywhere)."""
    rows, row_bytes, stride, base = 8, 96, 160, 320
    packed = np.random.default_rng(0).integers(0, 256, rows * row_bytes, dtype=np.uint8)
    pool = np.zeros(base + rows * stride, dtype=np.uint8)
    place_rows(pool, memoryview(packed[start:start + length]), base + start, (base, row_bytes, stride, 0))
    want = np.zeros_like(pool)
    for i in range(start, start + length):
        row, col = divmod(i, row_bytes)
        want[base + row * stride + col] = packed[i]
    assert np.array_equal(pool, want)


def test_bench_budgets_count_the_slots_memd_serves(wide):
    """Byte budgets the benchmarks hand memd (one layer's experts, a share of the pool) count spread slots: with
    packed ones, a one-layer budget would be refused as too small for one layer."""
    from services.bench.budget import model_bytes
    from services.memd.spread import served_slot_bytes

    packed = ExpertStore(Checkpoint(wide)).index()
    assert model_bytes(wide).slot_bytes == served_slot_bytes(packed) == spread_rows(packed).slot_bytes
    assert served_slot_bytes(packed) > packed.slot_bytes


def test_a_bench_share_counts_the_slots_memd_holds(wide):
    """bench e2e's cgroup budget for ``--expert-memory 25%`` counts as many slots as memd then holds (a share of the
    packed bytes counted one fewer where slots are spread)."""
    from types import SimpleNamespace

    from services.bench.budget import derive, model_bytes
    from services.memd.main import plan_pool

    store = spread_rows(ExpertStore(Checkpoint(wide)).index())
    for share in ("25%", "37.5%", "50%", "100%"):
        memd = plan_pool(SimpleNamespace(expert_memory=share), store)  # (plan_pool reads only --expert-memory)
        assert derive(model_bytes(wide), share, "1GiB").slots == memd, share
