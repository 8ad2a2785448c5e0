"""The wire codec: every message round-trips, the frame layout is fixed, and every malformed frame is a
``ProtocolError`` (never another exception, never a half-built message)."""
import dataclasses
import struct

import msgpack
import pytest

from common import admin_messages as a
from common import messages as m
from common.codec import HEADER_BYTES, ProtocolError, build, decode, encode, peek
from common.protocol import MEMD_ADMIN_OPS, MEMD_RPC_OPS, MEMD_TRACE_OPS, PROTOCOL, WORKER_OPS, Op

SPECS = [m.TensorSpec("gate_up_proj", 0, [256, 64], "float32"), m.TensorSpec("down_proj", 65536, [64, 128], "bfloat16")]

# One instance of every request and reply type, with non-default values in every field.
SAMPLES = {
    m.HelloRequest: m.HelloRequest(1, 4242, "/models/mixtral", "GPU-0b1c"),
    m.HelloReply: m.HelloReply(1, 77, "shm", "moeinf-abc-pool", 1 << 33, 98304, 87381, 32, 8, SPECS,
                               "moeinf-abc-control"),
    m.ReadyRequest: m.ReadyRequest(4242),
    m.ReadyReply: m.ReadyReply(),
    m.AcquireRequest: m.AcquireRequest(3, [7, 0, 5], ["req-a", "req-b"], [[1, 0, 2], [0, 4, 0]], 41, [True, False],
                                       [2, 6], [3, 1], True, [[1, 4], [2, 0]]),
    m.AcquireReply: m.AcquireReply([12, 0, 2**40], 1, [[2, 7], [0, 1]], 9),
    m.ReleaseRequest: m.ReleaseRequest(3, [7, 0, 5]),
    m.ReturnLeasesRequest: m.ReturnLeasesRequest(),
    m.StatsRequest: m.StatsRequest(),
    m.StatsReply: m.StatsReply(77, 1 << 30, 100, 90, 3, 1000, 200, 150, 123456789, 1.25, 0.5, True, [30, 30, 30],
                               "activation", True, 4000, 300, 250, 40, 10, 5, 0.86, 0.71, 120, 256, 0.83, 900, 2, 1.5e9,
                               0.002,
                               [m.LayerStats(0, 500, 100, 150, 125, 20, 0.25, 98304)],
                               [m.LookaheadStats(1, 600, 480, 550), m.LookaheadStats(2, 590, 400, 550)],
                               [m.LookaheadStats(1, 700, 500, 550)], 61, 959),
    m.RequestStartEvent: m.RequestStartEvent("req-a", 17),
    m.RequestEndEvent: m.RequestEndEvent("req-a", 64),
    m.StepTraceEvent: m.StepTraceEvent(4242, 17, ["req-a", "req-b"], [5, 1], [True, False], [
        m.LayerTrace(0, [1, 6], [[3, 7], [1, 1]], [[1.5, 3.5], [0.25, 0.75]], [2, 6]),
        m.LayerTrace(1, [2], [[10], [2]], [[5.0], [1.0]], [], True)]),
    m.GenerateRequest: m.GenerateRequest("req-a", [1, 2, 3], 32, [2, 7], 0.7, 0.9, 40, 1234),
    m.TokensReply: m.TokensReply("req-a", [5, 6], "stop", 3, 2),
    m.CancelRequest: m.CancelRequest("req-a"),
    m.CancelReply: m.CancelReply(True),
    m.WorkerInfoRequest: m.WorkerInfoRequest(),
    m.WorkerInfoReply: m.WorkerInfoReply(4243, "/models/mixtral", "mixtral", 4096, 32000, [2, 32000], True, 3, 1000),
}
KEYS = [a.ExpertKey(3, 5), a.ExpertKey(0, 7)]
SAMPLES.update({  # the admin link (common/admin_messages.py)
    a.AdminStatsRequest: a.AdminStatsRequest("tok"),
    a.AdminStatsReply: a.AdminStatsReply(SAMPLES[m.StatsReply], 64, 100, 98304, 1 << 22, 2, 3, 4),
    a.AdminExpertsRequest: a.AdminExpertsRequest("tok"),
    a.AdminExpertsReply: a.AdminExpertsReply(64, 100, [a.LayerExperts(0, [1, 2], [2], [5], [2], [1])]),
    a.ResizeRequest: a.ResizeRequest("tok", "25%"),
    a.ResizeReply: a.ResizeReply(100, 64, 100, 98304, 30, 6, 1 << 22),
    a.PolicyRequest: a.PolicyRequest("tok", "lfu"),
    a.PolicyReply: a.PolicyReply("activation", "lfu"),
    a.PrefetchRequest: a.PrefetchRequest("tok", True),
    a.PrefetchReply: a.PrefetchReply(False, True, 3),
    a.EamcSaveRequest: a.EamcSaveRequest("tok", "/tmp/a.eamc"),
    a.EamcLoadRequest: a.EamcLoadRequest("tok", "/tmp/b.eamc"),
    a.EamcClearRequest: a.EamcClearRequest("tok"),
    a.EamcReply: a.EamcReply(12, 256, "/tmp/a.eamc"),
    a.EamcMatchRequest: a.EamcMatchRequest("tok", KEYS),
    a.EamcMatchReply: a.EamcMatchReply(0.75, [[0.5, 0.5], [0.0, 1.0]]),
    a.PinRequest: a.PinRequest("tok", KEYS),
    a.PinReply: a.PinReply([4, 9], 1, 2),
    a.UnpinRequest: a.UnpinRequest("tok", KEYS),
    a.UnpinReply: a.UnpinReply(2, 0),
    a.DropRequest: a.DropRequest("tok"),
    a.DropReply: a.DropReply(20, 4, 6),
    a.AdminHealthRequest: a.AdminHealthRequest("tok"),
    a.AdminHealthReply: a.AdminHealthReply(77, 12.5, "/models/mixtral", "moeinf-abc-pool", [4242, 4243]),
})


