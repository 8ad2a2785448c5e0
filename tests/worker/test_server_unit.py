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
                                  _forget=None)
    server._reply_threadsafe = lambda identity, op, rid, reply: replies.append((op, reply))
    server._to_loop = lambda fn, *args: forgotten.append(args)
    WorkerServer.start(server, b"gw", 7, m.GenerateRequest("r1", [1, 2], 4))
    ((op, reply),) = replies
    assert op is Op.ERROR and reply.code == "internal" and "KeyError" in reply.message
    assert forgotten == [("r1",)] and server.jobs == {}


def test_requests_left_at_a_stop_are_answered_unavailable():
    """A request admitted after the compute loop last looked at its inbox, and (when a step outlives the stop's
    wait) every request still here, get their error from the event loop: none waits for a reply that never comes."""
    import queue

    server, replies = stub_server(inbox=queue.Queue(), compute_stuck=False)
    server.live = {"running": (b"gw", 1), "late": (b"gw", 2)}
    server.inbox.put((b"gw", 2, m.GenerateRequest("late", [1], 4)))
    WorkerServer.answer_leftovers(server, computing=False)
    assert [(op, reply.code) for op, reply in replies] == [(Op.ERROR, "unavailable")] and "late" not in server.live
    WorkerServer.answer_leftovers(server, computing=True)
    assert len(replies) == 2 and server.compute_stuck


def test_cancelled_requests_do_not_take_the_room_of_new_ones():
    """A client that gives up during a long step frees its room at once (the gateway already counts it free): a
    new request is admitted while the cancelled one waits for the step's end; the total stays bounded."""
    import queue

    server, replies = stub_server(inbox=queue.Queue(maxsize=4), max_live=2, cancelled=set())
    server.full = lambda: WorkerServer.full(server)
    server.admit_request = lambda *args: WorkerServer.admit_request(server, *args)
    admit = lambda name: WorkerServer.on_request(server, b"gw", Op.GENERATE, 1,  # noqa: E731
                                                 m.GenerateRequest(name, [1], 4))
    admit("a"), admit("b"), admit("c")
    assert [reply.code for _, reply in replies] == ["capacity"] and set(server.live) == {"a", "b"}
    WorkerServer.on_request(server, b"gw", Op.CANCEL, 2, m.CancelRequest("a"))
    admit("d")
    assert set(server.live) == {"a", "b", "d"} and len(replies) == 2  # (the CANCEL's reply)
    WorkerServer.on_request(server, b"gw", Op.CANCEL, 3, m.CancelRequest("b"))
    WorkerServer.on_request(server, b"gw", Op.CANCEL, 4, m.CancelRequest("d"))
    admit("e"), admit("f")
    assert set(server.live) == {"a", "b", "d", "e"} and replies[-1][1].code == "capacity"  # 2 x max_live in all


def test_a_request_cancelled_before_it_started_is_answered_and_never_queued():
    """Cancelled while still in the inbox: started, it is answered ``cancelled`` at once and takes no room in the
    scheduler's queue (it filled it for the requests the gateway admitted after it)."""
    added, finished, started = [], [], []
    server, replies = stub_server(engine=SimpleNamespace(start=lambda req: SimpleNamespace(req=req),
                                                         steps=SimpleNamespace(request_started=lambda *a:
                                                                               started.append(a[0]))),
                                  scheduler=SimpleNamespace(add=added.append), jobs={}, cancelled={"gone"})
    server.finish = lambda job, reason: (finished.append((job.seq.req.request, reason)),  # (and retired)
                                         server.jobs.pop(job.seq.req.request))
    server.drop_cancelled = lambda: WorkerServer.drop_cancelled(server)
    WorkerServer.start(server, b"gw", 1, m.GenerateRequest("gone", [1], 4))
    WorkerServer.start(server, b"gw", 2, m.GenerateRequest("kept", [1], 4))
    assert finished == [("gone", "cancelled")] and [seq.req.request for seq in added] == ["kept"]


def test_requests_cancelled_while_they_waited_leave_their_room_to_new_ones():
    """Clients that gave up during a step leave the scheduler's queue before a new request joins it: the new one is
    queued, not refused for a queue full of cancelled requests (whose room the gateway already counts free)."""
    from services.worker.scheduler import Limits, Scheduler

    scheduler = Scheduler(Limits(max_running=1, max_step_tokens=8, max_prefill_chunk=4, max_waiting=2))
    server, replies = stub_server(scheduler=scheduler, jobs={}, cancelled=set(),
                                  engine=SimpleNamespace(start=lambda req: SimpleNamespace(request_id=req.request),
                                                         steps=SimpleNamespace(request_started=lambda *a: None)))
    server.finish = lambda job, reason: (scheduler.remove(job.seq), server.jobs.pop(job.seq.request_id))
    server.drop_cancelled = lambda: WorkerServer.drop_cancelled(server)
    server._reply_threadsafe = lambda identity, op, rid, reply: replies.append((op, reply))
    for name in ("a", "b"):
        WorkerServer.start(server, b"gw", 1, m.GenerateRequest(name, [1], 4))
    server.cancelled.update({"a", "b"})  # (the event loop marks them while the compute thread is in a step)
    WorkerServer.start(server, b"gw", 2, m.GenerateRequest("c", [1], 4))
    assert replies == [] and [seq.request_id for seq in scheduler.waiting] == ["c"] and set(server.jobs) == {"c"}
