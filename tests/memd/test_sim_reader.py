"""services/memd/sim_reader.py: the simulated reader's rules, and a job cancelled by another job's end."""
import pytest

from services.memd.sim_reader import SimReader

MIB = 1 << 20


def reader(**kw):
    ended = []
    r = SimReader(100 * MIB, MIB, done=lambda k: ended.append(("done", k)),
                  cancelled=lambda k: ended.append(("cancelled", k)), **kw)
    return r, ended


def test_threads_share_the_bandwidth_and_demand_goes_first():
    r, ended = reader(threads=1, chunk=MIB // 2)
    r.submit((0, 1), demand=False, priority=0.9)
    r.submit((0, 2), demand=True)  # queued behind the prefetch's first chunk only
    r.advance(None)
    assert ended == [("done", (0, 2))] and r.now == pytest.approx(0.015)  # 1.5 chunks of 5 ms
    r.advance(None)
    assert ended[-1] == ("done", (0, 1)) and r.now == pytest.approx(0.02)


def test_a_job_that_an_earlier_end_cancels_in_the_same_instant_is_not_ended_twice():
    """Two chunks end at once; the first end's callback cancels the second job (as memd steals a prefetch's slot
    for an on-demand load). The second is gone: the reader must not end it again (it raised KeyError)."""
    ended = []
    r = SimReader(100 * MIB, MIB, threads=2, chunk=MIB,
                  done=lambda k: (ended.append(("done", k)), r.cancel((0, 2)) if k == (0, 1) else None),
                  cancelled=lambda k: ended.append(("cancelled", k)))
    r.submit((0, 1), demand=True)
    r.submit((0, 2), demand=False, priority=0.5)
    r.advance(None)  # both 1 MiB jobs finish at the same instant
    assert ended[0] == ("done", (0, 1)) and len(ended) == 2 and (0, 2) not in r.jobs


@pytest.mark.timeout(10)
def test_a_chunk_end_below_the_clocks_resolution_still_ends():
    """Late in a long run a few bytes of a chunk take less than one ulp of the clock: the chunk must end anyway
    (the reader used to spin forever, its clock never moving)."""
    r, ended = reader(threads=1, chunk=MIB)
    r.now = 1e6  # ulp(1e6 s) x 100 MiB/s is ~0.012 bytes
    r.submit((0, 1), demand=True)
    r.jobs[(0, 1)].chunk_left = 0.001  # above the 1e-6 "ended" cut, below what one tick of the clock reads
    r.jobs[(0, 1)].remaining = 0.0
    r.advance(None)
    assert ended == [("done", (0, 1))]


def test_a_job_handed_its_next_chunk_by_an_earlier_end_reads_that_chunk():
    """Two chunks end at once; the first job's end starts another load, which hands the second job its next chunk
    before the reader reaches it: that chunk must still be read (it used to be dropped, ending the job early)."""
    when = {}
    r = SimReader(100 * MIB, MIB, threads=2, chunk=MIB // 2,
                  done=lambda k: (when.setdefault(k, r.now), r.submit((0, 3), demand=True) if k == (0, 1) else None),
                  cancelled=lambda k: None)
    r.submit((0, 1), demand=True)
    r.submit((0, 2), demand=True)
    r.jobs[(0, 1)].remaining = 0.0  # (0, 1) has one chunk, (0, 2) two
    while r.jobs:
        r.advance(None)
    assert when[(0, 1)] == pytest.approx(0.01)  # half a MiB each at 50 MiB/s
    assert when[(0, 2)] == pytest.approx(0.02), "its second chunk was never read"
