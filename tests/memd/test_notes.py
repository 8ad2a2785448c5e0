"""LAYER_NOTE handling in the core: every layer (leased or not) advances the predictor and the policy, stale
prefetches are cancelled when the step moves on with no acquire at all, guesses k layers ahead are fused and
scored by distance, and no prefetch is planned while on-demand reads are queued."""
from common import messages as m
from services.memd.core import ExpertCache, CacheSettings
from services.memd.policy import LruPolicy
from services.memd.stats import stats_fields

E, L, MB = 8, 4, 1 << 20


class CountingLru(LruPolicy):
    def __init__(self):
        super().__init__()
        self.layers, self.steps = [], 0

    def on_layer(self, layer: int) -> None:
        self.layers.append(layer)

    def on_step(self) -> None:
        self.steps += 1


def core_with(slots=8, **knobs) -> ExpertCache:
    core = ExpertCache(slots, L, E, top_k=2, expert_bytes=MB, knobs=CacheSettings(policy="lru", **knobs))
    core.table.set_policy(CountingLru())
    core.request_start("r")
    return core


def note(step, layer, experts, guesses=(), worker=7):
    gl, ge = [g[0] for g in guesses], [g[1] for g in guesses]
    return m.LayerNoteEvent(worker, step, layer, experts, ["r"], [1] * len(experts), [False], gl, ge,
                            [0.9] * len(guesses))


def test_every_noted_layer_advances_predictor_and_policy():
    core = core_with()
    for step in (1, 2):
        for layer in range(L):
            assert core.note(note(step, layer, [0, 1]), now=step + layer / 10)
    assert core.table.policy.layers == [0, 1, 2, 3] * 2 and core.table.policy.steps == 2
    state = core.predictor.workers[7]
    assert (state.step, state.layer, state.routed) == (2, 3, [0, 1])
    assert core.predictor.layer_seconds is not None
    assert core.metrics.layers_fed == 8 and core.metrics.acquires == 0  # no acquire was needed
    assert not core.note(note(2, 3, [0, 1]), now=3.0)  # the same layer again: ignored
    assert core.metrics.notes_dropped == 1 and core.table.policy.layers[-1] == 3 and len(core.table.policy.layers) == 8


def test_a_noted_layer_is_not_fed_again_by_its_acquire():
    core = core_with()
    core.note(note(1, 0, [0, 1]), now=0.0)
    req = m.AcquireRequest(0, [0, 1], ["r"], [[1, 1]], 1, [False])
    for key in [(0, 0), (0, 1)]:
        core.table.pin(key)
    plan = core.acquire(7, req, now=0.01)
    assert not plan.fed and core.metrics.layers_fed == 1 and len(plan.loads) == 2


def test_malformed_notes_are_ignored():
    core = core_with()
    bad = [m.LayerNoteEvent(7, 1, L, [0]), m.LayerNoteEvent(7, 1, 0, [0, 1], ["r"], [1]),
           m.LayerNoteEvent(7, 1, 0, [0], ["r"], [1], [False], [1], [0], []),
           m.LayerNoteEvent(7, 1, 0, [0], ["r"], [1], [False], [1], [E], [0.5])]
    assert not any(core.note(ev, now=0.0) for ev in bad)
    assert core.bad_traces == 4 and 7 not in core.predictor.workers


def test_stale_prefetches_are_cancelled_when_the_step_moves_on_without_an_acquire():
    core = core_with(window=2, threshold=0.1)
    core.note(note(1, 0, [0], guesses=[(1, 5)]), now=0.0)
    plan = core.plan_prefetch(7, None, bandwidth=None)
    assert ((1, 5)) in [k for k, _, _ in plan.start]
    core.note(note(1, 1, [0]), now=0.1)  # layer 1 ran (leased: no acquire) without expert 5
    plan = core.plan_prefetch(7, None, bandwidth=None)
    assert (1, 5) in plan.cancel


