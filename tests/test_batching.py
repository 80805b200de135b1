"""The requests of one read, handled together (App.handle_many): sends share one context,
one group-commit entry and one reply group; every guarantee of one-at-a-time stays.

In memory first (App.handle_many over a real SQLite file), then over a real socket with
a real server: frames written in one write arrive in one read.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatd.app import App, Pending, ReplyGroup
from chatd.auth import Hasher
from chatd.codec import FrameDecoder, encode_frame
from chatd.config import Config
from chatd.errors import ErrorCode
from chatd.hub import Hub, Session
from chatd.protocol import Data
from chatd.store import Store
from tests.conftest import PASSWORD, Harness, MakeHarness

OK, BAD, NOT_FOUND, LIMITED = 0, ErrorCode.BAD_REQUEST, ErrorCode.NOT_FOUND, ErrorCode.RATE_LIMITED


@pytest.fixture
async def app(config: Config) -> AsyncIterator[App]:
    store = await Store.open(config.db)
    hasher = Hasher(config)
    yield App(config, store, Hub(), hasher)
    hasher.close()
    await store.close()


TOKENS: dict[Session, str] = {}  # what /login answered each session


async def logged_in(app: App, name: str) -> Session:
    session = Session(f"{name}-peer")
    params = {"name": name, "password": PASSWORD, "password_repete": PASSWORD}
    for op in ("/register", "/login"):
        reply = await app.handle(session, {"op": op, "params": params})
        assert isinstance(reply, dict) and reply["code"] == 0, reply
    assert isinstance(reply, dict)
    TOKENS[session] = reply["data"]["token"]
    return session


class Replies:
    """What App.handle_many hands its ``put``, in order."""

    def __init__(self) -> None:
        self.items: list[Data | Pending] = []

    async def put(self, item: Data | Pending) -> None:
        self.items.append(item)

    async def answers(self) -> list[Data]:
        """Every reply, in order, once each pending one is ready."""
        answers: list[Data] = []
        for item in self.items:
            if isinstance(item, dict):
                answers.append(item)
            else:
                await item.wait()
                assert item.ready
                answers += item.replies()
        return answers


def send(rid: int, to: str, msg: Any, **extra: Any) -> Data:
    return {"op": "/send", "id": rid, "params": {"name": to, "msg": msg, **extra}}


async def handle(app: App, session: Session, bodies: list[Any], budget: int = 100
                 ) -> tuple[Replies, int]:
    replies = Replies()
    refused = await app.handle_many(session, bodies, replies.put, budget)
    return replies, refused


async def inbox(app: App, session: Session) -> list[str]:
    reply = await app.handle(session, {"op": "/receive"})
    assert isinstance(reply, dict)
    return list(reply["data"]["messages"].get("alice", []))


async def test_sends_of_a_read_share_a_reply_group_and_answer_in_request_order(
    app: App,
) -> None:
    alice, bob = await logged_in(app, "alice"), await logged_in(app, "bob")
    await handle(app, alice, [send(0, "bob", "warm-up")])  # bob's profile is cached now
    assert await inbox(app, bob) == ["warm-up"]
    bodies = [
        send(1, "bob", "one"),
        send(2, "bob", "two"),
        send(3, "bob", 5),  # not a string: its own error, in its place
        {"op": "/ping", "id": 4},  # not a send: handled whole, after the sends before it
        send(5, "nobody", "lost"),  # not cached: the general path finds no such user
        send(6, "bob", "six", client_id="c6"),
        send(7, "bob", "six again", client_id="c6"),  # a repeat: the first one's answer
    ]
    replies, refused = await handle(app, alice, bodies)
    kinds = [type(item).__name__ for item in replies.items]
    assert kinds == ["ReplyGroup", "dict", "dict", "ReplyGroup"]
    assert [item.size for item in replies.items if isinstance(item, ReplyGroup)] == [3, 2]
    answers = await replies.answers()
    assert [(a["id"], a["code"]) for a in answers] == [
        (1, OK), (2, OK), (3, BAD), (4, OK), (5, NOT_FOUND), (6, OK), (7, OK),
    ]
    assert answers[5]["data"] == answers[6]["data"]  # one message, one id
    ids = [a["data"]["id"] for a in answers if a["code"] == 0 and "data" in a]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert refused == 0
    assert await inbox(app, bob) == ["one", "two", "six"]


async def test_an_op_of_the_wrong_type_among_sends_gets_its_own_error(app: App) -> None:
    """An op that cannot be a key ([...], {...}) must not break the read (it did)."""
    alice, bob = await logged_in(app, "alice"), await logged_in(app, "bob")
    await handle(app, alice, [send(0, "bob", "warm-up")])
    bodies = [send(1, "bob", "a"), {"op": ["/send"], "id": 2}, {"op": {}, "id": 3},
              send(4, "bob", "b")]
    replies, _ = await handle(app, alice, bodies)
    answers = await replies.answers()
    assert [(a["id"], a["code"]) for a in answers] == [(1, OK), (2, BAD), (3, BAD), (4, OK)]
    assert answers[1]["msg"] == "'op' must be a string, not an array"
    assert await inbox(app, bob) == ["warm-up", "a", "b"]


async def test_a_group_is_ready_only_once_its_sends_are_committed(app: App) -> None:
    alice, _ = await logged_in(app, "alice"), await logged_in(app, "bob")
    await handle(app, alice, [send(0, "bob", "warm-up")])
    replies, _ = await handle(app, alice, [send(1, "bob", "a"), send(2, "bob", "b")])
    (group,) = replies.items
    assert isinstance(group, ReplyGroup)
    assert not group.ready  # no COMMIT yet: nothing may be answered
    await group.wait()
    assert [a["code"] for a in group.replies()] == [OK, OK]
    history = await app.handle(alice, {"op": "/history", "params": {"name": "bob"}})
    assert isinstance(history, dict)
    assert {m["msg"] for m in history["data"]["messages"]} == {"warm-up", "a", "b"}


async def test_a_request_after_sends_in_the_same_read_sees_them(app: App) -> None:
    alice, _ = await logged_in(app, "alice"), await logged_in(app, "bob")
    await handle(app, alice, [send(0, "bob", "warm-up")])
    history = {"op": "/history", "id": 3, "params": {"name": "bob"}}
    replies, _ = await handle(app, alice, [send(1, "bob", "a"), send(2, "bob", "b"), history])
    answers = await replies.answers()
    assert {m["msg"] for m in answers[2]["data"]["messages"]} == {"warm-up", "a", "b"}


async def test_rate_limits_count_each_message_and_the_abuse_budget_stops_the_read(
    config: Config,
) -> None:
    store = await Store.open(config.db)
    hasher = Hasher(config)
    limited = dataclasses.replace(config, message_burst=4, message_rate=0.001)
    app = App(limited, store, Hub(), hasher)
    try:
        alice, bob = await logged_in(app, "alice"), await logged_in(app, "bob")
        await handle(app, alice, [send(0, "bob", "warm-up")])  # one of the four
        replies, refused = await handle(app, alice, [send(i, "bob", f"m{i}") for i in range(1, 7)])
        assert [a["code"] for a in await replies.answers()] == [OK, OK, OK, LIMITED, LIMITED,
                                                                 LIMITED]
        assert refused == 3
        # With a budget of one code 8, nothing after the first refusal is handled.
        replies, refused = await handle(app, alice, [send(7, "bob", "x"), {"op": "/ping"}],
                                        budget=1)
        assert refused == 1
        assert [a["code"] for a in await replies.answers()] == [LIMITED]
        assert await inbox(app, bob) == ["warm-up", "m1", "m2", "m3"]
    finally:
        hasher.close()
        await store.close()


async def test_a_send_carrying_its_token_on_a_fresh_session_goes_the_general_way(
    app: App,
) -> None:
    alice, bob = await logged_in(app, "alice"), await logged_in(app, "bob")
    token = TOKENS[alice]
    other = Session("alice-second-peer")
    bodies = [{**send(i, "bob", f"t{i}"), "token": token} for i in range(3)]
    replies, _ = await handle(app, other, bodies)
    # The first authenticates (it waits for the store); the others are bound by then.
    assert [type(item).__name__ for item in replies.items] == ["PendingReply", "ReplyGroup"]
    assert [a["code"] for a in await replies.answers()] == [OK, OK, OK]
    assert await inbox(app, bob) == ["t0", "t1", "t2"]


async def test_without_login_every_send_of_the_group_is_refused(app: App) -> None:
    await logged_in(app, "bob")
    replies, _ = await handle(app, Session(), [send(1, "bob", "a"), send(2, "bob", "b")])
    assert [a["code"] for a in await replies.answers()] == [ErrorCode.NOT_AUTHENTICATED] * 2


async def test_a_send_after_a_request_handled_whole_passes_the_auth_gate_again(
    app: App,
) -> None:
    """What a group takes for granted (the auth gate passed, the time, the rate bucket)
    holds only while nothing is awaited: a request handled whole in between (here a
    /logout) is followed by a new group, even when the one before took no request."""
    alice = await logged_in(app, "alice")
    channel_send = {"op": "/channel/send", "params": {"name": "general", "message": "hi"}}
    bodies = [{**channel_send, "id": 1}, {"op": "/logout", "id": 2}, {**channel_send, "id": 3}]
    replies, _ = await handle(app, alice, bodies)
    # The first is not cached yet: the general path creates the channel and caches it.
    assert [(a["id"], a["code"]) for a in await replies.answers()] == [
        (1, OK), (2, OK), (3, ErrorCode.NOT_AUTHENTICATED),
    ]


# Over a real socket: frames written in one write are one read for the server.


async def raw_exchange(harness: Harness, frames: list[bytes], count: int
                       ) -> list[Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
    try:
        writer.write(b"".join(frames))
        decoder, replies = FrameDecoder(), list[Any]()
        async with asyncio.timeout(10):
            while len(replies) < count:
                data = await reader.read(65536)
                assert data, "the server closed the connection"
                replies += decoder.feed(data)
        return replies
    finally:
        writer.close()


async def test_a_bad_frame_in_the_middle_of_a_read_gets_its_own_error(harness: Harness) -> None:
    alice, bob = await harness.user("alice"), await harness.user("bob")
    await alice.request("/send", {"name": "bob", "msg": "warm-up"})
    token = alice.token
    assert token is not None

    def frame(rid: int, msg: Any) -> bytes:
        return encode_frame({**send(rid, "bob", msg), "token": token})

    frames = [frame(i, f"m{i}") for i in range(20)]
    frames[7] = b"\x00\x00\x00\x02\xc1\xc1"  # not msgpack
    frames[13] = frame(13, ["not", "text"])
    replies = await raw_exchange(harness, frames, 20)
    codes = {reply.get("id", "none"): reply["code"] for reply in replies}
    assert [reply["code"] for reply in replies] == [
        BAD if i in (7, 13) else OK for i in range(20)
    ]
    assert "none" in codes  # the undecodable frame's reply carries no id
    assert [reply.get("id") for reply in replies if reply["code"] == 0] == [
        i for i in range(20) if i not in (7, 13)
    ]
    got = await bob.request("/receive")
    assert got["messages"]["alice"] == ["warm-up"] + [
        f"m{i}" for i in range(20) if i not in (7, 13)
    ]


async def test_sends_past_the_abuse_limit_in_one_read_close_the_connection(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(message_burst=3, message_rate=0.001, abuse_limit=2)
    alice, bob = await harness.user("alice"), await harness.user("bob")
    await alice.request("/send", {"name": "bob", "msg": "warm-up"})
    token = alice.token
    assert token is not None
    frames = [encode_frame({**send(i, "bob", f"m{i}"), "token": token}) for i in range(8)]
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
    writer.write(b"".join(frames))
    decoder, replies = FrameDecoder(), list[Any]()
    async with asyncio.timeout(10):
        while data := await reader.read(65536):
            replies += decoder.feed(data)
    writer.close()
    # Two sends left in the burst, then two refusals: the second is the abuse limit.
    assert [reply["code"] for reply in replies] == [OK, OK, LIMITED, LIMITED]
    got = await bob.request("/receive")
    assert got["messages"]["alice"] == ["warm-up", "m0", "m1"]


async def test_hot_path_sends_still_copy_to_the_senders_other_devices(harness: Harness) -> None:
    """The copy for the sender's other sessions is skipped only when there are none."""
    alice_phone = await harness.user("alice")
    bob = await harness.user("bob")
    await alice_phone.request("/send", {"name": "bob", "msg": "warm-up"})  # bob is cached
    alone = await alice_phone.request("/send", {"name": "bob", "msg": "no other device"})
    laptop = await harness.connect(token=alice_phone.token)
    await laptop.request("/subscribe")
    sent = await alice_phone.request("/send", {"name": "bob", "msg": "to the laptop too"})
    copy = await laptop.next_event(timeout=5)
    assert copy["data"]["id"] == sent["id"] and copy["data"]["to"] == "bob"
    assert alone["id"] < sent["id"]
    await laptop.request("/ping")  # nothing else was waiting: the earlier one had no copy
    with pytest.raises(TimeoutError):
        await laptop.next_event(timeout=0.05)
    assert (await bob.request("/receive"))["messages"]["alice"][-1] == "to the laptop too"


