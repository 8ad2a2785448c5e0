"""Eviction policies behind one interface. memd asks a policy for a victim among the evictable residents.

``lru`` and ``lfu`` are the baselines. ``activation`` is the paper's activation-aware cache: an expert's keep-score
grows with its decode reuse in the live requests, its predicted need (from the EAMC match and the next-gate guess),
its global frequency and its use in the last two steps, and is biased towards shallow layers, whose misses a
prefetch has the least time to hide (at the start of a step only the previous step's last layers run before them).
Experts loaded only for prompts are admitted as transient, so one long prompt does not flush the decode working set.
Pinned and loading experts never reach a policy: the slot table filters them.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np

from common.config import POLICIES

Key = tuple[int, int]  # (MoE layer, expert)


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
        """A worker reached MoE ``layer`` (every layer of every step, leased or not)."""

    def observe_need(self, need: np.ndarray) -> None:
        """``need[l, e]``: predicted probability that expert e of layer l runs the next time layer l runs."""

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        """The resident key to evict next among those ``evictable`` allows, or None when none is."""
        raise NotImplementedError

    def admits(self, candidate: Key, victim: Key, priority: float) -> bool:
        """May a prefetch of ``candidate`` (priority in [0, 1]) evict ``victim``? The baselines always let it."""
        return True


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


class _ScoredPolicy(EvictionPolicy):
    """A policy that evicts the resident key with the lowest score, kept as dense ``[layers, experts]`` arrays."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        self.resident = np.zeros((num_layers, num_experts), dtype=bool)
        self.last_use = np.zeros((num_layers, num_experts), dtype=np.int64)  # tie-break: least recent first
        self._clock = 0
        self._scores: np.ndarray | None = None  # cached until something changes

    def changed(self) -> None:
        self._scores = None

    def cached_scores(self) -> np.ndarray:
        if self._scores is None:
            self._scores = self.scores()
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
        self.changed()

    def scores(self) -> np.ndarray:
        raise NotImplementedError

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        # score first, then recency (a tiny fraction of it) among equal scores
        recency = self.last_use / (self._clock + 1.0)
        masked = np.where(self.resident, self.cached_scores() * 1e6 + recency, np.inf).ravel()
        for _ in range(int(self.resident.sum())):
            index = int(np.argmin(masked))
            if masked[index] == np.inf:
                return None
            key = divmod(index, self.num_experts)
            if evictable(key):
                return key
            masked[index] = np.inf
        return None


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


# keep-score = (NEED * need + REUSE * reuse + FREQ * frequency + RECENT * recent)
#              * (1 + LAYER_BIAS * (1 - layer / layers)), times TRANSIENT while the expert is transient.
# Tuned on the synthetic workload and the demo model's trace (docs/traces.md has the measurements).
NEED, REUSE, FREQ, LAYER_BIAS = 2.0, 1.0, 0.25, 0.5
TRANSIENT = 0.1
REUSE_DECAY = 0.7  # per step: reuse counts halve in about 2 steps
RECENT = 0.5  # bonus for an expert used in this step or the one before (recency, as LRU has)
PREFILL_ACCESS = 0.25  # a prompt's access counts this much towards frequency (decode counts 1)


class ActivationPolicy(_ScoredPolicy):
    """Keep-score from decode reuse, predicted need, a shallow-layer bias and frequency (see module docstring)."""

    name = "activation"
    spares_predicted = True

    def __init__(self, num_layers: int, num_experts: int) -> None:
        super().__init__(num_layers, num_experts)
        shape = (num_layers, num_experts)
        self.reuse = np.zeros(shape)  # decayed decode accesses, as of step ``reuse_step``
        self.reuse_step = np.zeros(shape, dtype=np.int64)
        self.used_step = np.full(shape, -10, dtype=np.int64)
        self.freq = np.zeros(shape)
        self.need = np.zeros(shape)
        self.transient = np.zeros(shape, dtype=bool)
        self.step = 0
        self.layer_factor = (1 + LAYER_BIAS * (1 - np.arange(num_layers) / num_layers))[:, None]

    def on_insert(self, key: Key, *, transient: bool = False) -> None:
        super().on_insert(key)
        self.transient[key] = transient and self.reuse_now(key) < 1e-3
        self.changed()

    def on_access(self, key: Key, *, decode: bool = True) -> None:
        super().on_access(key)
        self.used_step[key] = self.step
        if decode:
            self.reuse[key] = self.reuse_now(key) + 1.0
            self.reuse_step[key] = self.step
            self.transient[key] = False
        self.freq[key] += 1.0 if decode else PREFILL_ACCESS

    def on_step(self) -> None:
        self.step += 1
        self.changed()

    def observe_need(self, need: np.ndarray) -> None:
        self.need = np.clip(need, 0.0, 1.0)
        self.changed()

    def reuse_now(self, key=None) -> np.ndarray | float:
        if key is not None:
            return float(self.reuse[key] * REUSE_DECAY ** (self.step - self.reuse_step[key]))
        return self.reuse * REUSE_DECAY ** (self.step - self.reuse_step)

    def scores(self) -> np.ndarray:
        reuse = 1 - 1 / (1 + self.reuse_now())  # saturating in [0, 1)
        freq = self.freq / max(1.0, float(self.freq.max()))
        recent = (self.step - self.used_step) <= 1
        score = (NEED * self.need + REUSE * reuse + FREQ * freq + RECENT * recent) * self.layer_factor
        return np.where(self.transient, score * TRANSIENT, score)

    def admits(self, candidate: Key, victim: Key, priority: float) -> bool:
        """Only evict for a prefetch whose expert would score higher than the victim does."""
        scores = self.cached_scores()
        layer = candidate[0]
        mine = max(scores[candidate], NEED * priority * float(self.layer_factor[layer, 0]))
        return mine > scores[victim]


_CLASSES = {"lru": LruPolicy, "lfu": LfuPolicy, "activation": ActivationPolicy}
assert tuple(_CLASSES) == POLICIES


def make_policy(name: str, num_layers: int = 1, num_experts: int = 1) -> EvictionPolicy:
    try:
        cls = _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(_CLASSES)}") from None
    return cls(num_layers, num_experts)
