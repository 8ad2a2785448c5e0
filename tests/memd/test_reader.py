"""ExpertReader on a plain file of random bytes with hand-made segments: demand first (an on-demand load
preempts prefetch at piece granularity on every thread), one expert read by several threads at once, O_DIRECT
straight into page-aligned slots where the alignment allows and staged where not, exact bytes, cancellation."""
import ctypes
import mmap
import os
import threading
import time
from concurrent.futures import wait
from types import SimpleNamespace

import pytest

from services.memd.dio import DioAlign, _probe, dio_alignment
from services.memd.read_jobs import ReadCancelled
from services.memd.reader import ExpertReader
from services.memd.store import ALIGN, Segment

FILE_BYTES = 4 << 20
SLOT = 256 * 1024


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "experts.bin"
    payload = os.urandom(FILE_BYTES)
    path.write_bytes(payload)
    return path, payload


def fake_store(path, segments: dict) -> SimpleNamespace:
    return SimpleNamespace(files=[str(path)], segments=segments, prepare=lambda key: None, ready=lambda key: True)


def contiguous(path, keys, nbytes=SLOT) -> dict:
    """Expert k: ``nbytes`` from file offset k * nbytes into slot offset 0 (aligned: straight into the slot)."""
    return {key: [Segment(str(path), i * nbytes, nbytes, 0)] for i, key in enumerate(keys)}


def page_pool(slots: int) -> tuple[mmap.mmap, memoryview]:
    buf = mmap.mmap(-1, slots * SLOT)
    return buf, memoryview(buf)


class GatedReader(ExpertReader):
    """Every piece waits for its own gate before it is read; piece starts are logged (time, demand?, thread)."""

    def __init__(self, *args, **kwargs):
        self.gates: list[threading.Event] = []
        self.log: list[tuple[float, bool, str]] = []
        self.log_lock = threading.Lock()
        self.demand_slots: set = set()
        self.opened = False
        super().__init__(*args, **kwargs)

    def _read(self, piece):
        gate = threading.Event()
        with self.log_lock:
            self.log.append((time.perf_counter(), piece.dest // SLOT in self.demand_slots,
                             threading.current_thread().name))
            self.gates.append(gate)
            if self.opened:
                gate.set()
        gate.wait()
        return super()._read(piece)

    def open(self, upto: int | None = None) -> None:
        """Let the pieces logged so far (or the first ``upto``) go; with no ``upto``, every later one too."""
        with self.log_lock:
            self.opened = self.opened or upto is None
            for gate in self.gates[:upto]:
                gate.set()

    def wait_logged(self, n: int) -> None:
        deadline = time.monotonic() + 10
        while len(self.log) < n and time.monotonic() < deadline:
            time.sleep(0.002)
        assert len(self.log) == n


def test_demand_preempts_prefetch_on_every_thread(data):
    path, payload = data
    threads = 3
    store = fake_store(path, contiguous(path, [(0, e) for e in range(4)]))
    buf, pool = page_pool(4)
    reader = GatedReader(store, pool, SLOT, direct_io=True, threads=threads, chunk=16 * 1024)
    reader.demand_slots = {3}
    try:
        prefetches = [reader.submit((0, e), e, demand=False, priority=1.0 + e) for e in range(3)]
        reader.wait_logged(threads)
        assert not reader.demand_pending()  # every thread holds a prefetch piece
        demand = reader.submit((0, 3), 3, demand=True)
        assert reader.demand_pending()
        reader.open(threads)  # the prefetch pieces in flight end; each thread takes its next piece
        reader.wait_logged(2 * threads)
        reader.open()
        nbytes, seconds = demand.future.result(timeout=30)
        assert not reader.demand_pending()
        wait([p.future for p in prefetches], timeout=30)
    finally:
        reader.close()
    assert nbytes == SLOT and seconds > 0
    assert bytes(pool[3 * SLOT:4 * SLOT]) == payload[3 * SLOT:4 * SLOT]
    after = reader.log[threads:]
    first_demand = next(i for i, (_, d, _) in enumerate(after) if d)
    assert first_demand == 0, "a prefetch piece started while an on-demand piece was waiting"
    demand_pieces = [entry for entry in after if entry[1]]
    assert len(demand_pieces) == SLOT // reader.piece_bytes((0, 3))
    # no prefetch piece starts until the on-demand load has ended
    assert all(t > demand.ended for t, d, _ in after if not d)
    assert all(t < demand.ended for t, d, _ in demand_pieces)
    # one expert's pieces are read by every thread at once
    assert all(d for _, d, _ in after[:threads]) and len({name for _, _, name in after[:threads]}) == threads
    for e, p in enumerate(prefetches):  # the prefetches finished afterwards, with their bytes
        assert p.future.result()[0] == SLOT
        assert bytes(pool[e * SLOT:(e + 1) * SLOT]) == payload[e * SLOT:(e + 1) * SLOT]