def post(rid: int, channel: str, message: Any) -> Data:
    return {"op": "/channel/send", "id": rid, "params": {"name": channel, "message": message}}


async def test_channel_sends_of_members_join_the_group_and_others_go_the_general_way(
    app: App,
) -> None:
    alice = await logged_in(app, "alice")
    for channel in ("dev", "ops"):
        joined = await app.handle(alice, {"op": "/channel/join", "params": {"name": channel}})
        assert isinstance(joined, dict) and joined["code"] == 0
    leave = {"op": "/channel/leave", "params": {"name": "ops"}}
    left = await app.handle(alice, leave)
    assert isinstance(left, dict) and left["code"] == 0
    await handle(app, alice, [post(0, "dev", "warm-up")])
    bodies = [post(1, "dev", "one"), post(2, "dev", ""), post(3, "ops", "after leaving"),
              post(4, "dev", "four")]
    replies, _ = await handle(app, alice, bodies)
    kinds = [type(item).__name__ for item in replies.items]
    assert kinds == ["ReplyGroup", "dict", "ReplyGroup"]  # ops: not a member, handled whole
    assert [(a["id"], a["code"]) for a in await replies.answers()] == [
        (1, OK), (2, BAD), (3, ErrorCode.FORBIDDEN), (4, OK),
    ]
    history = await app.handle(alice, {"op": "/channel/history", "params": {"name": "dev"}})
    assert isinstance(history, dict)
    assert sorted(m["msg"] for m in history["data"]["messages"]) == ["four", "one", "warm-up"]
