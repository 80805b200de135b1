"""The IRC front-end in memory: bytes in, lines out, over a real store and hub, no sockets."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import AsyncIterator

import pytest

from chatd.app import App
from chatd.auth import Hasher
from chatd.config import Config
from chatd.hub import Hub, Session
from chatd.irc import session as irc_session
from chatd.irc.lines import format_line
from chatd.irc.session import IrcCore
from tests.conftest import PASSWORD
from tests.test_handlers import answer

SERVER = "irc.test"
NOW = 1583410320.0  # 2020-03-05 12:12:00 UTC
CAP_LS = (
    f":{SERVER} CAP * LS :account-tag batch draft/chathistory draft/read-marker echo-message"
    " labeled-response message-tags sasl=PLAIN server-time"
)


class Clock:
    """The app's clock, set by the tests that need time to pass."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def clock_of(app: App) -> Clock:
    assert isinstance(app.clock, Clock)
    return app.clock


class MemoryTransport:
    def __init__(self) -> None:
        self.data = b""
        self.probes = 0
        self.aborted: str | None = None

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None

    def abort(self, reason: str) -> None:
        self.aborted = reason

    def probe_soon(self) -> None:
        self.probes += 1


class Irc:
    """One IRC client's view: feed it lines, read back what the server wrote."""

    def __init__(self, app: App) -> None:
        self.transport = MemoryTransport()
        self.core = IrcCore(app, self.transport, "127.0.0.1", 1)

    async def send(self, *lines: str | bytes) -> list[str]:
        data = b"".join(
            (line if isinstance(line, bytes) else line.encode()) + b"\r\n" for line in lines
        )
        await self.core.receive(data)
        return self.take()

    def take(self) -> list[str]:
        out, self.transport.data = self.transport.data, b""
        assert out == b"" or out.endswith(b"\r\n")
        return out.decode().split("\r\n")[:-1]

    async def login(self, name: str, caps: str = "") -> list[str]:
        """Registration with CAP and SASL PLAIN, as WeeChat does it."""
        await self.send("CAP LS 302", f"NICK {name}", f"USER {name} 0 * :{name}")
        await self.send(f"CAP REQ :sasl {caps}".rstrip())
        await self.send("AUTHENTICATE PLAIN")
        token = base64.b64encode(f"\0{name}\0{PASSWORD}".encode()).decode()
        await self.send(f"AUTHENTICATE {token}")
        return await self.send("CAP END")


@pytest.fixture
async def app(config: Config) -> AsyncIterator[App]:
    from chatd.store import Store

    config = dataclasses.replace(config, server_name=SERVER)
    store = await Store.open(config.db)
    hasher = Hasher(config)
    app = App(config, store, Hub(), hasher, clock=Clock())
    yield app
    for session in app.hub.bound_sessions():
        app.hub.unbind(session)  # stops catch-ups before the store closes
    hasher.close()
    await store.close()


async def register(app: App, *names: str) -> None:
    for name in names:
        params = {"name": name, "password": PASSWORD, "password_repete": PASSWORD}
        reply = await answer(app, Session(), {"op": "/register", "params": params})
        assert reply["code"] == 0, reply


async def msgpack_user(app: App, name: str) -> Session:
    session = Session()
    params = {"name": name, "password": PASSWORD}
    reply = await answer(app, session, {"op": "/login", "params": params})
    assert reply["code"] == 0
    return session


async def test_cap_ls_302_lists_capabilities_with_values(app: App) -> None:
    irc = Irc(app)
    assert await irc.send("CAP LS 302") == [CAP_LS]
    assert (await irc.send("CAP LS"))[0].endswith(" sasl server-time")


