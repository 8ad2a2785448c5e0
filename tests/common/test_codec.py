"""The wire codec: every message round-trips, the frame layout is fixed, and every malformed frame is a
``ProtocolError`` (never another exception, never a half-built message)."""
import dataclasses
import struct

import msgpack
import msgspec
import pytest

from common import admin_messages as a
from common import messages as m
from common.codec import HEADER_BYTES, ProtocolError, build, decode, encode, peek, request_id_of
from common.protocol import MEMD_ADMIN_OPS, MEMD_RPC_OPS, MEMD_TRACE_OPS, PROTOCOL, PROTOCOL_VERSION, WORKER_OPS, Op

SPECS = [m.TensorSpec("gate_up_proj", 0, [256, 64], "float32"), m.TensorSpec("down_proj", 65536, [64, 128], "bfloat16")]

# One instance of every request and reply type, with non-default values in every field.
SAMPLES = {
    m.HelloRequest: m.HelloRequest(1, 4242, "/models/mixtral", "GPU-0b1c"),
    m.HelloReply: m.HelloReply(1, 77, "shm", "moeinf-abc-pool", 1 << 33, 98304, 87381, 32, 8, SPECS,
                               "moeinf-abc-control"),
    m.ReadyRequest: m.ReadyRequest(4242),
    m.ReadyReply: m.ReadyReply(),
    m.AcquireRequest: m.AcquireRequest(3, [7, 0, 5], ["req-a", "req-b"], [[1, 0, 2], [0, 4, 0]], 41, [True, False],
                                       [2, 6], [3, 1], True, [[1, 4], [2, 0]], partial=True),
    m.AcquireReply: m.AcquireReply([12, 0, 2**20], 1, [[2, 7], [0, 1]], 9, loading=[1]),
    m.AwaitRequest: m.AwaitRequest(3),
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
    m.StepTraceEvent: m.step_trace(4242, 17, ["req-a", "req-b"], [5, 1], [True, False], [
        m.LayerTrace(0, [1, 6], [[3, 7], [1, 1]], [[1.5, 3.5], [0.25, 0.75]], [2, 6]),
        m.LayerTrace(1, [2], [[10], [2]], [[5.0], [1.0]], [], True)]),
    m.LayerNoteEvent: m.LayerNoteEvent(4242, 17, 3, [1, 6], ["req-a", "req-b"], [3, 7, 1, 1], [True, False],
                                       [4, 4, 5], [0, 2, 7], [0.5, 0.25, 0.125]),
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
    a.EamcExportRequest: a.EamcExportRequest("tok"),
    a.EamcExportReply: a.EamcExportReply(12, 256, 4096),
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
    assert msgpack.unpackb(frame[9:]) == [3, [7, 1], []]  # the fields as an array, in declaration order


def test_nested_dataclass_is_a_nested_array_on_the_wire():
    frame = encode(Op.HELLO, 1, SAMPLES[m.HelloReply])
    body = msgpack.unpackb(frame[HEADER_BYTES:])
    assert body[9] == [["gate_up_proj", 0, [256, 64], "float32", "", 0, [], "", 0],
                       ["down_proj", 65536, [64, 128], "bfloat16", "", 0, [], "", 0]]
    assert body[10:] == ["moeinf-abc-control", "cpu", 0, [], [], "", 0]  # shm: no device, chunks, events, host tier


def test_cuda_hello_carries_device_and_chunk_handles():
    hello = m.HelloReply(1, 77, "cuda-ipc", "", 3 << 20, 1 << 20, 3, 1, 2, SPECS, "ctl", "GPU-0a1b", 2 << 20,
                         [b"\x01" * 64, b"\x02" * 64])
    _, _, back = decode(encode(Op.HELLO, 1, hello), reply=True)
    assert back == hello and back.chunk_handles[1] == b"\x02" * 64


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


def test_request_id_of_a_frame_that_does_not_decode():
    """The id an error reply to an undecodable frame carries: the header's, or 0 when there is no header."""
    assert request_id_of(encode(Op.STATS, 77, m.StatsRequest())[:HEADER_BYTES] + b"\xc1") == 77
    assert request_id_of(b"\x01") == 0


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


@pytest.mark.parametrize("body, match", [
    (b"", "STATS: body is not msgpack"),
    (b"\xc1", "STATS: body is not msgpack"),
    (b"\x90\x01", "STATS: body is not msgpack"),  # trailing bytes
    (b"\x92\x01", "StatsRequest: Expected `array` of at most length 0, got 2"),  # truncated, and too long anyway
    (b"\xff" * 3 + b"\xc1", "StatsRequest: Expected `array`, got `int`"),  # garbage that starts like an int
], ids=["empty", "never-used-byte", "trailing-bytes", "truncated-array", "garbage"])
def test_body_is_not_msgpack(body, match):
    with pytest.raises(ProtocolError, match=match):
        decode(struct.pack("<BQ", Op.STATS, 1) + body)


@pytest.mark.parametrize("op, fields, match", [
    (Op.READY, [], "ReadyRequest: Expected `array` of at least length 1, got 0"),
    (Op.READY, [1, [], 2, 3], "ReadyRequest: Expected `array` of at most length 3, got 4"),
    (Op.ACQUIRE, [1], "AcquireRequest: Expected `array` of at least length 2, got 1"),
    (Op.ACQUIRE, [1, [2], [], [], 0, [], [], [], False, [], [], False, "extra"],
     "AcquireRequest: Expected `array` of at most length 12, got 13"),
    (Op.STATS, [0], "StatsRequest: Expected `array` of at most length 0, got 1"),
    (Op.HELLO, 5, "HelloRequest: Expected `array`, got `int`"),
    (Op.HELLO, {"protocol": 1}, "HelloRequest: Expected `array`, got `object`"),
])
def test_wrong_field_count_or_shape(op, fields, match):
    with pytest.raises(ProtocolError, match=match):
        decode(_frame(op, 1, fields))


@pytest.mark.parametrize("op, fields, match", [
    (Op.READY, ["12"], r"ReadyRequest.pid: Expected `int`, got `str`"),
    (Op.READY, [True], r"ReadyRequest.pid: Expected `int`, got `bool`"),
    (Op.READY, [1.5], r"ReadyRequest.pid: Expected `int`, got `float`"),
    (Op.READY, [None], r"ReadyRequest.pid: Expected `int`, got `None`"),
    (Op.ACQUIRE, [0, ["1", "2"]], r"AcquireRequest.experts\[0\]: Expected `int`, got `str`"),
    (Op.ACQUIRE, [0, [1, False]], r"AcquireRequest.experts\[1\]: Expected `int`, got `bool`"),
    (Op.ACQUIRE, [0, 3], r"AcquireRequest.experts: Expected `array`, got `int`"),
    (Op.ACQUIRE, [0, [1], ["r"], [[1], ["x"]]], r"AcquireRequest.tokens\[1\]\[0\]: Expected `int`, got `str`"),
    (Op.ACQUIRE, [0, [1], [7]], r"AcquireRequest.requests\[0\]: Expected `str`, got `int`"),
    (Op.HELLO, [PROTOCOL_VERSION, 2, b"/bytes/path", "cpu"], r"HelloRequest.model: Expected `str`, got `bytes`"),
    (Op.CANCEL, [None], r"CancelRequest.request: Expected `str`, got `None`"),
    (Op.GENERATE, ["r", [1], 5, [], True], r"GenerateRequest.temperature: Expected `float`, got `bool`"),
    (Op.GENERATE, ["r", [1], 5, [], 0.0, 1.0, 0, "7"], r"GenerateRequest.seed: Expected `int \| null`, got `str`"),
])
def test_wrong_field_types(op, fields, match):
    with pytest.raises(ProtocolError, match=match):
        decode(_frame(op, 1, fields))


@pytest.mark.parametrize("op, fields, reply, match", [
    (Op.CANCEL, [1], True, r"CancelReply.found: Expected `bool`, got `int`"),
    (Op.STATS, [0, 1, 2, 3, 4, 5, 6, 7, 8, "1.0", 0.0, True, []], True,
     r"StatsReply.read_seconds: Expected `float`, got `str`"),
    (Op.STATS, [0, 1, 2, 3, 4, 5, 6, 7, 8, 1.0, 0.0, True, [], "lru", False, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0, 0, 0.0, 0,
                0, 0.0, 0.0,
                [[0, 1, 2, 3, 4, "5", 0.0, 0]]], True,
     r"StatsReply.layers\[0\].prefetch_wasted: Expected `int`, got `str`"),
    (Op.GENERATE, ["r", [1], 3], True, r"TokensReply.finish_reason: Expected `str \| null`, got `int`"),
])
def test_wrong_reply_field_types(op, fields, reply, match):
    with pytest.raises(ProtocolError, match=match):
        decode(_frame(op, 1, fields), reply=reply)


def _hello_fields(tensors):
    return [PROTOCOL_VERSION, 2, "shm", "pool", 10, 5, 2, 1, 8, tensors]


@pytest.mark.parametrize("tensors, match", [
    ([["w", 0, [2, 2], "float32", "fp8", 0, [1], "float32", 0, "extra"]],
     r"HelloReply.tensors\[0\]: Expected `array` of at most length 9, got 10"),
    ([["w", 0, [2, 2]]], r"HelloReply.tensors\[0\]: Expected `array` of at least length 4, got 3"),
    ([["w", 0, [2, 2], "float8_e4m3fn", "fp8", 0, ["1"], "float32"]],
     r"HelloReply.tensors\[0\].scale_shape\[0\]: Expected `int`, got `str`"),
    ([["w", "0", [2, 2], "float32"]], r"HelloReply.tensors\[0\].offset: Expected `int`, got `str`"),
    ([["w", 0, [2, "2"], "float32"]], r"HelloReply.tensors\[0\].shape\[1\]: Expected `int`, got `str`"),
    ([["w", 0, [2, 2], 4]], r"HelloReply.tensors\[0\].dtype: Expected `str`, got `int`"),
    ([{"name": "w"}], r"HelloReply.tensors\[0\]: Expected `array`, got `object`"),
    (["w"], r"HelloReply.tensors\[0\]: Expected `array`, got `str`"),
    ({"w": 1}, r"HelloReply.tensors: Expected `array`, got `object`"),
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
    with pytest.raises(ProtocolError, match=r"PinRequest.experts\[0\].layer: Expected `int`, got `str`"):
        decode(_frame(Op.ADMIN_PIN, 1, ["tok", [["3", 5]]]), MEMD_ADMIN_OPS)
    with pytest.raises(ProtocolError, match="ResizeRequest: Expected `array` of at least length 2, got 1"):
        decode(_frame(Op.ADMIN_RESIZE, 1, ["25%"]), MEMD_ADMIN_OPS)


def test_every_message_is_a_frozen_array_like_struct_without_extra_fields():
    """A message added in another style (a dataclass) would go on the wire as a map: refuse it here."""
    for cls in SAMPLES:
        assert issubclass(cls, m.Message), f"{cls.__name__} is not a common.messages.Message"
        info = cls.__struct_config__
        assert info.frozen and info.array_like and info.forbid_unknown_fields, cls.__name__


@pytest.mark.parametrize("op, fields, reply, match", [
    # a forged step trace: a token counter of 4.6e18, a NaN weight, a negative layer
    (Op.STEP_TRACE, [1, 2, ["r"], [4_600_000_000_000_000_000], [False], []], False,
     r"StepTraceEvent.tokens\[0\]: Expected `int` <= 2147483647"),
    (Op.STEP_TRACE, [1, 2**60, ["r"], [1], [False], []], False,
     r"StepTraceEvent.step: Expected `int` <= 9007199254740992"),
    (Op.STEP_TRACE, [1, 2, ["r"], [1], [False], [0], [False], [1], [1], [1], [float("nan")]], False,
     r"StepTraceEvent.weights\[0\]: Expected `float` >= 0.0"),
    (Op.STEP_TRACE, [1, 2, ["r"], [1], [False], [0], [False], [1], [1], [1], [float("inf")]], False,
     r"StepTraceEvent.weights\[0\]: Expected `float` <= 1e\+18"),
    (Op.STEP_TRACE, [1, 2, ["r"], [1], [False], [0], [False], [1], [1], [[1]]], False,
     r"StepTraceEvent.routed\[0\]: Expected `int`, got `array`"),  # flat: a nested row is refused
    (Op.ACQUIRE, [-1, [1]], False, r"AcquireRequest.layer: Expected `int` >= 0"),
    (Op.ACQUIRE, [0, [2**40]], False, r"AcquireRequest.experts\[0\]: Expected `int` <= 2147483647"),
    (Op.ACQUIRE, [0, [1], [], [], 2**64 - 1], False, r"AcquireRequest.step: Expected `int` <= 9007199254740992"),
    (Op.GENERATE, ["r", [1], 5, [], 0.5, 1.5], False, r"GenerateRequest.top_p: Expected `float` <= 1.0"),
    (Op.GENERATE, ["r", [1], 5, [], -0.5], False, r"GenerateRequest.temperature: Expected `float` >= 0.0"),
    (Op.GENERATE, ["r", [1], 5, [], 0.5, 1.0, 2**62], False, r"GenerateRequest.top_k: Expected `int` <= 2147483647"),
    (Op.GENERATE, ["r" * 5000, [1], 5], False, r"GenerateRequest.request: Expected `str` of length <= 4096"),
    (Op.ACQUIRE, [1, 1], True, r"AcquireReply.slots: Expected `array`, got `int`"),
    (Op.ACQUIRE, [[1, -2], 1], True, r"AcquireReply.slots\[1\]: Expected `int` >= 0"),
])
def test_out_of_range_values_are_refused(op, fields, reply, match):
    with pytest.raises(ProtocolError, match=match):
        decode(_frame(op, 1, fields), reply=reply)


def test_encode_of_an_int_beyond_64_bits_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="GenerateRequest: cannot encode"):
        encode(Op.GENERATE, 1, m.GenerateRequest("r", [1], 5, top_k=10**30))


def test_to_dict_names_every_field_recursively():
    d = m.to_dict(SAMPLES[a.AdminStatsReply])
    assert d["capacity"] == 64 and d["stats"]["layers"][0]["layer"] == 0
    assert list(d["stats"]) == list(m.field_names(m.StatsReply))


def test_step_trace_is_flat_and_reads_back_per_layer():
    """STEP_TRACE travels as flat arrays (no list inside a list on the wire) and reads back to the per-layer rows
    it was built from; lengths that do not fit together are named."""
    layers = [m.LayerTrace(0, [1, 6], [[3, 7], [1, 1]], [[1.5, 3.5], [0.25, 0.75]], [2, 6]),
              m.LayerTrace(2, [2], [[10], [2]], [[5.0], [1.0]], [], True),
              m.LayerTrace(3, [0, 4, 5], [[1, 0, 2], [0, 0, 0]], [[0.5, 0.0, 1.0], [0.0, 0.0, 0.0]], [7])]
    ev = m.step_trace(4242, 17, ["req-a", "req-b"], [5, 1], [True, False], layers)
    body = msgspec.msgpack.decode(encode(Op.STEP_TRACE, 0, ev)[HEADER_BYTES:])
    assert all(not isinstance(v, list) for f in body if isinstance(f, list) for v in f)
    assert ev.routed == [3, 7, 1, 1, 10, 2, 1, 0, 2, 0, 0, 0] and ev.expert_counts == [2, 1, 3]
    got = decode(encode(Op.STEP_TRACE, 0, ev), frozenset({Op.STEP_TRACE}))[2]
    assert got.layout_problem() is None and got.layer_traces() == layers
    assert m.step_trace(1, 2, ["r"], [1], [False], []).layer_traces() == []
    short = msgspec.structs.replace(ev, routed=ev.routed[:-1])
    assert "routed/weights hold 11/12 entries, not 2 x 6" in short.layout_problem()
    assert "3 layers but 2 leased flags" in msgspec.structs.replace(ev, leased=[True, False]).layout_problem()
