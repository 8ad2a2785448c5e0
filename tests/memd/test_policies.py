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


def test_activation_keeps_predicted_experts():
    p = filled(ActivationPolicy(L, E), [(2, 0), (2, 1), (2, 2)])
    need = np.zeros((L, E))
    need[2, 0], need[2, 2] = 0.9, 0.4
    p.observe_need(need)
    assert p.victim(ANY) == (2, 1)  # never predicted
    need[2, 1], need[2, 2] = 1.0, 0.0
    p.observe_need(need)
    assert p.victim(ANY) == (2, 2)  # the prediction moved on


def test_activation_keeps_decode_reuse_and_forgets_it_with_time():
    p = filled(ActivationPolicy(L, E), [(3, 0), (3, 1)])
    for _ in range(5):
        p.on_step()
        p.on_access((3, 1))  # reused by every decode step
    p.on_step()
    p.on_access((3, 0))  # used once, just now
    for _ in range(2):
        p.on_step()
    assert p.victim(ANY) == (3, 0)
    for _ in range(12):  # (3, 1) has not been used for a dozen steps: its reuse decayed
        p.on_step()
    p.on_access((3, 0))
    assert p.victim(ANY) == (3, 1)


def test_activation_favours_shallow_layers_at_equal_use():
    p = filled(ActivationPolicy(L, E), [(0, 0), (3, 0)])
    p.on_step()
    for key in [(0, 0), (3, 0)]:
        p.on_access(key)
    p.on_step()
    p.on_step()
    s = p.scores()
    assert s[0, 0] > s[3, 0]
    assert p.victim(ANY) == (3, 0)  # the deep layer goes first: a prefetch has more time to bring it back


def test_activation_prefill_only_experts_are_transient():
    p = ActivationPolicy(L, E)
    decode_set = [(1, 0), (1, 1)]
    for key in decode_set:
        p.on_insert(key)
    for _ in range(3):
        p.on_step()
        for key in decode_set:
            p.on_access(key)
    for _ in range(3):
        p.on_step()
    # a long prompt loads experts that only it used: they are admitted as transient
    for e in (2, 3):
        p.on_access((1, e), decode=False)
        p.on_insert((1, e), transient=True)
    assert p.victim(ANY) in {(1, 2), (1, 3)}  # the prompt's experts go before the decode working set
    # a decode step using a transient expert makes it a regular one
    p.on_step()
    p.on_access((1, 2))
    assert not p.transient[1, 2] and p.victim(ANY) == (1, 3)
    # an expert the decode working set still uses is not made transient by a prompt reloading it
    p.on_insert((1, 0), transient=True)
    assert not p.transient[1, 0]


def test_activation_admits_a_prefetch_only_over_a_weaker_resident():
    p = filled(ActivationPolicy(L, E), [(0, 0)])
    p.on_step()
    p.on_access((0, 0))
    need = np.zeros((L, E))
    need[0, 0] = 0.9
    p.observe_need(need)
    assert not p.admits((3, 1), (0, 0), priority=0.2)  # a weak guess does not evict a needed, reused expert
    need[3, 1], need[0, 0] = 1.0, 0.0
    p.observe_need(need)
    for _ in range(20):
        p.on_step()
    assert p.admits((3, 1), (0, 0), priority=1.0)
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
