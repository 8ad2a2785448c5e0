"""Eviction policies behind one interface. memd asks a policy for a victim among the evictable residents.

``lru`` and ``lfu`` are the baselines. ``activation`` is the activation-aware cache: routing visits the layers in a
cycle, so recency (LRU) evicts exactly the layer that runs next; this policy evicts the expert whose next use is
expected furthest ahead, from the cyclic distance to its layer and the probability that it runs there (predicted
need from the EAMC match and the live requests' history, and whether its layer used it last time). Experts loaded
only for prompts are admitted as transient, so one long prompt does not flush the decode working set.
Pinned and loading experts never reach a policy: the slot table filters them.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Callable

import numpy as np

from common.config import POLICIES

Key = tuple[int, int]  # (MoE layer, expert)

SORT_MAX = 256  # victims(): residents sorted at once up to this many, else found one argmin at a time


class EvictionPolicy:
    """The interface, with no-op hooks a policy that does not need them inherits."""

    name = "?"
    spares_predicted = False  # on-demand loads avoid evicting experts predicted to run soon (the baselines: no)

    def on_insert(self, key: Key, *, transient: bool = False) -> None:
        """``key`` became resident; ``transient``: it was loaded only for prompt tokens."""

    def on_access(self, key: Key, *, decode: bool = True) -> None:
        """``key`` was acquired (a hit, or a miss that is now loading); ``decode``: by a decode step."""

    def on_remove(self, key: Key) -> None:
        """``key`` left the pool."""

    def on_step(self) -> None:
        """A forward step began (ages reuse counts)."""

    def on_layer(self, layer: int) -> None:
        """Layer ``layer`` of a step is running now (every layer of every step, leased or not)."""

    def observe_need(self, need: np.ndarray) -> None:
        """``need[l, e]``: predicted probability that expert e of layer l runs the next time layer l runs."""

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        """The resident key to evict next among those ``evictable`` allows, or None when none is."""
        raise NotImplementedError

    def victims(self, allowed: Callable[[Key], bool], count: int) -> list[Key]:
        """The first ``count`` keys of the victim order among those ``allowed`` accepts (fewer when fewer are)."""
        raise NotImplementedError

    def admits(self, candidate: Key, victim: Key, priority: float) -> bool:
        """May a prefetch of ``candidate`` (``priority``: its need at its target, in [0, 1]) evict ``victim``? The
        baselines always let it."""
        return True

    def reuse(self, key: Key) -> float | None:
        """The probability that resident ``key`` runs the next time its layer runs, or None (the baselines do not
        estimate it)."""
        return None


class LruPolicy(EvictionPolicy):
    """Least recently used: the resident expert acquired longest ago goes first."""

    name = "lru"

    def __init__(self, num_layers: int = 0, num_experts: int = 0) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def on_insert(self, key: Key, *, transient: bool = False) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: Key, *, decode: bool = True) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        return next((k for k in self._order if evictable(k)), None)

    def victims(self, allowed: Callable[[Key], bool], count: int) -> list[Key]:
        return list(itertools.islice((k for k in self._order if allowed(k)), count))


class _ScoredPolicy(EvictionPolicy):
    """A policy that evicts the resident key with the lowest score, kept as dense ``[layers, experts]`` arrays."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        self.resident = np.zeros((num_layers, num_experts), dtype=bool)
        self.last_use = np.zeros((num_layers, num_experts), dtype=np.int64)  # tie-break: least recent first
        self._clock = 0
        self._scores: np.ndarray | None = None  # cached until something changes
        self._finite = True  # every cached score is finite
        self._ranked: list[int] | None = None  # the residents in victim order, kept with the scores (victims)

    def changed(self) -> None:
        self._scores = None
        self._ranked = None

    def cached_scores(self) -> np.ndarray:
        if self._scores is None:
            self._scores = self.scores()
            self._finite = bool(np.isfinite(self._scores).all())  # (victims skips the NaN and +inf rules then)
        return self._scores

    def on_insert(self, key: Key, *, transient: bool = False) -> None:
        self.resident[key] = True
        self._touch(key)

    def on_access(self, key: Key, *, decode: bool = True) -> None:
        self._touch(key)

    def on_remove(self, key: Key) -> None:
        self.resident[key] = False

    def on_step(self) -> None:
        self.changed()

    def observe_need(self, need: np.ndarray) -> None:
        self.changed()

    def _touch(self, key: Key) -> None:
        self._clock += 1
        self.last_use[key] = self._clock
        self.touched(key)

    def touched(self, key: Key) -> None:
        """``key`` was acquired or inserted: the scores move."""
        self.changed()

    def scores(self) -> np.ndarray:
        raise NotImplementedError

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        return next(iter(self.victims(evictable, 1)), None)

    def victims(self, allowed: Callable[[Key], bool], count: int) -> list[Key]:
        """The first ``count`` residents ``allowed``, in victim order: score first, then recency (a tiny fraction of
        it) among equal scores, then the lowest index (argmin's and a stable sort's tie-break). The order is sorted
        once with the scores and kept while they are (an acquire and a prefetch plan ask several times per layer);
        a resident the kept order lacks (inserted since, without moving the scores) is found by a fresh ranking
        when the kept one does not give ``count``."""
        if count <= 0:
            return []
        ranked = self._ranking()
        if ranked is not None:
            chosen = self._pick(ranked, allowed, count)
            if len(chosen) == count:
                return chosen
        return self._pick(self._rank(np.flatnonzero(self.resident)), allowed, count)

    def _ranking(self) -> list[int] | None:
        """The residents' flat indices in victim order, cached with the scores (None for a pool too large to sort
        at once: ranked lazily per call)."""
        if self._ranked is None:
            resident = np.flatnonzero(self.resident)
            if len(resident) > SORT_MAX:
                return None
            self._ranked = list(self._rank(resident))
        return self._ranked

    def _rank(self, resident: np.ndarray):
        """``resident`` (flat indices) in victim order: a NaN score first (as argmin took it), +inf never."""
        scores = self.cached_scores()
        order = scores.ravel()[resident] * 1e6 + self.last_use.ravel()[resident] / (self._clock + 1.0)
        if not self._finite:
            order = np.where(np.isnan(order), -np.inf, order)
            resident, order = resident[order != np.inf], order[order != np.inf]
        return _in_order(resident, order)

    def _pick(self, ranked, allowed: Callable[[Key], bool], count: int) -> list[Key]:
        resident, chosen = self.resident.ravel(), []
        for index in ranked:
            if not resident[index]:  # left since the order was kept
                continue
            key = divmod(index, self.num_experts)
            if allowed(key):
                chosen.append(key)
                if len(chosen) == count:
                    break
        return chosen


