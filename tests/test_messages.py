"""/user/info, /send and /receive over real sockets."""

from __future__ import annotations

import asyncio
import re

import pytest

from chatd.client import Client
from chatd.errors import BadRequest, Forbidden, NotFound, TooLarge
from tests.conftest import Harness, MakeHarness

DATETIME = re.compile(r"^\d{4}\.\d{2}\.\d{2}:\d{2}:\d{2}:\d{2}$")


async def test_user_info_shows_name_registration_and_presence(harness: Harness) -> None:
    alice = await harness.user("alice")
    await harness.user("bob")
    data = await alice.request("/user/info", {"name": "BOB"})
    assert data["name"] == "bob"
    assert DATETIME.match(data["registered"])
    assert data["online"] is True


async def test_user_info_online_goes_false_when_the_last_session_closes(
    harness: Harness,
) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    await bob.close()
    # The server notices the close asynchronously; a round trip on alice's connection
    # after bob's FIN is not enough ordering, so poll with a bound.
    for _ in range(100):
        if not (await alice.request("/user/info", {"name": "bob"}))["online"]:
            break
    assert (await alice.request("/user/info", {"name": "bob"}))["online"] is False


async def test_user_info_unknown_is_not_found(harness: Harness) -> None:
    alice = await harness.user("alice")
    with pytest.raises(NotFound):
        await alice.request("/user/info", {"name": "nobody"})


async def test_send_then_receive_groups_by_sender_oldest_first(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    carol = await harness.user("carol")
    first = await alice.request("/send", {"name": "carol", "msg": "a1"})
    await bob.request("/send", {"name": "carol", "msg": "b1"})
    await alice.request("/send", {"name": "carol", "msg": "a2"})
    assert DATETIME.match(first["datetime"]) and isinstance(first["id"], int)
    data = await carol.request("/receive", {"name": "carol"})
    assert data == {"messages": {"alice": ["a1", "a2"], "bob": ["b1"]}, "more": False}
    assert list(data["messages"]) == ["alice", "bob"]


async def test_received_messages_never_come_back(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    await alice.request("/send", {"name": "bob", "msg": "once"})
    assert (await bob.request("/receive"))["messages"] == {"alice": ["once"]}
    assert (await bob.request("/receive"))["messages"] == {}
    await alice.request("/send", {"name": "bob", "msg": "twice"})
    assert (await bob.request("/receive"))["messages"] == {"alice": ["twice"]}


async def test_message_ids_only_grow(harness: Harness) -> None:
    alice = await harness.user("alice")
    await harness.user("bob")
    ids = [(await alice.request("/send", {"name": "bob", "msg": str(i)}))["id"] for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5


async def test_receive_of_someone_else_is_forbidden(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    await alice.request("/send", {"name": "bob", "msg": "private"})
    with pytest.raises(Forbidden):
        await alice.request("/receive", {"name": "bob"})
    assert (await bob.request("/receive"))["messages"] == {"alice": ["private"]}


async def test_receive_is_paged_with_more(make_harness: MakeHarness) -> None:
    harness = await make_harness(receive_batch=3)
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    for i in range(7):
        await alice.request("/send", {"name": "bob", "msg": f"m{i}"})
    pages = []
    while True:
        data = await bob.request("/receive")
        pages.append(data["messages"].get("alice", []))
        if not data["more"]:
            break
    assert pages == [["m0", "m1", "m2"], ["m3", "m4", "m5"], ["m6"]]


async def test_send_to_unknown_user_is_not_found(harness: Harness) -> None:
    alice = await harness.user("alice")
    with pytest.raises(NotFound):
        await alice.request("/send", {"name": "ghost", "msg": "hello?"})


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"name": "bob", "msg": ""}, BadRequest),
        ({"name": "bob"}, BadRequest),
        ({"name": "bob", "msg": 42}, BadRequest),
        ({"name": "bob", "msg": "x" * 4097}, TooLarge),
        ({"name": "bob", "msg": "hi", "client_id": "c" * 65}, TooLarge),
        ({"msg": "hi"}, BadRequest),
    ],
)
async def test_send_rejects_bad_input(
    harness: Harness, params: dict[str, object], error: type[Exception]
) -> None:
    alice = await harness.user("alice")
    await harness.user("bob")
    with pytest.raises(error):
        await alice.request("/send", params)


async def test_longest_message_is_accepted_whole(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    text = "é" * 4096
    await alice.request("/send", {"name": "bob", "msg": text})
    assert (await bob.request("/receive"))["messages"] == {"alice": [text]}


async def test_send_with_client_id_is_stored_once(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    first = await alice.request("/send", {"name": "bob", "msg": "hi", "client_id": "k1"})
    again = await alice.request("/send", {"name": "bob", "msg": "hi", "client_id": "k1"})
    assert again == first
    assert (await bob.request("/receive"))["messages"] == {"alice": ["hi"]}


async def test_messages_to_offline_users_wait(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    await bob.close()
    await alice.request("/send", {"name": "bob", "msg": "while you were out"})
    bob_again = await harness.connect()
    await bob_again.login("bob", "correct horse battery")
    assert (await bob_again.request("/receive"))["messages"] == {"alice": ["while you were out"]}


async def test_two_clients_at_once_interleave_without_mixups(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")

    async def chat(me: Client, other: str, count: int) -> None:
        for i in range(count):
            await me.request("/send", {"name": other, "msg": f"{i}"})

    await asyncio.gather(chat(alice, "bob", 50), chat(bob, "alice", 50))
    assert (await bob.request("/receive"))["messages"] == {"alice": [str(i) for i in range(50)]}
    assert (await alice.request("/receive"))["messages"] == {"bob": [str(i) for i in range(50)]}


async def test_replies_larger_than_the_request_limit_reach_the_client(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    text = "\U0001f600" * 4096  # 16 KiB of UTF-8 per message
    for _ in range(40):
        await alice.request("/send", {"name": "bob", "msg": text})
    data = await bob.request("/receive")
    assert data["messages"]["alice"] == [text] * 40  # a reply of about 650 KiB
