"""Timing races of chatd/cluster.py around a stream's start position, made to happen on
purpose: a node's real store (a fresh PostgreSQL database) is wrapped in a ``Gate``
whose chosen method waits for the test before (or after) delegating, so that a
notice arrives while a start is read, a start is read while a position check runs,
or a lost notice is repaired while a subscription holds its streams.  In-process
nodes (Server) on a redis-server of the test's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from chatd.bus_redis import RedisBus
from chatd.client import Client
from chatd.cluster import ClusterBus, StoreLog, to_notice
from tests.cluster_helpers import RedisServer
from tests.conftest import Harness, MakeHarness, harness_factory

WAIT = 20.0  # bound on every wait for an event; generous for a loaded machine


class Gate:
    """The real store, but ``method`` waits for ``opened`` before delegating (or, with
    ``after``, between the store's answer and returning it)."""

    def __init__(self, store: Any, method: str, after: bool = False) -> None:
        self._store, self._method, self._after = store, method, after
        self.arrived = asyncio.Event()  # a call is waiting at the gate
        self.opened = asyncio.Event()
        self.returned = asyncio.Event()  # a call went through

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._store, name)
        if name != self._method:
            return real

        async def gated(*args: Any, **kwargs: Any) -> Any:
            if not self._after:
                await self._wait()
            result = await real(*args, **kwargs)
            if self._after:
                await self._wait()
            self.returned.set()
            return result

        return gated

    async def _wait(self) -> None:
        self.arrived.set()
        await self.opened.wait()


def gate(node: Harness, method: str, after: bool = False) -> Gate:
    """Put a Gate on ``node``'s store as its cluster bus reads it."""
    cluster = bus_of(node)
    gated = Gate(cluster._store, method, after)
    cluster._store = gated  # a MessageStore in all but name (Any to mypy)
    return gated


def bus_of(node: Harness) -> ClusterBus:
    cluster = node.server._cluster
    assert cluster is not None
    return cluster


async def until(condition: Callable[[], bool]) -> None:
    """Poll (bounded): for state that changes without an event to wait on."""
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def waited(event: asyncio.Event) -> None:
    async with asyncio.timeout(WAIT):
        await event.wait()


async def pushed_until(client: Client, last: int) -> list[int]:
    """Ids of the channel messages pushed to ``client``, up to the one with id ``last``."""
    ids: list[int] = []
    async with asyncio.timeout(WAIT):
        while last not in ids:
            event = await client.next_event()
            if event.get("event") == "channel_message":
                ids.append(event["data"]["id"])
    return ids


@pytest.fixture
async def make_node(pg_url: str, redis: RedisServer) -> AsyncIterator[MakeHarness]:
    """``await make_node(node_id="a", ...)``: a node on the test's database and bus;
    ``bus="local"`` for one that shares the database only (it publishes nothing)."""
    async with harness_factory(lambda n: pg_url) as make:

        async def node(**changes: Any) -> Harness:
            return await make(**{"bus": redis.url, **changes})

        yield node


async def in_the_hall(a: Harness, b: Harness) -> tuple[Client, Client]:
    alice, bob = await a.user("alice"), await b.user("bob")
    for client in (alice, bob):
        await client.request("/channel/join", {"name": "hall"})
    return alice, bob


def subscribing(client: Client) -> Awaitable[Any]:
    return asyncio.ensure_future(client.request("/subscribe", {}))


async def send(client: Client, text: str) -> int:
    reply = await client.request("/channel/send", {"name": "hall", "message": text})
    message_id: int = reply["id"]
    return message_id


