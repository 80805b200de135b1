"""The Redis bus, stream order and presence (chatd/bus_redis.py).

Stream order is tested in memory against a list standing in for the store's log;
the bus and presence against a real redis-server of the test's own (killed -9,
restarted, black-holed through a proxy).  Skipped where redis-server or redis-py is
absent, failed instead with CHATD_REQUIRE_POSTGRES=1 (CI).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from chatd.bus_redis import (
    BusFormatError,
    BusMessage,
    Notice,
    PresenceChange,
    RedisBus,
    RedisPresence,
    Revoke,
    StreamOrder,
    _parse_url,
    _tls_context,
    decode,
    decode_all,
    encode,
    node_channel,
    others_patterns,
    publish_once,
)
from tests.cluster_helpers import RedisServer, proxy, redis_server
from tests.conftest import ROOT, Harness

WAIT = 20.0  # bound on every wait for an event; generous for a loaded machine


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll a condition (bounded): for state that changes without an event to wait on."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


# The wire format.


def test_notices_and_revokes_survive_the_wire() -> None:
    notice = Notice("c:3", 7, 1207, {"name": "alice", "msg": "hi", "created_at": 1.5}, "n1")
    revoke = Revoke(42, (b"\x00" * 32,), "n2")
    assert decode(encode(notice)) == notice
    assert decode(encode(revoke)) == revoke
    assert decode(encode(Revoke(42))) == Revoke(42)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        encode(Notice("c:1", 1, 1))[:-1],
        b"\x93\x02\xa1n\xa0",  # another version
        b"\x95\x01\xa1n\xa0\x01\x02",  # a notice with too few fields
    ],
)
def test_garbage_on_the_bus_is_a_format_error(data: bytes) -> None:
    with pytest.raises(BusFormatError):
        decode(data)
    with pytest.raises(BusFormatError):
        decode_all(data)


def test_a_payload_holds_messages_back_to_back() -> None:
    messages: list[BusMessage] = [Notice("u:1", 1, 10, {"msg": "a"}, "n1"), Revoke(4, (), "n1"),
                Notice("u:1", 2, 11, {"msg": "b"}, "n1")]
    payload = b"".join(encode(m) for m in messages)
    assert decode_all(payload) == messages
    assert decode_all(encode(messages[0])) == messages[:1]  # a payload of one, as before
    with pytest.raises(BusFormatError):
        decode_all(payload[:-1])  # the last one cut short: not half a batch
    with pytest.raises(BusFormatError):
        decode_all(payload + b"\x93\x02\xa1n\xa0")  # another version at the end


# Stream order, in memory.


class ListLog:
    """The store's log as a dict of lists: what StreamOrder reads to fill gaps."""

    def __init__(self) -> None:
        self.rows: dict[str, list[Notice]] = {}
        self.reads = 0

    def append(self, stream: str) -> Notice:
        rows = self.rows.setdefault(stream, [])
        notice = Notice(stream, len(rows) + 1, 1000 + sum(map(len, self.rows.values())))
        rows.append(notice)
        return notice

    async def read(self, stream: str, after_id: int, limit: int) -> list[Notice]:
        self.reads += 1
        await asyncio.sleep(0)  # a real read yields to the loop: offers may interleave
        return [n for n in self.rows.get(stream, []) if n.id > after_id][:limit]


class Pushed(list[Notice]):
    """What a StreamOrder pushed, in order."""

    def __call__(self, stream: str, notice: Notice) -> None:
        assert notice.stream == stream
        self.append(notice)


def pushed_seqs(pushed: list[Notice], stream: str) -> list[int]:
    return [n.seq for n in pushed if n.stream == stream]


async def test_next_seq_is_pushed_and_a_repeat_dropped() -> None:
    log, pushed = ListLog(), Pushed()
    order = StreamOrder(log, pushed)
    order.follow("c:1", 0, 0)
    first, second = log.append("c:1"), log.append("c:1")
    for notice in (first, first, second, first, second):
        order.offer(notice.stream, notice)
    assert pushed == [first, second]
    assert order.counts.duplicates == 3
    assert log.reads == 0


async def test_a_gap_is_filled_from_the_store_in_order() -> None:
    log, pushed = ListLog(), Pushed()
    order = StreamOrder(log, pushed, page_size=2)
    order.follow("c:1", 0, 0)
    notices = [log.append("c:1") for _ in range(7)]
    order.offer("c:1", notices[0])
    order.offer("c:1", notices[5])  # 2..5 lost on the bus
    order.offer("c:1", notices[3])  # late, arrives while the repair runs
    order.offer("c:1", notices[6])
    await order.idle()
    assert pushed_seqs(pushed, "c:1") == [1, 2, 3, 4, 5, 6, 7]


