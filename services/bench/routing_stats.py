"""Statistics of a routing trace that decide how much any expert cache can gain (pure functions, numpy).

Measured on decode tokens of single-request traces (each request's tokens in order):

- ``top2_share``: per request and layer, the share of its routing that its two most used experts take
  (uniform routing with ``top_k=2`` of 8: 25%, plus sampling noise), averaged;
- ``prev_token_recall``: the previous token's experts at a layer as the guess for this token's (|both| / top_k);
- ``markov_recall``: a first-order chain across layers, fitted on half of the requests and scored on the
  other half: layer l's experts vote for layer l+1's through the fitted transition counts, top_k best guessed;
- ``corpus_spread``: per layer, the most used expert's share over the least used one's, over the whole trace
  (the worst layer): near 1 when the corpus uses experts uniformly;
- ``eam_oracle_vs_lru`` / ``belady_vs_lru`` at a capacity: the fetches of a static cache holding, per request,
  the experts its own EAM uses most (a perfect EAM oracle; ``capacity - top_k`` of them, the rest of the pool
  takes the misses) and of Belady's MIN, over those of on-demand LRU.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from common.traces import TraceHeader, TraceRecord
from services.bench.bounds import belady_fetches, lru_fetches


def request_routes(records: list[TraceRecord], *, decode_only: bool = True) -> dict[str, np.ndarray]:
    """request -> [tokens, layers, top_k] experts, tokens in position order."""
    rows: dict[str, dict[int, dict[int, list[int]]]] = defaultdict(lambda: defaultdict(dict))
    for rec in records:
        if decode_only and rec.phase == "prefill":
            continue
        rows[rec.req][rec.pos][rec.layer] = sorted(rec.experts)
    out = {}
    for req, tokens in rows.items():
        out[req] = np.array([[tokens[p][l] for l in sorted(tokens[p])] for p in sorted(tokens)])
    return out


def top2_share(routes: dict[str, np.ndarray], num_experts: int) -> float:
    shares = []
    for r in routes.values():
        for layer in range(r.shape[1]):
            counts = np.bincount(r[:, layer].ravel(), minlength=num_experts)
            shares.append(np.sort(counts)[-2:].sum() / counts.sum())
    return float(np.mean(shares))


def prev_token_recall(routes: dict[str, np.ndarray]) -> float:
    hits = total = 0
    for r in routes.values():
        same = (r[1:, :, :, None] == r[:-1, :, None, :]).any(-1)  # [t, l, k]: routed by the previous token too
        hits, total = hits + same.sum(), total + same.size
    return float(hits / total)


def markov_recall(routes: dict[str, np.ndarray], num_experts: int) -> float:
    names = sorted(routes)
    fit, test = names[::2], names[1::2] or names[::2]
    _, layers, top_k = routes[names[0]].shape
    counts = np.ones((layers, num_experts, num_experts))  # [l, e at l, e at l+1], add-one
    for name in fit:
        r = routes[name]
        for l in range(layers - 1):
            np.add.at(counts[l], (r[:, l, :, None], r[:, l + 1, None, :]), 1)
    hits = total = 0
    for name in test:
        r = routes[name]
        for l in range(layers - 1):
            votes = counts[l][r[:, l]].sum(1)  # [t, E]
            guess = np.argsort(-votes, axis=1)[:, :top_k]
            hits += (guess[:, :, None] == r[:, l + 1, None, :]).any(-1).sum()
            total += guess.size
    return float(hits / total)


def corpus_spread(records: list[TraceRecord], header: TraceHeader) -> float:
    counts = np.zeros((header.num_layers, header.num_experts))
    for rec in records:
        counts[rec.layer, rec.experts] += 1
    return float((counts.max(1) / np.maximum(1, counts.min(1))).max())


def accesses(routes: dict[str, np.ndarray]) -> list[list[tuple[int, int]]]:
    """The layer-by-layer acquires of the requests run one after another (one token per step)."""
    return [[(l, int(e)) for e in r[t, l]] for r in routes.values() for t in range(r.shape[0])
            for l in range(r.shape[1])]


def eam_oracle_fetches(routes: dict[str, np.ndarray], capacity: int) -> int:
    fetches = 0
    for r in routes.values():
        _, layers, top_k = r.shape
        use = Counter((l, int(e)) for t in range(r.shape[0]) for l in range(layers) for e in r[t, l])
        static = {k for k, _ in use.most_common(capacity - top_k)}
        fetches += len(static) + sum(n for k, n in use.items() if k not in static)
    return fetches


def summary(header: TraceHeader, records: list[TraceRecord], capacity_share: float = 0.25) -> dict[str, float]:
    routes = request_routes(records)
    capacity = int(header.num_layers * header.num_experts * capacity_share)
    seq = accesses(routes)
    lru = lru_fetches(seq, capacity)
    return {
        "top2_share": top2_share(routes, header.num_experts),
        "prev_token_recall": prev_token_recall(routes),
        "markov_recall": markov_recall(routes, header.num_experts),
        "corpus_spread": corpus_spread(records, header),
        "eam_oracle_vs_lru": eam_oracle_fetches(routes, capacity) / lru,
        "belady_vs_lru": belady_fetches(seq, capacity) / lru,
    }
