"""chatd served from PostgreSQL, end to end: a real server on a real database.

One scripted session of every endpoint runs against a server on SQLite and one on
PostgreSQL, and the two transcripts (replies and pushes) must be identical; then live
delivery (tests/test_live.py's own tests, run on PostgreSQL), restart persistence and a
SIGKILL under a stream of sends, on PostgreSQL.  Skipped
where PostgreSQL is absent, failed instead with CHATD_REQUIRE_POSTGRES=1
(tests/pg_helpers.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from chatd.client import Client
from chatd.config import Config
from tests import test_live
from tests.conftest import (
    PASSWORD,
    TEST_SETTINGS,
    Harness,
    MakeHarness,
    Spawn,
    harness_factory,
)
from tests.crash_helpers import (
    KILL_AFTER_SECONDS,
    RECIPIENT,
    SENDER,
    check_received,
    conversation_ids,
    drain_inbox,
    kill_during_sends,
    read_stderr,
    terminate,
)
from tests.crash_helpers import connect as connect_as

# Values that differ between any two runs, whatever the store.
VARYING = frozenset({"datetime", "registered", "token"})


@pytest.fixture
async def pg_harness(pg_url: str) -> AsyncIterator[Harness]:
    harness = Harness(Config(host="127.0.0.1", port=0, db=pg_url, **TEST_SETTINGS))
    await harness.start()
    yield harness
    await harness.stop()


@pytest.fixture
async def pg_make_harness(pg_url: str) -> AsyncIterator[MakeHarness]:
    """conftest's make_harness, on PostgreSQL (one server at a time per database)."""
    async with harness_factory(lambda _: pg_url) as make:
        yield make


# tests/test_live.py's tests of live delivery, each run as is on a server on PostgreSQL:
# pushes, every device, acks and redelivery, catch-up (across a restart, and while
# messages keep arriving: no gap, no duplicate), channels, joins and leaves, presence.
LIVE_ON_A_HARNESS: list[Callable[[Harness], Awaitable[None]]] = [
    test_live.test_push_arrives_without_polling,
    test_live.test_every_device_sees_the_whole_conversation,
    test_live.test_note_to_self_reaches_each_device_once,
    test_live.test_pushed_but_not_acked_comes_back_and_acked_never_does,
    test_live.test_unacked_messages_are_pushed_again_on_the_next_subscribe,
    test_live.test_reconnect_catches_up_exactly_once,
    test_live.test_catch_up_survives_a_server_restart,
    test_live.test_channel_messages_reach_every_subscribed_member_but_the_sender,
    test_live.test_join_and_leave_are_announced_and_leaving_stops_delivery,
    test_live.test_presence_is_pushed_to_channel_mates,
    test_live.test_send_retry_with_client_id_is_pushed_once,
]
LIVE_ON_MADE_HARNESSES: list[Callable[[MakeHarness], Awaitable[None]]] = [
    test_live.test_catch_up_while_messages_keep_arriving_has_no_gaps_or_duplicates,
]


@pytest.mark.parametrize("live", LIVE_ON_A_HARNESS, ids=lambda test: test.__name__[5:])
async def test_live_delivery_on_postgres(
    live: Callable[[Harness], Awaitable[None]], pg_harness: Harness
) -> None:
    await live(pg_harness)


@pytest.mark.parametrize("live", LIVE_ON_MADE_HARNESSES, ids=lambda test: test.__name__[5:])
async def test_live_delivery_with_settings_on_postgres(
    live: Callable[[MakeHarness], Awaitable[None]], pg_make_harness: MakeHarness
) -> None:
    await live(pg_make_harness)


def normalized(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "*" if k in VARYING else normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(item) for item in value]
    return value


