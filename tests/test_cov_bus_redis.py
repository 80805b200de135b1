"""The Redis bus's error paths and edges (chatd/bus_redis.py), beside test_bus_redis.py.

The wire format and stream order in memory; the bus and presence against a real
redis-server of the test's own (killed, restarted, with ACLs, behind a black hole).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from chatd.bus_redis import (
    NODE_USERS_PREFIX,
    NODES_KEY,
    BusFormatError,
    BusMessage,
    Notice,
    PresenceChange,
    RedisBus,
    RedisPresence,
    Revoke,
    StreamOrder,
    decode_all,
    encode,
    publish_once,
)
from tests.cluster_helpers import RedisServer, proxy, redis_server
from tests.test_bus_redis import ListLog, Pushed, pushed_seqs, until

WAIT = 20.0  # bound on every wait for an event; generous for a loaded machine


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


# The wire format.


@pytest.mark.parametrize(
    "body",
    [
        [1, "n", "n1", 7, 1, 1, {}],  # a notice's stream not a string
        [1, "n", "n1", "c:1", True, 1, {}],  # its seq a bool
        [1, "n", "n1", "c:1", 1, 1, []],  # its fields not a map
        [1, "n", 3, "c:1", 1, 1, {}],  # its node not a string
        [1, "r", "n1", "7", []],  # a revoke's user id a string
        [1, "r", "n1", 7, ["digest"]],  # a digest text, not bytes
        [1, "p", "n1", 7, "ann", 1, []],  # presence's online an int
        [1, "p", "n1", 7, "ann", True, ["c"]],  # a channel id a string
        [1, "x", "n1"],  # a kind this version does not know
    ],
)
def test_a_message_with_fields_of_the_wrong_type_is_a_format_error(body: list[Any]) -> None:
    """Well-formed msgpack from another version or a stranger on the channel: refused
    whole (logged and dropped by the bus), never half-built into a notice."""
    with pytest.raises(BusFormatError, match="malformed"):
        decode_all(encode_raw(body))


def encode_raw(body: list[Any]) -> bytes:
    import msgpack

    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def test_garbage_after_a_message_refuses_the_whole_payload() -> None:
    payload = encode(Notice("c:1", 1, 10, {}, "n1")) + b"\xc1"  # 0xc1: never valid msgpack
    with pytest.raises(BusFormatError, match="not msgpack"):
        decode_all(payload)


# Stream order, in memory.


async def test_following_a_followed_stream_keeps_its_position() -> None:
    log, pushed = ListLog(), Pushed()
    order = StreamOrder(log, pushed)
    order.follow("c:1", 3, 1003)
    order.follow("c:1", 0, 0)  # a second session's follow: not back to the start
    assert order.position("c:1") == (3, 1003)


async def test_a_stream_not_followed_is_not_read() -> None:
    log = ListLog()
    order = StreamOrder(log, Pushed())
    order.repair("c:9")
    await order.idle()
    assert log.reads == 0


class HeldLog(ListLog):
    """A store whose reads take their rows at once and answer when ``gate`` opens, as a
    PostgreSQL query that has its snapshot and is slow to return; ``fail``: the store
    is down."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.reading = asyncio.Event()
        self.fail = False

    async def read(self, stream: str, after_id: int, limit: int) -> list[Notice]:
        self.reads += 1
        rows = [n for n in self.rows.get(stream, []) if n.id > after_id][:limit]
        self.reading.set()
        await self.gate.wait()
        if self.fail:
            raise ConnectionError("the store is down")
        return rows


async def test_notices_pushed_while_a_read_runs_are_not_pushed_again() -> None:
    log, pushed = HeldLog(), Pushed()
    order = StreamOrder(log, pushed)
    order.follow("u:1", 0, 0)
    first, second = log.append("u:1"), log.append("u:1")
    order.check_positions()  # its read holds both rows
    await log.reading.wait()
    order.offer("u:1", first)  # their notices come in while it runs
    order.offer("u:1", second)
    log.gate.set()
    await order.idle()
    assert pushed == [first, second]  # once each
    assert order.counts.repaired == 0


async def test_unfollowing_a_stream_ends_its_read() -> None:
    log, pushed = HeldLog(), Pushed()
    order = StreamOrder(log, pushed)
    order.follow("u:1", 0, 0)
    log.append("u:1")
    order.check_positions()
    await log.reading.wait()
    order.unfollow("u:1")  # its last session left while the read ran
    log.gate.set()
    await order.idle()
    assert pushed == [] and not order.following("u:1")