async def test_a_notice_that_comes_while_the_start_is_read_and_is_below_it_is_pushed_once(
    make_node: MakeHarness,
) -> None:
    """The message commits before the start is read (so the start takes it in), its
    notice comes while the read waits: held, then handed to the hub, which the
    subscription's own catch-up also read it from: pushed once.  A second session
    subscribing meanwhile waits for the same read."""
    a, b = await make_node(node_id="a"), await make_node(node_id="b")
    alice, bob = await in_the_hall(a, b)
    gated = gate(b, "channel_history")  # the start read of a channel
    first = subscribing(bob)
    await waited(gated.arrived)
    again = await b.connect(bob.token)
    second = subscribing(again)
    cluster = bus_of(b)
    # Sent once the second /subscribe holds its streams: sent before, the message may
    # precede where that subscription starts (protocol.md section 9), and was not pushed
    # to it (a flaky failure, under coverage most of all).
    sessions = b.server.app.hub.bound_sessions
    await until(lambda: sum(s.subscription is not None for s in sessions()) == 2)
    before = await send(alice, "while the start is read")
    await until(lambda: len(cluster._pending.get("c:1", [])) == 1)  # held
    assert len(cluster._starting) == 1  # both sessions wait for the one read
    gated.opened.set()
    await asyncio.gather(first, second)
    after = await send(alice, "after")
    for session in (bob, again):
        assert await pushed_until(session, after) == [before, after]


async def test_a_notice_that_comes_after_the_start_was_read_is_pushed_in_order(
    make_node: MakeHarness,
) -> None:
    """The start is read (an empty channel: 0), the message commits and its notice
    comes before the read's task goes on: held, then offered above the start."""
    a, b = await make_node(node_id="a"), await make_node(node_id="b")
    alice, bob = await in_the_hall(a, b)
    gated = gate(b, "channel_history", after=True)
    subscribed = subscribing(bob)
    await waited(gated.arrived)
    held = await send(alice, "after the start was read")
    cluster = bus_of(b)
    await until(lambda: len(cluster._pending.get("c:1", [])) == 1)
    gated.opened.set()
    await subscribed
    assert cluster.order.position("c:1") == (1, held)  # pushed by the order, not the hub
    after = await send(alice, "after")
    assert await pushed_until(bob, after) == [held, after]


async def test_a_start_read_during_a_position_check_keeps_its_late_notices(
    make_node: MakeHarness, redis: RedisServer,
) -> None:
    """A late notice (a message committed before its stream's start was read, announced
    after) goes to the hub until the next position check.  A start read while a check
    was reading the heads was forgotten as that check ended, and the late notice,
    below the position, was dropped: the message never reached the session."""
    a = await make_node(node_id="a")
    b = await make_node(node_id="b", bus_position_check=2.0)
    silent = await make_node(bus="local")  # commits and publishes nothing
    alice = await a.user("alice")
    await alice.request("/channel/join", {"name": "hall"})
    carol = await silent.user("carol")
    await carol.request("/channel/join", {"name": "hall"})
    bob = await b.user("bob")
    await bob.request("/subscribe", {})  # his inbox followed: a check reads its head
    gated = gate(b, "stream_heads")
    await waited(gated.arrived)  # a position check is reading the heads
    late = await send(carol, "its notice comes late")
    await bob.request("/channel/join", {"name": "hall"})  # followed: its start is read
    cluster = bus_of(b)
    await until(lambda: cluster.order.following("c:1"))
    assert cluster.order.position("c:1") == (1, late)
    gated.opened.set()
    await waited(gated.returned)  # that check is over
    [event] = await StoreLog(cluster._store).read("c:1", 0, 10)
    publisher = RedisBus(redis.url, "slow", lambda m: None, lambda: None)
    await publisher.start()
    try:
        publisher.publish(to_notice(event))  # the late notice
        after = await send(alice, "after")
        assert await pushed_until(bob, after) == [late, after]
    finally:
        await publisher.close()


# A lost notice repaired while a session subscribes on the node that repairs it: the
# repair pushes old messages (read from the store) to the hub while the session's
# Subscription still holds its streams and reads where they start.


def gate_app(node: Harness, method: str, after: bool = False) -> Gate:
    """Put a Gate on ``node``'s store as its handlers read it (/subscribe)."""
    app = node.server.app
    gated = Gate(app.store, method, after)
    app.store = gated  # a MessageStore in all but name (Any to mypy)
    return gated


