"""Routing trace files (``moeinf-trace/1``, JSON Lines; the format is documented in docs/traces.md).

Line 1 is the header ``{"format": "moeinf-trace/1", "model": str, "num_layers": L, "num_experts": E, "top_k": K}``.
Every other line is one token at one MoE layer, in execution order:
``{"req": str, "pos": int, "layer": int, "experts": [int, ...], "weights": [float, ...], "phase": "prefill"|"decode"}``
(``weights`` and ``phase`` are optional; a missing phase means decode; unknown keys are ignored). Optional too:
``speculated`` (the experts guessed for the next MoE layer before this one ran) and ``guesses``
(``[[distance, expert, confidence], ...]``: the hidden-state guesses for MoE layers ``layer + distance``).

A forward *step* is a maximal run of lines whose layer never decreases: the worker writes a step layer by layer,
each layer's tokens in batch order, so the next step starts when the layer goes back down. A writer that emits
one token at a time (all layers of a token, then the next token) produces one-token steps, which is also valid.
A decode token of a request that already has a token at that layer in the current step also starts a new step
(a decode step holds one token per request), which tells steps apart in a model with a single MoE layer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, TextIO

FORMAT = "moeinf-trace/1"
PHASES = ("prefill", "decode")
Guess = tuple[int, int, float]  # (distance in MoE layers ahead, expert, confidence: the router's probability)


class TraceError(ValueError):
    """A trace file that does not follow the format; the message names the line."""


@dataclass(frozen=True, slots=True)
class TraceHeader:
    model: str
    num_layers: int
    num_experts: int
    top_k: int


@dataclass(frozen=True, slots=True)
class TraceRecord:
    req: str
    pos: int
    layer: int
    experts: list[int]
    weights: list[float] | None = None
    phase: str = "decode"
    speculated: list[int] | None = None  # optional: the experts guessed, before this layer ran, for the next one
    guesses: list[Guess] | None = None  # optional: every guess made before this layer ran, any distance ahead


@dataclass(frozen=True, slots=True)
class LayerRouting:
    """One MoE layer of one step, by request: the shape of the worker's ``LayerTrace``."""

    layer: int
    experts: list[int]
    tokens: list[list[int]]  # [request][expert]
    weights: list[list[float]]  # router weight sums, [request][expert]
    speculated: list[int] = field(default_factory=list)  # the records' guesses for the next MoE layer (union)
    guesses: list[Guess] = field(default_factory=list)  # the records' guesses (union, the highest confidence)


@dataclass(slots=True)
class Step:
    """One forward step: its requests (in order of first appearance) and, per layer, each token's experts."""

    requests: list[str] = field(default_factory=list)
    tokens: dict[str, set[int]] = field(default_factory=dict)  # request -> positions in this step
    phase: dict[str, str] = field(default_factory=dict)
    layers: dict[int, list[TraceRecord]] = field(default_factory=dict)

    def routing(self, layer: int) -> LayerRouting:
        """``layer`` of this step as the worker's step trace carries it: the experts used, and per request the
        tokens (and router weight sums) each got; ``speculated`` and ``guesses`` are the unions of the records'
        (a guess made for several tokens keeps its highest confidence)."""
        records = self.layers[layer]
        experts = sorted({e for rec in records for e in rec.experts})
        column = {e: j for j, e in enumerate(experts)}
        row = {r: i for i, r in enumerate(self.requests)}
        tokens = [[0] * len(experts) for _ in self.requests]
        weights = [[0.0] * len(experts) for _ in self.requests]
        for rec in records:
            for k, e in enumerate(rec.experts):
                tokens[row[rec.req]][column[e]] += 1
                if rec.weights is not None:
                    weights[row[rec.req]][column[e]] += rec.weights[k]
        guessed = sorted({e for rec in records for e in (rec.speculated or ())})
        return LayerRouting(layer, experts, tokens, weights, guessed, union_of_guesses(rec.guesses for rec in records))

    def has(self, rec: TraceRecord) -> bool:
        """Does this step already hold a token of ``rec.req`` at ``rec.layer``?"""
        return any(r.req == rec.req for r in self.layers.get(rec.layer, ()))

    def add(self, rec: TraceRecord) -> None:
        if rec.req not in self.tokens:
            self.requests.append(rec.req)
            self.tokens[rec.req] = set()
            self.phase[rec.req] = rec.phase
        self.tokens[rec.req].add(rec.pos)
        self.layers.setdefault(rec.layer, []).append(rec)


class TraceWriter:
    """Writes a trace file: the header at once, records as they come (buffered; ``close`` flushes)."""

    def __init__(self, path: Path | str, header: TraceHeader):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(self.path, "w", encoding="utf-8")
        self._file.write(json.dumps({"format": FORMAT, "model": header.model, "num_layers": header.num_layers,
                                     "num_experts": header.num_experts, "top_k": header.top_k}) + "\n")
        self.records = 0

    def write(self, rec: TraceRecord) -> None:
        line = {"req": rec.req, "pos": rec.pos, "layer": rec.layer, "experts": rec.experts}
        if rec.weights is not None:
            line["weights"] = [round(w, 4) for w in rec.weights]
        line["phase"] = rec.phase
        if rec.speculated is not None:
            line["speculated"] = rec.speculated
        if rec.guesses is not None:
            line["guesses"] = [[d, e, round(c, 4)] for d, e, c in rec.guesses]
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.records += 1

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_trace(path: Path | str) -> tuple[TraceHeader, Iterator[TraceRecord]]:
    """The header and an iterator over the records; TraceError (naming the line) on anything malformed."""
    f = open(path, encoding="utf-8")
    try:
        header = _header(f.readline(), path)
    except BaseException:
        f.close()
        raise
    return header, _records(f, path, header)