async def test_registration_with_cap_and_sasl_welcomes_byte_exact(app: App) -> None:
    await register(app, "alice")
    irc = Irc(app)
    assert await irc.send("CAP LS 302", "NICK alice", "USER alice 0 * :Alice") == [
        CAP_LS
    ]  # CAP LS holds registration: no 001 yet
    assert await irc.send("CAP REQ :sasl server-time") == [
        f":{SERVER} CAP alice ACK :sasl server-time"
    ]
    assert await irc.send("AUTHENTICATE PLAIN") == ["AUTHENTICATE +"]
    token = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    assert await irc.send(f"AUTHENTICATE {token}") == [
        f":{SERVER} 900 alice alice!alice@chatd alice :You are now logged in as alice",
        f":{SERVER} 903 alice :SASL authentication successful",
    ]
    welcome = await irc.send("CAP END")
    assert welcome[0] == (
        f":{SERVER} 001 alice :Welcome to the {SERVER} IRC network, alice!alice@chatd"
    )
    assert [line.split()[1] for line in welcome] == [
        "001", "002", "003", "004", "005", "005", "422"
    ]
    isupport = welcome[4] + welcome[5]  # 12 tokens a line at most
    for token in (
        "CASEMAPPING=ascii", "CHANTYPES=#", "CHANLIMIT=#:100", "NICKLEN=32", "CHANNELLEN=33",
        "PREFIX=", "CHANMODES=,,,", f"NETWORK={SERVER}", "UTF8ONLY", "CHATHISTORY=200",
        "MSGREFTYPES=msgid,timestamp", "SAFELIST",
    ):
        assert f" {token} " in isupport
    assert all(line.endswith(":are supported by this server") for line in welcome[4:6])
    assert welcome[6] == f":{SERVER} 422 alice :MOTD File is missing"


async def test_registration_without_cap_uses_pass(app: App) -> None:
    await register(app, "alice")
    irc = Irc(app)
    assert await irc.send(f"PASS :alice:{PASSWORD}", "NICK alice") == []
    welcome = await irc.send("USER alice 0 * :Alice")
    assert welcome[0].startswith(f":{SERVER} 001 alice ")
    # PASS with the bare password logs in the account named as the nick.
    irc = Irc(app)
    welcome = await irc.send(f"PASS :{PASSWORD}", "NICK alice", "USER a 0 * :A")
    assert welcome[0].startswith(f":{SERVER} 001 alice ")


async def test_wrong_pass_gets_464_and_stays_unregistered(app: App) -> None:
    await register(app, "alice")
    irc = Irc(app)
    assert await irc.send("PASS alice:wrong-password", "NICK alice", "USER a 0 * :A") == [
        f":{SERVER} 464 alice :Password incorrect"
    ]
    assert await irc.send("JOIN #x") == [f":{SERVER} 451 alice :You have not registered"]


async def test_sasl_failure_is_904_and_registration_waits(app: App) -> None:
    await register(app, "alice")
    irc = Irc(app)
    await irc.send("CAP LS 302", "CAP REQ sasl", "NICK alice", "USER a 0 * :A")
    assert await irc.send("AUTHENTICATE PLAIN") == ["AUTHENTICATE +"]
    bad = base64.b64encode(b"\0alice\0not the password").decode()
    assert await irc.send(f"AUTHENTICATE {bad}") == [
        f":{SERVER} 904 alice :SASL authentication failed"
    ]
    assert await irc.send("AUTHENTICATE SCRAM-SHA-256") == [
        f":{SERVER} 908 alice PLAIN :are available SASL mechanisms",
        f":{SERVER} 904 alice :SASL authentication failed",
    ]
    assert await irc.send("AUTHENTICATE PLAIN", "AUTHENTICATE *") == [
        "AUTHENTICATE +",
        f":{SERVER} 906 alice :SASL authentication aborted",
    ]
    # CAP END without an account: the nick is an account, so 433, and no welcome.
    refused = await irc.send("CAP END")
    assert refused == [
        f":{SERVER} 433 alice alice :Nickname is registered to an account: authenticate"
        " (SASL PLAIN, or PASS name:password)"
    ]


async def test_unknown_nick_without_login_is_refused_when_guests_are_off(app: App) -> None:
    irc = Irc(app)
    assert await irc.send("NICK nobody", "USER n 0 * :N") == [
        f":{SERVER} FAIL * ACCOUNT_REQUIRED :Log in first: SASL PLAIN, or PASS name:password"
    ]


async def test_nick_is_forced_to_the_account_and_cannot_change(app: App) -> None:
    await register(app, "alice")
    irc = Irc(app)
    await irc.send("CAP LS 302", "NICK somebody", "USER a 0 * :A", "CAP REQ sasl")
    await irc.send("AUTHENTICATE PLAIN")
    token = base64.b64encode(f"alice\0alice\0{PASSWORD}".encode()).decode()
    await irc.send(f"AUTHENTICATE {token}")
    welcome = await irc.send("CAP END")
    assert welcome[0].startswith(f":{SERVER} 001 alice ")
    assert await irc.send("NICK bob") == [
        f":{SERVER} 400 alice NICK :Your nick is your account name here:"
        " log in as another account instead"
    ]
    assert await irc.send("NICK alice") == []


