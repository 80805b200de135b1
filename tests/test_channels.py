"""/channel/send, /channel/receive and /channel/list_users over real sockets."""

from __future__ import annotations

import pytest

from chatd.errors import BadRequest, NotFound, TooLarge
from tests.conftest import Harness, MakeHarness
from tests.test_messages import DATETIME


async def test_channel_is_created_on_first_send_and_members_join_by_using_it(
    harness: Harness,
) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    await harness.user("carol")
    sent = await alice.request("/channel/send", {"name": "general", "message": "hello"})
    assert isinstance(sent["id"], int) and DATETIME.match(sent["datetime"])
    await bob.request("/channel/receive", {"name": "General"})
    data = await alice.request("/channel/list_users", {"name": "general"})
    assert data == {"users": [{"name": "alice", "online": True}, {"name": "bob", "online": True}]}


async def test_first_receive_gets_the_latest_backlog_then_only_new(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(channel_backlog=3)
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    for i in range(5):
        await alice.request("/channel/send", {"name": "dev", "message": f"m{i}"})
    first = await bob.request("/channel/receive", {"name": "dev"})
    assert [m["msg"] for m in first["messages"]] == ["m2", "m3", "m4"]
    assert first["more"] is False
    assert (await bob.request("/channel/receive", {"name": "dev"}))["messages"] == []
    await alice.request("/channel/send", {"name": "dev", "message": "m5"})
    await bob.request("/channel/send", {"name": "dev", "message": "m6"})
    later = await bob.request("/channel/receive", {"name": "dev"})
    assert [(m["name"], m["msg"]) for m in later["messages"]] == [("alice", "m5")]  # not bob's


async def test_channel_messages_carry_id_name_datetime_msg(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    sent = await alice.request("/channel/send", {"name": "dev", "message": "hi"})
    (message,) = (await bob.request("/channel/receive", {"name": "dev"}))["messages"]
    assert message == {"id": sent["id"], "name": "alice", "datetime": sent["datetime"], "msg": "hi"}


async def test_channel_receive_pages_with_more(make_harness: MakeHarness) -> None:
    harness = await make_harness(receive_batch=2)
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    await bob.request("/channel/receive", {"name": "dev"})  # joins; backlog is empty
    for i in range(5):
        await alice.request("/channel/send", {"name": "dev", "message": f"m{i}"})
    pages = []
    while True:
        data = await bob.request("/channel/receive", {"name": "dev"})
        pages.append([m["msg"] for m in data["messages"]])
        if not data["more"]:
            break
    assert pages == [["m0", "m1"], ["m2", "m3"], ["m4"]]


async def test_each_member_has_their_own_position(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    carol = await harness.user("carol")
    for client in (bob, carol):
        await client.request("/channel/receive", {"name": "dev"})
    await alice.request("/channel/send", {"name": "dev", "message": "one"})
    assert len((await bob.request("/channel/receive", {"name": "dev"}))["messages"]) == 1
    await alice.request("/channel/send", {"name": "dev", "message": "two"})
    carol_sees = await carol.request("/channel/receive", {"name": "dev"})
    assert [m["msg"] for m in carol_sees["messages"]] == ["one", "two"]


async def test_list_users_of_unknown_channel_is_not_found(harness: Harness) -> None:
    alice = await harness.user("alice")
    with pytest.raises(NotFound):
        await alice.request("/channel/list_users", {"name": "nowhere"})


@pytest.mark.parametrize(
    ("op", "params", "error"),
    [
        ("/channel/send", {"name": "dev", "message": ""}, BadRequest),
        ("/channel/send", {"name": "dev", "msg": "wrong key"}, BadRequest),
        ("/channel/send", {"name": "dev", "message": "x" * 4097}, TooLarge),
        ("/channel/send", {"name": "bad name", "message": "x"}, BadRequest),
        ("/channel/send", {"name": "c" * 33, "message": "x"}, TooLarge),
        ("/channel/receive", {}, BadRequest),
        ("/channel/receive", {"name": ["dev"]}, BadRequest),
        ("/channel/list_users", {"name": None}, BadRequest),
    ],
)
async def test_channel_ops_reject_bad_input(
    harness: Harness, op: str, params: dict[str, object], error: type[Exception]
) -> None:
    alice = await harness.user("alice")
    with pytest.raises(error):
        await alice.request(op, params)


async def test_channel_send_with_client_id_is_stored_once(harness: Harness) -> None:
    alice = await harness.user("alice")
    params = {"name": "dev", "message": "hi", "client_id": "retry-1"}
    assert await alice.request("/channel/send", params) == await alice.request(
        "/channel/send", params
    )
    assert len((await alice.request("/channel/history", {"name": "dev"}))["messages"]) == 1


async def test_zero_backlog_first_receive_skips_history_for_good(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(channel_backlog=0)
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    for i in range(3):
        await alice.request("/channel/send", {"name": "dev", "message": f"old{i}"})
    assert (await bob.request("/channel/receive", {"name": "dev"}))["messages"] == []
    await alice.request("/channel/send", {"name": "dev", "message": "new"})
    later = await bob.request("/channel/receive", {"name": "dev"})
    assert [m["msg"] for m in later["messages"]] == ["new"]
