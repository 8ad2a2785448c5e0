"""Which experts the next layers will need: EAMC match + the request's own history + the next-gate guess.

After layer ``l`` of a step (memd sees it as the layer's ACQUIRE, which carries the routing per request), every
request of the step is described by its EAM so far (traced steps + this step's layers up to ``l``). It is matched
against the whole EAMC in one matrix product; the similarity-weighted average of the top matches is a prior that
the request's own history updates (a Dirichlet posterior: decode counts weigh fully, the prompt's less), so a
request's skewed reuse of a few experts dominates once it has decoded a few tokens. Per token, expert ``e`` of
layer ``i`` is picked with probability ``q = min(1, top_k * P[i, e])``; the batch needs it with probability
``1 - prod_r (1 - q_r)^tokens_r``, for the remaining layers of this step and the early layers of the next one.
The worker's hidden-state guesses (the routers of layers l+1..l+k applied to layer l's
hidden state) are combined in for their target layers, each weighted by the precision measured at its distance.
Every prediction is scored against what was then routed, per lookahead distance.

Cost: the EAMC match and the batch need are computed once per decode step (at every layer of a step with prompt
tokens, whose observed rows still grow); each layer then adds the next-gate guess and scores what was routed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.memd.eam import EamTable
from services.memd.eamc import Eamc

PRIOR_TOKENS = 4.0  # the EAMC prior weighs like this many decode tokens (times the match similarity)
PROMPT_WEIGHT = 0.25  # a prompt token's routing counts this much of a decode token's ...
PROMPT_CAP = 32.0  # ... and a prompt weighs at most this many decode tokens in all
NEXT_GATE_PRIOR = 0.5  # next-gate precision assumed until measured
EWMA = 0.05
CONF_BINS = 5  # a guess's router probability, in bins of 0.2: each bin's own measured precision, by distance and
# by whether the expert was resident when guessed (prefetch acts only on the others, whose guesses are worse)


@dataclass(slots=True)
class WorkerStep:
    """One worker's position and what its current step has routed so far."""

    step: int = -1
    layer: int = -1
    requests: list[str] = field(default_factory=list)
    tokens: np.ndarray | None = None  # [R] tokens of each request in this step
    prefill: np.ndarray | None = None  # [R] bool
    partial: np.ndarray | None = None  # [R, L, E] this step's routing so far
    match: np.ndarray | None = None  # [R, L, E] EAMC prediction (row distributions)
    match_sim: np.ndarray | None = None  # [R]
    matched_rows: np.ndarray | None = None  # [R] observed rows when last matched
    need: np.ndarray | None = None  # [L, E] batch need, kept through a decode-only step ...
    likely: list | None = None  # ... and, per layer, the experts whose need reaches the threshold
    last_time: float | None = None
    stalled: float = 0.0  # seconds its acquires waited for loads since its last note (not compute)
    guesses: dict[int, dict[int, tuple[float, bool]]] = field(default_factory=dict)  # target -> expert -> conf, absent
    routed: list[int] = field(default_factory=list)  # the experts of the current layer


@dataclass(slots=True)
class Target:
    distance: int  # layers ahead of the one just acquired
    step: int
    layer: int
    need: np.ndarray  # [E] probability each expert runs there
    likely: list[int] | None = None  # the experts whose need reaches the threshold (None: not computed)


@dataclass(slots=True)
class Lookahead:
    predicted: int = 0
    correct: int = 0
    routed: int = 0


