"""The IRC front-end's less travelled paths, in memory: the sans-I/O machine alone where
IRC decides, the session core over a real store and hub where chatd does (no sockets)."""

from __future__ import annotations

import base64
import dataclasses
import sqlite3
import time

import pytest

from chatd.app import App
from chatd.auth import Hasher
from chatd.config import Config
from chatd.hub import Hub
from chatd.irc.lines import MAX_BUFFERED, TOO_LONG, LineDecoder, LineError, Message
from chatd.irc.machine import IrcMachine, Login
from chatd.store import Store
from tests import test_irc_machine as machine_tests
from tests.conftest import PASSWORD
from tests.test_handlers import answer
from tests.test_irc_machine import NOW, SERVER, Irc, clock_of, msgpack_user, register

app = machine_tests.app  # a real store and hub, with the test clock


class Machine:
    """The machine alone: lines in, lines out (what IRC itself decides needs no store)."""

    def __init__(self) -> None:
        self.machine = IrcMachine(SERVER)
        self.actions: list[object] = []

    def send(self, *lines: str) -> list[str]:
        self.machine.receive(b"".join(line.encode() + b"\r\n" for line in lines))
        while actions := self.machine.next_actions():
            self.actions.extend(actions)
        return self.take()

    def take(self) -> list[str]:
        return self.machine.take_output().decode().split("\r\n")[:-1]


def plain(payload: str) -> str:
    return base64.b64encode(payload.encode()).decode()


# The machine alone.


def test_cap_req_is_all_or_nothing_and_list_shows_the_result() -> None:
    client = Machine()
    assert client.send("CAP REQ :server-time bogus") == [
        f":{SERVER} CAP * NAK :server-time bogus"
    ]
    assert client.send("CAP REQ :") == [f":{SERVER} CAP * NAK :"]
    assert client.send("CAP REQ :server-time batch") == [
        f":{SERVER} CAP * ACK :server-time batch"
    ]
    assert client.send("CAP REQ -batch") == [f":{SERVER} CAP * ACK :-batch"]
    assert client.send("CAP LIST") == [f":{SERVER} CAP * LIST :server-time"]
    assert client.send("CAP FROB", "CAP") == [
        f":{SERVER} 410 * FROB :Invalid CAP command",
        f":{SERVER} 410 * * :Invalid CAP command",
    ]


def test_registration_commands_without_their_parameters() -> None:
    client = Machine()
    assert client.send("NICK", "USER alice 0 *", "PASS") == [
        f":{SERVER} 431 * :No nickname given",
        f":{SERVER} 461 * USER :Not enough parameters",
        f":{SERVER} 461 * PASS :Not enough parameters",
    ]
    assert client.actions == []  # nothing for the core: no NICK, no USER yet


def test_a_line_counts_once_it_is_whole() -> None:
    """Bytes without a line end are not a line: no reply, and not yet a sign of life
    (what counts as received waits for a whole line, protocol.md 12.4)."""
    machine = IrcMachine(SERVER)
    machine.receive(b"PING :hal")
    assert machine.next_actions() == [] and machine.take_output() == b""
    assert not machine.take_alive()
    machine.receive(b"f\r\n")
    machine.next_actions()
    assert machine.take_output() == f":{SERVER} PONG {SERVER} :half\r\n".encode()
    assert machine.take_alive()


def test_nothing_follows_the_first_error_line() -> None:
    """A QUIT and then the server's shutdown: one ERROR line, the QUIT's."""
    client = Machine()
    assert client.send("QUIT :bye") == ["ERROR :Closing link: Quit: bye"]
    client.machine.close("Server shutting down")
    assert client.take() == []


def test_sasl_needs_the_capability_first() -> None:
    client = Machine()
    assert client.send("AUTHENTICATE PLAIN") == [
        f":{SERVER} 904 * :SASL authentication failed: CAP REQ sasl first"
    ]


