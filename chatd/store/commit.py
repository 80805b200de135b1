"""Group commit, shared by every store: many messages, one transaction.

Messages sent at about the same time share one transaction, and each sender is
answered once the transaction holding its message has committed.  Under load a
batch gathers whatever arrived while the previous one was writing.  A store hands
``GroupCommit`` one function, "write this batch in one transaction and return a
result per message" (a coroutine, or a future of a write under way), and the kind of
exception that means one row is at fault; everything else (the queue, the chain of
writes, retrying a failed batch one message
at a time, publishing then answering in commit order, and telling which messages
repeat an earlier client_id) is here, once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from chatd.store.rows import CHANNEL, PRIVATE, NewMessage, Stored

log = logging.getLogger(__name__)

# Called with a committed message's result, right after its COMMIT (the publish seam).
Committed = Callable[[Stored], None]
# Called once for an entry of several messages, right after the COMMIT holding the last of
# them, with one result per message in order: its Stored, or why it was not stored.
Settle = Callable[[list[Stored | Exception]], None]
DedupKey = tuple[str, int, str]  # kind, sender id, client_id
# A coroutine (run in a task), or a future of a write already under way.
WriteBatch = Callable[
    [list[NewMessage]], Coroutine[Any, Any, list[Stored]] | asyncio.Future[list[Stored]]
]


class _Entry:
    """Messages enqueued together, and whom to tell once they are committed.

    A lone message (``enqueue``) has ``committed`` and a future resolving to its Stored;
    several (``enqueue_many``) have ``settle``, and a future resolving once it was called.
    """

    __slots__ = ("committed", "future", "messages", "settle")

    def __init__(
        self,
        messages: list[NewMessage],
        future: asyncio.Future[Any],
        committed: Committed | None,
        settle: Settle | None,
    ) -> None:
        self.messages, self.future = messages, future
        self.committed, self.settle = committed, settle

    def report(self, results: list[Stored | Exception]) -> None:
        """Publish then answer (settle), in commit order; never raises."""
        future = self.future
        if self.settle is None:
            (result,) = results
            if isinstance(result, Stored):
                settle(future, result, self.committed)
            elif not future.done():
                future.set_exception(result)
            return
        try:
            self.settle(results)
        except Exception:  # the replies are lost, but the writes and the others go on
            log.exception("settling %d committed messages failed", len(results))
        if not future.done():
            future.set_result(None)


def settle(future: asyncio.Future[Stored], stored: Stored, committed: Committed | None) -> None:
    """Report a committed message: publish it first, then answer its sender.

    Called in commit order, directly rather than through a done-callback on the
    future: that would cost a scheduled callback and a copied context per message.
    """
    if committed is not None and not stored.duplicate:
        try:
            committed(stored)
        except Exception:  # one failed push must not keep the others, or the reply, back
            log.exception("publishing message %d failed", stored.id)
    if not future.done():
        future.set_result(stored)


class GroupCommit:
    """The queue of messages waiting to be stored, and the chain of writes that stores them.

    ``write_batch`` runs one transaction and returns one Stored per message, in order;
    it is never called twice at once.  It may be a coroutine function, or return a
    future already under way (the SQLite store's, which needs no task for a commit).
    Should it raise ``row_fault`` (a constraint: a user deleted meanwhile), the batch is
    written again one message at a time, so that only the faulty message fails; any
    other exception fails the whole batch (nothing of it committed).

    No task runs the queue: a write is started by a callback scheduled when the queue
    stops being empty, and the next one by the done-callback of the one before. At low
    load every commit holds one message, and a flusher Task per commit (a coroutine, its
    registration among the loop's tasks, its teardown) cost more than the rest of the
    queue's work together (docs/benchmarks.md, "commit-lean").
    """

    def __init__(self, write_batch: WriteBatch, row_fault: type[Exception]) -> None:
        self._write_batch = write_batch
        self._row_fault = row_fault
        # Kept: asyncio.get_running_loop() makes a getpid() system call each time in
        # Python 3.11, which showed up as 2.5% of the server's time under /send load.
        self._loop = asyncio.get_running_loop()
        self._unwritten: list[_Entry] = []
        self._writing: list[_Entry] | None = None  # the entries of the write under way
        self._under_way: asyncio.Future[Any] | None = None  # kept: the loop keeps no task
        self._started = False  # a write is under way, or scheduled to start
        self.last: asyncio.Future[Any] | None = None  # the newest entry's

    def enqueue(
        self, message: NewMessage, committed: Committed | None = None
    ) -> asyncio.Future[Stored]:
        """Queue a message for the next group commit; the future resolves once committed.

        Messages are stored in the order they are enqueued. ``committed`` is called
        with the result right after the commit, in that order, unless the message
        repeated an earlier client_id (it was not stored again).
        """
        future: asyncio.Future[Stored] = self._loop.create_future()
        self._add(_Entry([message], future, committed, None))
        return future

    def enqueue_many(self, messages: list[NewMessage], settle: Settle) -> asyncio.Future[None]:
        """Queue messages for the next group commit, as one entry: one future, one call.

        ``settle(results)`` is called once, in commit order, right after the COMMIT
        holding the last of them (they commit together unless a faulty row makes the
        batch go one message at a time), with one result per message: its Stored, or
        the exception that kept it out. It publishes; duplicates (``Stored.duplicate``)
        are its to skip. The future resolves after it.
        """
        future: asyncio.Future[None] = self._loop.create_future()
        self._add(_Entry(messages, future, None, settle))
        return future

    def _add(self, entry: _Entry) -> None:
        self._unwritten.append(entry)
        self.last = entry.future
        if not self._started:
            self._started = True
            # Started on the loop's next turn, not here: the sends of one read (or of
            # every connection ready at once) join this batch.
            self._loop.call_soon(self._write_next)

    async def settled(self) -> None:
        """Wait until every message enqueued before has committed (read your writes)."""
        last = self.last
        if last is not None and not last.done():
            await asyncio.wait([last])

    def _write_next(self) -> None:
        """Start writing every entry queued, or stop until the next one comes."""
        entries = self._unwritten
        if not entries:
            self._started = False
            return
        self._unwritten = []
        self._writing = entries
        if len(entries) == 1:
            messages = entries[0].messages
        else:
            messages = [m for entry in entries for m in entry.messages]
        try:
            written = self._write_batch(messages)
        except Exception as exc:  # it failed to start: as if the transaction had failed
            self._report(entries, [exc] * len(messages))
            self._write_next()
            return
        if not isinstance(written, asyncio.Future):
            written = self._loop.create_task(written)
        self._under_way = written
        written.add_done_callback(self._written)

    def _written(self, written: asyncio.Future[list[Stored]]) -> None:
        """The write under way has ended: answer its entries, then start the next."""
        entries = self._writing
        assert entries is not None
        self._writing = self._under_way = None
        exc = _failure(written)
        if exc is None:
            self._report(entries, list(written.result()))
        elif isinstance(exc, self._row_fault):
            # One bad row must not sink the others: only that one fails.
            retry = self._under_way = self._loop.create_task(self._write_one_by_one(entries))
            retry.add_done_callback(self._retried)
            return
        else:
            # Nothing in the batch committed: every sender gets the error (code 9).
            self._report(entries, [exc] * sum(len(entry.messages) for entry in entries))
        self._write_next()

    def _retried(self, retry: asyncio.Future[None]) -> None:
        self._under_way = None
        exc = _failure(retry)
        if exc is not None:  # only if cancelled: its writes' failures are reported
            log.error("writing a batch one message at a time failed: %r", exc)
        self._write_next()

    @staticmethod
    def _report(entries: list[_Entry], stored: list[Stored | Exception]) -> None:
        if len(entries) == 1:
            entries[0].report(stored)
            return
        start = 0
        for entry in entries:
            end = start + len(entry.messages)
            entry.report(stored[start:end])
            start = end

    async def _write_one_by_one(self, entries: list[_Entry]) -> None:
        for entry in entries:
            results: list[Stored | Exception] = []
            for message in entry.messages:
                try:
                    (stored,) = await self._write_batch([message])
                except Exception as exc:
                    results.append(exc)
                else:
                    results.append(stored)
            entry.report(results)


def _failure(written: asyncio.Future[Any]) -> Exception | None:
    """Why a write ended without results; None if it has them."""
    if written.cancelled():
        return RuntimeError("the write was cancelled")
    exc = written.exception()
    if exc is None or isinstance(exc, Exception):
        return exc
    return RuntimeError(f"the write was interrupted: {exc!r}")  # KeyboardInterrupt and such


class BatchPlan:
    """Which messages of a batch to insert, and which repeat an earlier client_id.

    A message whose client_id was stored before (``earlier``) gets that result; one
    repeating a client_id earlier in the same batch gets the first one's, once known.
    """

    def __init__(self, batch: list[NewMessage], earlier: Mapping[DedupKey, Stored]) -> None:
        self.results: list[Stored | None] = [None] * len(batch)
        self.fresh: dict[str, list[int]] = {PRIVATE: [], CHANNEL: []}  # positions, by kind
        self._repeats: dict[int, int] = {}  # batch position -> position of the first send
        first_in_batch: dict[DedupKey, int] = {}
        fresh = self.fresh
        for position, message in enumerate(batch):
            if message.client_id is None:  # most sends: nothing to look up
                fresh[message.kind].append(position)
                continue
            key = (message.kind, message.sender_id, message.client_id)  # its dedup_key
            if key in earlier:
                self.results[position] = earlier[key]
            elif key in first_in_batch:
                self._repeats[position] = first_in_batch[key]
            else:
                first_in_batch[key] = position
                fresh[message.kind].append(position)

    def done(self) -> list[Stored]:
        """The results, once every fresh message has its own."""
        for position, first_position in self._repeats.items():
            first = self.results[first_position]
            assert first is not None
            self.results[position] = Stored(first.id, first.created_at, True, first.seq)
        stored = [result for result in self.results if result is not None]
        assert len(stored) == len(self.results)
        return stored
