"""Live delivery to one subscribed connection: every message once, in order, no gaps.

A connection follows several *streams*: its user's private inbox and each
channel its user is a member of.  On ``/subscribe`` each stream first *catches
up* from the store, starting at the user's acknowledged position, and only then
goes *live*, taking the events the hub offers as messages are stored.

Order and repeats are decided by the stream sequence number (``seq``: 1, 2, 3,
... within a stream, taken in the inserting transaction, so seq order is commit
order within the stream on either store), never by the global message id:
PostgreSQL's id sequences leave holes and commit out of order across streams,
and a stream's order must not depend on them.  A stream writes only a seq
above the last one it wrote, so a message is never written twice on a
connection.  Positions on the wire stay message ids (acks, cursors), so a start
position comes with its message's seq (chatd.store.StreamPosition).

Events offered while a stream is still catching up are queued (up to a bound)
and flushed in seq order when it goes live.  The hub offers a message only
after it is committed, so whatever the store's catch-up reads missed, the queue
holds.  If the queue overflows it is dropped and the catch-up simply reads on:
the store is the truth, the queue only a shortcut.  Gaps between live events
are not this module's business: what reaches the hub is already gap-free and
in seq order (one node: commit order; several: chatd.bus_redis.StreamOrder
reads a missed message from the store), and a seq may be skipped here on
purpose (the calling connection gets a reply instead of its own channel message).

What a stream holds for its user is the fetch's business: a channel's fetch
leaves out the user's own messages stored before the catch-up began (they are
not news to them, protocol.md section 9), so seqs may skip them; order and the
"above the last seq written" rule are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Protocol

from chatd.model import INBOX, Event, StreamEvent
from chatd.store.rows import StreamPosition

__all__ = ["INBOX", "Fetch", "Position", "Subscription", "Writer"]

log = logging.getLogger(__name__)

# Fetches the events of a stream stored after a message id, oldest first (at most a
# limit).  The catch-up pages by id, not seq: the stores index each stream by (stream,
# id) and SQLite has no (stream, seq) index on purpose (it cost 9% of the insert rate,
# chatd.store.sqlite); within one stream ids grow with seq on both stores (one writer
# on SQLite; on PostgreSQL the id is drawn under the stream's row lock), so reading on
# by id reads on in seq order.  Repeats and order are still decided by seq.
Fetch = Callable[[int, int], Awaitable[list[StreamEvent]]]
# Where a stream's catch-up starts: the user's acknowledged position (an id, with its
# seq), or "fresh": no position yet, so the stream starts at its newest message instead.
Position = Callable[[], Awaitable[StreamPosition]]


class Writer(Protocol):
    """The session a subscription writes to; it encodes each event at its edge."""

    def write(self, event: Event) -> None:
        """Queue an event without waiting; may drop a connection that reads too slowly."""

    async def push_paced(self, event: Event) -> None:
        """Push an event at the client's pace: wait while too much is queued (with a timeout)."""

    def abort(self, reason: str) -> None:
        """Drop the connection; what it did not acknowledge is delivered another time."""


@dataclass(slots=True)
class _Stream:
    seq: int  # the seq of the newest message written on this connection (or of the start)
    # Events offered while the stream catches up; None once it is live, so that ten
    # thousand idle subscriptions hold no empty lists.
    queued: list[StreamEvent] | None
    overflowed: bool = False
    # Seqs of this connection's own sends made while the stream caught up: answered by
    # their replies, so the store's pages must not push them back to it (None: none).
    own: set[int] | None = None

    @property
    def live(self) -> bool:
        return self.queued is None