def test_sasl_payload_in_400_byte_chunks_ends_with_a_short_one_or_plus() -> None:
    client = Machine()
    client.send("CAP REQ sasl", "AUTHENTICATE PLAIN")
    # 300 bytes encode to exactly 400: a chunk of 400 says "more to come", "+" ends it.
    exact = plain("\0alice\0" + "p" * 293)
    assert len(exact) == 400
    assert client.send(f"AUTHENTICATE {exact}") == [] and client.actions == []
    assert client.send("AUTHENTICATE +") == []
    assert client.actions == [Login("alice", "p" * 293, via_sasl=True)]

    client = Machine()
    client.send("CAP REQ sasl", "AUTHENTICATE PLAIN")
    longer = plain("\0alice\0" + "q" * 400)
    assert client.send(f"AUTHENTICATE {longer[:400]}", f"AUTHENTICATE {longer[400:]}") == []
    assert client.actions == [Login("alice", "q" * 400, via_sasl=True)]


def test_sasl_payloads_that_are_refused() -> None:
    client = Machine()
    client.send("CAP REQ sasl")
    failed = f":{SERVER} 904 * :SASL authentication failed"
    for payload in (
        "not*base64",
        base64.b64encode(b"\0alice\0\xff").decode(),  # not UTF-8
        plain("alice\0password"),  # two parts
        plain("\0\0password"),  # no authcid
        plain("bob\0alice\0password"),  # another authzid
    ):
        assert client.send("AUTHENTICATE PLAIN", f"AUTHENTICATE {payload}") == [
            "AUTHENTICATE +",
            failed,
        ]
    # More than 4096 bytes of base64 in all: 905, and the exchange is over.
    chunk = "A" * 400
    client.send("AUTHENTICATE PLAIN")
    assert client.send(*[f"AUTHENTICATE {chunk}"] * 10) == []
    assert client.send(f"AUTHENTICATE {chunk}") == [f":{SERVER} 905 * :SASL message too long"]
    assert client.send("AUTHENTICATE +") == [  # a new exchange must start with a mechanism
        f":{SERVER} 908 * PLAIN :are available SASL mechanisms",
        failed,
    ]
    assert client.actions == []


# The session core.


async def test_registration_is_final(app: App) -> None:
    await register(app, "alice")
    irc = Irc(app)
    await irc.login("alice", "sasl")
    assert await irc.send(
        "USER alice 0 * :Alice", f"PASS alice:{PASSWORD}", "AUTHENTICATE PLAIN"
    ) == [
        f":{SERVER} 462 alice :You may not reregister",
        f":{SERVER} 462 alice :You may not reregister",
        f":{SERVER} 907 alice :You have already authenticated using SASL",
    ]


async def test_failed_logins_are_slowed_down_on_both_ways_in(app: App) -> None:
    app.reconfigure(dataclasses.replace(app.config, login_free_failures=0))
    await register(app, "alice")
    irc = Irc(app)
    assert await irc.send("PASS alice:wrong", "NICK alice", "USER a 0 * :A") == [
        f":{SERVER} 464 alice :Password incorrect"
    ]
    # The right password, too soon after: refused with the wait, whichever way it comes.
    assert await irc.send(f"PASS alice:{PASSWORD}", "NICK alice") == [
        f":{SERVER} 464 alice :too many attempts, wait 2 s",
        f":{SERVER} 433 alice alice :Nickname is registered to an account: authenticate"
        " (SASL PLAIN, or PASS name:password)",
    ]
    await irc.send("CAP REQ sasl", "AUTHENTICATE PLAIN")
    assert await irc.send(f"AUTHENTICATE {plain(chr(0) + 'alice' + chr(0) + PASSWORD)}") == [
        f":{SERVER} 904 alice :SASL authentication failed: too many attempts, wait 2 s"
    ]
    clock_of(app).now = NOW + 1.6  # 0.4 s left: rounded up, never "wait 0 s"
    await irc.send("AUTHENTICATE PLAIN")
    assert await irc.send(f"AUTHENTICATE {plain(chr(0) + 'alice' + chr(0) + PASSWORD)}") == [
        f":{SERVER} 904 alice :SASL authentication failed: too many attempts, wait 1 s"
    ]
    clock_of(app).now = NOW + 2  # the wait is over: the right password gets in
    await irc.send("AUTHENTICATE PLAIN")
    accepted = await irc.send(f"AUTHENTICATE {plain(chr(0) + 'alice' + chr(0) + PASSWORD)}")
    assert accepted[-1] == f":{SERVER} 903 alice :SASL authentication successful"


