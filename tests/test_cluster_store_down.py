"""The store fails under a node (chatd/cluster.py): while it reads a stream's start
position, and while its position check reads the followed streams' heads.

The promise (protocol.md section 9, "Several nodes"): a push from another node may come
late while things fail, but no message is lost, and once the store is back every
subscribed connection gets every message, in order, once.  Each test runs a PostgreSQL
of its own (initdb, pg_ctl), two or three in-process nodes on it and a redis-server of
its own.  A ``Gate`` on the node's real store holds the chosen read until PostgreSQL is
stopped (immediate: every connection cut), then lets it go on to fail for real.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from chatd.client import Client
from chatd.cluster import ClusterBus
from tests.cluster_helpers import PostgresCluster, RedisServer, postgres_cluster
from tests.conftest import PASSWORD, Harness, MakeHarness, harness_factory

WAIT = 30.0  # bound on every wait for an event; generous for a loaded machine
CHECK = 0.5  # the position check's interval on the node under test (s)


class Gate:
    """The real store, but ``method`` waits for ``opened`` before delegating."""

    def __init__(self, store: Any, method: str) -> None:
        self._store, self._method = store, method
        self.arrived = asyncio.Event()  # a call is waiting at the gate
        self.opened = asyncio.Event()
        self.failed = asyncio.Event()  # a call went through and raised
        self._callers: dict[str, asyncio.Event] = {}  # by the calling task's name

    def _caller(self, task_name: str) -> asyncio.Event:
        return self._callers.setdefault(task_name, asyncio.Event())

    async def reached_by(self, task_name: str) -> None:
        """Until a call made by the task of that name waits at the gate."""
        async with asyncio.timeout(WAIT):
            await self._caller(task_name).wait()

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._store, name)
        if name != self._method:
            return real

        async def gated(*args: Any, **kwargs: Any) -> Any:
            self._caller(task_name()).set()
            self.arrived.set()
            await self.opened.wait()
            try:
                return await real(*args, **kwargs)
            except Exception:
                self.failed.set()
                raise

        return gated


def task_name() -> str:
    """The name of the asyncio task running now ("" outside one, or outside a loop)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop: a record logged from a thread
        return ""
    return "" if task is None else task.get_name()


def bus_of(node: Harness) -> ClusterBus:
    cluster = node.server._cluster
    assert cluster is not None
    return cluster


def gate(node: Harness, method: str) -> Gate:
    """A Gate on ``node``'s store as its cluster bus reads it (requests are not gated)."""
    cluster = bus_of(node)
    gated = Gate(cluster._store, method)
    cluster._store = gated  # a MessageStore in all but name (Any to mypy)
    return gated


class Warnings(logging.Handler):
    """chatd's warnings, and an event for the first one that says a given thing."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self._tasks: list[str] = []  # the name of the task that logged each message
        self._waiting: list[tuple[str, str | None, asyncio.Event]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message, task = record.getMessage(), task_name()  # emit runs in the logging task
        self.messages.append(message)
        self._tasks.append(task)
        for text, by, event in self._waiting:
            if text in message and by in (None, task):
                event.set()

    async def said(self, text: str, by: str | None = None) -> None:
        """Until a warning says ``text`` (logged by the task named ``by``, if given)."""
        event = asyncio.Event()
        logged = zip(self.messages, self._tasks, strict=True)
        if any(text in m and by in (None, t) for m, t in logged):
            return
        self._waiting.append((text, by, event))
        async with asyncio.timeout(WAIT):
            await event.wait()


@pytest.fixture
def warnings() -> Iterator[Warnings]:
    handler = Warnings()
    logger = logging.getLogger("chatd")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
async def pg() -> AsyncIterator[PostgresCluster]:
    async with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture
async def make_node(pg: PostgresCluster, redis: RedisServer) -> AsyncIterator[MakeHarness]:
    """``await make_node(node_id="a", ...)``: a node on the test's PostgreSQL and bus;
    ``bus="local"`` for one that shares the database only (it publishes nothing)."""
    async with harness_factory(lambda n: pg.url) as make:

        async def node(**changes: Any) -> Harness:
            return await make(**{"bus": redis.url, **changes})

        yield node


async def outage(pg: PostgresCluster, gated: Gate) -> None:
    """PostgreSQL stops while ``gated``'s call waits; the call then fails against it."""
    async with asyncio.timeout(WAIT):
        await gated.arrived.wait()
    await pg.stop("immediate")
    gated.opened.set()
    async with asyncio.timeout(WAIT):
        await gated.failed.wait()