def _case_list():
    for op, rpc in PROTOCOL.items():
        yield pytest.param(op, rpc.request, False, id=f"{op.name}-request")
        if rpc.reply is not None:
            yield pytest.param(op, rpc.reply, True, id=f"{op.name}-reply")


def _frame(op: int, rid: int, fields) -> bytes:
    return struct.pack("<BQ", op, rid) + msgpack.packb(fields)


def test_samples_cover_every_message_type_in_the_protocol():
    types = {rpc.request for rpc in PROTOCOL.values()} | {rpc.reply for rpc in PROTOCOL.values() if rpc.reply}
    assert types == set(SAMPLES)


@pytest.mark.parametrize("op, cls, reply", list(_case_list()))
def test_round_trip(op, cls, reply):
    msg = SAMPLES[cls]
    frame = encode(op, 2**63 + 5, msg)
    got_op, rid, got = decode(frame, reply=reply)
    assert got_op is op and rid == 2**63 + 5
    assert type(got) is cls and got == msg
    assert peek(frame) == (int(op), 2**63 + 5)


def test_round_trip_with_the_links_allowed_sets():
    for allowed in (MEMD_RPC_OPS, MEMD_TRACE_OPS, WORKER_OPS, MEMD_ADMIN_OPS):
        for op in allowed:
            cls = PROTOCOL[op].request
            assert decode(encode(op, 1, SAMPLES[cls]), allowed)[2] == SAMPLES[cls]


def test_defaults_fill_missing_trailing_fields():
    _, _, req = decode(_frame(Op.ACQUIRE, 1, [2, [1, 3]]))
    assert req == m.AcquireRequest(2, [1, 3], [], [])
    _, _, gen = decode(_frame(Op.GENERATE, 1, ["r", [1], 5]))
    assert gen == m.GenerateRequest("r", [1], 5)
    assert gen.seed is None and gen.temperature == 0.0 and gen.top_k == 0


def test_optional_fields_accept_none_and_float_fields_accept_ints():
    _, _, gen = decode(_frame(Op.GENERATE, 1, ["r", [1], 5, [], 1, 1, 0, None]))
    assert gen.seed is None and gen.temperature == 1.0 and isinstance(gen.temperature, float)
    _, _, tok = decode(_frame(Op.GENERATE, 1, ["r", [4], None, 0, 0]), reply=True)
    assert tok == m.TokensReply("r", [4], None, 0, 0)


def test_frame_header_layout():
    frame = encode(Op.RELEASE, 0x0102030405060708, m.ReleaseRequest(3, [7, 1]))
    assert HEADER_BYTES == 9
    assert frame[0] == Op.RELEASE == 4
    assert frame[1:9] == bytes([8, 7, 6, 5, 4, 3, 2, 1])  # u64 little-endian
    assert msgpack.unpackb(frame[9:]) == [3, [7, 1]]  # the fields as an array, in declaration order


def test_nested_dataclass_is_a_nested_array_on_the_wire():
    frame = encode(Op.HELLO, 1, SAMPLES[m.HelloReply])
    body = msgpack.unpackb(frame[HEADER_BYTES:])
    assert body[-2] == [["gate_up_proj", 0, [256, 64], "float32", "", 0, [], ""],
                        ["down_proj", 65536, [64, 128], "bfloat16", "", 0, [], ""]]