async def test_commands_with_missing_or_wrong_parameters(app: App) -> None:
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice")
    await irc.send("JOIN #mine")
    assert await irc.send("FROB x", "JOIN", "JOIN nohash,#", "JOIN #bad!name", "PART") == [
        f":{SERVER} 421 alice FROB :Unknown command",
        f":{SERVER} 461 alice JOIN :Not enough parameters",
        f":{SERVER} 403 alice nohash :No such channel (they start with #)",
        f":{SERVER} 403 alice # :No such channel (they start with #)",
        f":{SERVER} 479 alice #bad!name :Cannot join channel:"
        " channel name may contain only letters, digits, '_', '-' and '.'",
        f":{SERVER} 461 alice PART :Not enough parameters",
    ]
    bob = await msgpack_user(app, "bob")
    await answer(app, bob, {"op": "/channel/join", "params": {"name": "theirs"}})
    assert await irc.send("PART #theirs,#nowhere") == [
        f":{SERVER} 442 alice #theirs :You're not on that channel",
        f":{SERVER} 403 alice #nowhere :No such channel",
    ]
    assert await irc.send("TOPIC", "TOPIC #mine :new topic", "MODE", "MODE #mine +i") == [
        f":{SERVER} 461 alice TOPIC :Not enough parameters",
        f":{SERVER} 482 alice #mine :chatd channels have no topics",
        f":{SERVER} 461 alice MODE :Not enough parameters",
        f":{SERVER} 482 alice #mine :chatd channels have no modes",
    ]
    assert await irc.send("MODE bob", "MODE alice +i") == [
        f":{SERVER} 502 alice :Cannot change mode for other users"
    ]  # a user mode change of one's own is accepted silently


async def test_names_who_and_whois_of_users_and_unknown_targets(app: App) -> None:
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice")
    await irc.send("JOIN #a", "JOIN #b")
    assert await irc.send("NAMES", "NAMES #a,#b", "NAMES bob", "NAMES #nowhere") == [
        f":{SERVER} 366 alice * :End of /NAMES list",
        f":{SERVER} 353 alice = #a :alice",
        f":{SERVER} 366 alice #a :End of /NAMES list",
        f":{SERVER} 353 alice = #b :alice",
        f":{SERVER} 366 alice #b :End of /NAMES list",
        f":{SERVER} 366 alice bob :End of /NAMES list",
        f":{SERVER} 366 alice #nowhere :End of /NAMES list",
    ]
    assert await irc.send("WHO bob", "WHO nobody", "WHOIS") == [
        f":{SERVER} 352 alice * bob chatd {SERVER} bob G :0 bob",
        f":{SERVER} 315 alice bob :End of WHO list",
        f":{SERVER} 315 alice nobody :End of WHO list",
        f":{SERVER} 431 alice :No nickname given",
    ]
    assert await irc.send("WHOIS alice") == [  # connected: no 301
        f":{SERVER} 311 alice alice alice chatd * :alice",
        f":{SERVER} 312 alice alice {SERVER} :chatd",
        f":{SERVER} 330 alice alice alice :is logged in as",
        f":{SERVER} 318 alice alice :End of /WHOIS list",
    ]