class GatedLog(ListLog):
    """A store slow to answer (PostgreSQL under load): reads wait for ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def read(self, stream: str, after_id: int, limit: int) -> list[Notice]:
        await self.gate.wait()
        return await super().read(stream, after_id, limit)


async def test_the_next_seq_is_pushed_while_a_position_check_reads() -> None:
    """A position check's read must not hold up the stream's next messages: every
    ``bus_position_check`` a read of each followed stream ran, and under load each took
    tens of ms, during which that stream's messages waited."""
    log, pushed = GatedLog(), Pushed()
    order = StreamOrder(log, pushed)
    order.follow("u:1", 0, 0)
    first, second, third = [log.append("u:1") for _ in range(3)]
    order.offer("u:1", first)
    order.check_positions()  # a read starts, and waits for the store
    order.offer("u:1", second)
    order.offer("u:1", third)
    assert pushed == [first, second, third]  # at once, not after the read
    log.gate.set()
    await order.idle()
    assert pushed == [first, second, third]  # the read finds them pushed: none twice
    assert log.reads == 1


async def test_a_position_without_seq_is_settled_by_the_store() -> None:
    log, pushed = ListLog(), Pushed()
    order = StreamOrder(log, pushed)
    first, second = log.append("u:1"), log.append("u:1")
    order.follow("u:1", None, first.id)  # an ack position: its seq is not known
    third = log.append("u:1")
    order.offer("u:1", third)  # is it the next one? the store says 2 came first
    await order.idle()
    assert pushed == [second, third]


async def test_position_check_finds_a_lost_last_message() -> None:
    log, pushed = ListLog(), Pushed()
    order = StreamOrder(log, pushed)
    order.follow("u:5", 0, 0)
    order.follow("c:2", 0, 0)
    order.offer("u:5", log.append("u:5"))
    log.append("u:5")  # its notice was lost: nothing follows to reveal the gap
    log.append("c:9")  # a stream not followed here
    order.check_positions()
    await order.idle()
    assert pushed_seqs(pushed, "u:5") == [1, 2]
    assert pushed_seqs(pushed, "c:9") == []


async def test_position_check_with_heads_reads_only_the_streams_behind() -> None:
    log, pushed = ListLog(), Pushed()
    order = StreamOrder(log, pushed)
    for n in range(100):
        order.follow(f"c:{n}", 0, 0)
    order.follow("u:1", None, 0)  # an ack position: its seq is not known
    log.append("c:7")  # its notice was lost
    heads = {f"c:{n}": len(log.rows.get(f"c:{n}", [])) for n in range(100)} | {"u:1": 0}
    order.check_positions(heads)
    await order.idle()
    assert pushed_seqs(pushed, "c:7") == [1]
    assert log.reads == 2  # c:7, and u:1 once to learn its seq; not the 99 up to date
    assert order.position("u:1") == (0, 0)
    order.check_positions(heads | {"c:7": 1})
    await order.idle()
    assert log.reads == 2  # all up to date now
    following = log.append("u:1")
    order.offer("u:1", following)  # seq 1 after a learnt 0: pushed without a read
    assert pushed[-1] == following and log.reads == 2
    order.check_positions({})  # streams the store no longer has are left alone
    await order.idle()
    assert log.reads == 2


async def test_a_stream_followed_late_starts_after_its_head() -> None:
    log, pushed = ListLog(), Pushed()
    order = StreamOrder(log, pushed)
    for _ in range(3):
        log.append("c:1")
    order.offer("c:1", log.rows["c:1"][0])  # not followed yet: no local interest
    order.follow("c:1", 3, log.rows["c:1"][2].id)
    order.offer("c:1", log.append("c:1"))
    assert pushed_seqs(pushed, "c:1") == [4]
    order.unfollow("c:1")
    order.offer("c:1", log.append("c:1"))
    assert pushed_seqs(pushed, "c:1") == [4]


# The bus against a real redis-server.


