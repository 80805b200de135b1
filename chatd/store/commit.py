"""Group commit, shared by every store: many messages, one transaction.

Messages sent at about the same time share one transaction, and each sender is
answered once the transaction holding its message has committed.  Under load a
batch gathers whatever arrived while the previous one was writing.  A store hands
``GroupCommit`` one coroutine, "write this batch in one transaction and return a
result per message", and the kind of exception that means one row is at fault;
everything else (the queue, the flusher task, retrying a failed batch one message
at a time, publishing then answering in commit order, and telling which messages
repeat an earlier client_id) is here, once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from chatd.store.rows import CHANNEL, PRIVATE, NewMessage, Stored

log = logging.getLogger(__name__)

# Called with a committed message's result, right after its COMMIT (the publish seam).
Committed = Callable[[Stored], None]
# Called once for an entry of several messages, right after the COMMIT holding the last of
# them, with one result per message in order: its Stored, or why it was not stored.
Settle = Callable[[list[Stored | Exception]], None]
DedupKey = tuple[str, int, str]  # kind, sender id, client_id
WriteBatch = Callable[[list[NewMessage]], Awaitable[list[Stored]]]


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
        except Exception:  # the replies are lost, but the flusher and the others go on
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
    """The queue of messages waiting to be stored, and the one task that writes them.

    ``write_batch`` runs one transaction and returns one Stored per message, in order;
    it is never called twice at once.  Should it raise ``row_fault`` (a constraint:
    a user deleted meanwhile), the batch is written again one message at a time, so
    that only the faulty message fails; any other exception fails the whole batch
    (nothing of it committed).
    """

    def __init__(self, write_batch: WriteBatch, row_fault: type[Exception]) -> None:
        self._write_batch = write_batch
        self._row_fault = row_fault
        # Kept: asyncio.get_running_loop() makes a getpid() system call each time in
        # Python 3.11, which showed up as 2.5% of the server's time under /send load.
        self._loop = asyncio.get_running_loop()
        self._unwritten: list[_Entry] = []
        self._flusher: asyncio.Task[None] | None = None
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
        if self._flusher is None or self._flusher.done():
            # At low load a flusher per commit: the kept loop's create_task, not
            # asyncio.create_task (it looks the loop up: a getpid() call in Python 3.11).
            self._flusher = self._loop.create_task(self._flush())

    async def settled(self) -> None:
        """Wait until every message enqueued before has committed (read your writes)."""
        last = self.last
        if last is not None and not last.done():
            await asyncio.wait([last])

    async def _flush(self) -> None:
        while self._unwritten:
            entries, self._unwritten = self._unwritten, []
            messages = [m for entry in entries for m in entry.messages]
            try:
                stored: list[Stored | Exception] = list(await self._write_batch(messages))
            except self._row_fault:
                # One bad row must not sink the others: only that one fails.
                await self._write_one_by_one(entries)
                continue
            except Exception as exc:
                # Nothing in the batch committed: every sender gets the error (code 9).
                stored = [exc] * len(messages)
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