async def test_names_of_a_crowded_channel_span_several_lines(app: App) -> None:
    app.reconfigure(dataclasses.replace(app.config, register_burst=100))
    names = [f"member{i:02d}".ljust(32, "x") for i in range(16)]
    await register(app, *names)
    for name in names:
        member = await msgpack_user(app, name)
        await answer(app, member, {"op": "/channel/join", "params": {"name": "crowd"}})
    irc = Irc(app)
    await irc.login(names[0])
    lines = await irc.send("NAMES #crowd")
    assert [line.split()[1] for line in lines] == ["353", "353", "366"]
    assert all(len(line) + 2 <= 512 for line in lines)
    listed = [name for line in lines[:2] for name in line.rsplit(":", 1)[1].split()]
    assert sorted(listed) == names


async def test_messages_to_channels_not_there_or_not_joined(app: App) -> None:
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice")
    bob = await msgpack_user(app, "bob")
    await answer(app, bob, {"op": "/channel/join", "params": {"name": "theirs"}})
    assert await irc.send("PRIVMSG #nowhere :hi", "PRIVMSG #theirs :hi") == [
        f":{SERVER} 401 alice #nowhere :No such nick/channel",
        f":{SERVER} 404 alice #theirs :Cannot send to channel: JOIN it first",
    ]
    assert await irc.send("NOTICE #nowhere :hi", "NOTICE #theirs :hi") == []  # never answered


async def test_a_flooding_client_is_held_then_refused_beyond_ten_seconds(app: App) -> None:
    app.clock = time.time  # the hold waits in real time: the rate must see it pass
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice", "echo-message")
    app.reconfigure(dataclasses.replace(app.config, message_rate=50.0, message_burst=1))
    started = time.monotonic()
    echoed = await irc.send("PRIVMSG bob :one", "PRIVMSG bob :two", "PRIVMSG bob :three")
    assert [line.rsplit(":", 1)[1] for line in echoed] == ["one", "two", "three"]
    assert time.monotonic() - started >= 0.03  # two waits of 20 ms: held, not refused
    app.reconfigure(dataclasses.replace(app.config, message_rate=0.05))  # 20 s a message
    await irc.send("PRIVMSG bob :four")
    assert await irc.send("PRIVMSG bob :five") == [
        f":{SERVER} FAIL PRIVMSG MESSAGE_NOT_SENT :sending too fast"
    ]


async def _history_setup(app: App) -> Irc:
    """alice and bob: #h with m1..m5 (ids 1-5 at NOW+1..5 s), DMs d1 (alice to bob, NOW+6)
    and d2 (bob to alice, NOW+7)."""
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice", "message-tags draft/chathistory draft/read-marker")
    await irc.send("JOIN #h")
    for second in range(1, 6):
        clock_of(app).now = NOW + second
        await irc.send(f"PRIVMSG #h :m{second}")
    clock_of(app).now = NOW + 6
    await irc.send("PRIVMSG bob :d1")
    clock_of(app).now = NOW + 7
    bob = await msgpack_user(app, "bob")
    await answer(app, bob, {"op": "/send", "params": {"name": "alice", "msg": "d2"}})
    irc.take()
    return irc


def texts(lines: list[str]) -> list[str]:
    return [line.rsplit(":", 1)[1] for line in lines]