class Node:
    """One node's bus and stream order over a shared ListLog, as a server would wire them."""

    def __init__(self, name: str, url: str, log: ListLog, liveness: float = 3.0) -> None:
        self.pushed = Pushed()
        self.revoked: list[Revoke] = []
        self.resyncs = 0
        self.order: StreamOrder[Notice] = StreamOrder(log, self.pushed)
        self.bus = RedisBus(url, name, self._receive, self._resync, liveness=liveness,
                            reconnect_delay=0.1)

    def _receive(self, message: BusMessage) -> None:
        if isinstance(message, Notice):
            self.order.offer(message.stream, message)
        elif isinstance(message, Revoke):
            self.revoked.append(message)

    def _resync(self) -> None:
        self.resyncs += 1
        self.order.check_positions()

    def send(self, log: ListLog, stream: str) -> Notice:
        """What a node does after COMMIT: deliver locally, then publish."""
        notice = log.append(stream)
        self.order.offer(notice.stream, notice)
        self.bus.publish(notice)
        return notice

    async def close(self) -> None:
        await self.bus.close()
        self.order.close()


@pytest.fixture
async def nodes(redis: RedisServer) -> AsyncIterator[tuple[ListLog, Node, Node]]:
    log = ListLog()
    a, b = Node("a", redis.url, log), Node("b", redis.url, log)
    for node in (a, b):
        node.order.follow("c:1", 0, 0)
        await node.bus.start()
    yield log, a, b
    await a.close()
    await b.close()


async def test_published_on_one_node_pushed_once_on_both(
    nodes: tuple[ListLog, Node, Node],
) -> None:
    log, a, b = nodes
    sent = [a.send(log, "c:1") for _ in range(200)]
    await until(lambda: len(b.pushed) == len(sent))
    assert b.pushed == sent
    assert a.pushed == sent
    assert a.bus.counts.received == 0  # its own notices are not taken twice
    a.bus.publish(Revoke(9, (b"d" * 32,)))
    await until(lambda: bool(b.revoked))
    assert b.revoked == [Revoke(9, (b"d" * 32,))]
    assert b.revoked[0].node == "a"
    await publish_once(a.bus.url, Revoke(10, node="admin"))  # as `chatd admin` does
    await until(lambda: len(b.revoked) == 2 and len(a.revoked) == 1)
    assert a.revoked == b.revoked[1:] == [Revoke(10)]


async def test_a_node_does_not_read_its_own_notices_back(
    nodes: tuple[ListLog, Node, Node],
) -> None:
    """Each node publishes on a channel of its own, which the others subscribe to and it
    does not: its batches are not read back from Redis only to be dropped (per batch,
    that was most of a sending node's extra cost over a single node)."""
    log, a, b = nodes
    sent = [a.send(log, "c:1") for _ in range(50)]
    await until(lambda: len(b.pushed) == len(sent))
    a.bus.publish(Revoke(9))
    await until(lambda: bool(b.revoked))
    received = b.bus.counts.payloads
    sent_back = [b.send(log, "c:1") for _ in range(5)]  # a hears b: a's subscription works
    await until(lambda: a.pushed[-5:] == sent_back)
    assert b.bus.counts.payloads == received  # nor does b read its own
    assert a.bus.counts.payloads >= 1
    assert a.bus.counts.received == len(sent_back)
    assert a.pushed == b.pushed == sent + sent_back


async def test_the_publishing_connection_is_replaced_when_lost(
    nodes: tuple[ListLog, Node, Node], redis: RedisServer,
) -> None:
    """Publishing goes through a connection of its own that Redis answers nothing on
    (CLIENT REPLY OFF): a node notices its loss by the socket alone, and reconnects."""
    from redis import asyncio as aioredis

    log, a, b = nodes
    first = [a.send(log, "c:1") for _ in range(10)]
    await until(lambda: len(b.pushed) == len(first))
    admin: Any = aioredis.Redis.from_url(redis.url)  # redis-py's types are partial
    try:
        publishers = await _publishing_clients(admin)
        assert len(publishers) == 1  # b published nothing: only a's
        await admin.execute_command("CLIENT", "KILL", "ID", publishers[0])
        await until(lambda: not a.bus.publishing)
        meanwhile = [a.send(log, "c:1") for _ in range(5)]  # wait for the new connection
        await until(lambda: a.bus.publishing)
        after = [a.send(log, "c:1") for _ in range(10)]
        await until(lambda: len(b.pushed) == len(first) + len(meanwhile) + len(after))
        assert b.pushed == first + meanwhile + after
        assert a.bus.counts.dropped == 0
        assert len(await _publishing_clients(admin)) == 1
    finally:
        await admin.aclose()


