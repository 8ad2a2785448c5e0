"""memd's ROUTER answers (shared by the RPC and admin servers): a reply, a coded refusal, a bug reported as
"internal", nothing for None, and a reply to a vanished peer dropped rather than raised."""
import zmq

from common import messages as m
from common.codec import decode
from common.protocol import Op
from services.memd.replies import CodedError, answer


class Socket:
    def __init__(self, fail: bool = False):
        self.sent, self.fail = [], fail

    async def send_multipart(self, parts):
        if self.fail:
            raise zmq.ZMQError(zmq.EHOSTUNREACH)
        self.sent.append(parts)


def replies(sock: Socket):
    return [(identity, *decode(frame, reply=True)) for identity, frame in sock.sent]


async def test_a_reply_and_a_coroutine_reply():
    sock = Socket()
    await answer(sock, b"w", Op.READY, 3, lambda: m.ReadyReply())

    async def later():
        return m.ReadyReply()

    await answer(sock, b"v", Op.READY, 4, later)
    assert replies(sock) == [(b"w", Op.READY, 3, m.ReadyReply()), (b"v", Op.READY, 4, m.ReadyReply())]


async def test_a_coded_refusal_and_a_bug():
    sock = Socket()

    def refuse():
        raise CodedError("capacity", "raise --max-clients")

    def bug():
        raise KeyError("slot")

    await answer(sock, b"w", Op.HELLO, 5, refuse)
    await answer(sock, b"w", Op.STATS, 6, bug)
    assert replies(sock) == [(b"w", Op.ERROR, 5, m.ErrorReply("capacity", "raise --max-clients")),
                             (b"w", Op.ERROR, 6, m.ErrorReply("internal", "STATS failed in memd: 'slot'"))]


async def test_none_sends_nothing_and_a_vanished_peer_is_dropped():
    sock = Socket()
    await answer(sock, b"w", Op.RELEASE, 7, lambda: None)
    assert sock.sent == []
    await answer(Socket(fail=True), b"gone", Op.READY, 8, lambda: m.ReadyReply())  # does not raise


def test_a_flood_of_wrong_admin_tokens_is_answered_a_few_times_and_logged_now_and_then(monkeypatch):
    """Each wrong-token frame over TCP cost a warning line and a queued reply on memd's loop (an audit's flood of
    200k frames slowed a completion 25x): a peer is answered 3 times, the log counts refusals every 10 s."""
    import logging

    from services.memd import replies
    from services.memd.replies import Refusals

    clock = [100.0]
    monkeypatch.setattr(replies.time, "monotonic", lambda: clock[0])
    lines = []
    log = logging.getLogger("test.refusals")
    monkeypatch.setattr(log, "warning", lambda fmt, *args: lines.append(fmt % args))
    refusals = Refusals(log)
    answered = [refusals.refuse(b"peer", "ADMIN_STATS") for _ in range(1000)]
    assert answered == [True] * 3 + [False] * 997 and refusals.refuse(b"other", "ADMIN_PIN")
    assert len(lines) == 1 and "refused 1 admin request(s)" in lines[0]
    clock[0] += 10.0
    refusals.refuse(b"peer", "ADMIN_STATS")
    assert len(lines) == 2 and "refused 1001 admin request(s)" in lines[1]
