"""A subscription orders and drops repeats by stream seq, never by message id (in memory).

Within one stream both stores give ids in seq order (tests/test_store_contract.py
pins it), but ids are the global sequence's, which on PostgreSQL leaves holes and
commits out of order across streams: delivery must not lean on them.  These tests
hand a subscription events whose ids are deliberately out of seq order, which
id-ordered delivery got wrong (dropped or reordered), and check what it writes.
Positions stay ids on the wire: the catch-up reads the store after an id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from chatd.delivery import Fetch, Position, Subscription
from chatd.model import INBOX, Event, InboxMessage, StreamEvent
from chatd.store import StreamPosition

NOW = 1_800_000_000.0
WAIT = 10.0  # seconds a condition may take to come true, however loaded the machine
BOB = 2


class Recorder:
    """The session a subscription writes to, without a transport."""

    def __init__(self) -> None:
        self.written: list[Event] = []

    def write(self, event: Event) -> None:
        self.written.append(event)

    async def push_paced(self, event: Event) -> None:
        self.written.append(event)

    def abort(self, reason: str) -> None:
        raise AssertionError(f"aborted: {reason}")

    def seqs(self) -> list[int]:
        return [e.seq for e in self.written if isinstance(e, InboxMessage)]

    def ids(self) -> list[int]:
        return [e.id for e in self.written if isinstance(e, InboxMessage)]


def message(seq: int, message_id: int) -> InboxMessage:
    return InboxMessage(BOB, message_id, "ann", f"seq {seq}", NOW, seq)


def at(message_id: int, seq: int, fresh: bool = False) -> Position:
    async def position() -> StreamPosition:
        return StreamPosition(message_id, seq, fresh)

    return position


def stored(
    pages: list[list[StreamEvent]], gate: asyncio.Event | None = None
) -> tuple[Fetch, list[int]]:
    """A fetch handing out ``pages`` one per call (then nothing), after ``gate`` opens;
    and the list of the ids it was asked to read after."""
    asked: list[int] = []

    async def fetch(after: int, limit: int) -> list[StreamEvent]:
        asked.append(after)
        if gate is not None:
            await gate.wait()
        return pages.pop(0) if pages else []

    return fetch, asked


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110 - state with no event of its own
            await asyncio.sleep(0.001)


async def caught_up(
    subscription: Subscription, position: Position, fetch: Fetch
) -> Callable[[], Awaitable[None]]:
    subscription.hold(INBOX)
    await subscription.start([(INBOX, position, fetch)])

    async def done() -> None:
        await until(lambda: not subscription.catching_up)

    return done


async def test_live_events_go_out_by_seq_whatever_their_ids() -> None:
    writer = Recorder()
    subscription = Subscription(writer, page_size=10, queue_limit=10)
    fetch, _ = stored([])
    await (await caught_up(subscription, at(0, 0), fetch))()
    # ids out of seq order, and seq 2 offered twice: by id, 10 and 20 looked old.
    for seq, message_id in ((1, 30), (2, 10), (2, 10), (3, 20)):
        subscription.offer(INBOX, message(seq, message_id))
    assert writer.seqs() == [1, 2, 3]
    assert writer.ids() == [30, 10, 20]


async def test_events_held_during_the_catch_up_follow_it_in_seq_order() -> None:
    writer = Recorder()
    subscription = Subscription(writer, page_size=10, queue_limit=10)
    gate = asyncio.Event()
    fetch, asked = stored([[message(1, 7)]], gate)
    done = await caught_up(subscription, at(0, 0), fetch)
    await until(lambda: asked == [0])  # the store is being read
    for seq, message_id in ((3, 5), (1, 7), (2, 9)):  # 1 is both stored and offered
        subscription.offer(INBOX, message(seq, message_id))
    gate.set()
    await done()
    subscription.offer(INBOX, message(4, 6))
    assert writer.seqs() == [1, 2, 3, 4]
    assert writer.ids() == [7, 9, 5, 6]


async def test_the_catch_up_starts_after_the_acknowledged_id_and_its_seq() -> None:
    writer = Recorder()
    subscription = Subscription(writer, page_size=2, queue_limit=10)
    gate = asyncio.Event()
    pages: list[list[StreamEvent]] = [[message(5, 41), message(6, 48)], [message(7, 50)]]
    fetch, asked = stored(pages, gate)
    done = await caught_up(subscription, at(40, 4), fetch)
    await until(lambda: asked == [40])
    subscription.offer(INBOX, message(4, 40))  # the acknowledged message, seen live
    subscription.offer(INBOX, message(8, 44))
    gate.set()
    await done()
    assert writer.seqs() == [5, 6, 7, 8]
    assert asked == [40, 48]  # the store is read on by id: positions are ids


async def test_a_fresh_stream_writes_what_came_before_its_start_first() -> None:
    # No position yet: the stream starts at its newest message when read (seq 5); what
    # was offered between /subscribe and that read is new to the client, so it goes
    # out, and what came after follows the (empty) catch-up.
    writer = Recorder()
    subscription = Subscription(writer, page_size=10, queue_limit=10)
    subscription.hold(INBOX)
    subscription.offer(INBOX, message(6, 3))
    subscription.offer(INBOX, message(5, 12))
    fetch, asked = stored([])
    await subscription.start([(INBOX, at(12, 5, fresh=True), fetch)])
    await until(lambda: not subscription.catching_up)
    assert writer.seqs() == [5, 6]
    assert asked == [12]


async def test_an_overflowed_queue_is_read_from_the_store_instead() -> None:
    writer = Recorder()
    subscription = Subscription(writer, page_size=2, queue_limit=2)
    gate = asyncio.Event()
    pages: list[list[StreamEvent]] = [
        [message(1, 9), message(2, 4)], [message(3, 8), message(4, 2)], [message(5, 7)]
    ]
    fetch, asked = stored(pages, gate)
    done = await caught_up(subscription, at(0, 0), fetch)
    await until(lambda: asked == [0])
    for seq, message_id in ((3, 8), (4, 2), (5, 7)):  # three: the queue of two overflows
        subscription.offer(INBOX, message(seq, message_id))
    gate.set()
    await done()
    subscription.offer(INBOX, message(5, 7))  # a late repeat
    subscription.offer(INBOX, message(6, 1))
    assert writer.seqs() == [1, 2, 3, 4, 5, 6]


async def test_an_own_send_made_during_the_catch_up_is_not_pushed_back() -> None:
    # The connection sent seq 2 while its stream was still reading the store: it had a
    # reply for it, so the page that holds it must not push it back (protocol.md 9).
    writer = Recorder()
    subscription = Subscription(writer, page_size=10, queue_limit=10)
    gate = asyncio.Event()
    fetch, asked = stored([[message(1, 7), message(2, 8), message(3, 9)]], gate)
    done = await caught_up(subscription, at(0, 0), fetch)
    await until(lambda: asked == [0])
    subscription.sent(INBOX, 2)
    gate.set()
    await done()
    subscription.sent(INBOX, 5)  # live: the hub offers nothing, nothing to remember
    subscription.offer(INBOX, message(4, 10))
    assert writer.seqs() == [1, 3, 4]


async def test_a_fresh_stream_starts_before_start_returns_so_a_later_message_is_new() -> None:
    # The positions are read before /subscribe is answered: a message stored after the
    # reply, even one offered late (another node's notice), is above the start and goes
    # out. Read after the reply, the fresh start (its newest message then) took it in.
    writer = Recorder()
    subscription = Subscription(writer, page_size=10, queue_limit=10)
    subscription.hold(INBOX)
    newest = StreamPosition(4, 2, True)

    async def position() -> StreamPosition:
        return newest

    fetch, _ = stored([])
    await subscription.start([(INBOX, position, fetch)])
    newest = StreamPosition(9, 3, True)  # stored after the reply (the store's newest now)
    await until(lambda: not subscription.catching_up)
    subscription.offer(INBOX, message(3, 9))  # its notice, late
    assert writer.ids() == [9]


async def test_a_subscription_ended_while_its_positions_are_read_pushes_nothing() -> None:
    # /unsubscribe (or the end of the binding) while /subscribe still reads the start
    # positions: the catch-up that start() would begin afterwards has nothing to do.
    writer = Recorder()
    subscription = Subscription(writer, page_size=10, queue_limit=10)
    subscription.hold(INBOX)
    reading = asyncio.Event()
    release = asyncio.Event()

    async def position() -> StreamPosition:
        reading.set()
        await release.wait()
        return StreamPosition(0, 0, False)

    fetch, asked = stored([[message(1, 1), message(2, 2)]])
    starting = asyncio.create_task(subscription.start([(INBOX, position, fetch)]))
    await reading.wait()
    subscription.cancel()
    release.set()
    await starting
    await until(lambda: not subscription.catching_up)
    subscription.offer(INBOX, message(3, 3))
    assert writer.ids() == [] and asked == []