async def test_line_limits_417_and_not_utf8(app: App) -> None:
    await register(app, "alice")
    irc = Irc(app)
    await irc.login("alice")
    long_line = "PRIVMSG alice :" + "x" * (510 - len("PRIVMSG alice :") + 1)
    assert await irc.send(long_line) == [f":{SERVER} 417 alice :Input line was too long"]
    tags = "@+a=" + "b" * 4091
    assert await irc.send(tags + " PING x") == [f":{SERVER} PONG {SERVER} :x"]
    assert await irc.send(tags + "b PING x") == [f":{SERVER} 417 alice :Input line was too long"]
    assert await irc.send(b"PRIVMSG alice :\xff\xfe") == [
        f":{SERVER} FAIL PRIVMSG INVALID_UTF8 :Line is not UTF-8"
    ]
    assert await irc.send("", "   ", ":source") == []  # blank and command-less lines: ignored


async def test_channel_join_names_and_queries(app: App) -> None:
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice")
    assert await irc.send("JOIN #Lobby") == [
        ":alice!alice@chatd JOIN #Lobby",
        f":{SERVER} 353 alice = #Lobby :alice",
        f":{SERVER} 366 alice #Lobby :End of /NAMES list",
    ]
    assert await irc.send("MODE #Lobby", "MODE #Lobby b", "MODE alice", "TOPIC #Lobby") == [
        f":{SERVER} 324 alice #Lobby :+",
        f":{SERVER} 368 alice #Lobby :End of channel ban list",
        f":{SERVER} 221 alice :+",
        f":{SERVER} 331 alice #Lobby :No topic is set",
    ]
    assert await irc.send("WHO #Lobby") == [
        f":{SERVER} 352 alice #Lobby alice chatd {SERVER} alice H :0 alice",
        f":{SERVER} 315 alice #Lobby :End of WHO list",
    ]
    assert await irc.send("WHOIS bob") == [
        f":{SERVER} 311 alice bob bob chatd * :bob",
        f":{SERVER} 312 alice bob {SERVER} :chatd",
        f":{SERVER} 330 alice bob bob :is logged in as",
        f":{SERVER} 301 alice bob :Not connected (messages wait for them)",
        f":{SERVER} 318 alice bob :End of /WHOIS list",
    ]
    assert await irc.send("LIST") == [
        f":{SERVER} 321 alice Channel :Users  Name",
        f":{SERVER} 322 alice #Lobby 1 :",
        f":{SERVER} 323 alice :End of /LIST",
    ]
    assert await irc.send("PART #lobby :bye") == [":alice!alice@chatd PART #lobby :bye"]
    assert await irc.send("PART #lobby") == [
        f":{SERVER} 442 alice #lobby :You're not on that channel"
    ]
    assert await irc.send("PRIVMSG #lobby :hi") == [
        f":{SERVER} 404 alice #lobby :Cannot send to channel: JOIN it first"
    ]
    assert await irc.send("PRIVMSG nobody :hi", "NOTICE nobody :hi") == [
        f":{SERVER} 401 alice nobody :No such nick/channel"
    ]  # NOTICE never gets an error reply


async def test_private_message_both_ways_with_ids_and_echo(app: App) -> None:
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice", "server-time message-tags echo-message account-tag")
    bob = await msgpack_user(app, "bob")
    echoed = await irc.send("PRIVMSG bob :hello bob")
    assert echoed == [
        "@account=alice;msgid=1;time=2020-03-05T12:12:00.000Z"
        " :alice!alice@chatd PRIVMSG bob :hello bob"
    ]
    reply = await answer(app, bob, {"op": "/send", "params": {"name": "alice", "msg": "hi alice"}})
    assert reply["data"]["id"] == 2
    assert irc.take() == [
        "@account=bob;msgid=2;time=2020-03-05T12:12:00.000Z"
        " :bob!bob@chatd PRIVMSG alice :hi alice"
    ]
    assert irc.transport.probes == 1  # a PING soon, so the delivery can count as received