async def test_chathistory_without_batch_and_with_every_kind_of_bound(app: App) -> None:
    irc = await _history_setup(app)
    # Without the batch capability: the PRIVMSG lines alone.
    assert await irc.send("CHATHISTORY LATEST #h * 2") == [
        "@msgid=4 :alice!alice@chatd PRIVMSG #h :m4",
        "@msgid=5 :alice!alice@chatd PRIVMSG #h :m5",
    ]
    t = "timestamp=2020-03-05T12:12:0{}.000Z"
    assert texts(await irc.send(f"CHATHISTORY BEFORE #h {t.format(3)} 10")) == ["m1", "m2"]
    # AROUND takes the message at the reference too, by time as by id (fixed here: by time
    # it was left out, as "after" means after its whole millisecond).
    assert texts(await irc.send(f"CHATHISTORY AROUND #h {t.format(3)} 2")) == ["m2", "m3"]
    assert texts(await irc.send("CHATHISTORY AROUND #h msgid=3 2")) == ["m2", "m3"]
    # BETWEEN: bounds exclusive; reversed, the messages nearest the first reference.
    assert texts(await irc.send("CHATHISTORY BETWEEN #h msgid=1 msgid=5 2")) == ["m2", "m3"]
    assert texts(await irc.send("CHATHISTORY BETWEEN #h msgid=5 msgid=1 2")) == ["m3", "m4"]
    between = f"CHATHISTORY BETWEEN #h {t.format(5)} {t.format(1)} 10"
    assert texts(await irc.send(between)) == ["m2", "m3", "m4"]
    assert texts(await irc.send("CHATHISTORY BETWEEN #h msgid=3 * 10")) == ["m4", "m5"]
    assert await irc.send("CHATHISTORY LATEST #h * 0") == []
    # A user target: the conversation, both ways.
    assert await irc.send("CHATHISTORY LATEST bob * 10") == [
        "@msgid=1 :alice!alice@chatd PRIVMSG bob :d1",
        "@msgid=2 :bob!bob@chatd PRIVMSG alice :d2",
    ]


async def test_chathistory_refuses_bad_parameters_and_targets(app: App) -> None:
    irc = await _history_setup(app)
    bob = await msgpack_user(app, "bob")
    await answer(app, bob, {"op": "/channel/join", "params": {"name": "theirs"}})

    def invalid(sub: str) -> str:
        return f":{SERVER} FAIL CHATHISTORY INVALID_PARAMS {sub} :Invalid parameters"

    for line, sub in (
        ("CHATHISTORY LATEST #h * -1", "LATEST"),
        ("CHATHISTORY LATEST #h * many", "LATEST"),
        ("CHATHISTORY BEFORE #h * 10", "BEFORE"),  # BEFORE, AFTER, AROUND need a reference
        ("CHATHISTORY AFTER #h msgid=0 10", "AFTER"),
        ("CHATHISTORY SIDEWAYS #h msgid=1 10", "SIDEWAYS"),
        ("CHATHISTORY LATEST #h timestamp=yesterday 10", "LATEST"),
        ("CHATHISTORY LATEST #h timestamp=2020-13-45T99:00:00Z 10", "LATEST"),
        ("CHATHISTORY BETWEEN #h msgid=1", "BETWEEN"),
        ("CHATHISTORY TARGETS msgid=1 msgid=5 10", "TARGETS"),
        ("CHATHISTORY", "*"),
        ("CHATHISTORY LATEST", "LATEST"),  # no target: no FAIL line with an empty one
    ):
        assert await irc.send(line) == [invalid(sub)], line
    for target in ("#theirs", "nobody"):
        assert await irc.send(f"CHATHISTORY LATEST {target} * 10") == [
            f":{SERVER} FAIL CHATHISTORY INVALID_TARGET LATEST {target}"
            " :No such target, or not yours to read"
        ]


async def test_chathistory_targets_without_batch(app: App) -> None:
    irc = await _history_setup(app)
    window = "timestamp=2020-03-05T12:00:00.000Z timestamp=2020-03-05T13:00:00.000Z"
    assert await irc.send(f"CHATHISTORY TARGETS {window} 10") == [
        f":{SERVER} CHATHISTORY TARGETS bob timestamp=2020-03-05T12:12:07.000Z",
        f":{SERVER} CHATHISTORY TARGETS #h timestamp=2020-03-05T12:12:05.000Z",
    ]


