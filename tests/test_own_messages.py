"""A user's own channel messages are never news to them (protocol.md, "Your own messages").

Unread counts, /channel/receive and the catch-up of /subscribe skip them, and move the
position past them all the same; other members' messages stored around them, even in
the same group commit, are still delivered and counted.
"""

from __future__ import annotations

import asyncio
from typing import Any

from chatd.client import Client
from tests.conftest import Harness, MakeHarness
from tests.test_live import events_of


async def unread(client: Client) -> dict[str, int]:
    channels = (await client.request("/channel/list"))["channels"]
    return {channel["name"]: channel["unread"] for channel in channels}


async def received(client: Client, channel: str = "lobby") -> list[tuple[str, str]]:
    data = await client.request("/channel/receive", {"name": channel})
    return [(m["name"], m["msg"]) for m in data["messages"]]


async def post(client: Client, text: str, channel: str = "lobby") -> int:
    sent: int = (await client.request("/channel/send", {"name": channel, "message": text}))["id"]
    return sent


async def device(harness: Harness, of: Client) -> Client:
    """Another connection of the same user, subscribed: a second device."""
    other = await harness.connect(token=of.token)
    await other.request("/subscribe")
    return other


async def no_channel_messages(client: Client) -> bool:
    """True if no channel message is waiting after a full round trip on the connection.

    Pushes are written before the reply to the send that caused them, and this round
    trip comes after that reply, so a push that was sent has arrived by now.
    """
    await client.request("/ping")
    return not [e for e in client.waiting_events() if e.get("event") == "channel_message"]


def texts(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["data"]["name"], e["data"]["msg"]) for e in events]