async def test_long_message_is_split_never_cut(app: App) -> None:
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice", "message-tags")
    bob = await msgpack_user(app, "bob")
    text = ("word " * 800).strip() + "\nsecond line é"
    reply = await answer(app, bob, {"op": "/send", "params": {"name": "alice", "msg": text}})
    assert reply["code"] == 0
    lines = irc.take()
    assert len(lines) > 2
    assert all(len(line.encode()) + 2 <= 512 + len("@msgid=1 ") for line in lines)
    assert lines[0].startswith("@msgid=1 :bob!bob@chatd PRIVMSG alice :word")
    assert not any("msgid" in line for line in lines[1:])  # ids never repeat
    pieces = [line.split(" :", 1)[1] for line in lines[1:]]
    assert pieces[-1] == "second line é"
    assert "".join([lines[0].split("alice :", 1)[1], *pieces[:-1]]) == text.split("\n")[0]


async def test_labeled_response_ack_single_and_batch(app: App) -> None:
    await register(app, "alice")
    irc = Irc(app)
    await irc.login("alice", "labeled-response batch message-tags")
    assert await irc.send("@label=a1 MODE alice +i") == [f"@label=a1 :{SERVER} ACK"]
    assert await irc.send("@label=a2 TOPIC #x") == [
        f"@label=a2 :{SERVER} 331 alice #x :No topic is set"
    ]
    batch = await irc.send("@label=a3 JOIN #x")
    assert batch[0] == f"@label=a3 :{SERVER} BATCH +B1 labeled-response"
    assert batch[1] == "@batch=B1 :alice!alice@chatd JOIN #x"
    assert batch[-1] == f":{SERVER} BATCH -B1"


async def test_reconnect_replays_missed_dms_and_channel_lines(app: App) -> None:
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice", "server-time")
    await irc.send("JOIN #room")
    bob = await msgpack_user(app, "bob")
    await answer(app, bob, {"op": "/channel/join", "params": {"name": "room"}})
    await answer(app, bob, {"op": "/channel/send", "params": {"name": "room", "message": "one"}})
    assert irc.take()[-1] == "@time=2020-03-05T12:12:00.000Z :bob!bob@chatd PRIVMSG #room :one"
    await irc.send("PING alive")  # the client showed it is alive: "one" counts as received
    await irc.core.close()
    await answer(app, bob, {"op": "/channel/send", "params": {"name": "room", "message": "two"}})
    await answer(app, bob, {"op": "/send", "params": {"name": "alice", "msg": "psst"}})
    irc = Irc(app)
    welcome = await irc.login("alice", "server-time")
    assert welcome[-3:] == [
        ":alice!alice@chatd JOIN #room",
        f":{SERVER} 353 alice = #room :alice bob",
        f":{SERVER} 366 alice #room :End of /NAMES list",
    ]
    await _settle(irc)
    assert irc.take() == [
        "@time=2020-03-05T12:12:00.000Z :bob!bob@chatd PRIVMSG alice :psst",
        "@time=2020-03-05T12:12:00.000Z :bob!bob@chatd PRIVMSG #room :two",
    ]


async def test_unacknowledged_lines_come_again(app: App) -> None:
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice")
    bob = await msgpack_user(app, "bob")
    await answer(app, bob, {"op": "/send", "params": {"name": "alice", "msg": "lost?"}})
    assert irc.take() == [":bob!bob@chatd PRIVMSG alice :lost?"]
    await irc.core.close()  # gone without a line after it: not known to be received
    irc = Irc(app)
    await irc.login("alice")
    await _settle(irc)
    assert irc.take() == [":bob!bob@chatd PRIVMSG alice :lost?"]


async def _settle(irc: Irc) -> None:
    """Wait for the subscription's catch-up task to finish."""
    subscription = irc.core.session.subscription
    assert subscription is not None
    task = subscription._task  # the catch-up: nothing public tells when it is done
    if task is not None:
        await asyncio.wait_for(asyncio.shield(task), 10)


@pytest.fixture
async def guest_app(app: App) -> App:
    app.reconfigure(dataclasses.replace(app.config, irc_guests=True))
    return app


