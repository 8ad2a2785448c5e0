"""services/worker/server.py's request handling on stubs: a stopping worker says it is not ready, and a request
whose start fails for any reason is answered alone."""
import threading
from types import SimpleNamespace

from common import messages as m
from common.protocol import Op
from services.worker.server import WorkerServer


def stub_server(**extra):
    replies = []
    server = SimpleNamespace(info=m.WorkerInfoReply(1, "m", "mixtral", 64, 320, [2], True), live={},
                             generated_tokens=0, stopping=threading.Event(),
                             client=SimpleNamespace(memd_alive=lambda: True),
                             _reply=lambda identity, op, rid, reply: replies.append((op, reply)), **extra)
    return server, replies


def test_a_stopping_worker_is_not_ready():
    server, replies = stub_server()
    WorkerServer.on_request(server, b"gw", Op.WORKER_INFO, 1, m.WorkerInfoRequest())
    server.stopping.set()
    WorkerServer.on_request(server, b"gw", Op.WORKER_INFO, 2, m.WorkerInfoRequest())
    assert [reply.ready for _, reply in replies] == [True, False]


def test_a_request_whose_start_fails_unexpectedly_is_answered_alone():
    def broken(req):
        raise KeyError("a bug")

    forgotten = []
    server, replies = stub_server(engine=SimpleNamespace(start=broken), jobs={},
                                  loop=SimpleNamespace(call_soon_threadsafe=lambda fn, *a: forgotten.append(a)),
                                  _forget=None)
    server._reply_threadsafe = lambda identity, op, rid, reply: replies.append((op, reply))
    WorkerServer.start(server, b"gw", 7, m.GenerateRequest("r1", [1, 2], 4))
    ((op, reply),) = replies
    assert op is Op.ERROR and reply.code == "internal" and "KeyError" in reply.message
    assert forgotten == [("r1",)] and server.jobs == {}