async def test_own_message_is_not_unread(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    for client in (alice, bob):
        assert await received(client) == []  # joined, with a position
    await post(alice, "mine")
    assert await unread(alice) == {"lobby": 0}
    assert await unread(bob) == {"lobby": 1}
    await post(bob, "theirs")
    assert await unread(alice) == {"lobby": 1}
    assert await received(alice) == [("bob", "theirs")]
    assert await unread(alice) == {"lobby": 0}


async def test_first_receive_and_its_unread_count_hold_only_others_messages(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(channel_backlog=3)
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    for client, text in [(alice, "a0"), (bob, "b0"), (alice, "a1"), (alice, "a2")]:
        await post(client, text)
    await post(bob, "b1")
    # alice has no position yet: the backlog is the newest (up to) three messages of others.
    assert await unread(alice) == {"lobby": 2}
    assert await received(alice) == [("bob", "b0"), ("bob", "b1")]
    assert await unread(alice) == {"lobby": 0}
    assert await received(alice) == []


async def test_channel_receive_skips_own_messages_and_moves_past_them(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(receive_batch=2)
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    assert await received(alice) == []
    for client, text in [(bob, "b0"), (alice, "a0"), (alice, "a1"), (bob, "b1"), (bob, "b2")]:
        await post(client, text)
    last_own = await post(alice, "a2")
    first = await alice.request("/channel/receive", {"name": "lobby"})
    assert [m["msg"] for m in first["messages"]] == ["b0", "b1"]
    assert first["more"] is True
    assert await received(alice) == [("bob", "b2")]
    # The position is past alice's trailing message, though it was never returned.
    position = await alice.request("/ack", {"channel": "lobby", "id": 0})
    assert position == {"position": last_own}
    assert await received(alice) == []
    await post(bob, "b3")
    assert await received(alice) == [("bob", "b3")]
    # History still shows everything, both senders.
    history = await alice.request("/channel/history", {"name": "lobby"})
    assert [m["msg"] for m in history["messages"]] == ["b0", "a0", "a1", "b1", "b2", "a2", "b3"]


async def test_catch_up_on_a_new_connection_skips_own_messages(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    assert await received(alice) == []
    await post(bob, "before")  # not acknowledged by alice: it must come back
    await post(alice, "mine")
    laptop = await device(harness, alice)
    await post(bob, "after")  # live, after the catch-up
    assert texts(await events_of(laptop, 2, kind="channel_message")) == [
        ("bob", "before"),
        ("bob", "after"),
    ]


async def test_sessions_of_the_sender_still_get_the_live_copy(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    for client in (alice, bob):
        await client.request("/channel/join", {"name": "lobby"})
        await client.request("/subscribe")
    phone = await device(harness, alice)
    await post(alice, "from the desktop")
    assert texts(await events_of(phone, 1, kind="channel_message")) == [
        ("alice", "from the desktop")
    ]
    assert texts(await events_of(bob, 1, kind="channel_message")) == [
        ("alice", "from the desktop")
    ]
    assert await no_channel_messages(alice), "the sending connection got its own message"
    # A device that subscribes afterwards is not shown it as news.
    tablet = await device(harness, alice)
    await post(bob, "hello all")
    assert texts(await events_of(tablet, 1, kind="channel_message")) == [("bob", "hello all")]


async def test_others_messages_committed_among_own_sends_are_delivered_and_counted(
    harness: Harness,
) -> None:
    """Sends of both users pipelined at once share group commits, in both orders."""
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    for client in (alice, bob):
        assert await received(client) == []
    await alice.request("/subscribe")  # the sending connection is subscribed too
    phone = await device(harness, alice)
    # Once a connection has a message of the channel its catch-up has begun: alice's
    # messages from then on are live for it (those before, its catch-up would skip).
    ready = await post(bob, "ready")
    for client in (alice, phone):
        assert texts(await events_of(client, 1, kind="channel_message")) == [("bob", "ready")]
    await alice.request("/ack", {"channel": "lobby", "id": ready})
    rounds = 40
    labels: list[tuple[str, str]] = []
    sends = []
    for i in range(rounds):
        for client, name in ((alice, "alice"), (bob, "bob")):
            labels.append((name, f"{name[0]}{i}"))
            sends.append(asyncio.create_task(post(client, labels[-1][1])))
    ids = await asyncio.gather(*sends)
    in_commit_order = [label for _, label in sorted(zip(ids, labels, strict=True))]
    bobs = [("bob", f"b{i}") for i in range(rounds)]

    # The sending connection gets every message of bob's live, none of its own.
    assert texts(await events_of(alice, rounds, kind="channel_message")) == [
        text for text in in_commit_order if text[0] == "bob"
    ]
    assert await no_channel_messages(alice)
    # Another device of alice's gets both users' messages live, in commit order.
    assert texts(await events_of(phone, 2 * rounds, kind="channel_message")) == in_commit_order
    # None of bob's is lost to alice's position: counted, caught up, received.
    assert await unread(alice) == {"lobby": rounds}
    laptop = await device(harness, alice)
    assert texts(await events_of(laptop, rounds, kind="channel_message")) == bobs
    assert await no_channel_messages(laptop)
    assert await received(alice) == bobs
    assert await unread(alice) == {"lobby": 0}
    assert await unread(bob) == {"lobby": rounds}


async def test_acking_the_id_of_an_own_send_skips_earlier_undelivered_messages(
    harness: Harness,
) -> None:
    """Why protocol.md says not to /ack the id a /channel/send returned."""
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    assert await received(alice) == []
    await post(bob, "not yet seen by alice")
    own = await post(alice, "mine")
    assert await alice.request("/ack", {"channel": "lobby", "id": own}) == {"position": own}
    assert await received(alice) == []


async def test_notes_to_self_stay_news_in_the_inbox(harness: Harness) -> None:
    alice = await harness.user("alice")
    sent = await alice.request("/send", {"name": "alice", "msg": "remember the milk"})
    laptop = await device(harness, alice)
    (note,) = await events_of(laptop, 1, kind="message")
    assert note["data"]["id"] == sent["id"] and "to" not in note["data"]
    assert (await alice.request("/receive"))["messages"] == {"alice": ["remember the milk"]}


async def test_own_message_sent_while_a_device_catches_up_reaches_it(
    make_harness: MakeHarness,
) -> None:
    """Stored after that device's catch-up began, it is live for it: pushed, in order."""
    harness = await make_harness(receive_batch=1)  # a catch-up of one message per read
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    assert await received(alice) == []
    backlog = 200
    for i in range(backlog):
        await post(bob, f"b{i}")
    phone = await device(harness, alice)
    (first,) = await events_of(phone, 1, kind="channel_message")  # the catch-up has begun
    await post(alice, "mine")
    await post(bob, "after")  # a catch-up still reading would read this past "mine"
    rest = await events_of(phone, backlog + 1, kind="channel_message")
    assert texts([first, *rest]) == [("bob", f"b{i}") for i in range(backlog)] + [
        ("alice", "mine"),
        ("bob", "after"),
    ]
