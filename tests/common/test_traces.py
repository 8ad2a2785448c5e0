"""The moeinf-trace/1 format: writer and reader round-trip, every malformed line is a TraceError naming its line,
steps are recovered from execution order, and the files kept in tests/data parse."""
import json
from pathlib import Path

import pytest

from common.traces import TraceError, TraceHeader, TraceRecord, TraceWriter, group_steps, read_trace

DATA = Path(__file__).parent.parent / "data"
HEADER = TraceHeader("tiny", 2, 4, 2)


def write_lines(path: Path, *lines) -> Path:
    head = {"format": "moeinf-trace/1", "model": "tiny", "num_layers": 2, "num_experts": 4, "top_k": 2}
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in (head, *lines)) + "\n")
    return path


def test_round_trip(tmp_path):
    records = [TraceRecord("a", 0, 0, [1, 3], [0.75, 0.25], "prefill"), TraceRecord("a", 1, 0, [0, 1], None, "prefill"),
               TraceRecord("a", 0, 1, [2, 3], [0.123456, 0.876544], "prefill"), TraceRecord("a", 2, 0, [3, 0])]
    writer = TraceWriter(tmp_path / "t.jsonl", HEADER)
    for rec in records:
        writer.write(rec)
    writer.close()
    header, got = read_trace(tmp_path / "t.jsonl")
    got = list(got)
    assert header == HEADER
    assert [(r.req, r.pos, r.layer, r.experts, r.phase) for r in got] == [
        (r.req, r.pos, r.layer, r.experts, r.phase) for r in records]
    assert got[2].weights == [0.1235, 0.8765] and got[1].weights is None  # weights are rounded to 4 decimals
    first = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[1])
    assert first == {"req": "a", "pos": 0, "layer": 0, "experts": [1, 3], "weights": [0.75, 0.25], "phase": "prefill"}


def test_guesses_round_trip_and_their_union_per_layer(tmp_path):
    """``speculated`` and ``guesses`` (distance, expert, confidence) are written and read back; a step's layer
    holds the union of its tokens' guesses, each at its highest confidence."""
    header = TraceHeader("tiny", 3, 4, 2)
    records = [TraceRecord("a", 0, 0, [1, 3], None, "decode", [2], [(1, 2, 0.61234), (2, 0, 0.3)]),
               TraceRecord("b", 0, 0, [0, 1], None, "decode", [2, 3], [(1, 2, 0.9), (1, 3, 0.4)]),
               TraceRecord("a", 0, 2, [0, 2], None, "decode", [], [])]
    writer = TraceWriter(tmp_path / "t.jsonl", header)
    for rec in records:
        writer.write(rec)
    writer.close()
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()[1:]]
    assert lines[0]["speculated"] == [2] and lines[0]["guesses"] == [[1, 2, 0.6123], [2, 0, 0.3]]
    _, got = read_trace(tmp_path / "t.jsonl")
    got = list(got)
    assert got[1].guesses == [(1, 2, 0.9), (1, 3, 0.4)] and got[2].guesses == [] and got[2].speculated == []
    (step,) = list(group_steps(got))
    assert step.routing(0).guesses == [(1, 2, 0.9), (1, 3, 0.4), (2, 0, 0.3)]
    assert step.routing(0).speculated == [2, 3]