async def test_guest_talks_under_its_nick_while_connected(guest_app: App) -> None:
    app = guest_app
    await register(app, "bob")
    bob = await msgpack_user(app, "bob")
    guest = Irc(app)
    welcome = await guest.send("NICK visitor", "USER v 0 * :V")
    assert welcome[0] == (
        f":{SERVER} 001 visitor :Welcome to the {SERVER} IRC network, visitor!visitor@chatd"
    )
    await guest.send("JOIN #lobby")
    await answer(app, bob, {"op": "/channel/join", "params": {"name": "lobby"}})
    assert guest.take() == [":bob!bob@chatd JOIN #lobby"]
    assert await guest.send("PRIVMSG #lobby :hi from a guest") == []
    history = await answer(app, bob, {"op": "/channel/history", "params": {"name": "lobby"}})
    assert [(m["name"], m["msg"]) for m in history["data"]["messages"]] == [
        ("visitor", "hi from a guest")
    ]
    info = await answer(app, bob, {"op": "/user/info", "params": {"name": "visitor"}})
    assert info["data"]["online"] is True
    sent = await answer(app, bob, {"op": "/send", "params": {"name": "visitor", "msg": "welcome"}})
    assert sent["code"] == 0
    assert guest.take() == [":bob!bob@chatd PRIVMSG visitor :welcome"]
    params = {"name": "Visitor", "password": PASSWORD, "password_repete": PASSWORD}
    taken = await answer(app, Session(), {"op": "/register", "params": params})
    assert taken["code"] == 4  # a connected guest's name is taken

    await guest.core.close()
    gone = await answer(app, bob, {"op": "/user/info", "params": {"name": "visitor"}})
    assert gone["code"] == 5  # nothing of the guest outlives the connection...
    history = await answer(app, bob, {"op": "/channel/history", "params": {"name": "lobby"}})
    assert [m["name"] for m in history["data"]["messages"]] == ["visitor"]  # ...but its words
    members = await answer(app, bob, {"op": "/channel/list_users", "params": {"name": "lobby"}})
    assert [u["name"] for u in members["data"]["users"]] == ["bob"]
    again = Irc(app)
    assert (await again.send("NICK visitor", "USER v 0 * :V"))[0].startswith(f":{SERVER} 001 ")
    await again.core.close()


async def test_guest_nick_rules(guest_app: App) -> None:
    app = guest_app
    await register(app, "alice")
    assert await Irc(app).send("NICK alice", "USER a 0 * :A") == [
        f":{SERVER} 433 alice alice :Nickname is in use: pick another, or authenticate"
        " (SASL PLAIN, or PASS name:password)"
    ]
    first = Irc(app)
    await first.send("NICK visitor", "USER v 0 * :V")
    second = Irc(app)
    assert (await second.send("NICK VISITOR", "USER v 0 * :V"))[0].split()[1] == "433"
    assert await second.send("NICK bad!nick") == [
        f":{SERVER} 432 bad!nick bad!nick :Erroneous nickname:"
        " name may contain only letters, digits, '_', '-' and '.'"
    ]
    assert (await second.send("NICK visitor2"))[0].startswith(f":{SERVER} 001 visitor2 ")
    await first.core.close()
    await second.core.close()