def test_error_reply_for_op_error():
    frame = encode(Op.ERROR, 99, m.ErrorReply("capacity", "raise --expert-memory"))
    assert frame[0] == 0
    op, rid, reply = decode(frame, reply=True)
    assert op is Op.ERROR and rid == 99 and reply == m.ErrorReply("capacity", "raise --expert-memory")


def test_error_frame_is_not_a_request():
    """A peer sending an ERROR frame to a server socket must get a ProtocolError (so the server answers with an
    error), not an ErrorReply the server has no handler for."""
    frame = encode(Op.ERROR, 1, m.ErrorReply("x", "y"))
    for allowed in (MEMD_RPC_OPS, MEMD_TRACE_OPS, WORKER_OPS, MEMD_ADMIN_OPS):
        with pytest.raises(ProtocolError, match="ERROR"):
            decode(frame, allowed)
    with pytest.raises(ProtocolError, match="ERROR is a reply, not a request"):
        decode(frame)


def test_unknown_op_byte():
    with pytest.raises(ProtocolError, match="unknown op 200"):
        decode(_frame(200, 1, []))
    with pytest.raises(ProtocolError, match="unknown op 31"):
        decode(_frame(31, 1, []), MEMD_RPC_OPS)


@pytest.mark.parametrize("op, allowed", [(Op.GENERATE, MEMD_RPC_OPS), (Op.REQUEST_START, MEMD_RPC_OPS),
                                         (Op.HELLO, MEMD_TRACE_OPS), (Op.ACQUIRE, WORKER_OPS)])
def test_op_not_served_on_this_socket(op, allowed):
    frame = encode(op, 1, SAMPLES[PROTOCOL[op].request])
    with pytest.raises(ProtocolError, match=f"{op.name} is not served"):
        decode(frame, allowed)


def test_reply_of_a_fire_and_forget_op():
    with pytest.raises(ProtocolError, match="RELEASE has no reply"):
        decode(_frame(Op.RELEASE, 1, [1, [2]]), reply=True)


@pytest.mark.parametrize("length", [0, 1, 8])
def test_short_frame(length):
    frame = encode(Op.STATS, 1, m.StatsRequest())[:length]
    with pytest.raises(ProtocolError, match="shorter than the 9-byte header"):
        decode(frame)
    with pytest.raises(ProtocolError):
        peek(frame)


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x92\x01", b"\x90\x01", b"\xff" * 3 + b"\xc1"],
                         ids=["empty", "never-used-byte", "truncated-array", "trailing-bytes", "garbage"])
def test_body_is_not_msgpack(body):
    with pytest.raises(ProtocolError, match="STATS: body is not msgpack"):
        decode(struct.pack("<BQ", Op.STATS, 1) + body)


@pytest.mark.parametrize("op, fields, match", [
    (Op.READY, [], "ReadyRequest: expected 1..1 fields, got 0"),
    (Op.READY, [1, 2], "ReadyRequest: expected 1..1 fields, got 2"),
    (Op.ACQUIRE, [1], "AcquireRequest: expected 2..10 fields, got 1"),
    (Op.ACQUIRE, [1, [2], [], [], 0, [], [], [], -1, [], "extra"], "AcquireRequest: expected 2..10 fields, got 11"),
    (Op.STATS, [0], "StatsRequest: expected 0..0 fields, got 1"),
    (Op.HELLO, 5, "HelloRequest: expected an array"),
    (Op.HELLO, {"protocol": 1}, "HelloRequest: expected an array"),
])
def test_wrong_field_count_or_shape(op, fields, match):
    with pytest.raises(ProtocolError, match=match):
        decode(_frame(op, 1, fields))


@pytest.mark.parametrize("op, fields, match", [
    (Op.READY, ["12"], r"ReadyRequest.pid: expected int, got str"),
    (Op.READY, [True], r"ReadyRequest.pid: expected int, got bool"),
    (Op.READY, [1.5], r"ReadyRequest.pid: expected int, got float"),
    (Op.READY, [None], r"ReadyRequest.pid: expected int, got NoneType"),
    (Op.ACQUIRE, [0, ["1", "2"]], r"AcquireRequest.experts\[0\]: expected int, got str"),
    (Op.ACQUIRE, [0, [1, False]], r"AcquireRequest.experts\[1\]: expected int, got bool"),
    (Op.ACQUIRE, [0, 3], r"AcquireRequest.experts: expected a list, got int"),
    (Op.ACQUIRE, [0, [1], ["r"], [[1], ["x"]]], r"AcquireRequest.tokens\[1\]\[0\]: expected int, got str"),
    (Op.ACQUIRE, [0, [1], [7]], r"AcquireRequest.requests\[0\]: expected str, got int"),
    (Op.HELLO, [1, 2, b"/bytes/path", "cpu"], r"HelloRequest.model: expected str, got bytes"),
    (Op.CANCEL, [None], r"CancelRequest.request: expected str, got NoneType"),
    (Op.GENERATE, ["r", [1], 5, [], True], r"GenerateRequest.temperature: expected float, got bool"),
    (Op.GENERATE, ["r", [1], 5, [], 0.0, 1.0, 0, "7"], r"GenerateRequest.seed: expected int, got str"),
])
def test_wrong_field_types(op, fields, match):
    with pytest.raises(ProtocolError, match=match):
        decode(_frame(op, 1, fields))


