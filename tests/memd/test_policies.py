"""Each eviction policy's choice on constructed cases, and the slot table's protection and prefetch admission."""
import numpy as np
import pytest

from services.memd.policy import ActivationPolicy, LfuPolicy, LruPolicy, make_policy
from services.memd.slots import PoolExhausted, SlotTable

L, E = 4, 4
ANY = lambda key: True  # noqa: E731


def filled(policy, keys):
    for key in keys:
        policy.on_insert(key)
    return policy


def test_lfu_evicts_the_least_used_then_the_least_recent():
    p = filled(LfuPolicy(L, E), [(0, 0), (0, 1), (1, 0), (1, 1)])
    for key, times in {(0, 0): 3, (0, 1): 1, (1, 0): 2, (1, 1): 1}.items():
        for _ in range(times):
            p.on_access(key)
    # (0, 1) and (1, 1) were used once; (0, 1) longer ago
    assert p.victim(ANY) == (0, 1)
    assert p.victim(lambda k: k != (0, 1)) == (1, 1)
    p.on_remove((0, 1))
    p.on_remove((1, 1))
    assert p.victim(ANY) == (1, 0)
    # counts are kept across evictions (frequency of use, as MoE-Infinity's LFU): a returning expert keeps them
    p.on_insert((1, 1))
    assert p.victim(ANY) == (1, 1)
    p.on_access((1, 1))
    p.on_access((1, 1))
    assert p.victim(ANY) == (1, 0)  # (1, 1) has 3 uses now, (1, 0) 2
    assert p.victim(lambda k: False) is None


def run_layer(p, layer, experts, *, decode=True):
    """What memd tells a policy for one layer's acquire: the layer runs, then each expert is accessed."""
    p.on_layer(layer)
    for e in experts:
        p.on_access((layer, e), decode=decode)


def test_activation_evicts_the_layer_that_runs_last_where_lru_evicts_the_next_one():
    p, lru = ActivationPolicy(L, E), LruPolicy()
    for layer in range(L):  # one token: expert 0 of every layer
        run_layer(p, layer, [0])
        for policy in (p, lru):
            policy.on_access((layer, 0))
            policy.on_insert((layer, 0))
    # layer 3 just ran; layer 0 runs next: LRU evicts it, the cyclic distance evicts layer 3's (runs last)
    assert lru.victim(ANY) == (0, 0)
    assert p.victim(ANY) == (3, 0)
    run_layer(p, 0, [1])  # layer 0 runs now: layer 1 is next, layer 0's own expert 0 is a whole cycle away
    assert list(p.distance().ravel()) == [4, 1, 2, 3]
    assert p.victim(ANY) == (0, 0)


def test_activation_learns_how_sticky_routing_is():
    p = ActivationPolicy(L, E)
    for _ in range(200):  # every run of every layer uses the same two experts
        for layer in range(L):
            run_layer(p, layer, [1, 2])
    sticky = p.rate()
    assert sticky[0] > 0.9 and sticky[2] < 0.1
    q = ActivationPolicy(L, E)
    for t in range(200):  # every run uses two new experts: the last run's never come back
        for layer in range(L):
            run_layer(q, layer, [(2 * t) % E, (2 * t + 1) % E])
    assert q.rate()[0] < 0.1


def test_activation_keeps_the_last_runs_experts_over_older_ones_at_the_same_layer():
    p = filled(ActivationPolicy(L, E), [(2, 0), (2, 1)])
    run_layer(p, 2, [0])
    run_layer(p, 2, [1])  # expert 1: used at layer 2's last run; expert 0: the run before
    assert p.victim(ANY) == (2, 0)


def test_activation_ranks_experts_of_one_age_by_predicted_need():
    p = filled(ActivationPolicy(L, E), [(2, 0), (2, 1), (2, 2)])
    run_layer(p, 2, [0, 1, 2])
    run_layer(p, 3, [0])
    need = np.zeros((L, E))
    need[2, 0], need[2, 2] = 0.9, 0.4
    p.observe_need(need)
    assert p.victim(ANY) == (2, 1)  # never predicted
    need[2, 1], need[2, 2] = 1.0, 0.0
    p.observe_need(need)
    assert p.victim(ANY) == (2, 2)  # the prediction moved on


