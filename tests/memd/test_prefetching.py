"""services/memd/prefetching.py: planning waits for demand reads, acquires being answered and received requests,
and comes back when they end."""
import asyncio
import concurrent.futures
from types import SimpleNamespace

from services.memd.core import PrefetchPlan
from services.memd.loads import Loads
from services.memd.prefetching import Prefetcher
from services.memd.read_jobs import ReadCancelled


class StubCore:
    """Records each plan's ``demand_busy``; reads end as the test says."""

    def __init__(self):
        self.busy_at_plan: list[bool] = []
        self.table = SimpleNamespace(pins={})
        self.done: list = []

    def plan_prefetch(self, worker, layer, bandwidth, *, demand_busy: bool) -> PrefetchPlan:
        self.busy_at_plan.append(demand_busy)
        return PrefetchPlan()

    def load_done(self, key, nbytes, seconds):
        self.done.append(key)

    def partial_read(self, key, nbytes):
        self.partial = getattr(self, "partial", 0) + nbytes

    def load_cancelled(self, key):
        self.cancelled = key


class StubReader:
    def __init__(self):
        self.jobs = []

    def submit(self, key, slot, *, demand, priority=0.0):
        job = SimpleNamespace(key=key, future=concurrent.futures.Future())
        self.jobs.append(job)
        return job


async def settle(turns: int = 5) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_a_worker_planned_during_demand_reads_is_planned_again_once_they_end():
    core, reader = StubCore(), StubReader()
    loads = Loads(core, reader)
    prefetcher = Prefetcher(core, loads, lambda: None)
    first, second = loads.start((0, 1), 0, demand=True), loads.start((0, 2), 1, demand=True)
    assert not loads.demand_idle.is_set()
    prefetcher.plan("worker")
    assert core.busy_at_plan == [True], "planned while demand reads run: cancel and protect only"
    reader.jobs[0].future.set_result((100, 0.01))
    await first
    await settle()
    assert core.busy_at_plan == [True], "one demand read still runs: no plan yet"
    reader.jobs[1].future.set_result((100, 0.01))
    await second
    await settle()
    assert core.busy_at_plan == [True, False], "the last demand read ended: planned again, now free to prefetch"
    assert loads.demand_idle.is_set() and core.done == [(0, 1), (0, 2)]


async def test_planning_without_demand_reads_waits_for_nothing():
    core, reader = StubCore(), StubReader()
    loads = Loads(core, reader)
    prefetcher = Prefetcher(core, loads, lambda: None)
    prefetcher.plan("worker")
    await settle()
    assert core.busy_at_plan == [False] and prefetcher.after_demand is None


async def test_nothing_is_planned_while_an_acquire_waits_for_its_loads_or_its_reply():
    core, reader = StubCore(), StubReader()
    prefetcher = Prefetcher(core, Loads(core, reader), lambda: None)
    prefetcher.hold()  # an acquire waits for its loads
    prefetcher.wake("worker")  # a layer note meanwhile
    prefetcher.wake("other")
    await settle()
    assert core.busy_at_plan == [], "a plan would run between the demand read's end and the reply"
    prefetcher.let_go()  # answered
    await settle()
    assert core.busy_at_plan == [False, False], "both workers are planned once the acquire is answered"


async def test_a_received_request_is_handled_before_the_plan():
    core, reader = StubCore(), StubReader()
    waiting = [True]
    prefetcher = Prefetcher(core, Loads(core, reader), lambda: None, rpc_waiting=lambda: waiting[0])
    prefetcher.wake("worker")
    await settle(3)
    assert core.busy_at_plan == [], "an RPC frame is waiting: it goes first"
    waiting[0] = False
    await settle(3)
    assert core.busy_at_plan == [False]


async def test_a_plan_waits_for_received_requests_a_bounded_number_of_turns():
    from services.memd.prefetching import RPC_TURNS

    core, reader = StubCore(), StubReader()
    prefetcher = Prefetcher(core, Loads(core, reader), lambda: None, rpc_waiting=lambda: True)
    prefetcher.wake("worker")
    await settle(RPC_TURNS + 2)
    assert core.busy_at_plan == [False], "a frame nobody reads must not stop planning for good"


async def test_busy_time_counts_wall_time_with_some_load_in_flight_once():
    """Two overlapping loads count their union, not their sum; idle time between loads is not counted."""
    core, reader = StubCore(), StubReader()
    loads = Loads(core, reader)
    assert loads.busy_seconds() == 0.0
    first, second = loads.start((0, 1), 0, demand=True), loads.start((0, 2), 1, demand=False)
    await asyncio.sleep(0.05)
    reader.jobs[0].future.set_result((100, 0.05))
    await first
    await asyncio.sleep(0.05)
    reader.jobs[1].future.set_result((100, 0.1))
    await second
    busy = loads.busy_seconds()
    assert 0.1 <= busy < 0.15  # the union: 0.1 s, not 0.05 + 0.1
    await asyncio.sleep(0.05)  # nothing loading
    assert loads.busy_seconds() == busy
    third = loads.start((1, 0), 2, demand=True)
    await asyncio.sleep(0.02)
    assert loads.busy_seconds() >= busy + 0.02  # a load in flight counts while it runs
    reader.jobs[2].future.set_result((100, 0.02))
    await third


async def test_a_prefetch_that_cannot_start_gives_back_its_slot_and_the_rest_still_start():
    """The plan reserved a slot for each prefetch; one whose read cannot be submitted (a closed reader, a bad slot)
    must not leave its slot loading with no read behind it, nor stop the plan's other prefetches."""
    class Planned(StubCore):
        def __init__(self):
            super().__init__()
            self.failed = []

        def plan_prefetch(self, worker, layer, bandwidth, *, demand_busy: bool) -> PrefetchPlan:
            plan = PrefetchPlan()
            plan.start = [((1, 0), 0, 0.9), ((1, 1), 1, 0.8)]
            return plan

        def load_failed(self, key):
            self.failed.append(key)

    class Refusing(StubReader):
        def submit(self, key, slot, *, demand, priority=0.0):
            if key == (1, 0):
                raise RuntimeError("the reader is closed")
            return super().submit(key, slot, demand=demand, priority=priority)

    core, reader = Planned(), Refusing()
    loads = Loads(core, reader)
    Prefetcher(core, loads, lambda: None).plan("worker")
    assert core.failed == [(1, 0)] and (1, 0) not in loads.jobs and (1, 0) not in loads.tasks
    assert [job.key for job in reader.jobs] == [(1, 1)] and (1, 1) in loads.tasks
    reader.jobs[0].future.set_result((100, 0.01))
    await loads.tasks[(1, 1)]


async def test_a_cancelled_prefetch_counts_the_bytes_it_read():
    """The disk read them: bytes read per token must not leave them out (on-demand LRU never cancels)."""
    core, reader = StubCore(), StubReader()
    loads = Loads(core, reader)
    task = loads.start((0, 1), 0, demand=False)
    reader.jobs[0].future.set_exception(ReadCancelled(3 << 20))
    await task
    assert core.partial == 3 << 20 and core.cancelled == (0, 1)
