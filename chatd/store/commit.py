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

from chatd.store.rows import CHANNEL, PRIVATE, NewMessage, Stored

log = logging.getLogger(__name__)

# Called with a committed message's result, right after its COMMIT (the publish seam).
Committed = Callable[[Stored], None]
# A message waiting for the group commit: its future, and what to call once committed.
_Unwritten = tuple[NewMessage, asyncio.Future[Stored], Committed | None]
DedupKey = tuple[str, int, str]  # kind, sender id, client_id
WriteBatch = Callable[[list[NewMessage]], Awaitable[list[Stored]]]


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
        self._unwritten: list[_Unwritten] = []
        self._flusher: asyncio.Task[None] | None = None
        self.last: asyncio.Future[Stored] | None = None  # the newest message enqueued

    def enqueue(
        self, message: NewMessage, committed: Committed | None = None
    ) -> asyncio.Future[Stored]:
        """Queue a message for the next group commit; the future resolves once committed.

        Messages are stored in the order they are enqueued. ``committed`` is called
        with the result right after the commit, in that order, unless the message
        repeated an earlier client_id (it was not stored again).
        """
        future: asyncio.Future[Stored] = self._loop.create_future()
        self._unwritten.append((message, future, committed))
        self.last = future
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return future

    async def settled(self) -> None:
        """Wait until every message enqueued before has committed (read your writes)."""
        last = self.last
        if last is not None and not last.done():
            await asyncio.wait([last])

    async def _flush(self) -> None:
        while self._unwritten:
            batch, self._unwritten = self._unwritten, []
            try:
                results = await self._write_batch([message for message, _, _ in batch])
            except self._row_fault:
                # One bad row must not sink the others: only that one fails.
                await self._write_one_by_one(batch)
                continue
            except Exception as exc:
                # Nothing in the batch committed: every sender gets the error (code 9).
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future, committed), stored in zip(batch, results, strict=True):
                settle(future, stored, committed)

    async def _write_one_by_one(self, batch: list[_Unwritten]) -> None:
        for message, future, committed in batch:
            try:
                (stored,) = await self._write_batch([message])
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                settle(future, stored, committed)


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
        for position, message in enumerate(batch):
            key = message.dedup_key
            if key is not None and key in earlier:
                self.results[position] = earlier[key]
            elif key is not None and key in first_in_batch:
                self._repeats[position] = first_in_batch[key]
            else:
                if key is not None:
                    first_in_batch[key] = position
                self.fresh[message.kind].append(position)

    def done(self) -> list[Stored]:
        """The results, once every fresh message has its own."""
        for position, first_position in self._repeats.items():
            first = self.results[first_position]
            assert first is not None
            self.results[position] = Stored(first.id, first.created_at, True, first.seq)
        stored = [result for result in self.results if result is not None]
        assert len(stored) == len(self.results)
        return stored
