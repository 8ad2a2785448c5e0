"""A synthetic routing trace with the structure the MoE-Infinity paper describes, in the moeinf-trace/1 format.

Requests come from a few latent *topics*. Each topic favours a few experts per layer (group activation: they
co-activate across layers for every request of the topic). Each request picks, per layer, a small working set
from its topic's experts with skewed (Zipf) weights and routes most decode tokens there (skewed reuse); its prompt
tokens spread wider (the whole topic, plus uniform noise). A share of every token's routing is noise. Several
requests may run at once (continuous batching: a new request's prompt shares a step with the others' decode).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.traces import TraceHeader, TraceRecord, TraceWriter


@dataclass(frozen=True, slots=True)
class Workload:
    num_layers: int = 8
    num_experts: int = 32
    top_k: int = 2
    topics: int = 6
    topic_experts: int = 6  # experts a topic favours in each layer
    working_set: int = 3  # of those, how many one request uses per layer
    zipf: float = 1.2  # skew of a request's use of its working set
    noise: float = 0.05  # share of decode routing that ignores the request's working set
    prompt_noise: float = 0.15  # the same for prompt tokens ...
    prompt_topic: float = 0.3  # ... which also use any expert of the topic this often (else the request's own)
    requests: int = 60
    prompt_tokens: tuple[int, int] = (16, 48)
    decode_tokens: tuple[int, int] = (32, 64)
    batch: int = 1  # requests running at once
    seed: int = 0


def generate(w: Workload) -> tuple[TraceHeader, list[TraceRecord]]:
    rng = random.Random(w.seed)
    topics = [[rng.sample(range(w.num_experts), w.topic_experts) for _ in range(w.num_layers)]
              for _ in range(w.topics)]
    pending = [_Request(f"req-{i}", rng.choice(topics), w, rng) for i in range(w.requests)]
    pending.reverse()
    running: list[_Request] = []
    records: list[TraceRecord] = []
    while pending or running:
        while pending and len(running) < w.batch:
            running.append(pending.pop())
        tokens = [(r, pos, r.phase()) for r in running for pos in r.next_positions()]
        for layer in range(w.num_layers):
            for r, pos, phase in tokens:
                records.append(TraceRecord(r.id, pos, layer, r.route(layer, phase, rng), None, phase))
        for r in running:
            r.advance()
        running = [r for r in running if not r.finished]
    return TraceHeader("synthetic", w.num_layers, w.num_experts, w.top_k), records


class _Request:
    def __init__(self, rid: str, topic: list[list[int]], w: Workload, rng: random.Random):
        self.id, self.w, self.topic = rid, w, topic
        self.sets = [rng.sample(experts, w.working_set) for experts in topic]
        weights = [1 / (i + 1) ** w.zipf for i in range(w.working_set)]
        self.weights = [weights[:] for _ in topic]
        for ws in self.weights:
            rng.shuffle(ws)
        self.prompt = rng.randint(*w.prompt_tokens)
        self.decode = rng.randint(*w.decode_tokens)
        self.done = 0  # tokens run so far

    def phase(self) -> str:
        return "prefill" if self.done == 0 else "decode"

    def next_positions(self) -> range:
        return range(0, self.prompt) if self.done == 0 else range(self.done, self.done + 1)

    def advance(self) -> None:
        self.done = self.prompt if self.done == 0 else self.done + 1

    @property
    def finished(self) -> bool:
        return self.done >= self.prompt + self.decode

    def route(self, layer: int, phase: str, rng: random.Random) -> list[int]:
        w = self.w
        noise = w.noise if phase == "decode" else w.prompt_noise
        chosen: list[int] = []
        while len(chosen) < w.top_k:
            if rng.random() < noise or len(chosen) >= w.working_set:
                e = rng.randrange(w.num_experts)
            elif phase == "prefill" and rng.random() < w.prompt_topic:
                e = rng.choice(self.topic[layer])
            else:
                e = rng.choices(self.sets[layer], self.weights[layer])[0]
            if e not in chosen:
                chosen.append(e)
        return chosen


def write(path: Path | str, w: Workload = Workload()) -> Path:
    return _write(path, *generate(w))


# ---------------------------------------------------------------------------------------------- flat routing
@dataclass(frozen=True, slots=True)
class FlatWorkload:
    """Routing shaped like a trained Mixtral-8x7B's (docs/traces.md): no topics, little skew, weak memory.

    Each request draws, per layer, a preference over the experts from a symmetric Dirichlet(``alpha``), so the
    corpus uses every expert about equally while one request leans on a few (its top two take ~36% of its
    routing at a layer). A token picks its ``top_k`` experts without replacement with weights ``preference *
    exp(stick * [routed at this layer by the previous token] + chain * affinity[previous layer's experts])``:
    ``stick`` is the token-to-token memory at a layer, ``chain`` a fixed random affinity between an expert and
    the next layer's experts (the first-order Markov structure across layers). The defaults reproduce the public
    statistics of real Mixtral routing (``routing_stats.py`` measures them; tests/bench/test_synthetic_flat.py
    holds them within tolerances over several seeds).
    """

    num_layers: int = 32
    num_experts: int = 8
    top_k: int = 2
    alpha: float = 8.0  # per-request preference concentration (higher: flatter)
    stick: float = 0.55  # log-weight bonus for the previous token's experts at the same layer
    chain: float = 0.6  # log-weight scale of the cross-layer affinity
    requests: int = 5
    prompt_tokens: tuple[int, int] = (16, 64)
    decode_tokens: tuple[int, int] = (120, 160)
    batch: int = 1
    seed: int = 0


def generate_flat(w: FlatWorkload) -> tuple[TraceHeader, list[TraceRecord]]:
    rng = np.random.default_rng(w.seed)
    affinity = rng.standard_normal((w.num_layers, w.num_experts, w.num_experts))  # [l, e at l-1, e at l]
    affinity -= affinity.mean(1, keepdims=True)  # no expert is favoured on average: the corpus stays flat
    pending = [_FlatRequest(f"flat-{i}", w, rng) for i in range(w.requests)][::-1]
    running: list[_FlatRequest] = []
    records: list[TraceRecord] = []
    while pending or running:
        while pending and len(running) < w.batch:
            running.append(pending.pop())
        steps = [(r, r.phase(), r.next_positions()) for r in running]
        routed = {(r.id, pos): r.route_token(affinity, rng) for r, _, positions in steps for pos in positions}
        for layer in range(w.num_layers):
            for r, phase, positions in steps:
                for pos in positions:
                    records.append(TraceRecord(r.id, pos, layer, routed[(r.id, pos)][layer], None, phase))
        for r in running:
            r.advance()
        running = [r for r in running if not r.finished]
    return TraceHeader("synthetic-mixtral-flat", w.num_layers, w.num_experts, w.top_k), records


class _FlatRequest(_Request):
    def __init__(self, rid: str, w: FlatWorkload, rng):
        self.id, self.w = rid, w
        self.log_pref = np.log(rng.dirichlet([w.alpha] * w.num_experts, size=w.num_layers) + 1e-12)
        self.prompt = int(rng.integers(w.prompt_tokens[0], w.prompt_tokens[1] + 1))
        self.decode = int(rng.integers(w.decode_tokens[0], w.decode_tokens[1] + 1))
        self.done = 0
        self.previous: list[list[int]] | None = None  # the last token's experts per layer

    def route_token(self, affinity, rng) -> list[list[int]]:
        """One token's experts at every layer (top_k, without replacement, Gumbel top-k)."""
        w, out = self.w, []
        for layer in range(w.num_layers):
            logits = self.log_pref[layer].copy()
            if self.previous is not None:
                logits[self.previous[layer]] += w.stick
            if layer:
                logits += w.chain * affinity[layer, out[-1]].sum(0)
            noisy = logits + rng.gumbel(size=w.num_experts)
            out.append([int(e) for e in np.argsort(-noisy)[:w.top_k]])
        self.previous = out
        return out


def write_flat(path: Path | str, w: FlatWorkload = FlatWorkload()) -> Path:
    return _write(path, *generate_flat(w))


def _write(path, header: TraceHeader, records: list[TraceRecord]) -> Path:
    writer = TraceWriter(path, header)
    try:
        for rec in records:
            writer.write(rec)
    finally:
        writer.close()
    return Path(path)