def test_guesses_are_fused_by_distance_and_scored():
    core = core_with(window=3, threshold=0.3)
    core.note(note(1, 0, [0], guesses=[(1, 2), (2, 3), (3, 4)]), now=0.0)
    targets, need = core.predictor.predict(7)
    assert need[1, 2] > 0.3 and need[2, 3] > 0.3 and need[3, 4] > 0.3
    core.note(note(1, 1, [2]), now=0.1)
    core.note(note(1, 2, [5]), now=0.2)
    core.note(note(1, 3, [4]), now=0.3)
    spec = dict(core.predictor.speculation_stats())
    assert (spec[1].correct, spec[1].predicted) == (1, 1)
    assert (spec[2].correct, spec[2].predicted) == (0, 1)
    assert (spec[3].correct, spec[3].predicted) == (1, 1)
    stats = m.StatsReply(0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, False, [], **stats_fields(core))
    assert [s.distance for s in stats.speculation] == [1, 2, 3] and stats.layer_notes == 4


def test_no_prefetch_while_demand_reads_are_queued():
    core = core_with(window=2, threshold=0.1)
    core.note(note(1, 0, [0], guesses=[(1, 5)]), now=0.0)
    busy = core.plan_prefetch(7, None, bandwidth=None, demand_busy=True)
    assert busy.start == [] and core.metrics.prefetch_deferred == 1
    assert [k for k, _, _ in core.plan_prefetch(7, None, bandwidth=None).start] == [(1, 5)]


def test_a_prefetch_must_beat_the_slot_it_takes():
    core = core_with(slots=2, window=1, threshold=0.1)
    core.predictor.spec_calibrated[:, 0, :] = 0.2  # a guess one layer ahead is right one time in five
    for key in [(2, 0), (2, 1)]:  # both slots hold layer 2's experts, which the next step's layer 2 wants
        core.table.reserve(key)
        core.table.loaded(key)
    core.note(note(1, 2, [0, 1]), now=0.0)
    core.note(note(1, 3, [0, 1]), now=0.1)
    core.note(note(2, 0, [0, 1], guesses=[(1, 6)]), now=0.2)
    plan = core.plan_prefetch(7, None, bandwidth=None)
    assert plan.start == [] and core.metrics.prefetch_declined == 1


def test_the_lease_reserve_is_one_lookahead_of_experts_and_none_when_all_fit_or_prefetch_is_off():
    assert core_with(slots=8).prefetch_reserve() == 2  # top-2, one layer ahead until speculation measures more
    deep = core_with(slots=16)
    deep.metrics.speculate_layers = 3
    assert deep.prefetch_reserve() == 4  # 2 x 3, at most a quarter of the pool
    assert core_with(slots=L * E).prefetch_reserve() == 0 and core_with(slots=8, prefetch=False).prefetch_reserve() == 0


def test_workers_are_asked_for_guesses_only_while_a_prefetch_could_follow():
    assert core_with(slots=8).wants_guesses()
    assert not core_with(slots=8, prefetch=False).wants_guesses()
    full = core_with(slots=L * E)
    assert not full.wants_guesses()  # a pool of every expert never evicts: guesses would only cost the worker
    full.table.reserve((0, 0))
    full.table.loaded((0, 0))
    assert not full.wants_guesses()  # filling or not: a leased worker would never hear that it filled


def test_guess_probability_is_measured_by_confidence_and_by_residency():
    core = core_with(slots=4)
    p = core.predictor
    for key in [(1, 0), (1, 1)]:
        core.table.reserve(key)
        core.table.loaded(key)
    for step in range(1, 60):  # at layer 0 the worker guesses layer 1: experts 0, 1 (resident) and 5, 6 (not)
        core.note(m.LayerNoteEvent(7, step, 0, [2, 3], ["r"], [1, 1], [False], [1, 1, 1, 1], [0, 1, 5, 6],
                                   [0.95, 0.3, 0.95, 0.3]), now=step)
        core.note(note(step, 1, [0, 5]), now=step + 0.5)  # the confident guesses are right, the unsure ones wrong
    assert p.guess_probability(1, 0.95, absent=True) > 0.9 and p.guess_probability(1, 0.95, absent=False) > 0.9
    assert p.guess_probability(1, 0.3, absent=True) < 0.1 and p.guess_probability(1, 0.3, absent=False) < 0.1
    assert p.guess_probability(1, 0.55, absent=True) == 0.5  # a bin never seen keeps the prior
    assert abs(p.guess_probability(1, -1.0) - 0.5) < 0.01  # no confidence: the overall precision (half right)