def _in_order(indices: np.ndarray, values: np.ndarray):
    """``indices`` by increasing ``values`` (ties: the earlier first): sorted at once when few (a pool of a few
    hundred experts), else found one argmin at a time (only as many as the caller takes)."""
    if len(values) <= SORT_MAX:
        yield from indices[np.argsort(values, kind="stable")].tolist()
        return
    values = values.copy()
    for _ in range(len(values)):
        i = int(np.argmin(values))
        yield int(indices[i])
        values[i] = np.inf


class LfuPolicy(_ScoredPolicy):
    """Least frequently used: the resident expert acquired the fewest times (ever; ties: least recent) goes first."""

    name = "lfu"

    def __init__(self, num_layers: int, num_experts: int) -> None:
        super().__init__(num_layers, num_experts)
        self.count = np.zeros((num_layers, num_experts), dtype=np.float64)

    def on_access(self, key: Key, *, decode: bool = True) -> None:
        super().on_access(key)
        self.count[key] += 1

    def scores(self) -> np.ndarray:
        return self.count


# The activation policy estimates, for every resident expert, how many layer runs pass until it is next used, and
# evicts the one whose next use lies furthest ahead (Belady's rule, with an estimate in place of the future):
#     T = d + L * (1 - p) / p
# d in 1..L: the cyclic distance from the running layer to the expert's layer (the next time that layer runs);
# p: the probability that the expert runs then (with probability 1 - p it waits a whole cycle of L layers, again
# and again: a geometric number of cycles). Measured rates set its level by the expert's age: how often an expert
# that its layer used at its last run runs again at the next one (routing remembers the previous token: ~0.38 on
# Mixtral, ~0.9 on the random-weight demo model), one used at the run before that, and one used earlier or never.
# Within an age, the predicted need (the EAMC match and the live requests' history, services/memd/predictor.py)
# ranks a layer's experts: p = rate * (1 - NEED_WEIGHT + NEED_WEIGHT * need / the age's mean need in that layer),
# floored at FLOOR (NEED_WEIGHT 1 fetched 2% more than LRU at 25% on flat routing, 0 lost 1-4% at 12.5% and 50%).
# The rates count about MEMORY layer runs, from a prior worth PRIOR_RUNS runs.
# An expert loaded only for prompt tokens counts TRANSIENT of its p until a decode step uses it, so one long
# prompt does not flush the decode working set.
# Tuned on the flat synthetic routing (seeds 0-3) and the demo model's trace (docs/benchmarks.md (replay)).
PRIOR, PRIOR_RUNS, MEMORY = (0.4, 0.3, 0.2), 8.0, 2048.0
NEED_WEIGHT = 0.5
ADMIT = 0.85  # a prefetch that evicts must be near certain to be used (``admits``)
FLOOR = 0.01
TRANSIENT = 0.1


