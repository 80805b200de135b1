"""chatcat's interactive shell in memory (scripted typing, the screen as lines) against a
real server: commands with nowhere to go, history lookups, resumed sessions, passwords
refused at the prompt, and reconnection when replies are lost, acks are lost, the token is
revoked or the subscription refused (test_chatcat.py has the common paths)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatd import handlers
from chatd.client import MAX_REPLY_SIZE, Client
from chatd.codec import FrameDecoder, encode_frame
from chatd.protocol import Data, Params
from chatd.shell import NOT_LOGGED_IN, Screen, run_session
from tests.conftest import PASSWORD, Harness, MakeHarness
from tests.test_chatcat import TIME, Keyboard, LinkProxy, Session, Transcript, session
from tests.test_cov_client import Peer


class Proxy(LinkProxy):
    """Between chatcat and the server, frame by frame: drops every link on demand (or on
    the first request of the op ``drop_at``), holds back the replies to the next
    ``held_sends`` /channel/send, and swallows /ack when told."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.held_sends = 0
        self.swallow_acks = False
        self.drop_at: str | None = None
        self.forwarded: list[dict[str, Any]] = []  # server to client

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self._upstream(writer)
        held: set[int] = set()
        await asyncio.gather(self._requests(reader, up_writer, held),
                             self._replies(up_reader, writer, held), return_exceptions=True)

    async def _requests(
        self, reader: asyncio.StreamReader, out: asyncio.StreamWriter, held: set[int]
    ) -> None:
        decoder = FrameDecoder()
        while data := await reader.read(65536):
            for body in decoder.feed(data):
                if body.get("op") == self.drop_at:
                    self.drop_at = None
                    self.drop_all()
                    return
                if body.get("op") == "/ack" and self.swallow_acks:
                    continue
                if body.get("op") == "/channel/send" and self.held_sends:
                    self.held_sends -= 1
                    held.add(body["id"])
                out.write(encode_frame(body))
        out.close()

    async def _replies(
        self, reader: asyncio.StreamReader, out: asyncio.StreamWriter, held: set[int]
    ) -> None:
        decoder = FrameDecoder(MAX_REPLY_SIZE)
        while data := await reader.read(65536):
            for body in decoder.feed(data):
                if body.get("id") not in held:
                    self.forwarded.append(body)
                    out.write(encode_frame(body))
        out.close()


async def proxied(harness: Harness) -> tuple[Proxy, int]:
    """A proxy to the harness's server, and its port."""
    proxy = Proxy(harness.port)
    return proxy, await proxy.start()


async def login(ann: Session, harness: Harness, name: str = "ann") -> None:
    await (await harness.connect()).request(
        "/register", {"name": name, "password": PASSWORD, "password_repete": PASSWORD})
    ann.keyboard.type(f"/login {name} {PASSWORD}")
    await ann.screen.expect(TIME + f"logged in as {name}")


async def test_commands_with_nowhere_to_go_are_refused_with_the_way_out(
    harness: Harness,
) -> None:
    async with session(harness) as ann:
        ann.keyboard.type("", "   ", "/leave", "/names", "hello?", "/history", "/help")
        await ann.screen.expect(TIME + "no current channel: /leave CHANNEL$")
        await ann.screen.expect(TIME + "no current channel: /names CHANNEL$")
        await ann.screen.expect(TIME + "not in a channel: /join one, /query NAME or /msg")
        await ann.screen.expect(TIME + "no current channel: /history #CHANNEL or /history NAME")
        await ann.screen.expect(TIME + "commands:$")
        await ann.screen.expect("^      /join CHANNEL")  # the help text, indented
        assert not [line for line in ann.screen.lines if "empty line" in line]  # blanks skipped
        ann.keyboard.type("/whois bob")  # before logging in: the server's refusal, retold
        await ann.screen.expect(TIME + NOT_LOGGED_IN + "$")


