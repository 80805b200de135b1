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
from chatd.cluster import REDIS_EXTRA
from chatd.config import Config
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


async def test_a_message_sent_while_redis_was_down_is_pushed_when_the_bus_is_back(
    make_node: MakeHarness, redis: RedisServer,
) -> None:
    """On reconnecting, a node reads its followed streams at once, not at the next
    position check (an hour away here)."""
    a = await make_node(node_id="a", bus_position_check=3600.0)
    b = await make_node(node_id="b", bus_position_check=3600.0)
    alice = await a.user("alice")
    bob = await b.user("bob")
    await alice.request("/channel/join", {"name": "hall"})
    await bob.request("/channel/join", {"name": "hall"})
    await bob.request("/subscribe", {})
    await redis.kill()
    sent = await alice.request("/channel/send", {"name": "hall", "message": "while down"})
    publisher = a.server._cluster
    assert publisher is not None
    async with asyncio.timeout(WAIT):  # its notice dropped, not queued: the store's way
        while publisher.redis.counts.dropped == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    await redis.start()
    event = await next_push(bob, "channel_message")
    assert event["data"]["id"] == sent["id"]


async def test_a_stream_nobody_here_follows_any_more_is_dropped_at_the_next_check(
    make_node: MakeHarness,
) -> None:
    node = await make_node(node_id="a", bus_position_check=0.1)
    bob = await node.user("bob")
    await bob.request("/subscribe", {})
    cluster = node.server._cluster
    assert cluster is not None
    stream = "u:1"  # bob's inbox: the database's first user
    assert cluster.order.following(stream)
    await bob.close()
    async with asyncio.timeout(WAIT):
        while cluster.order.following(stream):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