async def test_chathistory_ranges_in_a_batch(app: App) -> None:
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice", "batch message-tags server-time draft/chathistory")
    await irc.send("JOIN #h")
    for second in range(1, 6):  # ids 1..5 at NOW+1..NOW+5
        clock_of(app).now = NOW + second
        await irc.send(f"PRIVMSG #h :m{second}")

    def texts(lines: list[str]) -> list[str]:
        assert lines[0] == f":{SERVER} BATCH +B1 chathistory #h"
        assert lines[-1] == f":{SERVER} BATCH -B1"
        assert all(line.startswith("@batch=B1;msgid=") for line in lines[1:-1])
        return [line.rsplit(":", 1)[1] for line in lines[1:-1]]

    irc.core.machine._batches = 0
    assert texts(await irc.send("CHATHISTORY LATEST #h * 2")) == ["m4", "m5"]
    irc.core.machine._batches = 0
    assert texts(await irc.send("CHATHISTORY BEFORE #h msgid=4 2")) == ["m2", "m3"]
    irc.core.machine._batches = 0
    assert texts(await irc.send("CHATHISTORY AFTER #h msgid=4 10")) == ["m5"]
    irc.core.machine._batches = 0
    assert texts(await irc.send("CHATHISTORY AROUND #h msgid=3 3")) == ["m2", "m3", "m4"]
    irc.core.machine._batches = 0
    between = "CHATHISTORY BETWEEN #h timestamp=2020-03-05T12:12:01.000Z msgid=5 10"
    assert texts(await irc.send(between)) == ["m2", "m3", "m4"]
    irc.core.machine._batches = 0
    first = await irc.send("CHATHISTORY LATEST #h timestamp=2020-03-05T12:12:04.000Z 10")
    assert texts(first) == ["m5"]
    assert (await irc.send("CHATHISTORY LATEST #nope * 10")) == [
        f":{SERVER} FAIL CHATHISTORY INVALID_TARGET LATEST #nope"
        " :No such target, or not yours to read"
    ]
    assert (await irc.send("CHATHISTORY LATEST #h bogus 10")) == [
        f":{SERVER} FAIL CHATHISTORY INVALID_PARAMS LATEST :Invalid parameters"
    ]
    irc.core.machine._batches = 0
    targets = await irc.send(
        "CHATHISTORY TARGETS timestamp=2020-03-05T12:00:00.000Z"
        " timestamp=2020-03-05T13:00:00.000Z 10"
    )
    assert targets == [
        f":{SERVER} BATCH +B1 draft/chathistory-targets",
        f"@batch=B1 :{SERVER} CHATHISTORY TARGETS #h timestamp=2020-03-05T12:12:05.000Z",
        f":{SERVER} BATCH -B1",
    ]


async def test_markread_moves_forward_only_and_tells_other_sessions(app: App) -> None:
    await register(app, "alice", "bob")
    bob = await msgpack_user(app, "bob")
    await answer(app, bob, {"op": "/channel/join", "params": {"name": "r"}})
    for second in (1, 2, 3):
        clock_of(app).now = NOW + second
        await answer(app, bob, {"op": "/channel/send", "params": {"name": "r", "message": "x"}})
    phone, laptop = Irc(app), Irc(app)
    await phone.login("alice", "draft/read-marker")
    await laptop.login("alice", "draft/read-marker")
    # Joined on another front-end: IRC shows the JOIN, and the channel has no position yet.
    alice = await msgpack_user(app, "alice")
    await answer(app, alice, {"op": "/channel/join", "params": {"name": "r"}})
    assert phone.take() == [":alice!alice@chatd JOIN #r"]
    laptop.take()
    assert await phone.send("MARKREAD #r") == [f":{SERVER} MARKREAD #r *"]
    mark = "timestamp=2020-03-05T12:12:02.000Z"
    assert await phone.send(f"MARKREAD #r {mark}") == [f":{SERVER} MARKREAD #r {mark}"]
    assert laptop.take() == [f":{SERVER} MARKREAD #r {mark}"]
    earlier = "timestamp=2020-03-05T12:12:01.000Z"
    assert await phone.send(f"MARKREAD #r {earlier}") == [f":{SERVER} MARKREAD #r {mark}"]
    assert await phone.send("MARKREAD #r bogus") == [
        f":{SERVER} FAIL MARKREAD INVALID_PARAMS bogus :Expected timestamp=..."
    ]
    # The JOIN of a channel shows the marker before 366: the position it starts from (here
    # at registration: a JOIN of a channel the client is on sends nothing).
    assert await phone.send("JOIN #r") == []
    tablet = Irc(app)
    assert (await tablet.login("alice", "draft/read-marker"))[-2:] == [
        f":{SERVER} MARKREAD #r {mark}",
        f":{SERVER} 366 alice #r :End of /NAMES list",
    ]


async def test_a_channel_joined_on_irc_replays_what_was_missed(app: App) -> None:
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice")
    await irc.send("JOIN #quiet")  # nothing said there yet, nothing received
    await irc.core.close()
    bob = await msgpack_user(app, "bob")
    await answer(app, bob, {"op": "/channel/join", "params": {"name": "quiet"}})
    await answer(app, bob, {"op": "/channel/send", "params": {"name": "quiet", "message": "m"}})
    irc = Irc(app)
    await irc.login("alice")
    await _settle(irc)
    assert irc.take() == [":bob!bob@chatd PRIVMSG #quiet :m"]