def test_prefetches_go_by_priority_and_promotion_jumps_the_queue(data):
    path, _ = data
    store = fake_store(path, contiguous(path, [(0, e) for e in range(3)]))
    buf, pool = page_pool(3)
    reader = GatedReader(store, pool, SLOT, direct_io=True, threads=1, chunk=64 * 1024)
    reader.demand_slots = set()
    try:
        low = reader.submit((0, 0), 0, demand=False, priority=0.1)
        reader.wait_logged(1)
        mid = reader.submit((0, 1), 1, demand=False, priority=0.5)
        high = reader.submit((0, 2), 2, demand=False, priority=0.9)
        reader.promote(low)  # an acquire waits for it now
        order = []
        for job in (low, mid, high):
            job.future.add_done_callback(lambda f, job=job: order.append(job.key))
        reader.open()
        wait([low.future, mid.future, high.future], timeout=30)
    finally:
        reader.close()
    assert order == [(0, 0), (0, 2), (0, 1)]


def test_cancel_stops_a_prefetch_and_reports_it(data):
    path, _ = data
    store = fake_store(path, contiguous(path, [(0, 0)]))
    buf, pool = page_pool(1)
    reader = GatedReader(store, pool, SLOT, direct_io=True, threads=2, chunk=16 * 1024)
    reader.demand_slots = set()
    try:
        job = reader.submit((0, 0), 0, demand=False)
        reader.wait_logged(2)
        reader.cancel(job)
        reader.open()
        with pytest.raises(ReadCancelled) as cancelled:
            job.future.result(timeout=30)
    finally:
        reader.close()
    assert len(reader.log) == 2 and job.nbytes == 2 * 16 * 1024  # only the pieces in flight were read
    assert cancelled.value.nbytes == job.nbytes  # (memd counts them: the disk read them)


def test_a_queued_prefetch_cancelled_twice_is_cancelled_once(data):
    """memd may cancel a prefetch twice (its layer passed, then an on-demand load steals its slot): the second
    cancel is a no-op, not an error in the acquire that made it."""
    path, _ = data
    store = fake_store(path, contiguous(path, [(0, 0), (0, 1)]))
    buf, pool = page_pool(2)
    reader = GatedReader(store, pool, SLOT, direct_io=True, threads=1, chunk=16 * 1024)
    try:
        first = reader.submit((0, 0), 0, demand=False, priority=0.9)
        reader.wait_logged(1)  # the only thread holds a piece of the first: the second stays queued
        queued = reader.submit((0, 1), 1, demand=False, priority=0.1)
        reader.cancel(queued)
        reader.cancel(queued)
        with pytest.raises(ReadCancelled):
            queued.future.result(timeout=10)
        assert reader.queued() == 1 and queued.nbytes == 0
        reader.open()
        assert first.future.result(timeout=30)[0] == SLOT
    finally:
        reader.open()
        reader.close()


def test_dio_alignment_from_statx_agrees_with_probing(data):
    path, _ = data
    align = dio_alignment(path)
    if align is None:
        pytest.skip("O_DIRECT is refused on this file system")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        probed = _probe(fd)
    finally:
        os.close(fd)
    assert (probed.mem, probed.offset) == (align.mem, align.offset)
    assert align.offset in (512, 1024, 2048, 4096) and align.mem <= align.offset