def test_an_unused_prefetch_is_spared_until_its_layer_has_run():
    core = core_with(slots=4)
    core.table.reserve((2, 1))
    core.table.loaded((2, 1))
    core.unused[(2, 1)] = (7, 1, 2, 0.9)  # prefetched for worker 7's step 1, layer 2
    assert core._protected([], 7, 1, 1) == {(2, 1): 0.9}
    assert core._protected([], 7, 1, 2) == {} and core._protected([], 7, 2, 0) == {}  # its layer ran: a victim
    assert core._protected([], 8, 9, 0) == {(2, 1): 0.9}  # another worker's steps say nothing of worker 7's
    core.forget_worker(7)
    assert core._protected([], 8, 0, 0) == {}  # gone with its worker


def test_time_per_layer_is_compute_not_the_waits_for_loads():
    """Between two notes the worker computed a layer and may have waited in an acquire: only the compute counts
    (it is what a prefetch can hide a read under, and what the speculation distance is sized from)."""
    core = core_with()
    assert core.note(note(1, 0, [0, 1]), now=10.0)
    core.stall(7, 0, 0.030)  # layer 0's acquire waited 30 ms for its loads
    assert core.note(note(1, 1, [0, 1]), now=10.040)
    assert abs(core.predictor.layer_seconds - 0.010) < 1e-9, core.predictor.layer_seconds
    core.stall(99, 1, 5.0)  # another worker's wait is not this worker's
    assert core.note(note(1, 2, [0, 1]), now=10.050)
    assert abs(core.predictor.layer_seconds - 0.010) < 1e-9


def full_activation_core(**knobs) -> ExpertCache:
    """An activation-policy core whose 4 slots hold never-used experts of layer 3 (their chance to run at its next
    run: 0.1, the policy's rate for never-used experts after one layer ran), a worker that guesses two layers ahead,
    right 95% of the time at that distance."""
    core = ExpertCache(4, L, E, top_k=2, expert_bytes=MB, knobs=CacheSettings(policy="activation", window=4,
                                                                              threshold=0.1, **knobs))
    core.request_start("r")
    for key in [(3, 4), (3, 5), (3, 6), (3, 7)]:
        core.table.reserve(key)
        core.table.loaded(key)
    core.metrics.speculate_layers = 2
    core.predictor.spec_calibrated[:, 1, :] = 0.95
    core.note(note(1, 0, [0, 1], guesses=[(2, 6)]), now=0.0)
    return core


def test_a_guess_two_layers_ahead_is_admitted_on_its_need_not_its_need_times_nearness():
    core = full_activation_core()
    plan = core.plan_prefetch(7, None, bandwidth=None)  # need 0.95, priority 0.95 x 0.8 = 0.76 < ADMIT (0.85)
    assert [k for k, _, _ in plan.start] == [(2, 6)] and core.metrics.prefetch_declined == 0


def test_an_expert_the_store_must_convert_first_is_never_prefetched():
    """--expert-format: the reader would drop such a prefetch (its conversion would hold a reader thread); the plan
    must not reserve it a slot either (that evicted a live expert for nothing)."""
    core = full_activation_core()
    core.fetchable = lambda key: key != (2, 6)
    plan = core.plan_prefetch(7, None, bandwidth=None)
    assert plan.start == [] and not core.table.loading and sum(core.metrics.prefetch_issued) == 0
    assert all(key in core.table.slot_of for key in [(3, 4), (3, 5), (3, 6), (3, 7)])  # nothing evicted


def test_a_prefetch_that_compute_cannot_hide_does_not_evict_a_live_expert():
    core = full_activation_core()
    assert abs(core.table.policy.reuse((3, 4)) - 0.1) < 0.01
    core.predictor.layer_seconds = 0.0005  # 0.5 ms of compute per layer at 100 MB/s: 10% of the read hidden at d=2
    plan = core.plan_prefetch(7, None, bandwidth=100 * MB)
    # benefit 0.95 x 0.1 < the victim's chance to run again (0.1) + the waste of a wrong guess (0.05 x 0.25)
    assert plan.start == [] and core.metrics.prefetch_declined == 1
    core.predictor.layer_seconds = 0.004  # 80% hidden: 0.76 beats it
    assert [k for k, _, _ in core.plan_prefetch(7, None, bandwidth=100 * MB).start] == [(2, 6)]


