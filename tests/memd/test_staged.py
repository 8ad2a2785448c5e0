"""``staged.py`` alone, with a fake server and socket: the task ``StagedAcquires.start`` returns (whose end lets the
prefetcher plan again) ends only after the acquire is answered, whether it goes out in one part (its loads ended,
or failed, before an expert could be handed out) or in two (then once the rest has loaded too, after AWAIT's
reply): no plan runs between a layer's last load and the reply the worker waits for."""
import asyncio

from common import messages as m
from common.codec import decode
from common.protocol import Op
from services.memd.replies import CodedError
from services.memd.staged import Pending, StagedAcquires


class Socket:
    def __init__(self, events: list):
        self.events = events

    async def send_multipart(self, frames) -> None:
        op, _, msg = decode(frames[1], reply=True)
        self.events.append(f"error {msg.code}" if op is Op.ERROR else "reply")


class Server:
    """What StagedAcquires asks of memd's server: the acquire's whole wait, a partial reply, the socket."""

    def __init__(self, events: list, fail: bool):
        self.rpc, self.clients, self.fail = Socket(events), {}, fail

    async def on_acquire(self, identity, pending, stall: bool) -> m.AcquireReply:
        await asyncio.gather(*pending.loading.values())
        if self.fail:
            raise CodedError("io", "a load failed")
        return m.AcquireReply(slots=[0, 1], hits=0)

    def _acquired(self, pending, still) -> m.AcquireReply:
        return m.AcquireReply(slots=[0, 0], hits=1, loading=still)


def pending_of(loads: dict) -> Pending:
    req = m.AcquireRequest(layer=3, experts=[1, 2], partial=True)
    return Pending(req, [(3, 1), (3, 2)], loads, 0, [], 0, False, {})


async def _one_part(fail: bool) -> list:
    events = []
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    staged = StagedAcquires(Server(events, fail))
    released = staged.start(b"w", 1, pending_of({(3, 1): first, (3, 2): second}))
    released.add_done_callback(lambda _: events.append("let go"))
    await asyncio.sleep(0)
    first.set_result(None)  # both loads end in the same loop turn: nothing is handed out early
    if fail:
        second.set_exception(OSError("short read"))
    else:
        second.set_result(None)
    await asyncio.wait([released], timeout=5)
    await asyncio.sleep(0)  # the done callbacks
    return events


def test_a_one_part_answer_goes_out_before_the_prefetcher_is_let_go():
    assert asyncio.run(_one_part(fail=True)) == ["reply", "let go"]  # the failed load's error reply first
    assert asyncio.run(_one_part(fail=False)) == ["reply", "let go"]  # both loaded within one loop turn


async def _two_parts() -> tuple[list, int]:
    events = []
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    staged = StagedAcquires(Server(events, fail=False))
    released = staged.start(b"w", 1, pending_of({(3, 1): first, (3, 2): second}))
    released.add_done_callback(lambda _: events.append("let go"))
    first.set_result(None)
    for _ in range(5):
        await asyncio.sleep(0)
    assert events == ["reply"] and not released.done()  # the partial answer; the prefetcher still held
    waiting = asyncio.create_task(staged.on_await(b"w", m.AwaitRequest(layer=3)))
    await asyncio.sleep(0)
    second.set_result(None)
    reply = await waiting
    events.append("await answered")
    await asyncio.wait_for(released, 5)
    await asyncio.sleep(0)
    return events, len(reply.slots)


def test_a_two_part_answer_holds_the_prefetcher_until_the_rest_has_loaded():
    events, slots = asyncio.run(_two_parts())
    assert slots == 2
    assert events == ["reply", "await answered", "let go"]


async def _cancelled_loads() -> list:
    events = []
    loop = asyncio.get_running_loop()
    staged = StagedAcquires(Server(events, fail=False))
    released = staged.start(b"w", 1, pending_of({(3, 1): loop.create_future(), (3, 2): loop.create_future()}))
    await asyncio.sleep(0)
    staged.awaiting[b"w"][1].cancel()  # the acquire's loads cancelled (not its answer)
    await asyncio.wait([released], timeout=5)
    return events


def test_an_acquire_whose_loads_are_cancelled_gets_an_error_reply_not_silence():
    assert asyncio.run(_cancelled_loads()) == ["error internal"]