async def test_markread_of_a_conversation_and_of_unknown_targets(app: App) -> None:
    irc = await _history_setup(app)
    # A user's marker is the inbox position, shared by all conversations: d2 was shown,
    # and the MARKREAD line itself shows the client alive, so d2 counts as received.
    d2 = f":{SERVER} MARKREAD bob timestamp=2020-03-05T12:12:07.000Z"
    assert await irc.send("MARKREAD bob") == [d2]
    assert await irc.send("MARKREAD bob timestamp=2020-03-05T12:12:06.500Z") == [d2]
    assert await irc.send("MARKREAD bob timestamp=2020-03-05T12:12:08.000Z") == [d2]
    assert await irc.send("MARKREAD", "MARKREAD nobody", "MARKREAD #nowhere") == [
        f":{SERVER} FAIL MARKREAD NEED_MORE_PARAMS :Missing parameters",
        f":{SERVER} FAIL MARKREAD INVALID_PARAMS nobody :No such target",
        f":{SERVER} FAIL MARKREAD INVALID_PARAMS #nowhere :No such target",
    ]


async def test_markread_before_the_first_message_moves_nothing(app: App) -> None:
    irc = await _history_setup(app)
    (marker,) = await irc.send("MARKREAD #h")
    assert await irc.send("MARKREAD #h timestamp=2020-03-05T12:00:00.000Z") == [marker]


async def test_acknowledgements_refused_by_flood_control_are_tried_again(app: App) -> None:
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice")
    await irc.send("JOIN #a", "JOIN #b")
    bob = await msgpack_user(app, "bob")
    for name in ("a", "b"):
        await answer(app, bob, {"op": "/channel/join", "params": {"name": name}})
        await answer(app, bob, {"op": "/channel/send", "params": {"name": name, "message": "hi"}})
    irc.take()
    app.reconfigure(dataclasses.replace(app.config, ack_rate=1.0, ack_burst=1))
    user_id = irc.core.session.user_id or 0

    async def positions() -> list[int]:
        found = []
        for name in ("a", "b"):
            channel = await app.store.find_channel(name)
            assert channel is not None
            position, _ = await app.store.channel_position(channel.id, user_id)
            found.append(position.id)
        return found

    before = await positions()
    assert await irc.send("PING x") == [f":{SERVER} PONG {SERVER} :x"]  # alive: acks
    after_one = await positions()
    assert sum(a != b for a, b in zip(before, after_one, strict=True)) == 1  # one refused
    clock_of(app).now = NOW + 1
    await irc.send("PING y")
    assert await positions() == [1, 2]  # the refused one went through the next time


async def test_an_acknowledgement_for_a_channel_left_meanwhile_is_dropped(app: App) -> None:
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice")
    await irc.send("JOIN #a")
    bob = await msgpack_user(app, "bob")
    await answer(app, bob, {"op": "/channel/join", "params": {"name": "a"}})
    await answer(app, bob, {"op": "/channel/send", "params": {"name": "a", "message": "hi"}})
    assert irc.take()[-1] == ":bob!bob@chatd PRIVMSG #a :hi"
    alice = await msgpack_user(app, "alice")
    await answer(app, alice, {"op": "/channel/leave", "params": {"name": "a"}})
    assert await irc.send("PING x") == [
        ":alice!alice@chatd PART :#a",
        f":{SERVER} PONG {SERVER} :x",
    ]  # the acknowledgement is refused (not a member): nothing to tell, nothing closed
    assert not irc.core.closed and irc.core._unacked == {}


# Refusals no command handler expects (fixed on this branch: they escaped to the
# connection, which logged a traceback and closed without a word to the client).


async def test_a_revoked_login_ends_the_session_at_any_command(app: App) -> None:
    await register(app, "alice")
    irc = Irc(app)
    await irc.login("alice")
    await app.store.revoke_tokens(irc.core.session.user_id or 0)
    clock_of(app).now = NOW + app.config.token_recheck + 1
    assert await irc.send("LIST") == [
        f":{SERVER} 321 alice Channel :Users  Name",
        "ERROR :Closing link: Session ended: token revoked: log in again",
    ]
    assert irc.core.closed


