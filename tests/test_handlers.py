"""Handlers called directly, without sockets: App.handle takes a decoded body and a session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chatd.app import App, PendingReply
from chatd.auth import Hasher
from chatd.codec import Malformed, Oversize
from chatd.config import Config
from chatd.handlers import OPS, Op
from chatd.hub import Hub, Session
from chatd.protocol import Data
from chatd.store import Store
from tests.conftest import PASSWORD


async def answer(app: App, session: Session, body: object) -> Data:
    """The reply, waiting for the commit when the op answers after one (sends)."""
    result = await app.handle(session, body)
    if isinstance(result, PendingReply):
        await result.wait()
        return result.result()
    return result


@pytest.fixture
async def app(config: Config) -> AsyncIterator[App]:
    store = await Store.open(config.db)
    hasher = Hasher(config)
    yield App(config, store, Hub(), hasher, clock=lambda: 1583410320.0)
    hasher.close()
    await store.close()


async def test_register_login_send_receive_without_a_socket(app: App) -> None:
    alice, bob = Session("alice-peer"), Session("bob-peer")
    for session, name in ((alice, "alice"), (bob, "bob")):
        params = {"name": name, "password": PASSWORD, "password_repete": PASSWORD}
        assert (await answer(app, session, {"op": "/register", "params": params}))["code"] == 0
        reply = await answer(
            app, session, {"op": "/login", "params": {"name": name, "password": PASSWORD}}
        )
        assert reply["code"] == 0
    pending = await app.handle(
        alice, {"op": "/send", "id": 1, "params": {"name": "bob", "msg": "hi"}}
    )
    assert isinstance(pending, PendingReply)  # a send is answered once its commit is done
    await pending.wait()
    sent = pending.result()
    assert sent == {
        "id": 1,
        "code": 0,
        "msg": "success",
        "data": {"id": 1, "datetime": "2020.03.05:12:12:00"},
    }
    got = await answer(app, bob, {"op": "/receive"})
    assert got["data"] == {"messages": {"alice": ["hi"]}, "more": False}
    assert app.hub.is_online(bob.user_id or 0)


async def test_decode_problems_map_to_codes(app: App) -> None:
    session = Session()
    assert (await answer(app, session, Malformed("x")))["code"] == 1
    assert (await answer(app, session, Oversize(10, 5)))["code"] == 7


async def test_unexpected_exception_becomes_code_9_without_details(
    app: App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setitem(OPS, "/ping", Op(broken, requires_auth=False))
    reply = await answer(app, Session(), {"op": "/ping", "id": 3})
    assert reply == {"id": 3, "code": 9, "msg": "server error"}
    assert "secret internal detail" in caplog.text  # logged with its traceback, not sent