async def test_passwords_refused_at_the_prompt_send_nothing(harness: Harness) -> None:
    async with session(harness) as ann:
        ann.keyboard.type("/register ann", PASSWORD, "another password")
        await ann.screen.expect(TIME + "the passwords differ: nothing sent")
        ann.keyboard.type("/login ann", "")
        await ann.screen.expect(TIME + "no password: nothing sent")
        ann.keyboard.type("/login ann")
        ann.keyboard.typed.put_nowait(None)  # Ctrl-C or Ctrl-D at the password prompt
        await ann.screen.expect(TIME + "no password: nothing sent")
        ann.keyboard.type("/whois ann")
        await ann.screen.expect(TIME + NOT_LOGGED_IN)  # none of them registered or logged in
    checker = await harness.connect()
    assert (await checker.call("/login", {"name": "ann", "password": PASSWORD}))["code"] == 3


async def test_history_queries_notes_to_self_and_leaving(harness: Harness) -> None:
    await harness.user("bob")
    async with session(harness) as ann:
        await login(ann, harness)
        ann.keyboard.type("/list", "/history bob", "/history nobody")
        await ann.screen.expect(TIME + "you are in no channel: /join one$")
        await ann.screen.expect(TIME + "no messages with bob$")  # no channel bob: the user
        await ann.screen.expect(TIME + "error 5: no such channel$")  # neither: the channel's
        ann.keyboard.type("/join lobby", "/history", "/query bob hi bob", "/history")
        await ann.screen.expect(TIME + "no messages in lobby$")
        await ann.screen.expect(TIME + "talking privately with bob")
        await ann.screen.expect(TIME + "ann -> bob: hi bob$")  # sent with /query
        await ann.screen.expect(TIME + "ann -> bob: hi bob$")  # /history of the query
        ann.keyboard.type("/msg ann note to self", "/query", "/leave")
        await ann.screen.expect(TIME + "ann -> ann: note to self$")
        await ann.screen.expect(TIME + "left lobby; /join a channel to talk$")
        await ann.prompt("> ")
        assert sum("note to self" in line for line in ann.screen.lines) == 1  # the event only


async def test_logging_in_as_an_account_outside_the_channel_drops_it(harness: Harness) -> None:
    await harness.user("bob")
    async with session(harness) as ann:
        await login(ann, harness)
        ann.keyboard.type("/join lobby", "/logout", f"/login bob {PASSWORD}")
        await ann.screen.expect(TIME + "logged in as bob")
        await ann.screen.expect(TIME + "not a member of lobby: /join it to talk there$")
        await ann.prompt("> ")


async def test_a_session_resumed_with_a_token_learns_its_name(
    harness: Harness,
) -> None:
    ann, bob = await harness.user("ann"), await harness.user("bob")
    client = await Client.connect("127.0.0.1", harness.port, token=ann.token, timeout=10)
    resumed = Session(client)
    try:
        await resumed.screen.expect(TIME + "logged in as ann; your channels: none yet$")
        await ann.request("/send", {"name": "bob", "msg": "from elsewhere"})
        await resumed.screen.expect(TIME + "ann -> bob: from elsewhere$")  # the copy
        resumed.keyboard.type("/msg bob and from here")
        await resumed.screen.expect(TIME + "ann -> bob: and from here$")  # not "you ->"
        history = await bob.request("/history", {"name": "ann"})
        assert [m["msg"] for m in history["messages"]] == ["from elsewhere", "and from here"]
        resumed.keyboard.typed.put_nowait(None)  # the end of input ends the session
        async with asyncio.timeout(20):
            assert await resumed.task == 0
    finally:
        resumed.task.cancel()
        await client.close()