async def test_a_command_refused_by_flood_control_fails_alone(app: App) -> None:
    await register(app, "alice", "bob")
    irc = Irc(app)
    await irc.login("alice", "draft/read-marker")
    await irc.send("PRIVMSG bob :x")
    app.reconfigure(dataclasses.replace(app.config, ack_rate=0.01, ack_burst=1))
    mark = "timestamp=2020-03-05T12:12:00.000Z"
    await irc.send(f"MARKREAD bob {mark}")
    assert await irc.send(f"MARKREAD bob {mark}", "PING x") == [
        f":{SERVER} FAIL MARKREAD RATE_LIMITED"
        " :acknowledging too often: acknowledge the latest id only",
        f":{SERVER} PONG {SERVER} :x",
    ]


async def test_reconnecting_in_a_loop_waits_for_the_subscription(app: App) -> None:
    await register(app, "alice")
    app.clock = time.time  # the hold waits in real time: the rate must see it pass
    app.reconfigure(dataclasses.replace(app.config, subscribe_rate=20.0, subscribe_burst=1))
    first, second = Irc(app), Irc(app)
    await first.login("alice")
    welcome = await second.login("alice")
    assert welcome[-1] == f":{SERVER} 422 alice :MOTD File is missing"
    assert second.core.session.subscription is not None and not second.core.closed
    app.reconfigure(dataclasses.replace(app.config, subscribe_rate=0.01))  # 100 s to wait
    third = Irc(app)
    refused = await third.login("alice")
    assert refused[-2:] == [
        f":{SERVER} 422 alice :MOTD File is missing",
        "ERROR :Closing link: subscribing too often",
    ]
    assert third.core.closed
    for irc in (first, second, third):
        await irc.core.close()


def test_a_line_too_long_is_reported_once_however_it_arrives() -> None:
    decoder = LineDecoder()
    # Whole, with its line end, in one read: reported, and the next line is read.
    out = decoder.feed(b"PRIVMSG a :" + b"x" * MAX_BUFFERED + b"\r\nPING b\r\n")
    assert [(type(item), getattr(item, "command", None)) for item in out] == [
        (LineError, "PRIVMSG"),
        (Message, "PING"),
    ]
    # Endless, over several reads each beyond the limit: one report, then resync.
    (error,) = decoder.feed(b"x" * (MAX_BUFFERED + 1))
    assert isinstance(error, LineError) and error.kind == TOO_LONG
    assert decoder.feed(b"x" * (MAX_BUFFERED + 1)) == []
    assert decoder.feed(b"x\nPING c\n") == [Message("PING", ["c"])]


async def test_a_database_locked_by_another_process_fails_messages_alone(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process (a backup, ``chatd admin``) holds the write lock beyond
    db_busy_timeout: the store raises sqlite's own error, which IRC shows as a failed
    message; a connection closing meanwhile cannot end its login, but still leaves."""
    config = dataclasses.replace(config, server_name=SERVER)
    store = await Store.open(config.db, busy_timeout=0.2)
    hasher = Hasher(config)
    app = App(config, store, Hub(), hasher, clock=machine_tests.Clock())
    try:
        await register(app, "alice", "bob")
        irc = Irc(app)
        await irc.login("alice")
        holder = sqlite3.connect(config.db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            assert await irc.send("PRIVMSG bob :while locked") == [
                f":{SERVER} FAIL PRIVMSG MESSAGE_NOT_SENT :server error"
            ]
            assert any("unexpected error" in r.getMessage() for r in caplog.records)
            user_id = irc.core.session.user_id or 0
            await irc.core.close()  # its /logout cannot write: logged, not raised
            assert not app.hub.is_online(user_id)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    finally:
        hasher.close()
        await store.close()
