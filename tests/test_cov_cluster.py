"""Multi-node edges of chatd/cluster.py, beside test_cluster.py: in-process nodes
(Server, so each runs in the test's own process) on one fresh PostgreSQL database and
a redis-server of the test's own, real sockets between clients and nodes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatd.bus_redis import Notice, RedisBus, RedisPresence
from chatd.client import Client
from chatd.cluster import REDIS_EXTRA, ClusterBus
from chatd.config import Config
from chatd.model import ChannelPost
from chatd.server import Server
from tests.cluster_helpers import RedisServer, spare_port
from tests.conftest import PASSWORD, Harness, MakeHarness, harness_factory

WAIT = 20.0  # bound on every wait for an event; generous for a loaded machine


@pytest.fixture
async def make_node(pg_url: str, redis: RedisServer) -> AsyncIterator[MakeHarness]:
    """``await make_node(node_id="a", ...)``: a node on the test's database and bus."""
    async with harness_factory(lambda n: pg_url) as make:

        async def node(**changes: Any) -> Harness:
            return await make(bus=redis.url, **changes)

        yield node


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


async def until_logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    async with asyncio.timeout(WAIT):
        while not logged(caplog, text):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def next_push(client: Client, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        while True:
            event = await client.next_event()
            if event.get("event") == kind:
                return event


async def test_a_node_without_redis_py_says_which_extra_to_install(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "hiredis", None)  # import hiredis: ImportError
    server = Server(dataclasses.replace(config, bus="redis://127.0.0.1:1/0"))
    with pytest.raises(RuntimeError, match="needs the redis-py driver") as refused:
        await server.start()
    assert REDIS_EXTRA in str(refused.value)


async def test_a_node_whose_bus_never_started_closes_without_redis() -> None:
    """What a node does when its bus cannot subscribe (RedisBus.start fails, after 10 s:
    too slow for here): its presence, never started, closes without asking Redis."""
    presence = RedisPresence(f"redis://127.0.0.1:{spare_port()}/0", "a", 30.0)
    async with asyncio.timeout(1.0):  # no connection tried (that would take a second)
        await presence.close()


async def test_a_notice_of_an_unknown_event_is_dropped_and_the_node_serves_on(
    make_node: MakeHarness, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A node of a later version may send events this one does not know."""
    node = await make_node(node_id="a")
    stranger = RedisBus(redis.url, "newer", lambda m: None, lambda: None)
    await stranger.start()
    try:
        stranger.publish(Notice("", 0, 0, {"type": "Reaction", "emoji": "+1"}))
        await until_logged(caplog, "bus: dropped a notice from newer: unknown event type")
        alice = await node.user("alice")
        assert (await alice.call("/ping", {}))["code"] == 0
    finally:
        await stranger.close()


async def test_a_subscribed_session_follows_the_channels_it_joins(
    make_node: MakeHarness,
) -> None:
    """Also: a message stored on another node after a /subscribe's reply reaches the
    new subscription, also when its notice comes after the subscription began. (The
    start positions were once read after the reply: a fresh channel's start, its
    newest message then, took in such a message, and its late notice was dropped.)"""
    a, b = await make_node(node_id="a"), await make_node(node_id="b")
    alice = await a.user("alice")
    bob = await b.user("bob")
    await bob.request("/subscribe", {})
    await alice.request("/channel/join", {"name": "hall"})
    await alice.request("/channel/send", {"name": "hall", "message": "before bob"})
    await bob.request("/channel/join", {"name": "hall"})  # after subscribing
    again = await b.connect(bob.token)  # a second session: the streams are followed
    await again.request("/subscribe", {})
    sent = await alice.request("/channel/send", {"name": "hall", "message": "after"})
    for session in (bob, again):
        event = await next_push(session, "channel_message")
        assert event["data"]["id"] == sent["id"]


async def test_logout_on_one_node_ends_that_token_elsewhere_and_no_other(
    make_node: MakeHarness,
) -> None:
    a, b = await make_node(node_id="a"), await make_node(node_id="b")
    alice = await a.user("alice")
    same_token = await b.connect(alice.token)
    other_token = await b.connect()
    await other_token.login("alice", PASSWORD)
    await alice.request("/logout", {})
    async with asyncio.timeout(WAIT):
        while (await same_token.call("/ping", {}))["code"] == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert (await other_token.call("/ping", {}))["code"] == 0


async def test_presence_falls_back_to_the_nodes_own_sessions_while_redis_is_down(
    make_node: MakeHarness, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await make_node(node_id="a"), await make_node(node_id="b")
    alice = await a.user("alice")
    await b.user("bob")
    assert (await alice.request("/user/info", {"name": "bob"}))["online"] is True
    await redis.kill()
    info = await alice.call("/user/info", {"name": "bob"})
    assert info["code"] == 0 and info["data"]["online"] is False  # not seen from here
    assert logged(caplog, "presence: cannot ask Redis")
    assert (await alice.request("/user/info", {"name": "alice"}))["online"] is True


Pushes = dict[str, list[int]]  # ids pushed to a client, by event kind


async def pushes_until(client: Client, last: dict[str, int]) -> Pushes:
    """The ids of the messages pushed to ``client`` (not copies of its own: no "to"), by
    kind, until the id ``last[kind]`` has come for every kind; other events ignored."""
    pushed: Pushes = {kind: [] for kind in last}
    async with asyncio.timeout(WAIT):
        while any(last[kind] not in pushed[kind] for kind in last):
            event = await client.next_event()
            ids = pushed.get(event.get("event", ""))
            if ids is not None and "to" not in event["data"]:
                ids.append(event["data"]["id"])
    return pushed


def newest(pushes: Pushes) -> dict[str, int]:
    return {kind: ids[-1] for kind, ids in pushes.items() if ids}


async def send(sender: Client, kinds: tuple[str, ...], text: str) -> Pushes:
    """One message of each kind from ``sender``: "channel_message" to #hall,
    "message" to bob; their ids."""
    sent: Pushes = {}
    for kind in kinds:
        if kind == "channel_message":
            reply = await sender.request("/channel/send", {"name": "hall", "message": text})
        else:
            reply = await sender.request("/send", {"name": "bob", "msg": text})
        sent[kind] = [reply["id"]]
    return sent


BOTH = ("channel_message", "message")


def bus_of(node: Harness) -> ClusterBus:
    cluster = node.server._cluster
    assert cluster is not None
    return cluster


async def test_messages_stored_while_the_bus_was_down_are_pushed_by_the_resync_once_each(
    make_node: MakeHarness, redis: RedisServer,
) -> None:
    """Redis goes down; Alice sends on A, whose notices are dropped (A cannot publish,
    B cannot hear).  When B subscribes again it reads its followed streams at once (the
    resync), not at the next position check (an hour away here): Bob gets every message
    sent meanwhile live, in order, once each, then the next ones as usual."""
    a = await make_node(node_id="a", bus_position_check=3600.0)
    b = await make_node(node_id="b", bus_position_check=3600.0)
    alice, bob = await a.user("alice"), await b.user("bob")
    for client in (alice, bob):
        await client.request("/channel/join", {"name": "hall"})
    await bob.request("/subscribe", {})
    before = await send(alice, BOTH, "before")
    assert await pushes_until(bob, newest(before)) == before
    publisher = bus_of(a).redis
    await redis.kill()
    down: Pushes = {kind: [] for kind in BOTH}
    async with asyncio.timeout(WAIT):
        # Polled (no event to wait on): A knows its link is gone, so its notices are not
        # written to a dead socket but dropped (counted), not queued for Redis's return.
        while publisher.publishing:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        for n in range(3):
            for kind, ids in (await send(alice, BOTH, f"while down {n}")).items():
                down[kind] += ids
        while publisher.counts.dropped < 6:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    await redis.start()
    assert await pushes_until(bob, newest(down)) == down
    after = await send(alice, BOTH, "after")  # nothing before it: no message twice
    assert await pushes_until(bob, newest(after)) == after
    assert bus_of(b).redis.counts.reconnects == 1


async def test_a_local_message_read_from_the_store_is_still_not_pushed_to_its_sender(
    make_node: MakeHarness, redis: RedisServer,
) -> None:
    """Redis is down, so B never hears of Alice's message on A.  Bob then posts on B:
    B's order of #hall sees a gap and reads both from the store.  Bob's own message,
    so read, keeps its origin: his connection has its reply and gets only Alice's
    message pushed, while Carol's gets both (protocol.md section 9)."""
    a = await make_node(node_id="a", bus_position_check=3600.0)
    b = await make_node(node_id="b", bus_position_check=3600.0)
    alice, bob, carol = await a.user("alice"), await b.user("bob"), await b.user("carol")
    for client in (alice, bob, carol):
        await client.request("/channel/join", {"name": "hall"})
    for client in (bob, carol):
        await client.request("/subscribe", {})
    await redis.kill()
    publisher = bus_of(a).redis
    async with asyncio.timeout(WAIT):
        while publisher.publishing:  # noqa: ASYNC110  (polled, as above)
            await asyncio.sleep(0.02)
        unheard = (await send(alice, ("channel_message",), "unheard"))["channel_message"]
        while publisher.counts.dropped == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    own = (await send(bob, ("channel_message",), "bob's"))["channel_message"]
    last = (await send(carol, ("channel_message",), "carol's"))["channel_message"]
    assert await pushes_until(bob, {"channel_message": last[0]}) == {
        "channel_message": unheard + last
    }
    assert await pushes_until(carol, {"channel_message": own[0]}) == {
        "channel_message": unheard + own
    }
    assert bus_of(b).order.counts.repaired >= 2  # both read from the store


# How Bob's only session on B lets go of #hall (c:1) and of his inbox (u:2), by the
# streams B stops following: an inbox is followed while its user is on the node at all.
LETTING_GO = {"unsubscribe": ("c:1",), "leave": ("c:1",), "logout": ("c:1", "u:2")}
KIND_OF = {"c:1": "channel_message", "u:2": "message"}


async def let_go(bob: Client, how: str) -> None:
    if how == "leave":
        await bob.request("/channel/leave", {"name": "hall"})
    else:
        await bob.request(f"/{how}", {})


async def follow_again(node: Harness, bob: Client, how: str) -> Client:
    """Bob's session on ``node`` following again what ``let_go`` let go of."""
    if how == "leave":
        await bob.request("/channel/join", {"name": "hall"})  # subscribed all along
        return bob
    if how == "logout":
        bob = await node.connect()
        await bob.login("bob", PASSWORD)
    await bob.request("/subscribe", {})
    return bob


async def test_out_of_order_notices_of_an_unfollowed_stream_keep_the_newest(
    make_node: MakeHarness,
) -> None:
    """A stream nobody here follows is followed later from the newest message heard of
    it. Notices can come out of order (a node's own at once, another node's earlier one
    through Redis): the older one, heard last, must not take the newer one's place."""
    node = await make_node(node_id="a", bus_position_check=3600.0)
    cluster = bus_of(node)
    for seq, newest in ((7, 7), (6, 7), (8, 8)):  # 6 heard after 7
        post = ChannelPost(channel_id=99, channel="far", id=100 + seq, sender="x", body="",
                           created_at=0.0, seq=seq)
        cluster._offer("c:99", post, local=False)
        assert cluster._seen["c:99"] == (newest, 100 + newest)
    assert not cluster.order.following("c:99")


@pytest.mark.parametrize("how", list(LETTING_GO))
async def test_a_stream_nobody_here_follows_any_more_is_dropped_and_followed_again_cleanly(
    make_node: MakeHarness, how: str,
) -> None:
    """Bob's only session on B lets go of a stream: the next position check stops
    following it, so B's notices of it are only remembered (where to follow it from
    again), never pushed.  Following it again, Bob gets what is his (a /subscribe's
    catch-up from his acknowledged positions, a join's live messages only), then each
    new message live, with no message missing or twice."""
    a = await make_node(node_id="a")
    b = await make_node(node_id="b", bus_position_check=0.1)
    alice, bob = await a.user("alice"), await b.user("bob")
    for client in (alice, bob):
        await client.request("/channel/join", {"name": "hall"})
    await bob.request("/subscribe", {})
    first = await send(alice, BOTH, "first")
    assert await pushes_until(bob, newest(first)) == first
    await bob.request("/ack", {"id": first["message"][0]})
    await bob.request("/ack", {"id": first["channel_message"][0], "channel": "hall"})
    cluster, gone = bus_of(b), LETTING_GO[how]
    await let_go(bob, how)
    async with asyncio.timeout(WAIT):
        while any(cluster.order.following(s) for s in gone):  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # polled: no event tells of the check
    pushed = dataclasses.replace(cluster.order.counts)
    away = await send(alice, tuple(KIND_OF[s] for s in gone), "away")
    remembered = {s: away[KIND_OF[s]][0] for s in gone}
    async with asyncio.timeout(WAIT):
        # Polled: B hears the notices, and keeps them as where to follow from.
        while {s: cluster._seen.get(s, (0, 0))[1] for s in gone} != remembered:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert cluster.order.counts == pushed
    assert not any(cluster.order.following(s) for s in gone)
    bob = await follow_again(b, bob, how)
    then = await send(alice, BOTH, "then")
    caught_up = {} if how == "leave" else away  # a join has no catch-up
    expected = {kind: caught_up.get(kind, []) + then[kind] for kind in BOTH}
    assert await pushes_until(bob, newest(then)) == expected
    last = await send(alice, BOTH, "last")
    assert await pushes_until(bob, newest(last)) == last