def _header(line: str, path) -> TraceHeader:
    try:
        head = json.loads(line)
    except ValueError:
        raise TraceError(f"{path}:1: the header is not JSON") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise TraceError(f"{path}:1: not a {FORMAT} trace (the header's format is {head.get('format')!r})"
                         if isinstance(head, dict) else f"{path}:1: the header is not an object")
    values = [head.get(k) for k in ("num_layers", "num_experts", "top_k")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise TraceError(f"{path}:1: num_layers, num_experts and top_k must be positive integers")
    return TraceHeader(str(head.get("model", "")), *values)


def _records(f: TextIO, path, header: TraceHeader) -> Iterator[TraceRecord]:
    with f:
        for number, line in enumerate(f, start=2):
            if line.strip():
                yield parse_record(line, header, f"{path}:{number}")


def parse_record(line: str, header: TraceHeader, where: str = "record") -> TraceRecord:
    try:
        obj = json.loads(line)
    except ValueError:
        raise TraceError(f"{where}: not JSON") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: not an object")
    req, pos, layer, experts = obj.get("req"), obj.get("pos"), obj.get("layer"), obj.get("experts")
    weights, phase = obj.get("weights"), obj.get("phase", "decode")
    if not isinstance(req, str) or not _int(pos) or pos < 0:
        raise TraceError(f"{where}: req must be a string and pos an integer >= 0")
    if not _int(layer) or not 0 <= layer < header.num_layers:
        raise TraceError(f"{where}: layer {layer!r} is not in 0..{header.num_layers - 1}")
    if (not isinstance(experts, list) or not 1 <= len(experts) <= header.num_experts
            or len(set(experts)) != len(experts) or not all(_int(e) and 0 <= e < header.num_experts for e in experts)):
        raise TraceError(f"{where}: experts must be distinct integers in 0..{header.num_experts - 1}")
    if weights is not None and (not isinstance(weights, list) or len(weights) != len(experts)
                                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)):
        raise TraceError(f"{where}: weights must be numbers, one per expert")
    if phase not in PHASES:
        raise TraceError(f"{where}: phase must be 'prefill' or 'decode'")
    speculated = obj.get("speculated")
    if speculated is not None and (not isinstance(speculated, list) or len(set(speculated)) != len(speculated)
                                   or not all(_int(e) and 0 <= e < header.num_experts for e in speculated)):
        raise TraceError(f"{where}: speculated must be distinct integers in 0..{header.num_experts - 1}")
    return TraceRecord(req, pos, layer, experts, None if weights is None else [float(w) for w in weights], phase,
                       speculated, _guesses(obj.get("guesses"), layer, header, where))


def _guesses(raw, layer: int, header: TraceHeader, where: str) -> list[Guess] | None:
    """``guesses``: ``[distance, expert, confidence]`` triples, distinct ``(distance, expert)``, each aiming at a
    MoE layer after this one, with a confidence in [0, 1]."""
    if raw is None:
        return None
    bad = TraceError(f"{where}: guesses must be [distance, expert, confidence] triples: distance >= 1 with layer +"
                     f" distance < {header.num_layers}, expert in 0..{header.num_experts - 1}, confidence in [0, 1],"
                     " no (distance, expert) twice")
    if not isinstance(raw, list):
        raise bad
    out = []
    for g in raw:
        if not isinstance(g, list) or len(g) != 3:
            raise bad
        d, e, c = g
        if (not _int(d) or not _int(e) or isinstance(c, bool) or not isinstance(c, (int, float))
                or not 1 <= d < header.num_layers - layer or not 0 <= e < header.num_experts or not 0 <= c <= 1):
            raise bad
        out.append((d, e, float(c)))
    if len({(d, e) for d, e, _ in out}) != len(out):
        raise bad
    return out


def union_of_guesses(groups: Iterable[list[Guess] | None]) -> list[Guess]:
    """The guesses of several records (tokens of one layer) as one list, sorted: a ``(distance, expert)`` guessed
    for several tokens keeps its highest confidence."""
    best: dict[tuple[int, int], float] = {}
    for group in groups:
        for d, e, c in group or ():
            best[d, e] = max(c, best.get((d, e), 0.0))
    return [(d, e, c) for (d, e), c in sorted(best.items())]


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def group_steps(records: Iterable[TraceRecord]) -> Iterator[Step]:
    """Forward steps: a new one starts whenever the layer goes down."""
    step, last = Step(), -1
    for rec in records:
        if step.requests and (rec.layer < last or (rec.phase == "decode" and step.has(rec))):
            yield step
            step = Step()
        step.add(rec)
        last = rec.layer
    if step.requests:
        yield step
