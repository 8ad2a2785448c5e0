"""The host tier's and the reader's locks (``services/memd/tiers.py``, ``reader.py``): a prefetch cancelled while a
finishing copy places a job waiting for a host slot does not deadlock memd's event loop."""
import mmap
import os
import threading

import services.memd.reader as reader_mod
from services.memd.read_jobs import ReadCancelled
from services.memd.reader import ExpertReader
from services.memd.standin import StandInPool, StandInStream
from services.memd.tiers import TieredReader
from tier_helpers import contiguous, fake_store


def test_cancelling_a_prefetch_while_a_copy_frees_a_host_slot_does_not_deadlock(tmp_path, monkeypatch):
    """Two locks, two orders: cancelling a queued prefetch settled its future under the reader's lock, and the tier's
    callback then takes the tier's lock; a copy that frees a host slot places a waiting job, under the tier's lock,
    by submitting to the reader (its lock). The cancel now settles outside the reader's lock. The threads are only
    timed (hooks that wait, holding nothing) so that each reaches its second lock while the other holds its first."""
    slot = 64 * 1024
    keys = [(0, e) for e in range(4)]
    path = tmp_path / "f"
    path.write_bytes(os.urandom(len(keys) * slot))
    gate, gated = threading.Event(), threading.Event()

    class Gated(ExpertReader):
        def _read(self, piece):
            if piece.dest // slot == 3:
                gated.set()
                gate.wait()
            return super()._read(piece)

    buf = mmap.mmap(-1, 4 * slot)
    reader = Gated(fake_store(path, contiguous(path, keys, slot)), memoryview(buf), slot, False, threads=1)
    tiers = TieredReader(reader, TieredReader.host_table(2, 1, 4), memoryview(buf),
                         StandInPool(4 * slot, slot, 2, StandInStream(auto=True), 0), slot)
    tiers.submit((0, 0), 0, demand=True).future.result(10)  # expert 0 resident in the host tier
    reader.submit((0, 3), 3, demand=True)
    assert gated.wait(5)  # a demand read in progress: prefetch reads stay queued
    prefetch = tiers.submit((0, 1), 1, demand=False)  # its host read queued, no piece in flight
    assert tiers.hold_host((0, 0), 0) is not None  # expert 0 pinned, as a copy pins it
    waiting = tiers.submit((0, 2), 2, demand=True)  # the host tier is full: it waits for a host slot
    assert waiting in tiers.waiting and prefetch.inner.inflight == 0
    cancelling, placing = threading.Event(), threading.Event()
    real_settle, real_submit = reader_mod.settle, reader.submit

    def slow_settle(fut, exc=None, result=None):
        if isinstance(exc, ReadCancelled):
            cancelling.set()
            placing.wait(2)
        return real_settle(fut, exc, result)

    def noted_submit(*args, **kwargs):
        placing.set()  # (TieredReader._place calls it under the tier's lock)
        return real_submit(*args, **kwargs)

    monkeypatch.setattr(reader_mod, "settle", slow_settle)
    monkeypatch.setattr(reader, "submit", noted_submit)
    loop = threading.Thread(target=tiers.cancel, args=(prefetch,), daemon=True)
    copy = threading.Thread(target=lambda: cancelling.wait(5) and tiers.drop_host((0, 0)), daemon=True)
    loop.start(), copy.start()
    loop.join(10), copy.join(10)
    assert not loop.is_alive() and not copy.is_alive(), "deadlock: cancel and a freed host slot's placement"
    gate.set()
    tiers.close()