async def _publishing_clients(admin: Any) -> list[str]:
    """Ids of the connections whose last command was a PUBLISH."""
    listing = (await admin.execute_command("CLIENT", "LIST")).decode()
    fields = [dict(f.split("=", 1) for f in line.split()) for line in listing.splitlines()]
    return [f["id"] for f in fields if f.get("cmd") == "publish"]


async def publishes_and_receives_but_not_through(url: str, refused_url: str) -> None:
    """Two buses on ``url`` carry each other's notices; one on ``refused_url`` (the same
    Redis, wrongly reached) cannot subscribe."""
    log = ListLog()
    a, b = Node("a", url, log), Node("b", url, log)
    try:
        for node in (a, b):
            node.order.follow("c:1", 0, 0)
            await node.bus.start()
        sent = [a.send(log, "c:1") for _ in range(3)]
        await until(lambda: b.pushed == sent)
        refused = RedisBus(refused_url, "c", lambda m: None, lambda: None)
        with pytest.raises(ConnectionError, match="cannot subscribe"):
            await refused.start(timeout=1.0)
    finally:
        await a.close()
        await b.close()


async def test_a_bus_with_a_password_publishes_and_receives() -> None:
    async with redis_server(password="s3cret") as server:
        await publishes_and_receives_but_not_through(
            server.url, server.url.replace("s3cret", "wrong")
        )


async def test_every_node_hears_every_other_once_and_not_itself(redis: RedisServer) -> None:
    """The patterns that leave a node's own channel out, against Redis's own matching:
    every other node's channel matches exactly one of them (a message is delivered once
    per matching pattern), the node's own none, nor the channel shared by all."""
    from redis import asyncio as aioredis

    names = ["a", "b", "node-1234", "ünïcode", "a*[?]\\", *[f"host-{i}" for i in range(40)]]
    client: Any = aioredis.Redis.from_url(redis.url)
    try:
        for name in names[:5]:
            patterns = others_patterns("chatd:bus", name)
            pubsub = client.pubsub()
            await pubsub.psubscribe(*patterns)
            for other in names:
                await client.publish(node_channel("chatd:bus", other), other.encode())
            await client.publish("chatd:bus", b"shared")
            # Last, on a channel of another node: what comes before it is all there is.
            await client.publish(node_channel("chatd:bus", name + "-last"), b"last")
            heard: list[bytes] = []
            async with asyncio.timeout(WAIT):
                while not heard or heard[-1] != b"last":
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=1)
                    if message is not None:
                        heard.append(message["data"])
            assert sorted(heard[:-1]) == sorted(o.encode() for o in names if o != name)
            await pubsub.aclose()
    finally:
        await client.aclose()


async def test_a_burst_goes_out_as_few_redis_messages_in_order(
    redis: RedisServer, nodes: tuple[ListLog, Node, Node],
) -> None:
    """Notices queued together are one PUBLISH: one message for every node to read
    instead of one per notice (the bus's cost per message was most of a node's CPU)."""
    from redis import asyncio as aioredis

    log, a, b = nodes
    listener: Any = aioredis.Redis.from_url(redis.url)  # redis-py's types are partial
    pubsub = listener.pubsub()
    await pubsub.subscribe(a.bus.node_channel)
    try:
        sent = [a.send(log, "c:1") for _ in range(300)]  # one loop turn: all queued
        payloads: list[bytes] = []
        async with asyncio.timeout(WAIT):
            while sum(len(decode_all(p)) for p in payloads) < len(sent):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    payloads.append(message["data"])
        await until(lambda: len(b.pushed) == len(sent))
    finally:
        await pubsub.aclose()
        await listener.aclose()
    assert [m for p in payloads for m in decode_all(p)] == sent
    assert len(payloads) <= 3
    assert b.pushed == sent
    assert a.bus.counts.published == len(sent)


async def test_redis_killed_and_restarted_loses_nothing(
    redis: RedisServer, nodes: tuple[ListLog, Node, Node],
) -> None:
    log, a, b = nodes
    before = [a.send(log, "c:1") for _ in range(50)]
    await until(lambda: len(b.pushed) == len(before))
    await redis.kill()
    during = [a.send(log, "c:1") for _ in range(50)]  # the store is up: sends succeed
    await redis.start()
    await until(lambda: b.resyncs >= 1)
    after = [a.send(log, "c:1") for _ in range(50)]
    everything = before + during + after
    await until(lambda: len(b.pushed) == len(everything))
    assert pushed_seqs(b.pushed, "c:1") == list(range(1, 151))
    await b.order.idle()
    assert len(b.pushed) == len(everything)  # nothing pushed twice, even later


