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
    header, records = generate(w)
    writer = TraceWriter(path, header)
    try:
        for rec in records:
            writer.write(rec)
    finally:
        writer.close()
    return Path(path)