def odd_segments(path) -> dict:
    """Segments at every kind of offset: slot offset congruent to the file offset modulo 512 (the memory alignment
    behind virtio; straight into the slot), off by 8 bytes (staged where the memory alignment is 512), inside one
    block, and ending at the end of the file."""
    s = str(path)
    return {
        (0, 0): [Segment(s, 1576, 100_000, 1576 % 512), Segment(s, 300_000, 50_000, 102_400 + 300_000 % 512)],
        (0, 1): [Segment(s, 1_000_008, 120_000, 0)],
        (0, 2): [Segment(s, 2_000_100, 200, 4096)],
        (0, 3): [Segment(s, FILE_BYTES - 70_024, 70_024, 4096 + (FILE_BYTES - 70_024) % 512)],
    }


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "buffered"])
def test_bytes_land_in_the_slot_straight_or_staged(data, direct_io):
    path, payload = data
    align = dio_alignment(path)
    segments = odd_segments(path)
    buf, pool = page_pool(len(segments))
    reader = ExpertReader(fake_store(path, segments), pool, SLOT, direct_io=direct_io, threads=3, chunk=32 * 1024)
    try:
        for slot, key in enumerate(segments):
            nbytes, _ = reader.read(key, slot)
            assert nbytes == sum(seg.nbytes for seg in segments[key])  # exactly the expert's bytes
    finally:
        reader.close()
    for slot, key in enumerate(segments):
        for seg in segments[key]:
            got = bytes(pool[slot * SLOT + seg.slot_offset:][:seg.nbytes])
            assert got == payload[seg.file_offset:seg.file_offset + seg.nbytes], f"{key} {seg}"
    stats = reader.stats
    if not reader.direct_io:
        assert stats.bounce_bytes == 0 and stats.direct_bytes == sum(s.nbytes for v in segments.values() for s in v)
        return
    a, mem = max(align.offset, mmap.PAGESIZE), align.mem  # pieces start on whole pages
    straight = [seg for slot, key in enumerate(segments) for seg in segments[key]
                if _middle(seg, a) > 0 and (slot * SLOT + seg.slot_offset - seg.file_offset) % mem == 0]
    staged = [seg for v in segments.values() for seg in v if _middle(seg, a) > 0 and seg not in straight]
    assert len(straight) >= 3 and stats.staged_segments == len(staged) and stats.segments == 5
    middles = sum(_middle(seg, a) for seg in straight)
    assert stats.direct_bytes == middles
    assert stats.bounce_bytes == sum(s.nbytes for v in segments.values() for s in v) - middles