async def test_a_black_holed_link_is_noticed_and_replaced(redis: RedisServer) -> None:
    log = ListLog()
    async with proxy(redis.port) as link:
        a = Node("a", redis.url, log)
        b = Node("b", f"redis://127.0.0.1:{link.port}/0", log, liveness=1.0)
        for node in (a, b):
            node.order.follow("c:1", 0, 0)
            await node.bus.start()
        try:
            a.send(log, "c:1")
            await until(lambda: len(b.pushed) == 1)
            link.black_hole()
            lost = [a.send(log, "c:1") for _ in range(20)]
            # b hears nothing, not even its pings' answers: it gives the link up.
            await until(lambda: not b.bus.subscribed.is_set())
            link.restore()
            await until(lambda: b.resyncs >= 1)
            await until(lambda: len(b.pushed) == 1 + len(lost))
            assert pushed_seqs(b.pushed, "c:1") == list(range(1, 22))
        finally:
            await a.close()
            await b.close()


async def test_a_bus_that_cannot_connect_says_so(redis: RedisServer) -> None:
    port = redis.port
    await redis.kill()
    bus = RedisBus(f"redis://127.0.0.1:{port}/0", "a", lambda m: None, lambda: None)
    with pytest.raises(ConnectionError, match="cannot subscribe"):
        await bus.start(timeout=1.0)
    with pytest.raises(ConnectionError, match="cannot publish"):
        await publish_once(f"redis://127.0.0.1:{port}/0", Revoke(1), timeout=1.0)


# Presence.


async def test_presence_is_seen_by_other_nodes_and_expires_with_its_node(
    redis: RedisServer,
) -> None:
    ttl = 0.9
    a, b = RedisPresence(redis.url, "a", ttl), RedisPresence(redis.url, "b", ttl)
    await a.start()
    await b.start()
    try:
        a.online_here(7)
        b.online_here(8)
        assert await a.is_online(7)  # its own users, without asking Redis
        await until_online(b, 7, True)
        a.offline_here(7)
        await until_online(b, 7, False)  # a clean logout: at once
        a.online_here(7)
        await until_online(b, 7, True)
        await a.close(forget=False)  # as if killed: the entry lapses on its own
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        await until_online(b, 7, False)
        # Bounded: within the TTL of the last refresh (plus scheduling slack).
        assert loop.time() - killed_at <= ttl + 1.0
        assert await a_fresh_reader(redis, 8)
    finally:
        await a.close()
        await b.close()


class Listener:
    """A bus connection that keeps the presence transitions it hears."""

    def __init__(self, url: str) -> None:
        self.changes: list[PresenceChange] = []
        self.heard = asyncio.Event()
        self.bus = RedisBus(url, "listener", self._receive, lambda: None)

    def _receive(self, message: BusMessage) -> None:
        if isinstance(message, PresenceChange):
            self.changes.append(message)
            self.heard.set()

    async def wait_for_all(self, wanted: list[tuple[int, bool]]) -> list[tuple[int, bool]]:
        async with asyncio.timeout(WAIT):
            while not set(wanted) <= {(c.user_id, c.online) for c in self.changes}:
                self.heard.clear()
                await self.heard.wait()
        return [(c.user_id, c.online) for c in self.changes]

    async def wait_for(self, count: int) -> list[tuple[int, bool]]:
        async with asyncio.timeout(WAIT):
            while len(self.changes) < count:
                self.heard.clear()
                await self.heard.wait()
        return [(c.user_id, c.online) for c in self.changes]


