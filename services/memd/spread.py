"""Expert rows spread apart in the pool's slots, for the worker's CPU kernels (``--pool-backend shm``).

The worker's matrix-vector kernels read 16 rows of a weight side by side. Where a row is a multiple of 2 KiB long
(a bfloat16 weight 1024, 2048 or 4096 wide: every hidden size of the families served), the 16 streams fall into
the same sets of the CPU's first-level cache and evict each other's prefetched lines: a ``[5632, 2048]`` expert
product reads at ~20-22 GB/s as stored and ~24-29 spread 64 bytes further apart, on one core (docs/benchmarks.md,
``bench profile``). So memd lays such a parameter's rows ``row_bytes + SPREAD_BYTES`` apart in the slot
(``TensorSpec.row_stride``) and the reader places each row there (``Segment.row_stride``: its pieces go through
the bounce buffer and are copied row by row). The worker views the parameter with that row stride; products and
tokens are unchanged (torch's and the kernels' bits do not depend on the row stride; the exactness tests check).
Quantized parameters (bytes the kernels decode), ``[in, out]`` experts and a GPU pool keep their rows packed.
``place_rows`` also puts rows stored in interleaved pairs (``Segment.interleaved``) in the parameter's order."""
from __future__ import annotations

import math

import msgspec
import numpy as np

from common.expert_index import ALIGN, ExpertIndex, Segment, align_up
from common.messages import TensorSpec

SPREAD_PERIOD, SPREAD_BYTES = 2048, 64  # rows a multiple of this long are laid this much further apart
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def spread_rows(index: ExpertIndex) -> ExpertIndex:
    """``index`` with the rows of its unquantized 2-D (or more) parameters whose rows are a multiple of
    ``SPREAD_PERIOD`` bytes long laid ``SPREAD_BYTES`` further apart; the index itself when none is."""
    spread = {} if index.transposed else {spec.offset: spec for spec in index.tensors if _spreads(spec, index)}
    if not spread:  # ([in, out] experts, GPT-OSS's: the kernels read their columns, which spreading does not help)
        return index
    moves = _moves(index, spread)  # old region start -> new start
    tensors = []
    for spec in index.tensors:
        changes = {"offset": moves[spec.offset]}
        if spec.offset in spread:
            changes["row_stride"] = _row_bytes(spec) + SPREAD_BYTES
        if spec.format:
            changes["scale_offset"] = moves[spec.scale_offset]
        tensors.append(msgspec.structs.replace(spec, **changes))
    experts = [[_segment(seg, spread, moves) for seg in segs] for segs in index.experts]
    grown = sum(_size(spec, True) - _size(spec, False) for spec in spread.values())
    return msgspec.structs.replace(index, tensors=tensors, experts=experts, slot_bytes=index.slot_bytes + grown)


def served_slot_bytes(index: ExpertIndex) -> int:
    """The slot size memd serves ``index`` with in a shared-memory pool (rows spread apart): what a byte budget
    computed for memd must count (``bench``'s memory limits and pool sizes)."""
    return spread_rows(index).slot_bytes


def _row_bytes(spec: TensorSpec) -> int:
    return spec.shape[-1] * ITEMSIZE.get(spec.dtype, 0)


def _spreads(spec: TensorSpec, index: ExpertIndex) -> bool:
    """Unquantized, rows a multiple of the period, and every segment of it whole rows (a checkpoint stores each
    expert's parameter, or each part of it, as whole rows; a layout that does not is left packed)."""
    rows = _row_bytes(spec)
    if spec.format or len(spec.shape) < 2 or not rows or rows % SPREAD_PERIOD:
        return False
    end = spec.offset + _size(spec, False)
    return all((seg.slot_offset - spec.offset) % rows == 0 and seg.nbytes % rows == 0
               for segs in index.experts for seg in segs if spec.offset <= seg.slot_offset < end)


def _size(spec: TensorSpec, spread: bool) -> int:
    """Bytes of the slot the parameter's values take (up to the next region's 4 KiB boundary)."""
    rows = math.prod(spec.shape[:-1])
    return align_up(rows * (_row_bytes(spec) + SPREAD_BYTES) if spread else rows * _row_bytes(spec), ALIGN)


def _moves(index: ExpertIndex, spread: dict[int, TensorSpec]) -> dict[int, int]:
    """Where each region of the slot (a parameter's values, a quantized one's scales) starts once the spread
    ones have grown: every region keeps its order and moves up by the growth of those before it."""
    starts = sorted({spec.offset for spec in index.tensors} | {spec.scale_offset for spec in index.tensors
                                                               if spec.format})
    moves, shift = {}, 0
    for start in starts:
        moves[start] = start + shift
        if start in spread:
            shift += _size(spread[start], True) - _size(spread[start], False)
    return moves


def _segment(seg: Segment, spread: dict[int, TensorSpec], moves: dict[int, int]) -> Segment:
    region = max(start for start in moves if start <= seg.slot_offset)
    if region not in spread:
        return msgspec.structs.replace(seg, slot_offset=seg.slot_offset - region + moves[region])
    rows = _row_bytes(spread[region])
    first = (seg.slot_offset - region) // rows
    stride = rows + SPREAD_BYTES
    return msgspec.structs.replace(seg, slot_offset=moves[region] + first * stride, row_bytes=rows, row_stride=stride)


def place_rows(pool: np.ndarray, data: memoryview, dest: int, rows: tuple[int, int, int, int]) -> None:
    """Copy ``data``, the bytes that the stored rows would hold from pool byte ``dest`` laid one after the other,
    into their rows of the slot (``Segment.rows``): ``rows`` = ``(start, row_bytes, row_stride, half)``, the stored
    rows' first byte, their length, the slot's row stride (``row_bytes`` where they are not spread apart), and for
    rows stored in interleaved pairs half the parameter's rows (stored row ``2 i + s`` is row ``s * half + i``; 0:
    in order). A partial first and last row by themselves, the whole rows between as strided copies (one; for
    interleaved pairs two, the even stored rows and the odd)."""
    start, row_bytes, stride, half = rows
    src = np.frombuffer(data, dtype=np.uint8)
    row, col = divmod(dest - start, row_bytes)
    done = 0
    if col:
        done = min(row_bytes - col, len(src))
        at = start + _row(row, half) * stride + col
        pool[at:at + done] = src[:done]
        row += 1
    whole = (len(src) - done) // row_bytes
    if whole:
        block = src[done:done + whole * row_bytes].reshape(whole, row_bytes)
        for first, part in ([(0, block)] if not half else [(0, block[0::2]), (1, block[1::2])]):
            if len(part):  # stored rows of one parity go to consecutive rows of the parameter
                at = start + _row(row + first, half) * stride
                np.lib.stride_tricks.as_strided(pool[at:], (len(part), row_bytes), (stride, 1))[...] = part
        done += whole * row_bytes
        row += whole
    if done < len(src):
        at = start + _row(row, half) * stride
        pool[at:at + len(src) - done] = src[done:]


def _row(stored: int, half: int) -> int:
    """The parameter's row that stored row ``stored`` is (``place_rows``)."""
    return stored if not half else (stored % 2) * half + stored // 2