def test_optional_fields_and_unknown_keys(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", {"req": "r", "pos": 4, "layer": 1, "experts": [2], "extra": {"x": 1}})
    _, records = read_trace(path)
    (rec,) = list(records)
    assert rec.phase == "decode" and rec.weights is None and rec.experts == [2]
    assert rec.speculated is None and rec.guesses is None


@pytest.mark.parametrize("line, words", [
    ("{not json", "not JSON"),
    ([1, 2], "not an object"),
    ({"req": 1, "pos": 0, "layer": 0, "experts": [0]}, "req must be a string"),
    ({"req": "r", "pos": -1, "layer": 0, "experts": [0]}, "pos an integer >= 0"),
    ({"req": "r", "pos": 0, "layer": 2, "experts": [0]}, "layer 2 is not in 0..1"),
    ({"req": "r", "pos": 0, "layer": True, "experts": [0]}, "layer True"),
    ({"req": "r", "pos": 0, "layer": 0, "experts": [0, 0]}, "distinct"),
    ({"req": "r", "pos": 0, "layer": 0, "experts": [4]}, "in 0..3"),
    ({"req": "r", "pos": 0, "layer": 0, "experts": []}, "experts must be"),
    ({"req": "r", "pos": 0, "layer": 0, "experts": [1], "weights": [0.5, 0.5]}, "one per expert"),
    ({"req": "r", "pos": 0, "layer": 0, "experts": [1], "phase": "warmup"}, "phase must be"),
    ({"req": "r", "pos": 0, "layer": 0, "experts": [1], "guesses": [[2, 1, 0.5]]}, "layer \\+ distance < 2"),
    ({"req": "r", "pos": 0, "layer": 0, "experts": [1], "guesses": [[0, 1, 0.5]]}, "distance >= 1"),
    ({"req": "r", "pos": 0, "layer": 0, "experts": [1], "guesses": [[1, 1, 1.5]]}, "confidence in"),
    ({"req": "r", "pos": 0, "layer": 0, "experts": [1], "guesses": [[1, 4, 0.5]]}, "expert in 0..3"),
    ({"req": "r", "pos": 0, "layer": 0, "experts": [1], "guesses": [[1, 1, 0.5], [1, 1, 0.2]]}, "twice"),
    ({"req": "r", "pos": 0, "layer": 0, "experts": [1], "guesses": [[1, 1]]}, "triples"),
])
def test_malformed_record_names_its_line(tmp_path, line, words):
    path = write_lines(tmp_path / "t.jsonl", {"req": "r", "pos": 0, "layer": 0, "experts": [0]}, line)
    _, records = read_trace(path)
    with pytest.raises(TraceError, match=f"t.jsonl:3: .*{words}"):
        list(records)


@pytest.mark.parametrize("head, words", [
    ("garbage", "header is not JSON"),
    ('{"format": "other/1"}', "not a moeinf-trace/1 trace"),
    ('{"format": "moeinf-trace/1", "num_layers": 0, "num_experts": 4, "top_k": 2}', "positive integers"),
    ('[]', "not an object"),
])
def test_bad_header(tmp_path, head, words):
    path = tmp_path / "t.jsonl"
    path.write_text(head + "\n")
    with pytest.raises(TraceError, match=f"t.jsonl:1: .*{words}"):
        read_trace(path)


def rec(req, pos, layer, phase="decode"):
    return TraceRecord(req, pos, layer, [0, 1], None, phase)


def test_steps_are_recovered_from_execution_order():
    records = [
        # step 1: a's 2-token prompt, layer by layer
        rec("a", 0, 0, "prefill"), rec("a", 1, 0, "prefill"), rec("a", 0, 1, "prefill"), rec("a", 1, 1, "prefill"),
        # step 2: a decodes while b's prompt runs
        rec("a", 2, 0), rec("b", 0, 0, "prefill"), rec("a", 2, 1), rec("b", 0, 1, "prefill"),
        # steps 3 and 4: token by token (all layers of one token, then the next) is valid too
        rec("a", 3, 0), rec("a", 3, 1), rec("a", 4, 0), rec("a", 4, 1),
    ]
    steps = list(group_steps(records))
    assert len(steps) == 4
    assert [s.requests for s in steps] == [["a"], ["a", "b"], ["a"], ["a"]]
    assert steps[0].tokens == {"a": {0, 1}} and steps[0].phase == {"a": "prefill"}
    assert steps[1].phase == {"a": "decode", "b": "prefill"} and sorted(steps[1].layers) == [0, 1]
    assert [len(steps[1].layers[layer]) for layer in (0, 1)] == [2, 2]
    # one MoE layer: decode steps are told apart because a decode step holds one token per request
    single = list(group_steps([rec("a", 0, 0, "prefill"), rec("a", 1, 0, "prefill"), rec("a", 2, 0), rec("a", 3, 0)]))
    assert [sorted(s.tokens["a"]) for s in single] == [[0, 1], [2], [3]]


@pytest.mark.parametrize("name", ["demo-trace.jsonl", "synthetic-trace.jsonl"])
def test_kept_traces_parse(name):
    header, records = read_trace(DATA / name)
    records = list(records)
    steps = list(group_steps(records))
    assert header.top_k == 2 and all(len(r.experts) == header.top_k for r in records)
    assert {r.phase for r in records} == {"prefill", "decode"}
    # every token of every step ran through every MoE layer
    for step in steps:
        tokens = sum(len(p) for p in step.tokens.values())
        assert sorted(step.layers) == list(range(header.num_layers))
        assert all(len(step.layers[layer]) == tokens for layer in step.layers)
    assert (DATA / name).stat().st_size < 300_000
