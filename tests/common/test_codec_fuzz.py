"""Property-based fuzzing of every decoder on every link (hypothesis): arbitrary bytes, arbitrary msgpack values,
and valid messages with one field replaced by a hostile value all give a decoded message of the right type or a
``ProtocolError`` -- never another exception. Whatever decodes re-encodes to a frame that decodes to the same."""
import math
import struct

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import messages as m
from common.codec import HEADER_BYTES, ProtocolError, decode, encode
from common.protocol import MEMD_ADMIN_OPS, MEMD_RPC_OPS, MEMD_TRACE_OPS, PROTOCOL, WORKER_OPS, Op
from test_codec import SAMPLES

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LINKS = (None, MEMD_RPC_OPS, MEMD_TRACE_OPS, WORKER_OPS, MEMD_ADMIN_OPS)

# Every (op, reply?) decoder: requests of every op, replies of the ops that have one, and ERROR replies.
DECODERS = [(op, False) for op in PROTOCOL] + [(op, True) for op, rpc in PROTOCOL.items() if rpc.reply] + [
    (Op.ERROR, True)]

# Values msgpack can carry, hostile ones included: ints at the 64-bit edges, NaN/inf, huge strings, bytes, maps.
LEAVES = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2**63, max_value=2**64 - 1),
    st.sampled_from([-1, 0, 2**31 - 1, 2**31, 2**53, 2**53 + 1, 4_600_000_000_000_000_000, 2**64 - 1, -2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), -0.0, 1e300]),
    st.text(max_size=20), st.binary(max_size=20), st.sampled_from(["x" * 5000, "\u0000", "é"]),
)
VALUES = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                      st.dictionaries(st.text(max_size=5), inner, max_size=4)),
                      max_leaves=20)


def _decode_or_protocol_error(frame: bytes, reply: bool, allowed=None):
    try:
        op, rid, msg = decode(frame, allowed, reply=reply)
    except ProtocolError as exc:
        assert str(exc), "a ProtocolError must say what was wrong"
        return None
    assert isinstance(msg, m.Message)
    expected = m.ErrorReply if op is Op.ERROR and reply else (PROTOCOL[op].reply if reply else PROTOCOL[op].request)
    assert type(msg) is expected
    again = decode(encode(op, rid, msg), reply=reply)[2]  # what decoded is valid on the wire again
    assert again == msg or _has_nan(msg)
    return msg


def _has_nan(value) -> bool:
    """A float NaN anywhere in the message (NaN != NaN; NonNeg refuses it, but a plain float could carry it); not a
    string that happens to spell "nan"."""
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, (list, tuple)):
        return any(_has_nan(v) for v in value)
    if isinstance(value, m.Message):
        return any(_has_nan(getattr(value, f)) for f in value.__struct_fields__)
    return False


def _header(op: int) -> bytes:
    return struct.pack("<BQ", op, 7)


@FUZZ
@given(decoder=st.sampled_from(DECODERS), body=st.binary(max_size=64))
def test_arbitrary_bytes(decoder, body):
    op, reply = decoder
    _decode_or_protocol_error(_header(op) + body, reply)


@FUZZ
@given(decoder=st.sampled_from(DECODERS), value=VALUES)
def test_arbitrary_msgpack_values(decoder, value):
    op, reply = decoder
    _decode_or_protocol_error(_header(op) + msgpack.packb(value), reply)


def _wire_array(msg) -> list:
    """A message as the nested lists that go on the wire."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(msg))


def _paths(value, prefix=()):
    """Every position inside a nested list (leaves and sub-lists alike)."""
    yield prefix
    if isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _replace(value, path, new):
    if not path:
        return new
    out = list(value)
    out[path[0]] = _replace(value[path[0]], path[1:], new)
    return out


@FUZZ
@given(decoder=st.sampled_from(DECODERS), data=st.data())
def test_valid_message_with_one_hostile_field(decoder, data):
    op, reply = decoder
    cls = m.ErrorReply if op is Op.ERROR else (PROTOCOL[op].reply if reply else PROTOCOL[op].request)
    sample = SAMPLES.get(cls, m.ErrorReply("capacity", "raise --expert-memory"))
    wire = _wire_array(sample)
    path = data.draw(st.sampled_from(list(_paths(wire))))
    hostile = _replace(wire, path, data.draw(VALUES))
    if isinstance(hostile, list) and data.draw(st.booleans()):  # and sometimes a field too many or too few
        hostile = hostile + [data.draw(VALUES)] if data.draw(st.booleans()) else hostile[:-1]
    _decode_or_protocol_error(_header(op) + msgpack.packb(hostile), reply)


@FUZZ
@given(frame=st.binary(max_size=80), reply=st.booleans(), link=st.sampled_from(LINKS))
def test_arbitrary_frames_on_every_link(frame, reply, link):
    """Any bytes at all, header included (unknown ops, short frames, ops not served on the link)."""
    _decode_or_protocol_error(frame, reply, link)


def test_the_fuzzers_reach_both_outcomes():
    """Sanity of the harness: valid samples decode, and a hostile field is refused."""
    for op, reply in DECODERS:
        cls = m.ErrorReply if op is Op.ERROR else (PROTOCOL[op].reply if reply else PROTOCOL[op].request)
        sample = SAMPLES.get(cls, m.ErrorReply("x", "y"))
        assert _decode_or_protocol_error(encode(op, 1, sample), reply) == sample
    frame = _header(Op.READY) + msgpack.packb([2**63])
    assert _decode_or_protocol_error(frame, False) is None
    assert len(_header(Op.READY)) == HEADER_BYTES
