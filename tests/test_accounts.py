"""/register, /login, /logout, /ping, tokens and the auth gate, over real sockets."""

from __future__ import annotations

import pytest

from chatd.errors import (
    BadCredentials,
    BadRequest,
    NameTaken,
    NotAuthenticated,
    TooLarge,
)
from tests.conftest import PASSWORD, Harness, MakeHarness


def registration(name: str, password: str = PASSWORD, repeat: str | None = None) -> dict[str, str]:
    return {"name": name, "password": password, "password_repete": repeat or password}


async def test_register_returns_no_data_then_login_returns_a_token(harness: Harness) -> None:
    client = await harness.connect()
    reply = await client.call("/register", registration("alice"))
    assert reply == {"id": reply["id"], "code": 0, "msg": "success"}
    data = await client.request("/login", {"name": "alice", "password": PASSWORD})
    assert data["name"] == "alice"
    assert isinstance(data["token"], str) and len(data["token"]) == 43


FULLWIDTH_ALICE = "\uff41\uff4c\uff49\uff43\uff45"


@pytest.mark.parametrize("taken", ["alice", "ALICE", "Alice", FULLWIDTH_ALICE])
async def test_names_are_unique_case_insensitively(harness: Harness, taken: str) -> None:
    client = await harness.connect()
    await client.request("/register", registration("alice"))
    with pytest.raises(NameTaken):
        await client.request("/register", registration(taken))


@pytest.mark.parametrize(
    ("params", "error"),
    [
        (registration("bob", repeat="something else"), BadRequest),
        (registration("bob", password="short", repeat="short"), BadRequest),
        (registration("bob", password="p" * 1025), TooLarge),
        (registration(""), BadRequest),
        (registration("b" * 33), TooLarge),
        (registration("has space"), BadRequest),
        (registration("semi;colon"), BadRequest),
        ({"name": "bob", "password": PASSWORD}, BadRequest),  # password_repete missing
        ({"name": 7, "password": PASSWORD, "password_repete": PASSWORD}, BadRequest),
    ],
)
async def test_register_rejects_bad_input(
    harness: Harness, params: dict[str, object], error: type[Exception]
) -> None:
    client = await harness.connect()
    with pytest.raises(error):
        await client.request("/register", params)


async def test_name_rules_accept_letters_digits_and_punctuation(harness: Harness) -> None:
    client = await harness.connect()
    for name in ("a", "b" * 32, "x_y-z.0", "zoë", "日本"):
        await client.request("/register", registration(name))
        await client.login(name, PASSWORD)


async def test_unknown_name_and_wrong_password_look_the_same(harness: Harness) -> None:
    client = await harness.connect()
    await client.request("/register", registration("alice"))
    wrong_password = await client.call("/login", {"name": "alice", "password": "not it at all"})
    unknown_name = await client.call("/login", {"name": "nobody", "password": PASSWORD})
    assert wrong_password["code"] == unknown_name["code"] == 3
    assert wrong_password["msg"] == unknown_name["msg"]
    with pytest.raises(BadCredentials):
        await client.request("/login", {"name": "alice", "password": "not it at all"})


async def test_login_is_case_insensitive_and_reports_the_registered_spelling(
    harness: Harness,
) -> None:
    client = await harness.connect()
    await client.request("/register", registration("Alice"))
    data = await client.request("/login", {"name": "aLiCe", "password": PASSWORD})
    assert data["name"] == "Alice"


@pytest.mark.parametrize(
    "op", ["/logout", "/user/info", "/send", "/receive", "/channel/send",
           "/channel/receive", "/channel/list_users"],
)
async def test_every_other_op_needs_a_bound_connection(harness: Harness, op: str) -> None:
    client = await harness.connect()
    reply = await client.call(op, {"name": "x", "msg": "m", "message": "m"})
    assert reply["code"] == 2


async def test_ping_needs_no_login(harness: Harness) -> None:
    client = await harness.connect()
    assert await client.call("/ping") == {"id": 1, "code": 0, "msg": "success"}


async def test_a_token_binds_a_fresh_connection(harness: Harness) -> None:
    alice = await harness.user("alice")
    assert alice.token is not None
    again = await harness.connect(token=alice.token)
    data = await again.request("/user/info", {"name": "alice"})
    assert data["name"] == "alice"


async def test_user_info_without_a_name_is_the_callers_own(harness: Harness) -> None:
    again = await harness.connect(token=(await harness.user("bob")).token)
    data = await again.request("/user/info")  # a client started from a saved token
    assert data["name"] == "bob" and data["online"] is True
    with pytest.raises(NotAuthenticated):  # nobody's, unbound
        await (await harness.connect()).request("/user/info")
    assert (await again.request("/user/info", {"name": None}))["name"] == "bob"  # nil: absent
    with pytest.raises(BadRequest):  # a name given must still be a name
        await again.request("/user/info", {"name": 5})


async def test_a_bad_token_is_refused_even_on_ping(harness: Harness) -> None:
    client = await harness.connect(token="x" * 43)
    assert (await client.call("/ping"))["code"] == 2
    with pytest.raises(NotAuthenticated):
        await client.request("/user/info", {"name": "x"})


async def test_a_stale_token_does_not_block_login_or_register(harness: Harness) -> None:
    client = await harness.connect(token="stale")
    await client.request("/register", registration("carol"))
    await client.login("carol", PASSWORD)
    await client.request("/user/info", {"name": "carol"})


async def test_logout_revokes_the_token_everywhere(harness: Harness) -> None:
    alice = await harness.user("alice")
    token = alice.token
    other_device = await harness.connect(token=token)
    await other_device.request("/ping")  # binds
    await alice.request("/logout")
    alice.token = None
    for client in (alice, other_device):
        with pytest.raises(NotAuthenticated):
            await client.request("/user/info", {"name": "alice"})
    fresh = await harness.connect(token=token)
    with pytest.raises(NotAuthenticated):
        await fresh.request("/user/info", {"name": "alice"})


async def test_logout_leaves_other_tokens_alone(harness: Harness) -> None:
    phone = await harness.user("alice")
    laptop = await harness.connect()
    await laptop.login("alice", PASSWORD)
    await phone.request("/logout")
    await laptop.request("/user/info", {"name": "alice"})


async def test_expired_token_is_refused(make_harness: MakeHarness) -> None:
    harness = await make_harness(token_ttl=1)
    alice = await harness.user("alice")
    token = alice.token
    harness.server.app.clock = lambda: 10**12  # far in the future
    with pytest.raises(NotAuthenticated):
        await alice.request("/user/info", {"name": "alice"})
    fresh = await harness.connect(token=token)
    with pytest.raises(NotAuthenticated):
        await fresh.request("/ping")


async def test_a_bad_token_unbinds_the_connection(harness: Harness) -> None:
    alice = await harness.user("alice")
    good = alice.token
    alice.token = "forged"
    assert (await alice.call("/ping"))["code"] == 2
    alice.token = None
    assert (await alice.call("/user/info", {"name": "alice"}))["code"] == 2
    alice.token = good
    await alice.request("/user/info", {"name": "alice"})


async def test_names_in_scripts_with_combining_marks(harness: Harness) -> None:
    client = await harness.connect()
    await client.request("/register", registration("हिन्दी"))
    await client.login("हिन्दी", PASSWORD)