async def with_a_gap(make_node: MakeHarness) -> tuple[Harness, Client, Client, Client]:
    """Nodes a (checks positions too rarely to matter) and b, and one that publishes
    nothing; carol subscribed on a, so that a follows the hall; the clients of alice
    (on b), carol, and dave (on the silent node), all members of the hall."""
    a = await make_node(node_id="a", bus_position_check=600.0)
    b = await make_node(node_id="b")
    silent = await make_node(bus="local")  # commits and publishes nothing: a lost notice
    alice, carol, dave = await b.user("alice"), await a.user("carol"), await silent.user("dave")
    for client in (alice, carol, dave):
        await client.request("/channel/join", {"name": "hall"})
    await carol.request("/subscribe", {})
    await until(lambda: bus_of(a).order.following("c:1"))
    return a, alice, carol, dave


async def repaired_while_held(a: Harness, alice: Client, carol: Client, lost: int) -> int:
    """With a session of a holding its streams: alice sends a message whose notice shows
    a the gap before it; a reads the lost message from the store and pushes both to its
    hub (carol, live, gets them).  Returns the id of alice's message."""
    before = bus_of(a).order.counts.repaired
    noticed = await send(alice, "its notice shows the gap")
    assert (await pushed_until(carol, noticed))[-2:] == [lost, noticed]
    assert bus_of(a).order.counts.repaired > before  # the lost one came by the repair
    return noticed


@pytest.mark.parametrize("read", ["acknowledged", "never read"])
async def test_a_repair_while_a_subscription_holds_its_streams_pushes_each_message_once(
    make_node: MakeHarness, read: str,
) -> None:
    """The repaired messages reach the subscription while it holds the hall and its
    start is read: those at or below the start are dropped, the others are read by the
    catch-up too and written once, in order, then the live ones."""
    a, alice, carol, dave = await with_a_gap(make_node)
    bob = await a.user("bob")
    await bob.request("/channel/join", {"name": "hall"})
    if read == "acknowledged":
        first = await send(alice, "read")
        await pushed_until(carol, first)
        await bob.request("/ack", {"channel": "hall", "id": first})
    lost = await send(dave, "its notice is lost")
    gated = gate_app(a, "channel_position")
    subscribed = subscribing(bob)
    await waited(gated.arrived)  # bob's streams are held, their starts being read
    noticed = await repaired_while_held(a, alice, carol, lost)
    gated.opened.set()
    await subscribed
    after = await send(alice, "after")
    # Acknowledged before it: the lost message is news. Never read: the hall starts at
    # its newest message as /subscribe began, the lost one (protocol.md section 9).
    caught_up = [lost] if read == "acknowledged" else []
    assert await pushed_until(bob, after) == [*caught_up, noticed, after]


async def test_a_channel_joined_while_subscribe_begins_gets_no_repaired_backlog(
    make_node: MakeHarness,
) -> None:
    """Bob joins the hall (on another connection) while his /subscribe reads where his
    channels start, so the hall had no start read before the streams were held.  A
    message stored before all this, its notice lost, is repaired while the hall is
    held: it is backlog, not news, and must not be pushed; what follows is."""
    a, alice, carol, dave = await with_a_gap(make_node)
    bob = await a.user("bob")
    await bob.request("/channel/join", {"name": "side"})  # so the newest are read
    other = await a.connect(bob.token)
    lost = await send(dave, "its notice is lost")
    newest = gate_app(a, "channel_newest", after=True)
    positions = gate_app(a, "channel_position")
    subscribed = subscribing(bob)
    await waited(newest.arrived)
    await other.request("/channel/join", {"name": "hall"})
    newest.opened.set()
    await waited(positions.arrived)  # the hall is held now, its start being read
    noticed = await repaired_while_held(a, alice, carol, lost)
    positions.opened.set()
    await subscribed
    after = await send(alice, "after")
    assert await pushed_until(bob, after) == [noticed, after]