def _middle(seg: Segment, a: int) -> int:
    first = -(-seg.file_offset // a) * a
    end = seg.file_offset + seg.nbytes
    return end - end % a - first


def test_plan_with_fine_memory_alignment(data):
    """Where the kernel needs only 4-byte buffer alignment (NVMe, Linux >= 6.0), a segment whose file offset and
    slot offset differ modulo 512 is still read straight into its slot, except for its head and tail blocks."""
    path, _ = data
    segments = odd_segments(path)
    buf, pool = page_pool(len(segments))
    reader = ExpertReader(fake_store(path, segments), pool, SLOT, direct_io=False, threads=2, chunk=32 * 1024)
    try:
        reader.direct_io, reader.align = True, DioAlign(4, 512, "test")
        pieces = reader.plan((0, 1), 1)
    finally:
        reader.close()
    seg = segments[(0, 1)][0]
    assert [p.bounce for p in pieces] == [True] + [False] * (len(pieces) - 2) + [True]
    assert sum(p.keep for p in pieces) == seg.nbytes and reader.stats.staged_segments == 0
    assert all(p.file_offset % 4096 == 0 and p.length % 4096 == 0 for p in pieces)  # whole pages
    assert pieces[1].dest == SLOT + (-seg.file_offset) % 4096 and pieces[1].length == reader.piece_bytes((0, 1))


def test_pieces_spread_one_expert_over_the_threads(data):
    path, _ = data
    store = fake_store(path, contiguous(path, [(0, 0)], nbytes=1 << 20))
    buf, pool = page_pool(4)
    reader = ExpertReader(store, pool, 1 << 20, direct_io=True, threads=4, chunk=1 << 20)
    try:
        assert reader.piece_bytes((0, 0)) == 256 * 1024 and len(reader.plan((0, 0), 0)) == 4
        assert reader.read((0, 0), 0)[0] == 1 << 20
        assert reader.bandwidth > 0
    finally:
        reader.close()


def test_a_job_whose_waiter_gave_up_ends_quietly(tmp_path):
    """An asyncio waiter cancelled at shutdown cancels the future it wraps; the reader must not crash on it when the
    job ends (or when close() cancels it): memd's exit raised InvalidStateError under SIGTERM with reads queued."""
    import concurrent.futures

    from services.memd.read_jobs import settle

    for outcome in ({"exc": RuntimeError("x")}, {"result": (1, 0.1)}):
        future = concurrent.futures.Future()
        assert future.cancel()
        settle(future, **outcome)  # no InvalidStateError
        assert future.cancelled()
    future = concurrent.futures.Future()
    settle(future, result=(4, 0.5))
    assert future.result() == (4, 0.5)


def test_copies_run_outside_the_reads_in_flight(data, monkeypatch):
    """Exactly ``threads`` reads reach the disk at once (the probe's and fio's depth), never more; a staged piece
    is copied out of its bounce buffer after its read permit is released, so copies overlap ``threads`` reads."""
    path, payload = data
    if dio_alignment(path) is None:
        pytest.skip("O_DIRECT is refused here: no piece is staged")
    threads, keys = 3, [(0, e) for e in range(6)]
    segments = {key: [Segment(str(path), i * SLOT + 1000, SLOT - 4096, 100)] for i, key in enumerate(keys)}
    buf, pool = page_pool(len(keys))
    reader = ExpertReader(fake_store(path, segments), pool, SLOT, direct_io=True, threads=threads, chunk=32 * 1024)
    reader.align = DioAlign(mmap.PAGESIZE, 512, "test")  # staged on any disk: slot and file offset never congruent
    lock, state = threading.Lock(), {"reads": 0, "most": 0, "overlapped": 0}
    preadv, memmove = os.preadv, ctypes.memmove

    def slow_preadv(*args):
        with lock:
            state["reads"] += 1
            state["most"] = max(state["most"], state["reads"])
        try:
            time.sleep(0.003)
            return preadv(*args)
        finally:
            with lock:
                state["reads"] -= 1

    def slow_memmove(*args):
        time.sleep(0.002)
        with lock:
            state["overlapped"] += state["reads"] == threads
        return memmove(*args)

    monkeypatch.setattr(os, "preadv", slow_preadv)
    monkeypatch.setattr(ctypes, "memmove", slow_memmove)
    try:
        jobs = [reader.submit(key, slot, demand=True) for slot, key in enumerate(keys)]
        assert [job.future.result(timeout=30)[0] for job in jobs] == [SLOT - 4096] * len(keys)
    finally:
        reader.close()
    assert reader.stats.staged_segments == len(keys)
    assert state["most"] == threads and state["overlapped"] > 0
    for slot, key in enumerate(keys):
        seg = segments[key][0]
        assert bytes(pool[slot * SLOT + 100:][:seg.nbytes]) == payload[seg.file_offset:seg.file_offset + seg.nbytes]


def test_a_submit_wakes_as_many_threads_as_the_job_has_pieces(data, monkeypatch):
    """Each woken reader thread takes the GIL to look at the queue: an expert of one piece wakes one thread, not
    every idle one (on 2 cores that herd cost memd's loop ~0.1 ms per load)."""
    path, _ = data
    store = fake_store(path, contiguous(path, [(0, 0), (0, 1)]))
    buf, pool = page_pool(2)
    reader = ExpertReader(store, pool, SLOT, direct_io=True, threads=4, chunk=SLOT)
    time.sleep(0.05)  # the threads are waiting
    woken = []
    notify = reader._cv.notify
    monkeypatch.setattr(reader._cv, "notify", lambda n=1: (woken.append(n), notify(n)))
    monkeypatch.setattr(reader._cv, "notify_all", lambda: pytest.fail("every waiting thread woken"))
    try:
        spread = len(reader.plan((0, 0), 0))
        assert reader.read((0, 0), 0)[0] == SLOT
        reader.piece_bytes = lambda key: SLOT  # the next one in one piece
        assert reader.read((0, 1), 1)[0] == SLOT
    finally:
        monkeypatch.undo()
        reader.close()
    assert spread == 4 and woken == [4, 1]