@pytest.mark.parametrize("op, fields, reply, match", [
    (Op.CANCEL, [1], True, r"CancelReply.found: expected bool, got int"),
    (Op.STATS, [0, 1, 2, 3, 4, 5, 6, 7, 8, "1.0", 0.0, True, []], True, r"StatsReply.read_seconds: expected float"),
    (Op.STATS, [0, 1, 2, 3, 4, 5, 6, 7, 8, 1.0, 0.0, True, [], "lru", False, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0, 0, 0.0, 0, 0,
                0.0, 0.0,
                [[0, 1, 2, 3, 4, "5", 0.0, 0]]], True, r"LayerStats.prefetch_wasted: expected int, got str"),
    (Op.GENERATE, ["r", [1], 3], True, r"TokensReply.finish_reason: expected str, got int"),
])
def test_wrong_reply_field_types(op, fields, reply, match):
    with pytest.raises(ProtocolError, match=match):
        decode(_frame(op, 1, fields), reply=reply)


def _hello_fields(tensors):
    return [1, 2, "shm", "pool", 10, 5, 2, 1, 8, tensors]


@pytest.mark.parametrize("tensors, match", [
    ([["w", 0, [2, 2], "float32", "fp8", 0, [1], "float32", "extra"]], r"TensorSpec: expected 4..8 fields, got 9"),
    ([["w", 0, [2, 2]]], r"TensorSpec: expected 4..8 fields, got 3"),
    ([["w", 0, [2, 2], "float8_e4m3fn", "fp8", 0, ["1"], "float32"]], r"TensorSpec.scale_shape\[0\]: expected int"),
    ([["w", "0", [2, 2], "float32"]], r"TensorSpec.offset: expected int, got str"),
    ([["w", 0, [2, "2"], "float32"]], r"TensorSpec.shape\[1\]: expected int, got str"),
    ([["w", 0, [2, 2], 4]], r"TensorSpec.dtype: expected str, got int"),
    ([{"name": "w"}], r"TensorSpec: expected an array"),
    (["w"], r"TensorSpec: expected an array"),
    ({"w": 1}, r"HelloReply.tensors: expected a list"),
])
def test_nested_tensor_spec_validation(tensors, match):
    with pytest.raises(ProtocolError, match=match):
        decode(_frame(Op.HELLO, 1, _hello_fields(tensors)), reply=True)


def test_nested_tensor_spec_valid():
    _, _, hello = decode(_frame(Op.HELLO, 1, _hello_fields([["w", 4096, [3], "bfloat16"]])), reply=True)
    assert hello.tensors == [m.TensorSpec("w", 4096, [3], "bfloat16")]
    assert isinstance(hello.tensors[0], m.TensorSpec)


def test_build_validates_directly():
    assert build(m.ReleaseRequest, [1, [2, 3]]) == m.ReleaseRequest(1, [2, 3])
    with pytest.raises(ProtocolError):
        build(m.ReleaseRequest, [1, [2.0]])


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)


def test_encode_refuses_unknown_objects():
    @dataclasses.dataclass
    class Holder:
        x: object

    with pytest.raises(TypeError, match="cannot encode"):
        encode(Op.STATS, 1, Holder(object()))


def test_admin_ops_are_served_only_on_the_admin_socket():
    frame = encode(Op.ADMIN_DROP, 3, a.DropRequest("tok"))
    assert decode(frame, MEMD_ADMIN_OPS)[2] == a.DropRequest("tok")
    for allowed in (MEMD_RPC_OPS, MEMD_TRACE_OPS, WORKER_OPS):
        with pytest.raises(ProtocolError, match="ADMIN_DROP is not served on this socket"):
            decode(frame, allowed)
    with pytest.raises(ProtocolError, match=r"ExpertKey.layer: expected int, got str"):
        decode(_frame(Op.ADMIN_PIN, 1, ["tok", [["3", 5]]]), MEMD_ADMIN_OPS)
    with pytest.raises(ProtocolError, match="ResizeRequest: expected 2..2 fields, got 1"):
        decode(_frame(Op.ADMIN_RESIZE, 1, ["25%"]), MEMD_ADMIN_OPS)