async def test_a_revoked_login_ends_the_irc_session(app: App) -> None:
    await register(app, "alice")
    irc = Irc(app)
    await irc.login("alice")
    assert irc.core.session.token_digest is not None
    await app.store.revoke_tokens(irc.core.session.user_id or 0)
    clock_of(app).now = NOW + app.config.token_recheck + 1  # the next command re-checks
    assert await irc.send("PRIVMSG alice :still there?") == [
        "ERROR :Closing link: Session ended: token revoked: log in again",
    ]  # and nothing after the ERROR line
    assert irc.core.closed


async def test_privmsg_without_recipient_or_text(app: App) -> None:
    await register(app, "alice")
    irc = Irc(app)
    await irc.login("alice")
    assert await irc.send("PRIVMSG", "PRIVMSG alice", "PRIVMSG alice :", "NOTICE alice") == [
        f":{SERVER} 411 alice :No recipient given (PRIVMSG)",
        f":{SERVER} 412 alice :No text to send",
        f":{SERVER} 412 alice :No text to send",
    ]


async def test_actions_travel_as_me_and_other_ctcp_is_dropped(app: App) -> None:
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice", "echo-message")
    bob = await msgpack_user(app, "bob")
    assert await irc.send("PRIVMSG bob :\x01ACTION waves\x01", "PRIVMSG bob :\x01VERSION\x01") == [
        ":alice!alice@chatd PRIVMSG bob :\x01ACTION waves\x01"
    ]
    assert await irc.send("NOTICE bob :a notice") == [":alice!alice@chatd NOTICE bob :a notice"]
    history = await answer(app, bob, {"op": "/history", "params": {"name": "alice"}})
    assert [m["msg"] for m in history["data"]["messages"]] == ["/me waves", "a notice"]


async def test_channel_lines_made_once_fit_each_kind_of_client(app: App) -> None:
    await register(app, "alice", "bob", "carol", "dave")
    plain, tagged, also_tagged = Irc(app), Irc(app), Irc(app)
    await plain.login("alice")
    await tagged.login("bob", "message-tags")
    await also_tagged.login("carol", "message-tags")
    for irc in (plain, tagged, also_tagged):
        await irc.send("JOIN #c")
    dave = await msgpack_user(app, "dave")
    await answer(app, dave, {"op": "/channel/join", "params": {"name": "c"}})
    for irc in (plain, tagged, also_tagged):
        irc.take()
    await answer(app, dave, {"op": "/channel/send", "params": {"name": "c", "message": "one"}})
    assert plain.take() == [":dave!dave@chatd PRIVMSG #c :one"]
    assert tagged.take() == also_tagged.take() == ["@msgid=1 :dave!dave@chatd PRIVMSG #c :one"]


async def test_a_client_sending_everything_at_once_is_answered_in_order(app: App) -> None:
    await register(app, "alice")
    irc = Irc(app)
    plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    lines = await irc.send(
        "CAP LS 302", "NICK alice", "USER alice 0 * :A", "CAP REQ :sasl",
        "AUTHENTICATE PLAIN", f"AUTHENTICATE {plain}", "CAP END", "JOIN #now", "PING end",
    )
    numerics = [line.split()[1] for line in lines]
    assert numerics == [
        "CAP", "CAP", "+", "900", "903", "001", "002", "003", "004", "005", "005", "422",
        "JOIN", "353", "366", "PONG",
    ]


async def test_a_push_during_a_labelled_command_is_not_labelled(app: App) -> None:
    await register(app, "alice")
    irc = Irc(app)
    await irc.login("alice", "labeled-response batch")
    machine = irc.core.machine
    # A command in progress (its replies held for the label) when the hub pushes.
    machine.begin_label({"label": "w"})
    machine.numeric("311", "reply one")
    irc.core.deliver_message(7, None, "bob", None, "psst", NOW)
    assert irc.take() == [":bob!bob@chatd PRIVMSG alice :psst"]  # out at once, unlabelled
    machine.numeric("318", "reply two")
    machine.end_label()
    irc.core._flush()
    assert irc.take() == [
        f"@label=w :{SERVER} BATCH +B1 labeled-response",
        f"@batch=B1 :{SERVER} 311 alice :reply one",
        f"@batch=B1 :{SERVER} 318 alice :reply two",
        f":{SERVER} BATCH -B1",
    ]