class ActivationPolicy(_ScoredPolicy):
    """Evict the expert with the furthest expected next use (cyclic layer distance, predicted need, recency)."""

    name = "activation"
    spares_predicted = True

    def __init__(self, num_layers: int, num_experts: int) -> None:
        super().__init__(num_layers, num_experts)
        shape = (num_layers, num_experts)
        self.need = np.zeros(shape)
        self.transient = np.zeros(shape, dtype=bool)
        self.visits = np.zeros(num_layers, dtype=np.int64)  # how often each layer ran
        self.used_visit = np.full(shape, -1, dtype=np.int64)  # the layer's visit that last used the expert
        self.decoded_visit = np.full(shape, -2, dtype=np.int64)  # ... in a decode step
        self.layer = num_layers - 1  # the layer running now (before the first step: as if the last one ran)
        self._probability: np.ndarray | None = None
        # [ran, could have] for experts by age: used at their layer's last run, at the one before, earlier or never
        self.rates = np.array([[p, 1.0] for p in PRIOR]) * PRIOR_RUNS
        self._row_class = np.arange(num_layers)[:, None] * len(PRIOR)  # [L, 1]: class of age 0 in each layer
        self._age = np.full(shape, len(PRIOR) - 1, dtype=np.int64)  # age(), kept incrementally

    def on_layer(self, layer: int) -> None:
        self.layer = layer
        self.rates *= 1 - 1 / MEMORY
        row = self._age[layer]
        self.rates[:, 1] += np.bincount(row, minlength=len(PRIOR))
        self.visits[layer] += 1
        np.minimum(row + 1, len(PRIOR) - 1, out=row)  # the layer's run began: its experts are a run older
        self.changed()

    def age(self) -> np.ndarray:
        """[L, E]: 0 for an expert its layer used at its last (or current) run, 1 at the run before, 2 earlier
        (``min(visits - used_visit, 2)``, never used: 2), kept up to date by ``on_layer`` and ``on_access``.
        Read-only for callers."""
        return self._age

    def rate(self) -> np.ndarray:
        """[ages]: the measured chance that an expert of each age runs at its layer's next run."""
        return self.rates[:, 0] / self.rates[:, 1]

    def on_insert(self, key: Key, *, transient: bool = False) -> None:
        super().on_insert(key)
        self.transient[key] = transient and self.decoded_visit[key] < self.visits[key[0]] - 1

    def on_access(self, key: Key, *, decode: bool = True) -> None:
        super().on_access(key)
        age = self.visits[key[0]] - 1 - self.used_visit[key]  # its age when this run of its layer began
        age = age if self.used_visit[key] >= 0 else len(PRIOR) - 1  # never used before
        if age >= 0:  # its first use in this run
            self.rates[min(age, len(PRIOR) - 1), 0] += 1
        self.used_visit[key] = self.visits[key[0]]
        self._age[key] = 0
        if decode:
            self.decoded_visit[key] = self.visits[key[0]]
            self.transient[key] = False

    def observe_need(self, need: np.ndarray) -> None:
        need = np.clip(need, 0.0, 1.0)
        if not np.array_equal(need, self.need):  # a second plan in a layer often predicts the same
            self.need = need
            self.changed()

    def distance(self) -> np.ndarray:
        """[L, 1]: layer runs from now until each layer runs next (1: the next layer; L: the running one)."""
        return ((np.arange(self.num_layers) - self.layer - 1) % self.num_layers + 1)[:, None]

    def changed(self) -> None:
        super().changed()
        self._probability = None

    def touched(self, key: Key) -> None:
        """The estimate waits for the next layer or need when ``key`` belongs to the running layer: those experts
        are in use until it ends (never victims meanwhile), and an acquire asks for a victim per miss, each a fresh
        estimate otherwise (3.1 per layer in ``bench cache``, 1.1 now). Meanwhile the others' values are slightly
        stale too (the access moved the measured rates and the key's age class, so its layer's class means): the
        flat and demo rows moved within 0.6% either way. A use told late (a lease's) or a prefetch landing in
        another layer redoes it."""
        if key[0] != self.layer:
            self.changed()

    def probability(self) -> np.ndarray:
        """[L, E]: the chance each expert runs at its layer's next run; cached until something changes (a plan asks
        for it for every candidate: the victim's score, its reuse, the admission). Read-only for callers."""
        if self._probability is None:
            self._probability = self._estimate()
        return self._probability

    def _estimate(self) -> np.ndarray:
        """Within an age, the need ranks a layer's experts around the age's rate: each expert's need over the mean
        need of its layer's experts of its age (1 where that mean is 0). One pass over all (layer, age) classes:
        class ``layer * ages + age``, summed by ``bincount`` (a few numpy calls whatever the model's size)."""
        age = self.age()
        ages = len(PRIOR)
        cls = (self._row_class + age).ravel()  # [L * E]: each expert's (layer, age) class
        sums = np.bincount(cls, weights=self.need.ravel(), minlength=self.num_layers * ages)
        counts = np.bincount(cls, minlength=self.num_layers * ages)
        mean = (sums / np.maximum(1, counts))[cls].reshape(age.shape)  # [L, E]: its class's mean need
        ranked = np.divide(self.need, mean, out=np.ones(age.shape), where=mean > 0)
        p = np.clip(self.rate()[age] * (1 - NEED_WEIGHT + NEED_WEIGHT * ranked), FLOOR, 1.0)
        return np.where(self.transient, p * TRANSIENT, p)

    def next_use(self, p: np.ndarray) -> np.ndarray:
        return self.distance() + self.num_layers * (1 - p) / p

    def scores(self) -> np.ndarray:
        return -self.next_use(self.probability())

    def admits(self, candidate: Key, victim: Key, priority: float) -> bool:
        """Evict ``victim`` for a prefetch only when the candidate is near certain (ADMIT) to be used, and sooner
        than the victim by the expected next use above. Its probability is the larger of this policy's (its layer's
        measured reuse, ranked by need) and the planner's ``priority``: the candidate's need at its target (its
        distance counts in the next use, not here), which carries the worker's hidden-state guesses at the precision
        measured for guesses like it: same distance, router probability and residency,
        ``Predictor.guess_probability``). A right guess costs no extra read (the expert would have been read on
        demand a moment later) and hides its read under compute; a wrong one costs a read and the victim. ADMIT 0.5
        let through 0.3-0.45 precision and 1.1-2.5x LRU's bytes end to end (an 8-layer test model with 8.6 MiB
        experts, 12.5% and 25%); 0.85 gave 0.8-0.95 at LRU's bytes or fewer."""
        p = self.probability()
        mine = max(float(p[candidate]), priority)
        if mine < ADMIT:
            return False
        t = self.next_use(p)
        return self._next_use_at(candidate, mine) < t[victim]

    def reuse(self, key: Key) -> float:
        return float(self.probability()[key])

    def _next_use_at(self, key: Key, p: float) -> float:
        return float(self.distance()[key[0], 0] + self.num_layers * (1 - p) / p)


_CLASSES = {"lru": LruPolicy, "lfu": LfuPolicy, "activation": ActivationPolicy}
assert tuple(_CLASSES) == POLICIES


def make_policy(name: str, num_layers: int = 1, num_experts: int = 1) -> EvictionPolicy:
    try:
        cls = _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(_CLASSES)}") from None
    return cls(num_layers, num_experts)