async def stored(client: Client, op: str, params: dict[str, Any]) -> int:
    """Send until the store takes it (a pooled connection may still be a dead one right
    after PostgreSQL is back: code 9), the same client_id each time: its id."""
    params = {**params, "client_id": str(params)}
    async with asyncio.timeout(WAIT):
        while True:
            reply = await client.call(op, params)
            if reply["code"] == 0:
                message_id: int = reply["data"]["id"]
                return message_id
            assert reply["code"] == 9, reply
            await asyncio.sleep(0.1)  # the node's pool reconnects by itself


async def post(client: Client, text: str) -> int:
    return await stored(client, "/channel/send", {"name": "hall", "message": text})


async def pushed_until(client: Client, kind: str, last: int) -> list[int]:
    """Ids of the ``kind`` events pushed to ``client``, up to the one with id ``last``."""
    ids: list[int] = []
    async with asyncio.timeout(WAIT):
        while last not in ids:
            event = await client.next_event()
            if event.get("event") == kind and "to" not in event["data"]:
                ids.append(event["data"]["id"])
    return ids


async def no_more_pushes(client: Client, kind: str, marker: Client, text: str) -> None:
    """Nothing of ``kind`` is pushed to ``client`` before a message ``marker`` sends now
    (so a repeat or a stray message queued before it would show)."""
    last = await post(marker, text)
    assert await pushed_until(client, kind, last) == [last]


async def test_a_position_check_whose_heads_read_fails_reads_them_again_once_the_store_is_back(
    make_node: MakeHarness, pg: PostgresCluster, warnings: Warnings,
) -> None:
    """A message whose notice never came (a node without the bus stored it) is found by
    the position check.  The check that would find it fails (PostgreSQL down while it
    reads the heads): a warning, and the next check, once PostgreSQL is back, pushes it
    after the messages of the other node stored before it, once each and in order."""
    a = await make_node(node_id="a")
    b = await make_node(node_id="b", bus_position_check=CHECK)
    silent = await make_node(bus="local")
    alice, bob, carol = await a.user("alice"), await b.user("bob"), await silent.user("carol")
    for client in (alice, bob, carol):
        await client.request("/channel/join", {"name": "hall"})
    await bob.request("/subscribe", {})
    before = [await post(alice, "before 1"), await post(alice, "before 2")]
    assert await pushed_until(bob, "channel_message", before[-1]) == before
    gated = gate(b, "stream_heads")
    async with asyncio.timeout(WAIT):
        await gated.arrived.wait()  # a check waits to read the heads
    lost = await post(carol, "its notice never comes")
    await outage(pg, gated)
    await warnings.said("cannot read the followed streams' heads")
    await pg.start()
    assert await pushed_until(bob, "channel_message", lost) == [lost]
    after = await post(alice, "after")
    assert await pushed_until(bob, "channel_message", after) == [after]
    await no_more_pushes(bob, "channel_message", alice, "last")
    checker = bus_of(b)._checker
    assert checker is not None and not checker.done()  # the checks go on


@pytest.mark.parametrize("held", [False, True], ids=["nothing held", "a message held"])
async def test_a_channel_joined_while_its_start_cannot_be_read_gets_what_follows_the_join(
    make_node: MakeHarness, pg: PostgresCluster, warnings: Warnings, held: bool,
) -> None:
    """Bob, subscribed on B, joins a channel: B reads where its stream starts, and
    PostgreSQL goes down during that read.  The joined channel is live from the next
    message on, with no catch-up (protocol.md section 9): once PostgreSQL is back Bob
    gets the messages stored after his join (``held``: one whose notice came while the
    read waited, too), in order, once each, and none of those before it."""
    a = await make_node(node_id="a")
    alice = await a.user("alice")
    await alice.request("/channel/join", {"name": "hall"})
    for n in range(3):
        await post(alice, f"before bob joined {n}")
    # Started after: B has heard no notice of the channel, so it reads its start.
    b = await make_node(node_id="b", bus_position_check=CHECK)
    bob = await b.user("bob")
    await bob.request("/subscribe", {})
    gated = gate(b, "channel_history")  # the bus's read of a channel's start
    await bob.request("/channel/join", {"name": "hall"})
    expected = []
    if held:
        async with asyncio.timeout(WAIT):
            await gated.arrived.wait()
        expected.append(await post(alice, "while the start is read"))
        cluster = bus_of(b)
        async with asyncio.timeout(WAIT):
            while not cluster._pending.get("c:1"):  # noqa: ASYNC110  (no event to wait on)
                await asyncio.sleep(0.01)
    await outage(pg, gated)
    await warnings.said("cannot read where c:1 starts")
    await pg.start()
    expected += [await post(alice, "after 1"), await post(alice, "after 2")]
    assert await pushed_until(bob, "channel_message", expected[-1]) == expected
    await no_more_pushes(bob, "channel_message", alice, "last")