class Transcript:
    """Every reply and push of a scripted session, in order, varying values masked."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.lines: list[Any] = []

    async def call(self, client: Client, op: str, params: dict[str, Any] | None = None) -> Any:
        reply = await client.call(op, params)
        reply.pop("id", None)
        self.lines.append((op, normalized(reply)))
        return reply.get("data")

    async def push(self, client: Client) -> None:
        self.lines.append(("push", normalized(await client.next_event(timeout=10))))

    async def user(self, name: str) -> Client:
        client = await self.harness.connect()
        password = {"password": PASSWORD, "password_repete": PASSWORD}
        await self.call(client, "/register", {"name": name, **password})
        await self.call(client, "/login", {"name": name, "password": PASSWORD})
        return client


async def every_endpoint(harness: Harness) -> list[Any]:
    """A session touching every endpoint, successes and documented errors alike."""
    t = Transcript(harness)
    ann, bob, carol = await t.user("ann"), await t.user("Bob"), await t.user("carol")
    taken = {"name": "ANN", "password": PASSWORD, "password_repete": PASSWORD}
    await t.call(ann, "/register", taken)
    await t.call(carol, "/login", {"name": "carol", "password": "wrong password"})
    await t.call(bob, "/subscribe")
    for i in range(3):
        await t.call(ann, "/send", {"name": "bob", "msg": f"hi {i}", "client_id": f"c{i}"})
        await t.push(bob)
    await t.call(ann, "/send", {"name": "bob", "msg": "retry", "client_id": "c1"})
    await t.call(ann, "/send", {"name": "nobody", "msg": "lost"})
    await t.call(carol, "/send", {"name": "ann", "msg": "nul\x00 and \U0001f600"})
    await t.call(ann, "/receive")
    await t.call(bob, "/ack", {"id": 2})
    await t.call(bob, "/receive")
    await t.call(bob, "/receive")
    await t.call(bob, "/history", {"name": "ann", "limit": 2})
    await t.call(bob, "/history", {"name": "ann", "before": 2})
    await t.call(bob, "/user/info", {"name": "ANN"})
    for client, name in ((ann, "Lobby"), (bob, "lobby"), (carol, "dev"), (ann, "dev")):
        await t.call(client, "/channel/join", {"name": name})
    for i in range(4):
        await t.call(ann, "/channel/send", {"name": "lobby", "message": f"m{i}"})
        await t.push(bob)
    await t.call(ann, "/channel/send", {"name": "lobby", "message": "again", "client_id": "x"})
    await t.call(ann, "/channel/send", {"name": "lobby", "message": "again", "client_id": "x"})
    await t.push(bob)
    await t.call(bob, "/channel/list")
    await t.call(bob, "/channel/receive", {"name": "lobby"})
    await t.call(carol, "/channel/receive", {"name": "lobby"})  # not a member
    await t.call(bob, "/channel/history", {"name": "lobby", "limit": 2})
    await t.call(bob, "/channel/history", {"name": "lobby", "before": 3})
    await t.call(bob, "/channel/list_users", {"name": "lobby"})
    await t.call(bob, "/ack", {"channel": "lobby", "id": 1})
    await t.call(bob, "/unsubscribe")
    await t.call(bob, "/channel/leave", {"name": "lobby"})
    await t.call(bob, "/channel/leave", {"name": "lobby"})
    await t.call(bob, "/channel/send", {"name": "lobby", "message": "gone"})
    await t.call(bob, "/channel/join", {"name": "lobby"})
    await t.call(ann, "/channel/list")
    await t.call(ann, "/logout")
    await t.call(ann, "/receive")  # logged out
    return t.lines


async def test_every_endpoint_answers_on_postgres_as_on_sqlite(
    harness: Harness, pg_harness: Harness
) -> None:
    on_sqlite = await every_endpoint(harness)
    on_postgres = await every_endpoint(pg_harness)
    codes = [line[1]["code"] for line in on_sqlite if line[0] != "push"]
    assert codes.count(0) > 30 and len(set(codes)) >= 5  # successes and kinds of error
    for sqlite_line, postgres_line in zip(on_sqlite, on_postgres, strict=True):
        assert postgres_line == sqlite_line


async def test_postgres_keeps_everything_across_a_restart(pg_harness: Harness) -> None:
    ann = await pg_harness.user("ann")
    bob = await pg_harness.user("bob")
    token = bob.token
    sent = await ann.request("/send", {"name": "bob", "msg": "kept"})
    await ann.request("/channel/join", {"name": "lobby"})
    await ann.request("/channel/send", {"name": "lobby", "message": "kept too"})
    await pg_harness.restart()
    bob = await pg_harness.connect(token=token)  # the session token survived
    assert await bob.request("/receive") == {"messages": {"ann": ["kept"]}, "more": False}
    (stored,) = (await bob.request("/history", {"name": "ann"}))["messages"]
    assert (stored["id"], stored["msg"]) == (sent["id"], "kept")
    await bob.request("/channel/join", {"name": "lobby"})
    history = await bob.request("/channel/history", {"name": "lobby"})
    assert [m["msg"] for m in history["messages"]] == ["kept too"]


@pytest.mark.slow
async def test_sigkill_on_postgres_loses_no_acknowledged_send(
    spawn: Spawn, pg_url: str
) -> None:
    server = await spawn("--db", pg_url)
    port = await server.wait_listening()
    stream = await kill_during_sends(server, port, KILL_AFTER_SECONDS * 4)

    again = await spawn("--db", pg_url)
    port = await again.wait_listening()
    log_reader = read_stderr(again)
    try:
        recipient = await connect_as(port, RECIPIENT)
        sender = await connect_as(port, SENDER)
        received = await drain_inbox(recipient)
        check_received(stream, received)
        stored_ids = await conversation_ids(sender, RECIPIENT)
        assert {text: stored_ids[text] for text in stream.acked} == stream.acked
        await recipient.close()
        await sender.close()
    finally:
        assert await terminate(again, log_reader) == 0