async def test_close_ends_the_reads_in_progress() -> None:
    log, pushed = HeldLog(), Pushed()
    order = StreamOrder(log, pushed)
    order.follow("u:1", 0, 0)
    log.append("u:1")
    order.check_positions()
    await log.reading.wait()
    order.close()
    log.gate.set()
    await order.idle()
    await asyncio.sleep(0)  # the cancelled read's last step
    assert pushed == []


async def test_a_failed_read_is_logged_and_the_next_check_reads_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log, pushed = HeldLog(), Pushed()
    order = StreamOrder(log, pushed)
    order.follow("u:1", 0, 0)
    lost = log.append("u:1")
    log.fail = True
    order.check_positions()
    await log.reading.wait()
    order.check_positions()  # asked again while the read runs: once more after it
    log.gate.set()
    await order.idle()
    assert logged(caplog, "reading u:1 from the store failed")
    assert pushed == [] and log.reads == 1  # not again at once: the store is down
    log.fail = False
    order.check_positions()
    await order.idle()
    assert pushed == [lost]


async def test_a_push_that_fails_does_not_stop_its_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log, pushed = ListLog(), Pushed()
    failing = {1}

    def push(stream: str, notice: Notice) -> None:
        if notice.seq in failing:
            raise RuntimeError("a session's write failed")
        pushed(stream, notice)

    order = StreamOrder(log, push)
    order.follow("c:1", 0, 0)
    for _ in range(3):
        order.offer("c:1", log.append("c:1"))
    assert pushed_seqs(pushed, "c:1") == [2, 3]
    assert logged(caplog, "push of c:1 seq 1 failed")


# The bus against a real redis-server.


