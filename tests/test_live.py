"""Live delivery with several clients on real sockets: push, acks, catch-up, channels, presence."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from chatd.client import Client
from chatd.errors import Forbidden
from tests.conftest import PASSWORD, Harness, MakeHarness
from tests.test_wire import RawPeer

MESSAGES = ("message", "channel_message")


async def events_of(
    client: Client, count: int, kind: str | tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """The next ``count`` events (of the given kinds, skipping others), each within 5 s."""
    kinds = (kind,) if isinstance(kind, str) else kind
    found: list[dict[str, Any]] = []
    while len(found) < count:
        item = await client.next_event(timeout=5)
        if kinds is None or item.get("event") in kinds:
            found.append(item)
    return found


async def quiet(client: Client) -> bool:
    """True if no event is waiting after a full round trip on the connection."""
    await client.request("/ping")
    try:
        await client.next_event(timeout=0.05)
    except TimeoutError:
        return True
    return False


async def subscribed(harness: Harness, name: str) -> Client:
    client = await harness.user(name)
    await client.request("/subscribe")
    return client


async def test_push_arrives_without_polling(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await subscribed(harness, "bob")
    sent = await alice.request("/send", {"name": "bob", "msg": "hello"})
    (pushed,) = await events_of(bob, 1)
    assert pushed == {
        "event": "message",
        "data": {"id": sent["id"], "name": "alice", "msg": "hello", "datetime": sent["datetime"]},
    }
    assert "id" not in pushed


async def test_polling_clients_never_get_unasked_frames(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    await alice.request("/send", {"name": "bob", "msg": "poll me"})
    await alice.request("/channel/send", {"name": "dev", "message": "x"})
    await bob.request("/channel/receive", {"name": "dev"})
    await alice.request("/channel/send", {"name": "dev", "message": "y"})
    assert await quiet(bob)
    assert (await bob.request("/receive"))["messages"] == {"alice": ["poll me"]}


async def test_every_device_sees_the_whole_conversation(harness: Harness) -> None:
    alice_phone = await subscribed(harness, "alice")
    alice_laptop = await harness.connect(token=alice_phone.token)
    await alice_laptop.request("/subscribe")
    bob_phone = await subscribed(harness, "bob")
    bob_laptop = await harness.connect(token=bob_phone.token)
    await bob_laptop.request("/subscribe")

    sent = await alice_phone.request("/send", {"name": "bob", "msg": "hi bob"})
    for device in (bob_phone, bob_laptop):
        (event,) = await events_of(device, 1)
        assert event["data"]["id"] == sent["id"] and "to" not in event["data"]
    (copy,) = await events_of(alice_laptop, 1)
    assert copy["event"] == "message"
    assert copy["data"] == {
        "id": sent["id"],
        "name": "alice",
        "to": "bob",
        "msg": "hi bob",
        "datetime": sent["datetime"],
    }
    assert await quiet(alice_phone)  # the sending connection has its reply already


async def test_note_to_self_reaches_each_device_once(harness: Harness) -> None:
    phone = await subscribed(harness, "alice")
    laptop = await harness.connect(token=phone.token)
    await laptop.request("/subscribe")
    await phone.request("/send", {"name": "alice", "msg": "remember milk"})
    for device in (phone, laptop):
        (event,) = await events_of(device, 1)
        assert event["data"]["msg"] == "remember milk"
        assert await quiet(device)


async def test_pushed_but_not_acked_comes_back_and_acked_never_does(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await subscribed(harness, "bob")
    ids = [(await alice.request("/send", {"name": "bob", "msg": f"m{i}"}))["id"] for i in range(4)]
    pushed = await events_of(bob, 4)
    assert [e["data"]["id"] for e in pushed] == ids
    assert await bob.request("/ack", {"id": ids[1]}) == {"position": ids[1]}
    # m2 and m3 were pushed but not acknowledged: a poll returns them, and only them.
    assert (await bob.request("/receive"))["messages"] == {"alice": ["m2", "m3"]}
    assert (await bob.request("/receive"))["messages"] == {}


async def test_unacked_messages_are_pushed_again_on_the_next_subscribe(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await subscribed(harness, "bob")
    for i in range(3):
        await alice.request("/send", {"name": "bob", "msg": f"m{i}"})
    first = await events_of(bob, 3)
    await bob.request("/ack", {"id": first[0]["data"]["id"]})
    await bob.close()
    again = await harness.connect(token=bob.token)
    await again.request("/subscribe")
    replayed = await events_of(again, 2)
    assert [e["data"]["msg"] for e in replayed] == ["m1", "m2"]
    assert await quiet(again)


async def test_ack_cannot_skip_messages_not_yet_sent(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    sent = await alice.request("/send", {"name": "bob", "msg": "one"})
    assert await bob.request("/ack", {"id": 10**12}) == {"position": sent["id"]}
    await alice.request("/send", {"name": "bob", "msg": "two"})
    assert (await bob.request("/receive"))["messages"] == {"alice": ["two"]}
    assert (await bob.call("/ack", {"id": "x"}))["code"] == 1
    assert (await bob.call("/ack", {}))["code"] == 1


async def test_reconnect_catches_up_exactly_once(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await subscribed(harness, "bob")
    for i in range(3):
        await alice.request("/send", {"name": "bob", "msg": f"before{i}"})
    seen = await events_of(bob, 3)
    await bob.request("/ack", {"id": seen[-1]["data"]["id"]})
    await bob.close()
    for i in range(3):
        await alice.request("/send", {"name": "bob", "msg": f"while-away{i}"})
    again = await harness.connect(token=bob.token)
    await again.request("/subscribe")
    caught_up = await events_of(again, 3)
    assert [e["data"]["msg"] for e in caught_up] == [f"while-away{i}" for i in range(3)]
    await alice.request("/send", {"name": "bob", "msg": "live again"})
    (live,) = await events_of(again, 1)
    assert live["data"]["msg"] == "live again"
    assert await quiet(again)


async def test_catch_up_survives_a_server_restart(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await subscribed(harness, "bob")
    token = bob.token
    await alice.request("/channel/send", {"name": "dev", "message": "c0"})
    await bob.request("/channel/join", {"name": "dev"})
    await alice.request("/send", {"name": "bob", "msg": "p0"})
    await alice.request("/channel/send", {"name": "dev", "message": "c1"})
    seen = await events_of(bob, 2, kind=None)
    by_kind = {e["event"]: e["data"]["id"] for e in seen}
    await bob.request("/ack", {"id": by_kind["message"]})
    await bob.request("/ack", {"channel": "dev", "id": by_kind["channel_message"]})
    await alice.request("/send", {"name": "bob", "msg": "p1"})
    await alice.request("/channel/send", {"name": "dev", "message": "c2"})

    await harness.restart()

    bob = await harness.connect(token=token)
    await bob.request("/subscribe")
    replay = await events_of(bob, 2)
    assert sorted((e["event"], e["data"]["msg"]) for e in replay) == [
        ("channel_message", "c2"),
        ("message", "p1"),
    ]
    assert await quiet(bob)
    # Polling agrees: what was not acknowledged is still waiting there too.
    assert (await bob.request("/receive"))["messages"] == {"alice": ["p1"]}


async def test_catch_up_while_messages_keep_arriving_has_no_gaps_or_duplicates(
    make_harness: MakeHarness,
) -> None:
    # Tiny pages and queue: catch-up needs many reads and the live queue overflows.
    harness = await make_harness(receive_batch=4, catch_up_queue=2)
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    for i in range(25):
        await alice.request("/send", {"name": "bob", "msg": f"old{i}"})

    async def keep_sending() -> None:
        for i in range(25):
            await alice.request("/send", {"name": "bob", "msg": f"new{i}"})

    sender = asyncio.create_task(keep_sending())
    await bob.request("/subscribe")
    await sender
    got = await events_of(bob, 50)
    texts = [e["data"]["msg"] for e in got]
    assert texts == [f"old{i}" for i in range(25)] + [f"new{i}" for i in range(25)]
    assert await quiet(bob)


async def test_channel_messages_reach_every_subscribed_member_but_the_sender(
    harness: Harness,
) -> None:
    alice = await subscribed(harness, "alice")
    bob = await subscribed(harness, "bob")
    carol = await harness.user("carol")  # a member who only polls
    for client in (alice, bob, carol):
        await client.request("/channel/join", {"name": "dev"})
    await events_of(alice, 2, kind="join")  # bob and carol joining
    sent = await alice.request("/channel/send", {"name": "dev", "message": "standup?"})
    (event,) = await events_of(bob, 1, kind="channel_message")
    assert event["data"] == {
        "id": sent["id"], "channel": "dev", "name": "alice", "msg": "standup?",
        "datetime": sent["datetime"],
    }
    assert await quiet(alice)
    assert await quiet(carol)


async def test_join_and_leave_are_announced_and_leaving_stops_delivery(
    harness: Harness,
) -> None:
    alice = await subscribed(harness, "alice")
    bob = await subscribed(harness, "bob")
    await alice.request("/channel/join", {"name": "dev"})
    assert await bob.request("/channel/join", {"name": "Dev"}) == {"name": "dev"}
    (joined,) = await events_of(alice, 1, kind="join")
    assert joined == {"event": "join", "data": {"channel": "dev", "name": "bob"}}
    await bob.request("/channel/leave", {"name": "dev"})
    (left,) = await events_of(alice, 1, kind="leave")
    assert left == {"event": "leave", "data": {"channel": "dev", "name": "bob"}}

    await alice.request("/channel/send", {"name": "dev", "message": "bob is gone"})
    assert await quiet(bob)
    for op, params in (
        ("/channel/receive", {"name": "dev"}),
        ("/channel/send", {"name": "dev", "message": "let me back"}),
        ("/channel/history", {"name": "dev"}),
        ("/ack", {"channel": "dev", "id": 1}),
    ):
        with pytest.raises(Forbidden):
            await bob.request(op, params)
    users = await alice.request("/channel/list_users", {"name": "dev"})
    assert [u["name"] for u in users["users"]] == ["alice"]
    with pytest.raises(Forbidden):
        await bob.request("/channel/leave", {"name": "dev"})

    await bob.request("/channel/join", {"name": "dev"})
    await alice.request("/channel/send", {"name": "dev", "message": "welcome back"})
    (back,) = await events_of(bob, 1, kind="channel_message")
    assert back["data"]["msg"] == "welcome back"


async def test_presence_is_pushed_to_channel_mates(harness: Harness) -> None:
    alice = await subscribed(harness, "alice")
    await alice.request("/channel/join", {"name": "dev"})
    bob = await harness.user("bob")
    await bob.request("/channel/join", {"name": "dev"})
    await events_of(alice, 1, kind="join")
    await bob.close()
    (offline,) = await events_of(alice, 1, kind="presence")
    assert offline == {"event": "presence", "data": {"name": "bob", "online": False}}
    again = await harness.connect()
    await again.login("bob", PASSWORD)
    (online,) = await events_of(alice, 1, kind="presence")
    assert online["data"] == {"name": "bob", "online": True}
    users = await alice.request("/channel/list_users", {"name": "dev"})
    assert users["users"] == [{"name": "alice", "online": True}, {"name": "bob", "online": True}]


async def test_channel_list_shows_memberships_with_unread_counts(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    await bob.request("/channel/join", {"name": "dev"})
    await bob.request("/channel/receive", {"name": "dev"})
    await bob.request("/channel/join", {"name": "announce"})
    for i in range(3):
        await alice.request("/channel/send", {"name": "dev", "message": f"d{i}"})
    await alice.request("/channel/send", {"name": "announce", "message": "a"})
    assert await bob.request("/channel/list") == {
        "channels": [{"name": "announce", "unread": 1}, {"name": "dev", "unread": 3}]
    }
    await bob.request("/channel/receive", {"name": "dev"})
    await bob.request("/channel/leave", {"name": "announce"})
    assert await bob.request("/channel/list") == {"channels": [{"name": "dev", "unread": 0}]}


async def test_channel_history_pages_back_to_the_start(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    await bob.request("/channel/join", {"name": "dev"})
    for i in range(7):
        await alice.request("/channel/send", {"name": "dev", "message": f"m{i}"})
    pages: list[list[str]] = []
    before = None
    while True:
        params: dict[str, Any] = {"name": "dev", "limit": 3}
        if before is not None:
            params["before"] = before
        page = await bob.request("/channel/history", params)
        pages.append([m["msg"] for m in page["messages"]])
        if not page["more"]:
            break
        before = page["messages"][0]["id"]
    assert pages == [["m4", "m5", "m6"], ["m1", "m2", "m3"], ["m0"]]
    # History does not move the read position.
    assert len((await bob.request("/channel/receive", {"name": "dev"}))["messages"]) == 7


async def test_history_is_capped_and_checks_its_parameters(make_harness: MakeHarness) -> None:
    harness = await make_harness(history_page=5)
    alice = await harness.user("alice")
    for i in range(8):
        await alice.request("/channel/send", {"name": "dev", "message": f"m{i}"})
    page = await alice.request("/channel/history", {"name": "dev", "limit": 1000})
    assert len(page["messages"]) == 5 and page["more"] is True
    for bad in ({"limit": 0}, {"limit": "3"}, {"before": -1}, {"before": 1.5}):
        assert (await alice.call("/channel/history", {"name": "dev", **bad}))["code"] == 1
    assert (await alice.call("/channel/history", {"name": "nowhere"}))["code"] == 5


async def test_private_history_shows_both_directions_to_both_sides_only(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    carol = await harness.user("carol")
    await alice.request("/send", {"name": "bob", "msg": "a->b"})
    await bob.request("/send", {"name": "alice", "msg": "b->a"})
    await carol.request("/send", {"name": "bob", "msg": "c->b"})
    await bob.request("/receive")  # reading the inbox does not change history
    history = await alice.request("/history", {"name": "bob"})
    assert [(m["name"], m["to"], m["msg"]) for m in history["messages"]] == [
        ("alice", "bob", "a->b"),
        ("bob", "alice", "b->a"),
    ]
    assert history["more"] is False
    # Carol's history with bob holds only her own message: no one else's leaks in.
    carols = await carol.request("/history", {"name": "bob"})
    assert [m["msg"] for m in carols["messages"]] == ["c->b"]
    assert (await carol.call("/history", {"name": "ghost"}))["code"] == 5


async def test_send_retry_with_client_id_is_pushed_once(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await subscribed(harness, "bob")
    for _ in range(3):
        await alice.request("/send", {"name": "bob", "msg": "once", "client_id": "retry"})
    await events_of(bob, 1)
    assert await quiet(bob)


async def test_a_reader_that_never_reads_is_cut_off_while_others_keep_receiving(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(max_outbound_buffer=256 * 1024)
    alice = await harness.user("alice")
    good = await subscribed(harness, "good")
    await good.request("/channel/join", {"name": "flood"})

    stalled_sock = socket.socket()
    stalled_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled_sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(stalled_sock, ("127.0.0.1", harness.port))
    reader, writer = await asyncio.open_connection(sock=stalled_sock)
    stalled = Client(reader, writer)
    await stalled.request("/register", {"name": "stalled", "password": PASSWORD,
                                        "password_repete": PASSWORD})
    await stalled.login("stalled", PASSWORD)
    await stalled.request("/channel/join", {"name": "flood"})
    await stalled.request("/subscribe")
    stalled._reader_task.cancel()  # from now on nothing reads this socket

    text = "x" * 4000
    total = 1500  # about 6 MB: far more than the cap plus every kernel buffer
    received = 0

    async def drain_good() -> None:
        nonlocal received
        while received < total:
            event = await good.next_event(timeout=10)
            if event["event"] == "channel_message":
                received += 1

    reading = asyncio.create_task(drain_good())
    for i in range(total):
        await alice.request("/channel/send", {"name": "flood", "message": f"{i}{text}"})
    await reading
    assert received == total
    users = await alice.request("/channel/list_users", {"name": "flood"})
    assert {"name": "stalled", "online": False} in users["users"]
    writer.close()


async def test_silent_subscriber_is_pinged_then_dropped(make_harness: MakeHarness) -> None:
    harness = await make_harness(ping_interval=0.1, ping_timeout=0.1)
    lively = await subscribed(harness, "lively")  # chatd.client answers pings by itself
    silent = await subscribed(harness, "silent")
    token = silent.token
    await silent.close()
    peer = await RawPeer.open(harness.port)  # reads everything, answers nothing
    peer.send({"op": "/subscribe", "id": 1, "token": token})
    assert (await peer.reply())["code"] == 0
    assert await peer.reply() == {"event": "ping", "data": {}}
    assert await peer.closed()
    peer.close()
    await asyncio.sleep(0.5)  # several ping intervals
    await lively.request("/ping")


async def test_unsubscribed_idle_connection_is_closed(make_harness: MakeHarness) -> None:
    harness = await make_harness(idle_timeout=0.2)
    client = await harness.connect()
    with pytest.raises(ConnectionError):
        await client.next_event(timeout=5)


async def test_unsubscribe_stops_pushes(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await subscribed(harness, "bob")
    await bob.request("/unsubscribe")
    await alice.request("/send", {"name": "bob", "msg": "poll for this"})
    assert await quiet(bob)
    assert (await bob.request("/receive"))["messages"] == {"alice": ["poll for this"]}


async def test_a_second_login_on_the_same_connection_keeps_live_delivery(
    harness: Harness,
) -> None:
    alice = await harness.user("alice")
    bob = await subscribed(harness, "bob")
    await bob.request("/channel/join", {"name": "dev"})
    await bob.login("bob", PASSWORD)  # a new token on the same connection
    await alice.request("/channel/send", {"name": "dev", "message": "still there?"})
    await alice.request("/send", {"name": "bob", "msg": "and here?"})
    got = await events_of(bob, 2, kind=MESSAGES)
    assert sorted(e["data"]["msg"] for e in got) == ["and here?", "still there?"]


async def test_channel_messages_during_a_long_inbox_catch_up_are_pushed(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(receive_batch=2)
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    await bob.request("/channel/join", {"name": "dev"})  # never received: no position yet
    for i in range(30):
        await alice.request("/send", {"name": "bob", "msg": f"p{i}"})
    await bob.request("/subscribe")
    for i in range(5):
        await alice.request("/channel/send", {"name": "dev", "message": f"c{i}"})
    got = await events_of(bob, 35, kind=MESSAGES)
    assert [e["data"]["msg"] for e in got if e["event"] == "channel_message"] == [
        f"c{i}" for i in range(5)
    ]
    assert [e["data"]["msg"] for e in got if e["event"] == "message"] == [
        f"p{i}" for i in range(30)
    ]


async def test_catch_up_of_a_big_backlog_goes_at_the_clients_pace(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(max_outbound_buffer=64 * 1024)
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    for i in range(300):
        await alice.request("/send", {"name": "bob", "msg": f"{i:04d}" + "x" * 4000})
    await bob.request("/subscribe")  # 1.2 MB to catch up through a 64 KiB cap
    got = await events_of(bob, 300)
    assert [e["data"]["msg"][:4] for e in got] == [f"{i:04d}" for i in range(300)]
    assert await quiet(bob)


async def test_a_big_reply_in_the_buffer_does_not_count_against_the_push_cap(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(max_outbound_buffer=64 * 1024)
    # More than the kernel's socket buffers absorb (about 4 MB), so the reply waits in ours.
    COUNT = 400
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    for _ in range(COUNT):
        await alice.request("/send", {"name": "bob", "msg": "\U0001f600" * 4096})
    peer = await RawPeer.open(harness.port, receive_buffer=4096)
    peer.send({"op": "/subscribe", "id": 1, "token": bob.token})
    assert (await peer.reply())["code"] == 0
    for _ in range(COUNT):  # the catch-up, read but not acknowledged
        assert (await peer.reply())["event"] == "message"
    peer.send({"op": "/receive", "id": 3})  # the same 400 as a 6.5 MB reply, not read now
    await asyncio.sleep(0.2)
    await alice.request("/send", {"name": "bob", "msg": "pushed meanwhile"})
    reply = await peer.reply()
    assert reply["id"] == 3 and len(reply["data"]["messages"]["alice"]) == COUNT
    pushed = await peer.reply()
    assert pushed["event"] == "message" and pushed["data"]["msg"] == "pushed meanwhile"
    peer.close()


async def test_leaving_is_announced_to_the_leavers_other_devices(harness: Harness) -> None:
    phone = await subscribed(harness, "bob")
    laptop = await harness.connect(token=phone.token)
    await laptop.request("/subscribe")
    await phone.request("/channel/join", {"name": "dev"})
    await events_of(laptop, 1, kind="join")
    await phone.request("/channel/leave", {"name": "dev"})
    (left,) = await events_of(laptop, 1, kind="leave")
    assert left["data"] == {"channel": "dev", "name": "bob"}


async def test_integers_beyond_64_bits_are_bad_requests(harness: Harness) -> None:
    alice = await harness.user("alice")
    await alice.request("/channel/join", {"name": "dev"})
    for op, params in (
        ("/channel/history", {"name": "dev", "before": 2**63}),
        ("/ack", {"id": 2**64 - 1}),
        ("/history", {"name": "alice", "limit": 2**64 - 1}),
    ):
        assert (await alice.call(op, params))["code"] == 1


async def test_client_reconnect_binds_resubscribes_and_replays_what_was_not_acked(
    harness: Harness,
) -> None:
    alice = await harness.user("alice")
    bob = await subscribed(harness, "bob")
    first = await alice.request("/send", {"name": "bob", "msg": "before"})
    (event,) = await events_of(bob, 1, kind=MESSAGES)
    assert event["data"]["id"] == first["id"]  # seen, but not acknowledged
    await bob.reconnect()
    (again,) = await events_of(bob, 1, kind=MESSAGES)
    assert again["data"]["msg"] == "before"  # the renewed subscription replays it
    await bob.request("/ack", {"id": again["data"]["id"]})
    await alice.request("/send", {"name": "bob", "msg": "after"})
    (live,) = await events_of(bob, 1, kind=MESSAGES)
    assert live["data"]["msg"] == "after"
    assert (await bob.request("/user/info", {"name": "bob"}))["online"] is True


async def test_a_message_sent_as_a_fresh_member_subscribes_is_pushed(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    for round_number in range(15):
        channel = f"room{round_number}"
        await alice.request("/channel/join", {"name": channel})
        await bob.request("/channel/join", {"name": channel})  # no position yet
        # Sent while the subscription is still reading where each stream starts.
        sending = asyncio.ensure_future(
            alice.request("/channel/send", {"name": channel, "message": f"hi {round_number}"})
        )
        await bob.request("/subscribe")
        await sending
        (event,) = await events_of(bob, 1, kind="channel_message")
        assert event["data"]["msg"] == f"hi {round_number}"
        await bob.request("/unsubscribe")
        bob.waiting_events()  # drop join events