async def test_presence_transitions_are_announced_once_for_the_cluster(
    redis: RedisServer,
) -> None:
    ttl = 2.0  # a node refreshes every 0.67 s: a loaded machine does not miss it
    a, b = RedisPresence(redis.url, "a", ttl), RedisPresence(redis.url, "b", ttl)
    listener = Listener(redis.url)
    await listener.bus.start()
    await a.start()
    await b.start()
    try:
        a.online_here(7, "seven", [1, 2])
        assert await listener.wait_for(1) == [(7, True)]
        assert listener.changes[0] == PresenceChange(7, "seven", True, (1, 2))
        b.online_here(7, "seven", [1, 2])  # online on two nodes: no news
        await until_online(b, 7, True)
        a.offline_here(7, "seven", [1])  # still on b
        b.online_here(8, "eight")
        assert await listener.wait_for(2) == [(7, True), (8, True)]
        b.offline_here(7, "seven", [1])  # the last node: offline, with its channels now
        assert await listener.wait_for(3) == [(7, True), (8, True), (7, False)]
        assert listener.changes[2].channels == (1,)
        a.online_here(7, "seven")
        assert (await listener.wait_for(4))[3:] == [(7, True)]
        for _ in range(20):  # online on a all along: b coming and going is no news
            b.online_here(7, "seven")
            b.offline_here(7, "seven")
        b.online_here(10, "ten")  # a marker: b's changes before it have been made
        assert (await listener.wait_for(5))[4:] == [(10, True)]
        for _ in range(20):  # both nodes at once, again and again
            a.online_here(9, "nine")
            b.online_here(9, "nine")
            a.offline_here(9, "nine")
            b.offline_here(9, "nine")
        a.online_here(11, "eleven")  # markers: each node's changes before them are made
        b.online_here(12, "twelve")
        changes = await listener.wait_for_all([(11, True), (12, True)])
        nine = [online for user, online in changes if user == 9]
        # However the two nodes' changes interleave: one transition at a time, never
        # "online" twice in a row, ending offline.
        assert nine[0] is True and nine[-1] is False
        assert all(x != y for x, y in itertools.pairwise(nine)), nine
        heard = len(changes)
        # A killed node (no goodbye): its users go offline when its heartbeat lapses.
        b.online_here(7, "seven", [3])  # on a as well
        await until_online(b, 7, True)
        loop = asyncio.get_running_loop()
        await b.close(forget=False)
        killed_at = loop.time()
        changes = await listener.wait_for(heard + 3)
        assert sorted(changes[heard:]) == [(8, False), (10, False), (12, False)]
        # Within the TTL of b's last refresh plus a's janitor's tick (1 s at most).
        assert loop.time() - killed_at <= ttl + 1.0 + 0.5
    finally:
        await a.close()
        await b.close()
        await listener.bus.close()


async def until_online(presence: RedisPresence, user_id: int, online: bool) -> None:
    async with asyncio.timeout(WAIT):
        while await presence.is_online(user_id) != online:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def a_fresh_reader(redis: RedisServer, user_id: int) -> bool:
    reader = RedisPresence(redis.url, "c", 5.0)
    await reader.start()
    try:
        return await reader.is_online(user_id)
    finally:
        await reader.close()


async def test_admin_revoke_tokens_tells_every_node(
    redis: RedisServer, harness: Harness
) -> None:
    await harness.user("alice")  # the first user: id 1
    heard: list[BusMessage] = []
    listener = RedisBus(redis.url, "listener", heard.append, lambda: None)
    await listener.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chatd", "admin", "revoke-tokens", "alice",
            "--db", harness.config.db, "--bus", redis.url,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert b"revoked" in out
        await until(lambda: bool(heard))
        assert heard == [Revoke(1)]
    finally:
        await listener.close()


@pytest.mark.parametrize(
    ("query", "verify", "check_hostname"),
    [
        ("", ssl.CERT_REQUIRED, True),
        ("?ssl_cert_reqs=none", ssl.CERT_NONE, False),
        ("?ssl_cert_reqs=optional", ssl.CERT_OPTIONAL, True),
        ("?ssl_check_hostname=false", ssl.CERT_REQUIRED, False),
    ],
)
def test_the_bus_reads_a_rediss_url_as_redis_py_does(
    query: str, verify: ssl.VerifyMode, check_hostname: bool
) -> None:
    # The bus's own connections and redis-py's (presence) must accept the same server:
    # a self-signed Redis with ssl_cert_reqs=none must not work for one and not the other.
    context = _tls_context(_parse_url(f"rediss://redis.example:6380/0{query}"))
    assert (context.verify_mode, context.check_hostname) == (verify, check_hostname)


async def test_a_bus_over_tls_publishes_and_receives() -> None:
    # rediss:// with the server's certificate trusted through the URL (ssl_ca_certs):
    # the bus's own connections, not redis-py's, must take it as redis-py would.
    async with redis_server(tls=True) as server:
        untrusting = server.url.split("?")[0]  # the system's authorities only
        await publishes_and_receives_but_not_through(server.url, untrusting)