def test_activation_prefill_only_experts_are_transient():
    p = ActivationPolicy(L, E)
    for _ in range(3):
        run_layer(p, 1, [0, 1])
    for key in [(1, 0), (1, 1)]:
        p.on_insert(key)
    # a long prompt loads experts that only it used: they are admitted as transient
    p.on_layer(1)
    for e in (0, 1, 2, 3):
        p.on_access((1, e), decode=False)
    for e in (2, 3):
        p.on_insert((1, e), transient=True)
    assert p.victim(ANY) in {(1, 2), (1, 3)}  # the prompt's experts go before the decode working set
    run_layer(p, 1, [2])  # a decode step using a transient expert makes it a regular one
    assert not p.transient[1, 2] and p.victim(ANY) == (1, 3)
    # an expert the decode working set still uses is not made transient by a prompt reloading it
    p.on_insert((1, 2), transient=True)
    assert not p.transient[1, 2]


def test_activation_admits_a_prefetch_only_for_a_near_certain_expert_that_runs_sooner():
    p = filled(ActivationPolicy(L, E), [(3, 0)])
    for _ in range(100):  # expert 0 of layer 1 runs at every run of layer 1, expert 0 of layer 3 too
        for layer in range(L):
            run_layer(p, layer, [0])
    p.on_remove((1, 0))
    run_layer(p, 0, [0])  # layer 0 runs: layer 1 is next, layer 3 two layers later
    assert p.admits((1, 0), (3, 0), priority=0.0)  # its own reuse makes it near certain
    assert not p.admits((2, 3), (3, 0), priority=0.6)  # never used, and a guess right 60% of the time is not enough
    assert p.admits((2, 3), (3, 0), priority=0.95)  # a near-certain guess, for a layer that runs before the victim's
    run_layer(p, 1, [0])
    run_layer(p, 2, [0])  # layer 3 is next now, layer 2 runs last: the victim is needed sooner than the guess
    assert not p.admits((2, 3), (3, 0), priority=0.95)
    q = filled(ActivationPolicy(L, E), [(3, 0)])
    rng = np.random.default_rng(0)
    for _ in range(100):  # random routing: reuse makes nothing near-certain; only a guess can
        for layer in range(L):
            run_layer(q, layer, rng.choice(E, 2, replace=False).tolist())
    assert not q.admits((1, 0), (3, 0), priority=0.0) and not q.admits((1, 0), (3, 0), priority=0.8)
    assert q.admits((1, 0), (3, 0), priority=0.9)
    assert LruPolicy().admits((3, 1), (0, 0), 0.0) and LfuPolicy(L, E).admits((3, 1), (0, 0), 0.0)


def table(policy: str, slots=3) -> SlotTable:
    return SlotTable(slots, L, make_policy(policy, L, E))


def load(t: SlotTable, key, **kw):
    t.record_access(key, **kw)
    slot = t.reserve(key)
    t.loaded(key)
    return slot


@pytest.mark.parametrize("policy", ["lru", "lfu", "activation"])
def test_protected_experts_are_spared_while_something_else_can_go(policy):
    t = table(policy)
    for key in [(0, 0), (0, 1), (0, 2)]:
        load(t, key)
    victim = t.policy.victim(t.evictable)
    slot = t.reserve((1, 0), protect={victim})
    assert t.is_resident(victim) and t.owner[slot] == (1, 0)
    t.loaded((1, 0))
    # when only protected experts are evictable, an on-demand load still gets a slot (correctness first)
    everything = set(t.slot_of)
    t.reserve((1, 1), protect=everything)
    assert len(t.slot_of) == 3


@pytest.mark.parametrize("policy", ["lru", "lfu", "activation"])
def test_prefetch_never_takes_a_pinned_loading_or_protected_slot(policy):
    t = table(policy)
    if policy == "activation":  # it admits only near-certain prefetches: expert 0 of layer 2 runs every time
        for _ in range(50):
            for layer in range(L):
                run_layer(t.policy, layer, [0])
        run_layer(t.policy, 0, [0])
        run_layer(t.policy, 1, [0])  # layer 1 runs: layer 2 is next
    load(t, (0, 0))
    load(t, (0, 1))
    t.pin((0, 0))
    t.reserve((0, 2))  # loading
    assert t.reserve_prefetch((2, 0), 0.5, protect={(0, 1): 0.5}) is None  # needed as much as the prefetch
    assert t.owner.count(None) == 0 and set(t.slot_of) == {(0, 0), (0, 1), (0, 2)}
    slot = t.reserve_prefetch((2, 0), 1.0, protect={(0, 1): 0.5})  # a nearer or likelier need may evict it
    assert slot is not None and (0, 1) not in t.slot_of and (2, 0) in t.loading
    with pytest.raises(PoolExhausted):
        t.reserve((3, 3))  # pinned, loading, loading


