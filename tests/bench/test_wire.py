"""``moeinf bench wire``: both codecs carry the same messages, and the table has a row per hot message."""
import msgspec

from common import messages as m
from services.cli import main
from services.bench import wire, wire_legacy


def test_old_and_new_samples_carry_the_same_fields():
    for name, (_, _, new, old) in wire.samples(4, 3, 8, 2).items():
        assert type(old) is getattr(wire_legacy, name)
        want = wire_legacy.dataclasses.asdict(old)
        if name == "StepTraceEvent":  # new: flat arrays (the old codec sent a nested list per layer)
            assert [msgspec.structs.asdict(t) for t in new.layer_traces()] == want.pop("layers")
            new = m.StepTraceEvent(new.worker, new.step, new.requests, new.tokens, new.prefill)
        got = m.to_dict(new)
        assert {k: got[k] for k in want} == want, name


def test_bench_wire_prints_a_row_per_message_and_the_round_trip(capsys):
    assert main(["bench", "wire", "-n", "20", "--repeats", "1", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("AcquireRequest", "AcquireReply", "StepTraceEvent", "acquire RTT ipc"):
        line = next(line for line in out.splitlines() if line.startswith(name))
        ratio = float(line.split()[-1] if name != "acquire RTT ipc" else line.split()[5])
        assert 0 < ratio < 1, line  # the typed codec is faster than the reflective one (0.01-0.25 measured)