async def test_a_server_that_cannot_say_whose_token_it_is_still_logs_in(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A chatd from before "/user/info without a name": it asks for the name (code 1).
    async def named_only(ctx: handlers.Context, params: Params) -> Data:
        params.text("name", 100)
        raise AssertionError("chatcat asked about someone by name")

    monkeypatch.setitem(handlers.OPS, "/user/info", handlers.Op(named_only))
    ann = await harness.user("ann")
    client = await Client.connect("127.0.0.1", harness.port, token=ann.token, timeout=10)
    resumed = Session(client)
    try:
        await resumed.screen.expect(TIME + "logged in; your channels: none yet$")  # no name
        resumed.keyboard.type("/join lobby")
        await resumed.screen.expect(TIME + "talking in lobby$")
        await resumed.quit()
    finally:
        resumed.task.cancel()
        await client.close()


async def test_a_refused_token_at_start_says_to_log_in_once(harness: Harness) -> None:
    client = await Client.connect("127.0.0.1", harness.port, token="not-a-token", timeout=10)
    refused = Session(client)
    try:
        # One sentence; it was the server's "...: log in again" and then "(the token was not
        # accepted: /login)", the same thing twice.
        await refused.screen.expect(TIME + r"the token given was refused \(invalid, expired or "
                                    r"revoked\): /login NAME to log in$")
        refused.keyboard.type("/list")  # the token forgotten: not sent, refused, again
        await refused.screen.expect(TIME + NOT_LOGGED_IN + "$")
        assert sum("log in" in line for line in refused.screen.lines) == 1
        await refused.quit()
    finally:
        refused.task.cancel()
        await client.close()


async def test_a_connection_lost_during_the_login_with_a_token_is_reconnected(
    harness: Harness,
) -> None:
    # The link drops as chatcat starts its session with the token given: the follower
    # reconnects, and the login goes on. It waited for a reconnection that nothing made
    # (the follower started only after the login), and chatcat hung until Ctrl-C.
    ann, bob = await harness.user("ann"), await harness.user("bob")
    for user in (ann, bob):
        await user.request("/channel/join", {"name": "lobby"})
    proxy, port = await proxied(harness)
    proxy.drop_at = "/channel/list"
    client = await Client.connect("127.0.0.1", port, token=ann.token, timeout=10)
    resumed = Session(client)
    try:
        await resumed.screen.expect(TIME + "logged in as ann; your channels: lobby$")
        resumed.keyboard.type("/list")  # run once the login has subscribed
        await resumed.screen.expect(TIME + "lobby: 0 unread$")
        await bob.request("/channel/send", {"name": "lobby", "message": "still here"})
        await resumed.screen.expect(TIME + r"\[lobby\] bob: still here$")
        await resumed.quit()
    finally:
        resumed.task.cancel()
        await client.close()
        await proxy.close()


async def test_a_token_accepted_at_start_but_refused_a_subscription_is_not_blamed(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(subscribe_burst=1, subscribe_rate=0.001)
    ann = await harness.user("ann")
    await ann.request("/subscribe")  # takes the one allowed
    client = await Client.connect("127.0.0.1", harness.port, token=ann.token, timeout=10)
    resumed = Session(client)
    try:
        await resumed.screen.expect(TIME + "logged in as ann; your channels: none yet$")
        await resumed.screen.expect(TIME + "error 8: ")
        assert not [line for line in resumed.screen.lines if "token" in line]
        await resumed.quit()
    finally:
        resumed.task.cancel()
        await client.close()


async def test_a_line_typed_after_logout_says_how_to_log_in(harness: Harness) -> None:
    async with session(harness) as ann:
        await login(ann, harness)
        ann.keyboard.type("/join lobby", "/logout", "still there?")
        await ann.screen.expect(TIME + r"logged out \(/login to come back\)$")
        # chatcat's words, not the server's ("...or a token with the request").
        await ann.screen.expect(TIME + "not logged in: /login NAME first, or /register NAME "
                                "for a new account$")
        assert not [line for line in ann.screen.lines if "token" in line]


# Reconnection.


async def test_a_reply_lost_twice_is_waited_out_and_the_message_stored_once(
    harness: Harness,
) -> None:
    bob = await harness.user("bob")
    await bob.request("/channel/join", {"name": "lobby"})
    proxy, port = await proxied(harness)
    client = await Client.connect("127.0.0.1", port, timeout=1)
    ann = Session(client)
    try:
        await login(ann, harness)
        ann.keyboard.type("/join lobby")
        await ann.prompt("#lobby> ")
        proxy.held_sends = 2  # no reply twice: the client times out, twice
        ann.keyboard.type("patience")
        await ann.screen.expect(TIME + 'not connected: your line "patience" will go out once '
                                "reconnected$")
        await ann.screen.expect(TIME + r"\[lobby\] ann: patience$", timeout=30)
        assert sum("not connected" in line for line in ann.screen.lines) == 1  # said once
        assert sum("connection to test lost" in line for line in ann.screen.lines) == 2
        history = await bob.request("/channel/history", {"name": "lobby"})
        assert [m["msg"] for m in history["messages"]] == ["patience"]  # sent 3 times
        await ann.quit()
    finally:
        ann.task.cancel()
        await client.close()
        await proxy.close()


async def test_a_message_whose_ack_was_lost_is_not_shown_again(harness: Harness) -> None:
    bob = await harness.user("bob")
    proxy, port = await proxied(harness)
    try:
        async with session(harness, port) as ann:
            await login(ann, harness)
            proxy.swallow_acks = True
            await bob.request("/send", {"name": "ann", "msg": "only once please"})
            await ann.screen.expect(TIME + "bob -> ann: only once please$")
            proxy.swallow_acks = False  # the replay is acknowledged on the new connection
            proxy.drop_all()
            await ann.screen.expect(TIME + r"reconnected to test \(session and subscription")
            await bob.request("/send", {"name": "ann", "msg": "after"})
            await ann.screen.expect(TIME + "bob -> ann: after$")
            replayed = [f for f in proxy.forwarded
                        if (f.get("data") or {}).get("msg") == "only once please"]
            assert len(replayed) == 2  # the server did push it again
            assert sum("only once please" in line for line in ann.screen.lines) == 1
    finally:
        await proxy.close()


async def test_a_session_revoked_while_away_asks_to_log_in_again(harness: Harness) -> None:
    proxy, port = await proxied(harness)
    client = await Client.connect("127.0.0.1", port, timeout=10)
    ann = Session(client)
    try:
        await login(ann, harness)
        elsewhere = await harness.connect(token=client.token)
        await elsewhere.request("/logout")  # revokes the token this session uses
        proxy.drop_all()
        await ann.screen.expect(TIME + "reconnected to test, but the session has ended "
                                "\\(token expired or revoked\\): /login again")
        ann.keyboard.type(f"/login ann {PASSWORD}")
        await ann.screen.expect(TIME + "logged in as ann")
        await ann.quit()
    finally:
        ann.task.cancel()
        await client.close()
        await proxy.close()


async def test_a_subscription_refused_on_reconnection_is_said(make_harness: MakeHarness) -> None:
    harness = await make_harness(subscribe_burst=1, subscribe_rate=0.001)
    proxy, port = await proxied(harness)
    try:
        async with session(harness, port) as ann:
            await login(ann, harness)  # its /subscribe takes the one allowed
            ann.keyboard.type("/list")  # commands run in turn: listed once /login has subscribed
            await ann.screen.expect(TIME + "you are in no channel")
            proxy.drop_all()
            await ann.screen.expect(TIME + "reconnected to test; error 8: ")
    finally:
        await proxy.close()


async def test_a_follower_that_fails_ends_the_session_with_its_error() -> None:
    peer = Peer()
    await peer.start()
    client = await Client.connect("127.0.0.1", peer.port, timeout=10)
    screen = Transcript()
    running = asyncio.create_task(run_session(client, "peer", Keyboard(), Screen(screen.write)))
    try:
        _, writer = await peer.links.get()
        writer.write(encode_frame({"event": "typing", "data": {"name": "bob"}})
                     + encode_frame({"event": "presence", "data": {"name": "bob",
                                                                    "online": True}}))
        await screen.expect(TIME + r"\* bob is online$")
        writer.write(encode_frame({"event": "message", "data": {"name": "bob"}}))  # no id
        with pytest.raises(KeyError):
            async with asyncio.timeout(10):
                await running  # not a shell left without its follower
        assert not [line for line in screen.lines if "typing" in line]  # unknown: not shown
    finally:
        running.cancel()
        await client.close()
        await peer.close()

