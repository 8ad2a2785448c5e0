"""memd's RPC reader (``services/memd/server.py``): a call that fails outside its handler's own guard fails alone."""
import asyncio

from common import messages as m
from common.codec import encode
from common.protocol import Op
from services.memd import server as memd_server


def test_a_call_that_fails_outside_its_handler_fails_alone_and_the_reader_goes_on(monkeypatch):
    """memd's RPC reader serves every call in turn; one that raises where no handler catches it (a bug) gets an
    ``internal`` error reply, and the next call is still served (a dead reader would leave memd up and deaf)."""
    frames = [(b"w", encode(Op.STATS, 1, m.StatsRequest())), (b"w", encode(Op.STATS, 2, m.StatsRequest()))]
    errors, handled = [], []

    async def recv_pair():
        if frames:
            return frames.pop(0)
        await asyncio.sleep(3600)

    async def handle(identity, op, rid, req):
        if rid == 1:
            raise RuntimeError("a bug")
        handled.append(rid)

    async def record_error(sock, identity, rid, code, message):
        errors.append((rid, code, message))

    monkeypatch.setattr(memd_server, "send_error", record_error)
    srv = memd_server.MemdServer.__new__(memd_server.MemdServer)
    srv._recv_pair, srv._handle, srv.rpc = recv_pair, handle, None

    async def serve_two() -> None:
        reader = asyncio.create_task(srv._read_rpc())
        for _ in range(100):
            await asyncio.sleep(0.01)
            if handled:
                break
        assert not reader.done(), "the reader died"
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    asyncio.run(serve_two())
    assert errors == [(1, "internal", "STATS failed in memd: a bug")] and handled == [2]