class Predictor:
    def __init__(self, num_layers: int, num_experts: int, top_k: int, eamc: Eamc, eams: EamTable, *,
                 window: int, threshold: float, top: int):
        self.L, self.E, self.top_k = num_layers, num_experts, max(1, top_k)
        self.eamc, self.eams = eamc, eams
        self.window, self.threshold, self.top = min(window, num_layers), threshold, top
        self.workers: dict[object, WorkerStep] = {}
        self.lookahead = [Lookahead() for _ in range(self.window)]
        self.pending: dict[tuple[object, int, int], dict[int, set[int]]] = {}  # (worker, step, layer) -> d -> set
        self.speculation = [Lookahead() for _ in range(num_layers)]  # the worker's guesses alone, by distance
        self.spec_precision = [NEXT_GATE_PRIOR] * num_layers  # measured (EWMA), by distance
        self.spec_calibrated = np.full((2, num_layers, CONF_BINS), NEXT_GATE_PRIOR)  # [absent?, distance, conf bin]
        self._spec_pending: dict[tuple[object, int, int], dict[int, dict[int, tuple[float, bool]]]] = {}
        self.layer_seconds: float | None = None
        self.match_similarity: float | None = None

    # ---------------------------------------------------------------- positions
    def advance(self, worker, step: int, layer: int, requests: list[str], tokens: list[list[int]],
                prefill: list[bool], now: float) -> bool:
        """Place ``worker`` at (step, layer); returns True when this begins a new step."""
        state = self.workers.setdefault(worker, WorkerStep())
        new_step = step != state.step or layer <= state.layer
        elapsed = None if state.last_time is None else now - state.last_time
        if not new_step and elapsed is not None and elapsed > state.stalled:  # compute: between notes, less stalls
            seconds = (elapsed - state.stalled) / max(1, layer - state.layer)  # (a late note gives no sample)
            self.layer_seconds = seconds if self.layer_seconds is None else (
                (1 - EWMA) * self.layer_seconds + EWMA * seconds)
        if new_step or requests != state.requests:
            self._begin(state, requests, tokens, prefill)
        state.step, state.layer, state.last_time, state.stalled = step, layer, now, 0.0
        return new_step

    def stalled(self, worker, seconds: float) -> None:
        """An acquire of ``worker`` waited ``seconds`` for loads: not part of its layers' compute time."""
        state = self.workers.get(worker)
        if state is not None:
            state.stalled += seconds

    def _begin(self, state: WorkerStep, requests, tokens, prefill) -> None:
        count = len(requests)
        state.requests = list(requests)
        routed = np.array([sum(row) for row in tokens], dtype=np.float32) if tokens else np.zeros(count, np.float32)
        state.tokens = np.maximum(1.0, np.ceil(routed / self.top_k))
        state.prefill = np.array(prefill if len(prefill) == count else [False] * count, dtype=bool)
        state.partial = np.zeros((count, self.L, self.E), np.float32)
        state.match, state.match_sim, state.matched_rows, state.need = None, None, None, None
        state.guesses = {}

    def forget(self, worker) -> None:
        self.workers.pop(worker, None)
        for key in [k for k in self.pending if k[0] == worker]:
            del self.pending[key]
        for key in [k for k in self._spec_pending if k[0] == worker]:
            del self._spec_pending[key]

    @property
    def next_gate(self) -> Lookahead:
        """The guess one layer ahead (what the next-gate guess alone used to be)."""
        return self.speculation[0]

    def duplicate(self, worker, step: int, layer: int) -> bool:
        """Was (step, layer) of ``worker`` already fed (by its note or its acquire)? (An earlier layer of the same
        step number begins a new step, as for a client that never numbers its steps.)"""
        state = self.workers.get(worker)
        return state is not None and state.step == step and layer == state.layer

    # ---------------------------------------------------------------- scoring
    def score(self, worker, step: int, layer: int, routed: list[int]) -> None:
        """Score the predictions made for (step, layer) against the experts that were routed there."""
        actual = set(routed)
        for key in [k for k in self.pending if k[0] == worker and (k[1], k[2]) <= (step, layer)]:
            for distance, predicted in self.pending.pop(key).items():
                if (key[1], key[2]) == (step, layer):
                    self._count(self.lookahead[distance - 1], predicted, actual)
        for key in [k for k in self._spec_pending if k[0] == worker and (k[1], k[2]) <= (step, layer)]:
            for distance, guess in self._spec_pending.pop(key).items():
                if (key[1], key[2]) == (step, layer) and guess:
                    self._count(self.speculation[distance - 1], set(guess), actual)
                    precision = len(guess.keys() & actual) / len(guess)
                    self.spec_precision[distance - 1] += EWMA * (precision - self.spec_precision[distance - 1])
                    for expert, (conf, absent) in guess.items():
                        if conf >= 0:
                            row = self.spec_calibrated[int(absent), distance - 1]
                            b = _bin(conf)
                            row[b] += EWMA * ((expert in actual) - row[b])

    def guess_probability(self, distance: int, conf: float, absent: bool = False) -> float:
        """How often a guess made ``distance`` layers ahead with router probability ``conf`` came true, among the
        guesses of experts that were (not, when ``absent``) resident when guessed; measured. A guess without a
        confidence gets its distance's overall precision."""
        if conf < 0:
            return self.spec_precision[distance - 1]
        return float(self.spec_calibrated[int(absent), distance - 1, _bin(conf)])

    @staticmethod
    def _count(stats: Lookahead, predicted: set[int], actual: set[int]) -> None:
        stats.predicted += len(predicted)
        stats.correct += len(predicted & actual)
        stats.routed += len(actual)

    # ---------------------------------------------------------------- prediction
    def observe(self, worker, layer: int, experts: list[int], tokens: list[list[int]]) -> None:
        state = self.workers[worker]
        state.routed = list(experts)
        if tokens and len(tokens) == len(state.requests):
            state.partial[:, layer, experts] += np.asarray(tokens, dtype=np.float32)

    def guess(self, worker, layers: list[int], experts: list[int], confidence: list[float] = (),
              resident=lambda key: False) -> None:
        """The worker's guesses made at its current layer: ``experts[i]`` runs at MoE layer ``layers[i]`` of this
        step (later layers only; others are ignored), ``confidence[i]`` its router probability (-1 or absent: not
        known); ``resident(key)``: is it in the pool now. They replace the guesses made at earlier layers."""
        state = self.workers[worker]
        state.guesses = {}
        confidence = list(confidence) if len(confidence) == len(experts) else [-1.0] * len(experts)
        for target, expert, conf in zip(layers, experts, confidence):
            if state.layer < target < self.L:
                state.guesses.setdefault(target, {})[expert] = (float(conf), not resident((target, expert)))
        for target, guessed in state.guesses.items():
            pending = self._spec_pending.setdefault((worker, state.step, target), {})
            pending[target - state.layer] = dict(guessed)

    def predict(self, worker) -> tuple[list[Target], np.ndarray]:
        """Targets for the next ``window`` layers and ``need[L, E]``: the probability each expert runs the next
        time its layer runs (the rest of this step, then the next step)."""
        state = self.workers[worker]
        layer = state.layer
        if state.need is None or state.prefill.any():  # a decode step's need barely moves: once per step
            state.need = self._batch_need(state) if state.requests else np.zeros((self.L, self.E))
            likely = state.need >= self.threshold
            state.likely = [np.flatnonzero(row).tolist() for row in likely]
        need, likely = state.need, state.likely
        if state.guesses:
            need, likely = need.copy(), list(likely)
            for target, guessed in state.guesses.items():
                if target <= layer:
                    continue
                guess = np.zeros(self.E)
                for expert, (conf, absent) in guessed.items():
                    guess[expert] = self.guess_probability(target - layer, conf, absent)
                need[target] = 1 - (1 - need[target]) * (1 - guess)
                likely[target] = np.flatnonzero(need[target] >= self.threshold).tolist()
        targets = []
        for distance in range(1, self.window + 1):
            step, target = divmod(layer + distance, self.L)
            t = Target(distance, state.step + step, target, need[target], likely[target])
            targets.append(t)
            self.pending.setdefault((worker, t.step, t.layer), {})[distance] = set(t.likely)
        return targets, need

    def _batch_need(self, state: WorkerStep) -> np.ndarray:
        history = self._history(state)  # [R, L, E] counts, [R, L] totals
        self._refresh_match(state, history)
        prior = PRIOR_TOKENS * self.top_k * state.match_sim[:, None, None]  # [R, 1, 1]
        counts = history
        totals = counts.sum(-1, keepdims=True)
        denom = prior + totals
        dist = np.divide(prior * state.match + counts, denom, out=np.zeros_like(counts), where=denom > 0)
        per_token = np.minimum(1.0, self.top_k * dist)  # [R, L, E]
        # tokens each request brings the next time each layer runs: this step's after `layer`, then one (decode)
        upcoming = np.where(np.arange(self.L) > state.layer, 1.0, 0.0)
        tokens = upcoming[None, :] * state.tokens[:, None] + (1 - upcoming[None, :])  # [R, L]
        log_miss = np.log1p(-np.minimum(per_token, 1 - 1e-6)) * tokens[:, :, None]
        return 1 - np.exp(log_miss.sum(0))

    def _history(self, state: WorkerStep) -> np.ndarray:
        """Each request's routing so far as weighted counts: decode fully, prompt down-weighted and capped."""
        out = np.empty_like(state.partial)
        for r, request in enumerate(state.requests):
            eam = self.eams.get(request)
            prefill = eam.prefill if eam is not None else 0.0
            decode = eam.decode if eam is not None else 0.0
            prompt_tokens = eam.prompt_tokens if eam is not None else 0
            if state.prefill[r]:
                prefill = prefill + state.partial[r]
                prompt_tokens += int(state.tokens[r])
            else:
                decode = decode + state.partial[r]
            weight = PROMPT_WEIGHT * min(1.0, PROMPT_CAP / max(1, prompt_tokens))
            out[r] = decode + weight * np.asarray(prefill, np.float32)
        return out

    def _refresh_match(self, state: WorkerStep, history: np.ndarray) -> None:
        rows = (history.sum(-1) > 0).sum(-1)  # observed rows per request
        stale = np.ones(len(rows), bool) if state.match is None else rows > state.matched_rows
        if not stale.any():
            return
        if state.match is None:
            state.match = np.zeros_like(history)
            state.match_sim = np.zeros(len(rows), np.float32)
            state.matched_rows = np.zeros(len(rows), np.int64)
        queries = np.stack([self._eam_so_far(state, r) for r in np.flatnonzero(stale)])
        predicted, sims = self.eamc.predict(queries, self.top)
        state.match[stale], state.match_sim[stale], state.matched_rows[stale] = predicted, sims, rows[stale]
        if len(self.eamc):
            mean = float(sims.mean())
            self.match_similarity = mean if self.match_similarity is None else (
                (1 - EWMA) * self.match_similarity + EWMA * mean)

    def _eam_so_far(self, state: WorkerStep, r: int) -> np.ndarray:
        eam = self.eams.get(state.requests[r])
        return state.partial[r] if eam is None else eam.total + state.partial[r]

    # ---------------------------------------------------------------- report
    def lookahead_stats(self) -> list[tuple[int, Lookahead]]:
        return [(d + 1, s) for d, s in enumerate(self.lookahead)]

    def speculation_stats(self) -> list[tuple[int, Lookahead]]:
        """The worker's guesses by distance, up to the farthest one that was ever scored."""
        last = max((d for d, s in enumerate(self.speculation) if s.predicted or s.routed), default=-1)
        return [(d + 1, self.speculation[d]) for d in range(last + 1)]


def _bin(conf: float) -> int:
    return min(CONF_BINS - 1, max(0, int(conf * CONF_BINS)))
