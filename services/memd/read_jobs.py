"""What memd's reader queues (``services/memd/reader.py``): a job loads one expert into one slot as pieces, each one
``preadv`` straight into the pool or through a thread's bounce buffer; its future settles with (bytes, seconds),
the read's error, or ``ReadCancelled``."""
from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field


DECAY = 0.9  # bandwidth: exponentially weighted over the recent busy periods


class BusyRate:
    """Bytes per second while busy: loads overlap, so the clock runs from the first one in flight to the last one's
    end (a busy period), and the rate is the periods' bytes over their seconds, weighted toward the recent ones.
    The caller serialises ``begin``/``end`` (its own lock)."""

    def __init__(self) -> None:
        self.active, self.since, self.period_bytes = 0, 0.0, 0
        self.bytes = self.seconds = 0.0  # decayed sums

    def begin(self, now: float) -> None:
        if self.active == 0:
            self.since = now
        self.active += 1

    def end(self, now: float, nbytes: int) -> None:
        self.active -= 1
        self.period_bytes += nbytes
        if self.active == 0:
            self.bytes = self.bytes * DECAY + self.period_bytes
            self.seconds = self.seconds * DECAY + (now - self.since)
            self.period_bytes = 0

    @property
    def rate(self) -> float | None:
        return self.bytes / self.seconds if self.seconds > 0 else None


class ReadCancelled(Exception):
    """The prefetch was cancelled before it finished; its slot holds partial data and must be given back.
    ``nbytes``: what it had read by then (the disk did that work: counted as bytes read)."""

    def __init__(self, nbytes: int = 0):
        super().__init__(f"cancelled after {nbytes} bytes")
        self.nbytes = nbytes


@dataclass(frozen=True, slots=True)
class Piece:
    """Read ``length`` bytes of ``file`` at ``file_offset``; keep ``keep`` of them from ``skip`` on, at pool byte
    ``dest``. ``bounce``: read into the thread's bounce buffer, then copy; else read straight into the pool.
    ``rows``: ``Segment.rows`` of a segment whose rows are spread apart or reordered (always bounced): ``dest`` is
    then where the bytes would lie with its rows as stored from pool byte ``start``. ``codec``: a packed unit of a
    compressed slot image (``packed_images.py``): its first ``codec`` bytes are the packed high plane, the low plane
    follows; decoded into ``keep`` bytes at ``dest``."""

    file: str
    file_offset: int
    length: int
    dest: int
    skip: int = 0
    keep: int = 0
    bounce: bool = False
    rows: tuple[int, int, int, int] | None = None
    codec: int = 0


@dataclass(eq=False, slots=True)
class ReadJob:
    key: tuple[int, int]
    slot: int
    demand: bool
    priority: float
    seq: int
    pieces: list[Piece]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    next: int = 0  # the next piece to start
    inflight: int = 0
    nbytes: int = 0
    started: float | None = None
    ended: float = 0.0
    cancelled: bool = False
    removed: bool = False  # out of the queue (its future is set, or about to be)
    dropped: bool = False  # a piece was given up unread (an unconverted prefetch): it ends cancelled, never revived
    error: BaseException | None = None
    generation: int = 0  # the slot's generation this load began (``ExpertReader.generation``)

    @property
    def waiting(self) -> bool:
        """Pieces to start remain."""
        return self.next < len(self.pieces) and not self.cancelled and self.error is None

    @property
    def over(self) -> bool:
        return self.inflight == 0 and not self.waiting

    def rank(self) -> tuple:
        return (0, self.seq) if self.demand else (1, -self.priority, self.seq)


@dataclass(slots=True)
class ReaderStats:
    direct_bytes: int = 0  # read straight into slots
    bounce_bytes: int = 0  # read into a bounce buffer and copied (head/tail blocks, staged segments)
    staged_segments: int = 0  # segments read whole through the bounce buffer (alignment could not match)
    segments: int = 0
    pieces: int = 0


def split_pieces(file: str, offset: int, nbytes: int, dest: int, size: int) -> list[Piece]:
    """Pieces read straight into the pool: ``nbytes`` from ``offset`` in steps of ``size``."""
    return [Piece(file, offset + done, min(size, nbytes - done), dest + done, 0, min(size, nbytes - done))
            for done in range(0, nbytes, size)]


def settle(future, exc: BaseException | None = None, result=None) -> None:
    """Complete a job's future, unless its waiter gave up on it already: an asyncio waiter cancelled at shutdown
    cancels the future it wraps, and setting a cancelled future raises InvalidStateError (which crashed memd's exit)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