async def test_a_stream_whose_start_could_not_be_read_is_let_go_when_nobody_follows_it(
    make_node: MakeHarness, pg: PostgresCluster, warnings: Warnings,
) -> None:
    """Bob joins a channel while subscribed and its start cannot be read (PostgreSQL
    down), then unsubscribes: the next check stops holding the channel's messages rather
    than read its start for nobody.  Subscribed again, he gets what follows."""
    a = await make_node(node_id="a")
    alice = await a.user("alice")
    await alice.request("/channel/join", {"name": "hall"})
    b = await make_node(node_id="b", bus_position_check=CHECK)
    bob = await b.user("bob")
    await bob.request("/subscribe", {})
    gated = gate(b, "channel_history")
    await bob.request("/channel/join", {"name": "hall"})
    await outage(pg, gated)
    await warnings.said("cannot read where c:1 starts")
    await bob.request("/unsubscribe", {})
    cluster = bus_of(b)
    async with asyncio.timeout(WAIT):
        while "c:1" in cluster._pending:  # noqa: ASYNC110  (no event to wait on)
            await asyncio.sleep(0.01)
    assert not cluster.order.following("c:1")
    await pg.start()
    async with asyncio.timeout(WAIT):
        # Polled: the node's pool reconnects by itself, with no event to wait on.
        while (await bob.call("/subscribe", {}))["code"] != 0:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    sent = [await post(alice, "after 1"), await post(alice, "after 2")]
    assert await pushed_until(bob, "channel_message", sent[-1]) == sent


async def test_a_subscribe_that_fails_with_the_store_down_can_be_sent_again(
    make_node: MakeHarness, pg: PostgresCluster, warnings: Warnings,
) -> None:
    """Bob's /subscribe on B: PostgreSQL goes down while B reads where his inbox starts,
    so the /subscribe fails (code 9).  Sent again once PostgreSQL is back, it catches up
    the message Alice sent him on A before (unacknowledged) and pushes the next ones,
    in order, once each."""
    a = await make_node(node_id="a")
    alice = await a.user("alice")
    await (await a.user("bob")).close()
    before = await stored(alice, "/send", {"name": "bob", "msg": "before"})
    # Started after: B has heard no notice of Bob's inbox, so it reads its start.
    b = await make_node(node_id="b", bus_position_check=CHECK)
    bob = await b.connect()
    await bob.login("bob", PASSWORD)
    gated = gate(b, "inbox_position")  # the bus's read of an inbox's start
    subscribing = asyncio.ensure_future(bob.call("/subscribe", {}))
    await outage(pg, gated)
    await warnings.said("cannot read where u:2 starts")
    assert (await subscribing)["code"] == 9
    await pg.start()
    async with asyncio.timeout(WAIT):
        # Polled: the node's pool reconnects by itself, with no event to wait on.
        while (await bob.call("/subscribe", {}))["code"] != 0:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    after = await stored(alice, "/send", {"name": "bob", "msg": "after"})
    assert await pushed_until(bob, "message", after) == [before, after]
    last = await stored(alice, "/send", {"name": "bob", "msg": "last"})
    assert await pushed_until(bob, "message", last) == [last]


async def test_a_resync_whose_heads_read_fails_is_made_good_by_the_next_check(
    make_node: MakeHarness, pg: PostgresCluster, redis: RedisServer, warnings: Warnings,
) -> None:
    """Redis goes down and a message is stored meanwhile (its notice dropped); when B
    subscribes again its resync reads the followed streams' heads, and PostgreSQL goes
    down during that read: a warning, and the next position check, once PostgreSQL is
    back, pushes the message once.  B's periodic check is held at the gate from before
    Redis goes down, so only the resync, then the check after it, could find it."""
    a = await make_node(node_id="a")
    b = await make_node(node_id="b", bus_position_check=CHECK)
    alice, bob = await a.user("alice"), await b.user("bob")
    for client in (alice, bob):
        await client.request("/channel/join", {"name": "hall"})
    await bob.request("/subscribe", {})
    before = await post(alice, "before")
    assert await pushed_until(bob, "channel_message", before) == [before]
    gated = gate(b, "stream_heads")
    await gated.reached_by("position-check")
    publisher = bus_of(a).redis
    await redis.kill()
    async with asyncio.timeout(WAIT):
        # Polled (no event to wait on): A knows its link is gone, so the notice is not
        # written to a dead socket but dropped (counted), not queued for Redis's return.
        while publisher.publishing:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        lost = await post(alice, "its notice is dropped")
        while publisher.counts.dropped == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    await redis.start()
    await gated.reached_by("resync")
    await outage(pg, gated)
    await warnings.said("cannot read the followed streams' heads", by="resync")
    await pg.start()
    assert await pushed_until(bob, "channel_message", lost) == [lost]
    await no_more_pushes(bob, "channel_message", alice, "last")
    assert bus_of(b).redis.counts.reconnects == 1