def test_traces_of_a_worker_not_attached_leave_no_per_worker_state():
    """A dead worker's notes still queued on the trace socket: counted and ignored, so the predictor and the step
    counts hold attached workers only (at most --max-clients), and forgetting a worker drops both."""
    from types import SimpleNamespace

    from services.memd.host_compute import NoHostCompute
    from services.memd.traces import Traces

    core = core_with()
    woken = []
    server = SimpleNamespace(core=core, clients={b"w": SimpleNamespace(pid=7)}, host=NoHostCompute(),
                             prefetcher=SimpleNamespace(wake=woken.append))
    traces = Traces(server)
    traces.on_layer_note(None, note(1, 0, [0, 1], worker=99))
    assert 99 not in core.predictor.workers and core.metrics.notes_unattached == 1 and not woken
    traces.on_layer_note(None, note(1, 0, [0, 1], worker=7))
    assert 7 in core.predictor.workers and core.metrics.notes_unattached == 1 and woken == [7]
    routes = [m.LayerTrace(0, [2, 3], [[1, 1]], [[1.0, 1.0]])]
    traces.on_step_trace(None, m.step_trace(99, 5, ["r"], [1], [False], routes))
    traces.on_step_trace(None, m.step_trace(7, 5, ["r"], [1], [False], routes))
    assert core.metrics.last_step == {7: 5} and core.metrics.trace_steps == 2  # both learned, one worker tracked
    core.forget_worker(7)
    assert 7 not in core.predictor.workers and core.metrics.last_step == {}


def test_the_lookahead_stays_within_what_the_workers_guess():
    """memd's k (read time x experts fetched per layer / layer time) is capped by the workers' READY: a worker
    guessing 2 layers ahead never hears 'guess 3', and the prefetch reserve is sized for 2 layers' guesses."""
    from services.memd.leases import ConnectedWorker, ahead_limit
    core = core_with(slots=24, prefetch=True)  # (a reserve of up to 6 slots)
    core.predictor.layer_seconds = 0.001  # a 1 MiB read at 100 MB/s takes ~10 layers
    assert core.speculation(100e6)[0] == L - 1  # nobody has said: every layer but one
    workers = [ConnectedWorker(1, ready=True, speculate_max=2), ConnectedWorker(2, ready=False, speculate_max=3),
               ConnectedWorker(3, ready=True)]  # (not ready yet; and one that guesses nothing)
    core.ahead_limit = ahead_limit(workers, L)
    assert core.ahead_limit == 2
    assert core.speculation(100e6)[0] == 2 and core.metrics.speculate_layers == 2
    assert core.prefetch_reserve() == 2 * 2  # top-k x the lookahead
    assert ahead_limit([ConnectedWorker(4, ready=True, speculate_max=9)], L) == L - 1
    assert ahead_limit([], L) == L - 1


def test_the_on_demand_baseline_makes_no_prediction():
    """Prefetch off under LRU (the `moeinf-ondemand-lru` baseline): its memd predicts nothing and plans nothing
    (the predictor's CPU on memd's loop was the baseline's cost, not moeinf's); the activation policy still
    predicts with prefetch off (its evictions spare the predicted experts)."""
    core = core_with(prefetch=False)
    core.predictor.predict = lambda worker: (_ for _ in ()).throw(AssertionError("predicted"))
    core.note(note(1, 0, [0, 1], guesses=[(1, 2)]), now=0.0)
    assert core.plan_prefetch(7) == core.plan_prefetch(7, None, bandwidth=1e9) and core.need is None
    active = ExpertCache(8, L, E, top_k=2, expert_bytes=MB, knobs=CacheSettings(policy="activation", prefetch=False))
    active.request_start("r")
    active.note(note(1, 0, [0, 1]), now=0.0)
    active.plan_prefetch(7)
    assert active.need is not None