class Heard(list[BusMessage]):
    """What a bus received, with an event to wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def __call__(self, message: BusMessage) -> None:
        self.append(message)
        self.changed.set()

    async def wait_for(self, count: int) -> list[BusMessage]:
        async with asyncio.timeout(WAIT):
            while len(self) < count:
                self.changed.clear()
                await self.changed.wait()
        return list(self)


def bus(url: str, node: str, receive: Callable[[BusMessage], None], **options: Any) -> RedisBus:
    return RedisBus(url, node, receive, lambda: None, reconnect_delay=0.05, **options)


async def test_admins_revoke_reaches_a_node_named_admin(redis: RedisServer) -> None:
    """`chatd admin` publishes its revokes as node "admin": a node given that name with
    --node-id dropped them as its own (a node hears no channel of its own, so whatever
    it hears is another's)."""
    heard = Heard()
    node = bus(redis.url, "admin", heard)
    await node.start()
    try:
        await publish_once(redis.url, Revoke(7, node="admin"))
        assert await heard.wait_for(1) == [Revoke(7)]
    finally:
        await node.close()


async def test_a_stranger_on_the_bus_is_dropped_and_counted(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from redis import asyncio as aioredis

    heard = Heard()
    node = bus(redis.url, "b", heard)
    await node.start()
    client: Any = aioredis.Redis.from_url(redis.url)
    try:
        await client.publish("chatd:bus", b"\xc1 not a bus message")
        await publish_once(redis.url, Revoke(7, node="admin"))  # what follows is heard
        assert await heard.wait_for(1) == [Revoke(7)]
        assert node.counts.malformed == 1
        assert logged(caplog, "bus: dropped a message: not msgpack")
    finally:
        await client.aclose()
        await node.close()


async def test_a_message_its_handler_fails_on_does_not_end_the_subscription(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    heard = Heard()

    def receive(message: BusMessage) -> None:
        if isinstance(message, Revoke) and message.user_id == 1:
            raise RuntimeError("a bug in the node's handler")
        heard(message)

    node = bus(redis.url, "b", receive)
    await node.start()
    try:
        await publish_once(redis.url, Revoke(1))
        await publish_once(redis.url, Revoke(2))
        assert await heard.wait_for(1) == [Revoke(2)]
        assert node.counts.reconnects == 0
        assert logged(caplog, "bus: handling a message failed")
    finally:
        await node.close()


async def test_a_batch_beyond_the_payload_limit_goes_out_as_several_in_order(
    redis: RedisServer,
) -> None:
    heard = Heard()
    a, b = bus(redis.url, "a", lambda m: None), bus(redis.url, "b", heard)
    await a.start()
    await b.start()
    try:
        await until(lambda: a.publishing)
        big = "x" * 300_000  # beyond PAYLOAD_LIMIT (256 KiB) on its own
        alone = Notice("c:1", 1, 1, {"msg": big})
        a.publish(alone)  # one turn: a PUBLISH of its own, nothing left after it
        await heard.wait_for(1)
        batch = [Notice("c:1", 2, 2, {"msg": big}), Notice("c:1", 3, 3, {"msg": "small"})]
        for notice in batch:  # one turn: the big one, then the small one after it
            a.publish(notice)
        assert await heard.wait_for(3) == [alone, *batch]
        assert b.counts.payloads == 3
    finally:
        await a.close()
        await b.close()


async def test_notices_beyond_the_queue_while_redis_is_down_are_dropped_and_counted(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis pub/sub is at most once (the position checks fill the gap): while the
    publishing connection cannot be made, notices queue up to queue_limit, and the
    queue is dropped at each failed attempt; once Redis is back, publishing resumes."""
    heard = Heard()
    a = bus(redis.url, "a", lambda m: None, queue_limit=2)
    await a.start()
    try:
        await until(lambda: a.publishing)
        await redis.kill()
        await until(lambda: not a.publishing)
        for seq in (1, 2, 3):
            a.publish(Notice("c:1", seq, seq))
        assert a.counts.dropped == 1  # the third: the queue was full
        await until(lambda: a.counts.dropped == 3)  # the other two: no connection
        assert logged(caplog, "bus: 2 notices not published")
        await redis.start()
        b = bus(redis.url, "b", heard)
        await b.start()
        try:
            await until(lambda: a.publishing)
            a.publish(Notice("c:1", 4, 4))
            assert await heard.wait_for(1) == [Notice("c:1", 4, 4)]
        finally:
            await b.close()
    finally:
        await a.close()


async def test_a_url_without_the_password_cannot_subscribe_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with redis_server(password="s3cret") as server:
        node = bus(server.url.replace(":s3cret@", ""), "a", lambda m: None)
        with pytest.raises(ConnectionError, match="cannot subscribe"):
            await node.start(timeout=1.0)
        assert logged(caplog, "NOAUTH")


async def test_a_refused_ping_drops_the_subscription_saying_why(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL that allows subscribing but not PING (a user set up by hand): the link
    cannot be kept alive, and the log says what Redis refused, not just "closed"."""
    from redis import asyncio as aioredis

    admin: Any = aioredis.Redis.from_url(redis.url)
    try:
        await admin.execute_command(
            "ACL", "SETUSER", "node", "on", ">pw", "allchannels", "+subscribe",
            "+psubscribe", "+publish", "+client", "-ping",
        )
    finally:
        await admin.aclose()
    url = redis.url.replace("redis://", "redis://node:pw@")
    node = bus(url, "a", lambda m: None, liveness=1.0)
    await node.start()  # subscribed: the first PING comes a third of a second later
    try:
        async with asyncio.timeout(WAIT):
            while not logged(caplog, "subscriber connection lost (Redis says: NOPERM"):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        await node.close()


async def test_a_black_holed_publishing_link_drops_rather_than_hoards(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis not reading (a partition no RST reveals): beyond WRITE_BUFFER_LIMIT the
    notices are dropped, not kept in memory, and the link is replaced once its writes
    have been stuck for ``liveness`` seconds."""
    heard = Heard()
    b = bus(redis.url, "b", heard)
    await b.start()
    async with proxy(redis.port) as link:
        a = bus(f"redis://127.0.0.1:{link.port}/0", "a", lambda m: None, liveness=1.0)
        await a.start()
        try:
            await until(lambda: a.publishing)
            link.black_hole()
            body = {"msg": "x" * 1_000_000}
            async with asyncio.timeout(WAIT):
                seq = 0
                while a.counts.dropped == 0:  # 16 MiB and the kernel's buffers
                    seq += 1
                    a.publish(Notice("c:1", seq, seq, body))
                    await asyncio.sleep(0)
            async with asyncio.timeout(WAIT):  # stuck for a second: given up
                while not logged(caplog, "publishing connection lost (Redis took nothing"):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            link.restore()
            await until(lambda: a.publishing)
            after = Notice("c:2", 1, 1)
            a.publish(after)
            async with asyncio.timeout(WAIT):
                while after not in heard:
                    heard.changed.clear()
                    await heard.changed.wait()
        finally:
            await a.close()
            await b.close()


# Presence.


class Listener:
    """Presence transitions heard on the bus."""

    def __init__(self, url: str) -> None:
        self.heard = Heard()
        self.bus = bus(url, "listener", self.heard)

    def changes(self) -> list[tuple[int, bool]]:
        return [(m.user_id, m.online) for m in self.heard if isinstance(m, PresenceChange)]


async def test_a_node_announces_its_users_again_after_redis_restarts_empty(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The others may have taken this node's users for gone: its next refresh, finding
    its heartbeat gone, announces them online again."""
    node = RedisPresence(redis.url, "a", 60.0)  # refreshed at start, then in 20 s
    listener = Listener(redis.url)
    await listener.bus.start()
    await node.start()
    try:
        node.online_here(7, "seven", [1])
        await listener.heard.wait_for(1)
        await redis.restart()  # empty: no persistence
        await until(lambda: listener.bus.counts.reconnects == 1)
        await refreshed(node)  # as its loop does every ttl / 3
        await listener.heard.wait_for(2)
        assert listener.heard[1] == PresenceChange(7, "seven", True, (1,))
        assert logged(caplog, "heartbeat was gone")
    finally:
        await node.close()
        await listener.bus.close()


async def refreshed(node: RedisPresence) -> None:
    """A refresh, tried again while redis-py's pooled connection is the one Redis lost
    (its loop does the same: a failed refresh is retried a tick later)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async with asyncio.timeout(WAIT):
        while True:
            try:
                return await node.refresh()
            except RedisConnectionError:
                await asyncio.sleep(0.05)


async def test_a_node_never_buries_itself(redis: RedisServer) -> None:
    """Its own heartbeat read as lapsed (a stall, a clock stepped forward): its users
    stay online rather than flap offline and back."""
    from redis import asyncio as aioredis

    node = RedisPresence(redis.url, "a", 60.0)
    await node.start()
    admin: Any = aioredis.Redis.from_url(redis.url)
    try:
        node.online_here(7, "seven")
        await until(lambda: not node._pending)  # its entry written
        await admin.zadd(NODES_KEY, {"a": 1.0, "gone": 1.0})  # both lapsed long ago
        await node.bury_lapsed()
        reader = RedisPresence(redis.url, "reader", 60.0)
        await reader.start()
        try:
            assert await reader.online([7, 8]) == {7}
        finally:
            await reader.close()
    finally:
        await admin.aclose()
        await node.close()


async def test_presence_started_while_redis_is_down_writes_once_it_is_back(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Presence alone (no ``unshared``): a change Redis cannot take is logged, and the
    refresh loop writes this node's entries when Redis returns."""
    await redis.kill()
    node = RedisPresence(redis.url, "a", 0.9)
    await node.start()
    try:
        assert logged(caplog, "presence: cannot clear this node's old entries")
        node.online_here(7, "seven")
        async with asyncio.timeout(WAIT):
            while not logged(caplog, "presence: update failed"):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await redis.start()
        reader = RedisPresence(redis.url, "reader", 60.0)
        await reader.start()
        try:
            async with asyncio.timeout(WAIT):
                while not await reader.online([7]):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            await reader.close()
    finally:
        await node.close()


async def test_a_nodes_users_outlive_its_heartbeat_by_more_than_a_janitors_tick(
    redis: RedisServer,
) -> None:
    """A janitor looks for lapsed heartbeats every second at most: the lapsed node's
    users (with their offline notices) must still be there then, however short the
    ttl. With a ttl of 0.9 s they expired after 1 s, and their offline notice was lost
    whenever the janitor looked in the 0.9 s after that."""
    from redis import asyncio as aioredis

    admin: Any = aioredis.Redis.from_url(redis.url)

    async def users_kept_ms(ttl: float) -> int:
        node = RedisPresence(redis.url, f"short-{ttl}", ttl)
        await node.start()
        try:
            node.online_here(9, "nine")
            await until(lambda: not node._pending)  # its entry written
            await node.refresh()
            return int(await admin.pttl(f"{NODE_USERS_PREFIX}short-{ttl}"))
        finally:
            await node.close()

    try:
        for ttl in (0.9, 1.4, 30.0):
            assert await users_kept_ms(ttl) >= (ttl + 1.0) * 1000 + 500, ttl
    finally:
        await admin.aclose()


async def test_a_janitor_with_a_long_ttl_still_looks_for_lapsed_nodes_every_second(
    redis: RedisServer,
) -> None:
    """A node refreshes every ttl / 3 (2 s here) but buries lapsed nodes every second:
    a dead node's users go offline at most a second after its own entries lapse."""
    janitor = RedisPresence(redis.url, "janitor", 6.0)
    dying = RedisPresence(redis.url, "dying", 0.9)
    listener = Listener(redis.url)
    await listener.bus.start()
    await janitor.start()
    await dying.start()
    try:
        dying.online_here(8, "eight")
        await listener.heard.wait_for(1)
        await dying.close(forget=False)  # killed: its entries lapse in 0.9 s
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        await listener.heard.wait_for(2)
        assert listener.changes() == [(8, True), (8, False)]
        assert loop.time() - killed_at <= 0.9 + 1.0 + 1.0  # its ttl, a tick, slack
    finally:
        await janitor.close()
        await dying.close()
        await listener.bus.close()