def test_policies_can_be_switched_live():
    t = table("lru", slots=4)
    for e in range(4):
        load(t, (0, e))
    t.set_policy(make_policy("activation", L, E))
    assert t.policy.name == "activation" and t.policy.resident.sum() == 4
    load(t, (1, 0))  # evicts through the new policy
    assert t.policy.resident.sum() == 4 and len(t.slot_of) == 4


def test_activation_probability_is_computed_once_until_something_changes():
    p = ActivationPolicy(L, E)
    first = p.probability()
    assert p.probability() is first and p.reuse((0, 0)) == float(first[0, 0])  # a plan's candidates share it
    p.on_layer(0)
    assert p.probability() is not first  # a layer ran: ages and rates moved
    second = p.probability()
    p.observe_need(np.full((L, E), 0.5))
    assert p.probability() is not second
    third = p.probability()
    p.observe_need(np.full((L, E), 0.5))  # the same need again
    p.on_access((0, 1))  # the running layer's experts: in use until it ends
    p.on_insert((0, 2))
    assert p.probability() is third
    p.on_access((1, 1))  # another layer's (a lease's use, told late)
    assert p.probability() is not third


@pytest.mark.parametrize("name", ["lru", "lfu", "activation"])
def test_victims_are_the_victim_order(name):
    """``victims(allowed, n)``: the first n of the order ``victim`` picks one at a time, skipping what is not
    allowed; fewer when fewer are allowed."""
    rng = np.random.default_rng(0)
    p = make_policy(name, L, E)
    keys = [(layer, e) for layer in range(L) for e in range(E) if (layer + e) % 3]
    filled(p, keys)
    for layer in range(L):
        run_layer(p, layer, [int(e) for e in rng.choice(E, 2, replace=False)])
    allowed = lambda k: k[1] != 2  # noqa: E731
    one_at_a_time = []
    while (key := p.victim(lambda k: allowed(k) and k not in one_at_a_time)) is not None:
        one_at_a_time.append(key)
    assert len(one_at_a_time) == sum(allowed(k) for k in keys)
    assert p.victims(allowed, 5) == one_at_a_time[:5]
    assert p.victims(allowed, 100) == one_at_a_time
    assert p.victims(allowed, 0) == [] and p.victims(lambda k: False, 3) == []


def test_activation_keeps_its_victim_order_and_still_finds_a_resident_inserted_since():
    """The order is kept with the scores; an expert of the running layer inserted since (which moves no score) is
    not in it, yet a victim search that finds nothing else still finds it (no false "every slot is pinned")."""
    p = ActivationPolicy(L, E)
    run_layer(p, 0, [0, 1])
    filled(p, [(1, 0), (2, 0)])
    p.on_layer(3)
    assert p.victims(ANY, 2) and p._ranked is not None
    kept = p._ranked
    p.on_insert((3, 1))  # the running layer: the scores and the kept order stay
    assert p._ranked is kept and 3 * E + 1 not in kept
    assert p.victims(lambda k: k == (3, 1), 1) == [(3, 1)]
    p.on_remove((1, 0))  # a kept resident that left is skipped
    assert (1, 0) not in p.victims(ANY, 10)


def test_activation_age_kept_incrementally_equals_its_definition():
    rng = np.random.default_rng(7)
    p = ActivationPolicy(L, E)
    for _ in range(200):
        if rng.random() < 0.3:
            p.on_layer(int(rng.integers(L)))
        else:
            p.on_access((int(rng.integers(L)), int(rng.integers(E))), decode=bool(rng.random() < 0.8))
        oldest = 2
        truth = np.where(p.used_visit < 0, oldest, np.minimum(p.visits[:, None] - p.used_visit, oldest))
        assert np.array_equal(p.age(), truth)