async def test_channel_lines_are_made_once_per_kind_of_client_not_per_member(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lines are memoised on the event (chatd.model) per set of tag capabilities,
    as the msgpack frame is: members of two kinds, however interleaved, cost two."""
    names = ["alice", "bob", "carol", "erin", "frank", "grace"]
    await register(app, "dave", *names)
    members = [Irc(app) for _ in names]
    for index, (irc, name) in enumerate(zip(members, names, strict=True)):
        await irc.login(name, "message-tags" if index % 2 else "")
        await irc.send("JOIN #c")
    dave = await msgpack_user(app, "dave")
    await answer(app, dave, {"op": "/channel/join", "params": {"name": "c"}})
    for irc in members:
        irc.take()
    made: list[dict[str, str] | None] = []

    def counting(
        command: str, params: list[str], source: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> bytes:
        made.append(tags)
        return format_line(command, params, source, tags)

    monkeypatch.setattr(irc_session, "format_line", counting)
    await answer(app, dave, {"op": "/channel/send", "params": {"name": "c", "message": "one"}})
    assert sorted(made, key=bool) == [None, {"msgid": "1"}]
    for index, irc in enumerate(members):
        tags = "@msgid=1 " if index % 2 else ""
        assert irc.take() == [f"{tags}:dave!dave@chatd PRIVMSG #c :one"]


async def test_replies_quoting_junk_are_valid_lines(app: App) -> None:
    """Found by test_irc_fuzz.py: a reply quoting a trailing parameter as a middle one
    crashed the connection (irctokens refuses a space) or made an empty parameter, and
    one quoting a long parameter went past 512 bytes."""
    await register(app, "alice")
    irc = Irc(app)
    await irc.login("alice")
    assert await irc.send("TOPIC :#a b", "JOIN :,#", "WHOIS ::x") == [
        f":{SERVER} 331 alice * :No topic is set",
        f":{SERVER} 403 alice * :No such channel (they start with #)",
        f":{SERVER} 403 alice # :No such channel (they start with #)",
        f":{SERVER} 401 alice * :No such nick/channel",
        f":{SERVER} 318 alice * :End of /WHOIS list",
    ]
    token = "é" * 250  # 500 bytes
    (pong,) = await irc.send(f"PING :{token}")
    # Cut to 510 bytes with the CRLF to come, never inside a character: 509 here.
    assert len(pong.encode()) == 509 and pong.startswith(f":{SERVER} PONG {SERVER} :éé")
    (refused,) = await irc.send("CAP " + "x" * 500)
    assert len(refused.encode()) == 510 and refused.startswith(f":{SERVER} 410 alice XXX")


async def test_junk_message_references_fail_the_command_only(app: App) -> None:
    """Found by test_irc_fuzz.py: each of these crashed the connection."""
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice", "batch")
    failed = f":{SERVER} FAIL MARKREAD INVALID_PARAMS"
    assert await irc.send("MARKREAD bob =", "MARKREAD bob timestamp=now") == [
        f"{failed} = :Expected timestamp=...",
        f"{failed} timestamp=now :Expected timestamp=...",
    ]
    invalid = f":{SERVER} FAIL CHATHISTORY INVALID_PARAMS"
    assert await irc.send(
        "CHATHISTORY BEFORE bob msgid=² 10",  # a digit to str.isdigit(), not to int()
        "CHATHISTORY BEFORE bob msgid=99999999999999999999 10",  # past a 64-bit column
        "CHATHISTORY BETWEEN bob msgid=1 msgid=9223372036854775808 10",
    ) == [f"{invalid} BEFORE :Invalid parameters"] * 2 + [f"{invalid} BETWEEN :Invalid parameters"]
    assert await irc.send(f"CHATHISTORY BEFORE bob msgid={2**63 - 1} 10") == [
        f":{SERVER} BATCH +B1 chathistory bob", f":{SERVER} BATCH -B1"
    ]


async def test_sasl_payload_not_ascii_is_904(app: App) -> None:
    """Found by test_irc_fuzz.py: b64decode() raises a plain ValueError on non-ASCII
    text, which crashed the connection instead of failing the exchange."""
    irc = Irc(app)
    await irc.send("CAP REQ sasl", "AUTHENTICATE PLAIN")
    assert await irc.send("AUTHENTICATE AGFsaWNlAHNlY3JldA==ß") == [
        f":{SERVER} 904 * :SASL authentication failed"
    ]
