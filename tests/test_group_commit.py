"""chatd.store.commit in memory: the group commit both stores share, over a toy backend.

The contract suite (test_store_contract.py) runs it against SQLite and PostgreSQL;
these check the machine itself: batching, the one-by-one retry, publish-then-answer.
"""

from __future__ import annotations

import asyncio

import pytest

from chatd.store import PRIVATE, NewMessage, Stored
from chatd.store.commit import BatchPlan, GroupCommit


class RowFault(Exception):
    pass


class Backend:
    """Stores bodies in a list; a body "bad" is a faulty row, "down" a failed database."""

    def __init__(self) -> None:
        self.rows: list[str] = []
        self.batches: list[list[str]] = []

    async def write_batch(self, batch: list[NewMessage]) -> list[Stored]:
        await asyncio.sleep(0)  # a real write yields to the loop: others enqueue meanwhile
        return self.write_now(batch)

    def write_now(self, batch: list[NewMessage]) -> list[Stored]:
        bodies = [m.body for m in batch]
        self.batches.append(bodies)
        if "down" in bodies:
            raise OSError("database unreachable")
        if "bad" in bodies:
            raise RowFault()
        start = len(self.rows)
        self.rows += bodies
        return [Stored(start + i + 1, m.created_at, False, start + i + 1) for i, m in
                enumerate(batch)]


def message(body: str, client_id: str | None = None) -> NewMessage:
    return NewMessage(PRIVATE, 1, 2, body, 0.0, client_id)


async def test_messages_enqueued_together_share_a_batch_and_keep_their_order() -> None:
    backend = Backend()
    commit = GroupCommit(backend.write_batch, RowFault)
    first = commit.enqueue(message("a"))
    await asyncio.sleep(0)  # the flusher takes "a" alone, then the rest as one batch
    rest = [commit.enqueue(message(body)) for body in "bcd"]
    results = await asyncio.gather(first, *rest)
    assert [r.id for r in results] == [1, 2, 3, 4]
    assert backend.batches == [["a"], ["b", "c", "d"]]


async def test_a_faulty_row_fails_alone() -> None:
    backend = Backend()
    commit = GroupCommit(backend.write_batch, RowFault)
    futures = [commit.enqueue(message(body)) for body in ("a", "bad", "c")]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(results[1], RowFault)
    assert backend.rows == ["a", "c"]


async def test_a_failed_database_fails_the_whole_batch_and_the_next_one_goes_on() -> None:
    backend = Backend()
    commit = GroupCommit(backend.write_batch, RowFault)
    failed = [commit.enqueue(message(body)) for body in ("a", "down")]
    for future in failed:
        with pytest.raises(OSError):
            await future
    assert (await commit.enqueue(message("later"))).id == 1


async def test_each_message_is_published_before_its_sender_is_answered() -> None:
    backend = Backend()
    commit = GroupCommit(backend.write_batch, RowFault)
    seen: list[tuple[int, bool]] = []
    futures: list[asyncio.Future[Stored]] = []

    def publish(stored: Stored) -> None:
        seen.append((stored.id, futures[stored.id - 1].done()))
        if stored.id == 2:
            raise RuntimeError("a push failed")  # logged; the others and the reply go on

    futures += [commit.enqueue(message(body), publish) for body in "abc"]
    await asyncio.gather(*futures)
    assert seen == [(1, False), (2, False), (3, False)]
    await commit.settled()
    assert commit.last is futures[-1]


def test_batch_plan_answers_repeats_with_the_first_result() -> None:
    earlier = {(PRIVATE, 1, "x"): Stored(7, 0.0, True, 3)}
    batch = [message("a", "x"), message("b", "y"), message("c"), message("d", "y")]
    plan = BatchPlan(batch, earlier)
    assert plan.fresh[PRIVATE] == [1, 2]
    plan.results[1] = Stored(10, 0.0, False, 4)
    plan.results[2] = Stored(11, 0.0, False, 5)
    assert [(s.id, s.seq, s.duplicate) for s in plan.done()] == [
        (7, 3, True), (10, 4, False), (11, 5, False), (10, 4, True),
    ]


class Settled:
    """An enqueue_many entry's settle: records the results and whether its future was done."""

    def __init__(self) -> None:
        self.calls: list[list[Stored | Exception]] = []
        self.future: asyncio.Future[None] | None = None

    def __call__(self, results: list[Stored | Exception]) -> None:
        assert self.future is not None and not self.future.done()  # settled, then answered
        self.calls.append(results)


