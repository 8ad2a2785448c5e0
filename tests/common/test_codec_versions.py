"""A handshake from another protocol version is answered by its version, not by a field that did not decode."""
import msgspec
import pytest

from common.codec import _HEADER, VersionMismatch, decode
from common.protocol import PROTOCOL_VERSION, Op


@pytest.mark.parametrize("reply", [False, True])
def test_a_handshake_from_another_version_says_so(reply):
    """A HELLO (or its reply) of a later moeinf may carry fields this one does not know: the error names the two
    versions, not the field that did not decode."""
    fields = [PROTOCOL_VERSION + 1, 123, "x", "cpu", [], "a field of the next version"]
    frame = _HEADER.pack(int(Op.HELLO), 1) + msgspec.msgpack.encode(fields)
    with pytest.raises(VersionMismatch, match=f"the peer speaks protocol {PROTOCOL_VERSION + 1}, this side"):
        decode(frame, reply=reply)
