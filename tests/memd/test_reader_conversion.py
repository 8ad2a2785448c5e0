"""ExpertReader and a store that converts experts on their first read (the compressed cache, ``store.prepare``):
a failed conversion fails its load alone, a prefetch never converts (dropped, 0 bytes; a demand read converts), and
a dropped prefetch is never revived by a promote."""
import threading
from types import SimpleNamespace

import pytest

from services.memd.read_jobs import ReadCancelled
from services.memd.reader import ExpertReader

from test_reader import SLOT, contiguous, data, page_pool  # noqa: F401 (data: the fixture)


def test_experts_whose_preparation_fails_fail_alone_and_leave_the_readers_their_permits(data):
    """A compressed cache converts an expert on its first read (``store.prepare``); a conversion that fails (a full
    cache disk) fails that load, and more failures than reader threads must not use up the read permits: a healthy
    expert still loads, and the reader closes."""
    path, payload = data
    keys = [(0, e) for e in range(6)]
    segments = contiguous(path, keys)

    def prepare(key):
        if key[1] < 5:
            raise OSError(28, "No space left on device")

    store = SimpleNamespace(files=[str(path)], segments=segments, prepare=prepare, ready=lambda key: True)
    buf, pool = page_pool(len(keys))
    reader = ExpertReader(store, pool, SLOT, direct_io=False, threads=2, chunk=SLOT)
    try:
        for slot, key in enumerate(keys[:5]):
            with pytest.raises(OSError, match="No space left"):
                reader.read(key, slot)
        job = reader.submit(keys[5], 5, demand=True)
        assert job.future.result(timeout=10)[0] == SLOT
        assert bytes(pool[5 * SLOT:6 * SLOT]) == payload[5 * SLOT:6 * SLOT]
    finally:
        closer = threading.Thread(target=reader.close)
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), "the reader did not close"


def test_a_prefetch_never_converts_an_expert_on_a_reader_thread(data):
    """A compressed cache converts an expert at its first read (seconds each, one at a time): a prefetch of an
    expert not converted yet is dropped (cancelled, 0 bytes) instead of holding a reader thread, and the demand
    reads behind it; a demand read converts it."""
    path, payload = data
    keys = [(0, 0), (0, 1)]
    converted: list = []
    store = SimpleNamespace(files=[str(path)], segments=contiguous(path, keys), prepare=converted.append,
                            ready=lambda key: key in converted)
    buf, pool = page_pool(2)
    reader = ExpertReader(store, pool, SLOT, direct_io=False, threads=1, chunk=SLOT)
    try:
        prefetch = reader.submit(keys[0], 0, demand=False)
        with pytest.raises(ReadCancelled) as cancelled:
            prefetch.future.result(timeout=10)
        assert cancelled.value.nbytes == 0 and converted == []
        assert reader.read(keys[0], 0)[0] == SLOT and converted == [keys[0]]
        assert bytes(pool[:SLOT]) == payload[:SLOT]
        again = reader.submit(keys[0], 1, demand=False)  # converted now: a prefetch reads it
        assert again.future.result(timeout=10)[0] == SLOT
    finally:
        reader.close()


def test_a_dropped_prefetch_is_not_revived_by_a_promote_that_comes_before_its_end(data):
    """Between a reader thread dropping an unconverted prefetch's piece and its ``_finish``, an acquire promotes the
    job: it must still end cancelled (memd reads the pinned key again), not as a success missing that piece."""
    path, payload = data
    keys = [(0, 0)]
    store = SimpleNamespace(files=[str(path)], segments=contiguous(path, keys), prepare=lambda key: None,
                            ready=lambda key: False)
    buf, pool = page_pool(1)
    reader = ExpertReader(store, pool, SLOT, direct_io=False, threads=2, chunk=SLOT // 4)
    finish, promoted = reader._finish, []

    def promote_first(job, piece, n, error):
        if not promoted:
            promoted.append(job)
            reader.promote(job)
        finish(job, piece, n, error)

    reader._finish = promote_first
    try:
        job = reader.submit(keys[0], 0, demand=False)
        with pytest.raises(ReadCancelled):
            job.future.result(timeout=10)
        assert promoted == [job]
    finally:
        reader.close()