class Subscription:
    __slots__ = ("_page_size", "_queue_limit", "_streams", "_task", "_writer")

    def __init__(self, writer: Writer, page_size: int, queue_limit: int) -> None:
        self._writer = writer
        self._page_size = page_size
        self._queue_limit = queue_limit
        self._streams: dict[int, _Stream] = {}
        self._task: asyncio.Task[None] | None = None

    def hold(self, stream: int) -> None:
        """Start queueing a stream's live events until its catch-up has run."""
        self._streams[stream] = _Stream(seq=0, queued=[])

    def follow(self, stream: int) -> None:
        """Take a stream's events live from now on (a channel joined while subscribed)."""
        self._streams.setdefault(stream, _Stream(seq=0, queued=None))

    def drop(self, stream: int) -> None:
        self._streams.pop(stream, None)

    def offer(self, stream: int, event: StreamEvent) -> None:
        """A message of ``stream`` (INBOX or a channel id), just committed."""
        state = self._streams.get(stream)
        if state is None:
            return
        queued = state.queued
        if queued is not None:  # still catching up
            if len(queued) < self._queue_limit:
                queued.append(event)
            else:
                queued.clear()
                state.overflowed = True
        elif (seq := event.seq) > state.seq:
            state.seq = seq
            self._writer.write(event)

    def sent(self, stream: int, seq: int) -> None:
        """This connection's own message of ``stream``, just committed: it was answered
        with a reply, never pushed back (protocol.md section 9).  Live, the hub simply
        does not offer it; while the stream still catches up, the store's next page
        may hold it, so it is remembered and left out there."""
        state = self._streams.get(stream)
        if state is not None and state.queued is not None:
            if state.own is None:
                state.own = set()
            state.own.add(seq)

    async def start(self, catch_ups: list[tuple[int, Position, Fetch]]) -> None:
        """Read every held stream's start position, then catch each up in the background:
        (stream, its start position, fetch).

        The positions are read before this returns, so before the reply to /subscribe:
        a message stored after that reply is above every start. Read in the background
        instead, a fresh channel's start ("its newest message when read") could take in
        a message another node stored after the reply whose notice had not come yet,
        and that message was then never pushed (its late notice at or below the start).
        """
        # Every start position is read before any stream catches up, so a stream that
        # starts at "the newest message now" means now, not after the others caught up.
        starts = [await position() for _, position, _ in catch_ups]
        self._task = asyncio.create_task(self._catch_up_all(catch_ups, starts))
        self._task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None  # a finished task and its coroutine cost 1 KiB per connection
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, ConnectionError):
            return  # the connection went away meanwhile: nothing to report
        if isinstance(error, TimeoutError):
            self._writer.abort("dropped: catch-up stalled (client not reading)")
        elif error is not None:
            log.error("catch-up failed", exc_info=error)
            self._writer.abort("dropped: catch-up failed")

    @property
    def catching_up(self) -> bool:
        return self._task is not None

    def cancel(self) -> None:
        """The subscription ends (Hub.unsubscribe): its streams are dropped too, so that
        a start() still reading positions meanwhile catches nothing up afterwards."""
        self._streams.clear()
        if self._task is not None:
            self._task.cancel()

    async def _catch_up_all(
        self, catch_ups: list[tuple[int, Position, Fetch]], starts: list[StreamPosition]
    ) -> None:
        starts_after: dict[int, int] = {}  # the id each stream's catch-up reads after
        for (stream, _, _), start in zip(catch_ups, starts, strict=True):
            state = self._streams.get(stream)
            if state is not None and not state.live:
                if start.fresh:
                    written = self._deliver_held_up_to(state, start.seq)
                    if written is not None:
                        # The stream starts at the first message held, and goes on from
                        # the last one written without a gap: a message at or below the
                        # start may not have been offered yet (another node's, which the
                        # bus brings a moment after its commit), so the catch-up reads
                        # it rather than the start skipping it.
                        starts_after[stream] = written
                        continue
                state.seq = max(state.seq, start.seq)
                starts_after[stream] = start.id
        for (stream, _, fetch), start in zip(catch_ups, starts, strict=True):
            state = self._streams.get(stream)
            if state is not None and not state.live:
                after = starts_after.get(stream, start.id)
                await self._catch_up(stream, state, fetch, after)

    async def _catch_up(self, stream: int, state: _Stream, fetch: Fetch, after: int) -> None:
        """Read the stream from the store after message id ``after`` until it is live."""
        while True:
            page = await fetch(after, self._page_size)
            for event in page:
                if self._streams.get(stream) is not state:
                    return  # dropped meanwhile (the user left the channel)
                after = event.id
                if event.seq > state.seq:
                    state.seq = event.seq
                    if state.own is None or event.seq not in state.own:
                        await self._writer.push_paced(event)
            if len(page) < self._page_size and not state.overflowed:
                # Events offered since the last read are in the queue: nothing slips between.
                self._go_live(state)
                return
            state.overflowed = False

    def _deliver_held_up_to(self, state: _Stream, start: int) -> int | None:
        """A fresh stream starts at its newest message when read (seq ``start``), a moment
        after the subscription began: what was offered in that moment is new, so it goes
        out, from the first held message on while the seqs run without a gap (a missing
        one is read from the store).  Returns the id of the last message written, if any."""
        queued = state.queued or []
        held = sorted((e for e in queued if e.seq <= start), key=_by_seq)
        written: int | None = None
        for event in held:
            if written is not None and event.seq != state.seq + 1:
                break  # a gap: the catch-up reads on from the last one written
            state.seq = event.seq
            written = event.id
            self._writer.write(event)
        state.queued = [e for e in queued if e.seq > state.seq]
        return written

    def _go_live(self, state: _Stream) -> None:
        for event in sorted(state.queued or [], key=_by_seq):
            if event.seq > state.seq:
                state.seq = event.seq
                self._writer.write(event)
        state.queued = None
        state.own = None


_by_seq = attrgetter("seq")