def entry(commit: GroupCommit, bodies: str | list[str]) -> Settled:
    settled = Settled()
    settled.future = commit.enqueue_many([message(body) for body in bodies], settled)
    return settled


async def test_an_entry_of_several_messages_is_settled_once_in_commit_order() -> None:
    backend = Backend()
    commit = GroupCommit(backend.write_batch, RowFault)
    first, lone, second = entry(commit, "ab"), commit.enqueue(message("c")), entry(commit, "de")
    await asyncio.gather(lone, commit.settled())
    assert backend.batches == [["a", "b", "c", "d", "e"]]  # one transaction for all
    assert [[r.id for r in call if isinstance(r, Stored)] for call in first.calls] == [[1, 2]]
    assert (await lone).id == 3
    assert [[r.id for r in call if isinstance(r, Stored)] for call in second.calls] == [[4, 5]]
    assert commit.last is second.future


async def test_a_faulty_row_fails_alone_within_its_entry() -> None:
    backend = Backend()
    commit = GroupCommit(backend.write_batch, RowFault)
    settled = entry(commit, ["a", "bad", "c"])
    await commit.settled()
    (results,) = settled.calls
    assert [type(r).__name__ for r in results] == ["Stored", "RowFault", "Stored"]
    assert backend.rows == ["a", "c"]


async def test_a_failed_database_fails_every_message_of_an_entry() -> None:
    backend = Backend()
    commit = GroupCommit(backend.write_batch, RowFault)
    settled = entry(commit, ["a", "down"])
    await commit.settled()
    assert [type(r).__name__ for r in settled.calls[0]] == ["OSError", "OSError"]


async def test_a_settle_that_raises_is_logged_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = Backend()
    commit = GroupCommit(backend.write_batch, RowFault)

    def broken(results: list[Stored | Exception]) -> None:
        raise RuntimeError("a reply group failed")

    failed = commit.enqueue_many([message("a")], broken)
    after = entry(commit, "b")
    await commit.settled()
    assert failed.done() and after.calls  # its future resolves all the same
    assert "settling 1 committed messages failed" in caplog.text


class FutureBackend(Backend):
    """A backend whose writes are futures already under way, as the SQLite store's are."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks_seen: list[int] = []

    def write_batch_soon(self, batch: list[NewMessage]) -> asyncio.Future[list[Stored]]:
        self.tasks_seen.append(len(asyncio.all_tasks()))
        written: asyncio.Future[list[Stored]] = asyncio.get_running_loop().create_future()

        def finish() -> None:
            try:
                written.set_result(self.write_now(batch))
            except Exception as exc:
                written.set_exception(exc)

        asyncio.get_running_loop().call_soon(finish)
        return written


async def test_a_write_under_way_as_a_future_needs_no_task_per_commit() -> None:
    backend = FutureBackend()
    commit = GroupCommit(backend.write_batch_soon, RowFault)
    for body in "abc":  # one commit each, as at low load
        assert (await commit.enqueue(message(body))).id == "abc".index(body) + 1
    assert backend.batches == [["a"], ["b"], ["c"]]
    assert backend.tasks_seen == [1, 1, 1]  # only this test's own task


async def test_a_future_write_keeps_the_order_the_batching_and_the_one_by_one_retry() -> None:
    backend = FutureBackend()
    commit = GroupCommit(backend.write_batch_soon, RowFault)
    first = commit.enqueue(message("a"))
    await asyncio.sleep(0)  # "a" is under way; the rest gather behind it
    rest = [commit.enqueue(message(body)) for body in ("b", "bad", "d")]
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert [r.id if isinstance(r, Stored) else type(r).__name__ for r in results] == [
        1, 2, "RowFault", 3,
    ]
    settled = entry(commit, ["e", "down"])
    await commit.settled()
    assert [type(r).__name__ for r in settled.calls[0]] == ["OSError", "OSError"]
    assert backend.batches == [["a"], ["b", "bad", "d"], ["b"], ["bad"], ["d"], ["e", "down"]]
    assert (await commit.enqueue(message("later"))).id == 4  # and the queue goes on


async def test_a_write_that_fails_to_start_fails_its_batch_and_the_next_one_goes_on() -> None:
    backend = FutureBackend()
    refuse = True

    def write_batch(batch: list[NewMessage]) -> asyncio.Future[list[Stored]]:
        if refuse:
            raise ValueError("Connection closed")
        return backend.write_batch_soon(batch)

    commit = GroupCommit(write_batch, RowFault)
    with pytest.raises(ValueError):
        await commit.enqueue(message("a"))
    refuse = False
    assert (await commit.enqueue(message("b"))).id == 1
