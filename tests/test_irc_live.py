"""The IRC front-end over real sockets, next to msgpack clients of the same server."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import re
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from chatd.client import Client
from chatd.codec import encode_frame
from chatd.config import Config
from tests.conftest import PASSWORD, TEST_SETTINGS, Harness, MakeHarness, Spawn, fast_env
from tests.pg_helpers import fresh_database
from tests.test_fuzz import settled_connections
from tests.test_live import events_of
from tests.tls_helpers import RawTls, certificate

SERVER = "irc.test"


def free_port() -> int:
    """A port free now, for settings where 0 means "off" (irc_port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class IrcClient:
    """A raw-socket IRC client: writes lines, waits for lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.seen: list[str] = []

    @classmethod
    async def connect(cls, port: int, tls: ssl.SSLContext | None = None) -> IrcClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
        return cls(reader, writer)

    async def send(self, *lines: str) -> None:
        self.writer.write("".join(line + "\r\n" for line in lines).encode())
        await self.writer.drain()

    async def expect(self, wanted: str | Callable[[str], bool], timeout: float = 10) -> str:
        """The next line matching (a regular expression, or a predicate); PINGs answered."""
        matches = wanted if callable(wanted) else re.compile(wanted).search
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.reader.readline()
                if not raw:
                    raise ConnectionError(f"closed while waiting for {wanted!r}: {self.seen}")
                line = raw.decode().rstrip("\r\n")
                self.seen.append(line)
                if line.startswith("PING "):
                    await self.send("PONG " + line[5:])
                if matches(line):
                    return line

    async def login(self, name: str, caps: str = "message-tags server-time") -> None:
        await self.send("CAP LS 302", f"NICK {name}", f"USER {name} 0 * :{name}")
        await self.send(f"CAP REQ :sasl {caps}", "AUTHENTICATE PLAIN")
        await self.expect(r"^AUTHENTICATE \+$")
        plain = base64.b64encode(f"\0{name}\0{PASSWORD}".encode()).decode()
        await self.send(f"AUTHENTICATE {plain}")
        await self.expect(r" 903 ")
        await self.send("CAP END")
        await self.expect(r" 422 ")

    async def close(self) -> None:
        self.writer.close()


async def irc_harness(make_harness: MakeHarness, **changes: object) -> tuple[Harness, int]:
    port = free_port()
    harness = await make_harness(irc_port=port, server_name=SERVER, **changes)
    return harness, port


def msgid(line: str) -> int:
    match = re.search(r"(?:^@|;)msgid=(\d+)[; ]", line)
    assert match, line
    return int(match[1])


async def test_irc_and_msgpack_users_share_a_channel_and_dms_with_the_same_ids(
    make_harness: MakeHarness,
) -> None:
    harness, port = await irc_harness(make_harness)
    bob = await harness.user("bob")
    await bob.request("/subscribe")
    await harness.user("alice")  # registers alice
    alice = await IrcClient.connect(port)
    await alice.login("alice", "message-tags server-time echo-message")
    await alice.send("JOIN #room")
    await alice.expect(r" 366 alice #room ")
    await bob.request("/channel/join", {"name": "room"})
    await alice.expect(r":bob!bob@chatd JOIN #room")

    sent = await bob.request("/channel/send", {"name": "room", "message": "hello from msgpack"})
    line = await alice.expect(r"PRIVMSG #room :hello from msgpack$")
    assert msgid(line) == sent["id"] and ":bob!bob@chatd PRIVMSG" in line

    await alice.send("PRIVMSG #room :hello from IRC")
    echo = await alice.expect(r"PRIVMSG #room :hello from IRC$")
    (pushed,) = await events_of(bob, 1, "channel_message")
    assert pushed["data"]["msg"] == "hello from IRC" and pushed["data"]["name"] == "alice"
    assert pushed["data"]["id"] == msgid(echo)

    await alice.send("PRIVMSG bob :a private word")
    echo = await alice.expect(r"PRIVMSG bob :a private word$")
    (dm,) = await events_of(bob, 1, "message")
    assert dm["data"]["id"] == msgid(echo) and dm["data"]["name"] == "alice"

    sent = await bob.request("/send", {"name": "alice", "msg": "and back"})
    line = await alice.expect(r"PRIVMSG alice :and back$")
    assert msgid(line) == sent["id"] and line.startswith("@msgid=")
    await alice.close()


async def test_one_user_on_both_front_ends_gets_copies(make_harness: MakeHarness) -> None:
    harness, port = await irc_harness(make_harness)
    await harness.user("bob")
    laptop = await harness.user("alice")
    await laptop.request("/subscribe")
    irc = await IrcClient.connect(port)
    await irc.login("alice")
    await laptop.request("/send", {"name": "bob", "msg": "sent from msgpack"})
    copy = await irc.expect(r"PRIVMSG bob :sent from msgpack$")
    assert copy.split(" ", 2)[1] == ":alice!alice@chatd"
    await irc.send("PRIVMSG bob :sent from IRC")  # no echo-message: no copy on this line
    (event,) = await events_of(laptop, 1, "message")
    assert event["data"]["msg"] == "sent from IRC" and event["data"]["to"] == "bob"
    await irc.send("PING check")
    await irc.expect(r"PONG \S+ :check$")
    assert not any("sent from IRC" in line for line in irc.seen)
    await irc.close()


async def test_missed_messages_are_replayed_on_connect(make_harness: MakeHarness) -> None:
    harness, port = await irc_harness(make_harness)
    bob = await harness.user("bob")
    await harness.user("alice")
    irc = await IrcClient.connect(port)
    await irc.login("alice")
    await irc.send("JOIN #room")
    await irc.expect(r" 366 ")
    await bob.request("/channel/join", {"name": "room"})
    await bob.request("/channel/send", {"name": "room", "message": "seen live"})
    await irc.expect(r"PRIVMSG #room :seen live$")
    await irc.send("QUIT :bye")  # a line after it: "seen live" counts as received
    assert (await irc.expect(r"^ERROR ")).startswith("ERROR :Closing link")
    await irc.close()

    await bob.request("/channel/send", {"name": "room", "message": "while away"})
    await bob.request("/send", {"name": "alice", "msg": "a DM while away"})
    irc = await IrcClient.connect(port)
    await irc.login("alice")
    await irc.expect(r"^:alice!alice@chatd JOIN #room$")
    await irc.expect(r" 366 alice #room ")
    dm = await irc.expect(r"PRIVMSG alice :a DM while away$")
    assert re.match(r"@msgid=\d+;time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", dm)
    await irc.expect(r"PRIVMSG #room :while away$")
    assert not any("seen live" in line for line in irc.seen)
    await irc.close()


async def test_a_join_to_a_channel_already_joined_sends_nothing(
    make_harness: MakeHarness,
) -> None:
    # As ergo, ngircd and solanum: a repeated JOIN echoed again looked like a second join.
    harness, port = await irc_harness(make_harness)
    laptop = await harness.user("alice")
    irc = await IrcClient.connect(port)
    await irc.login("alice")
    await irc.send("JOIN #a")
    await irc.expect(r" 366 alice #a ")
    await laptop.request("/channel/join", {"name": "elsewhere"})  # the account's, on msgpack
    await irc.expect(r"^:alice!alice@chatd JOIN #elsewhere$")
    await irc.send("JOIN #a", "JOIN #A,#b,#elsewhere", "JOIN #ELSEWHERE", "PING done")
    await irc.expect(r"PONG \S+ :done$")
    after = irc.seen[irc.seen.index(":alice!alice@chatd JOIN #elsewhere") + 1:]
    assert [line for line in after if "PONG" not in line] == [
        ":alice!alice@chatd JOIN #b",
        f":{SERVER} 353 alice = #b :alice",
        f":{SERVER} 366 alice #b :End of /NAMES list",
    ]
    await irc.close()


async def test_chanlimit_is_advertised_and_a_join_beyond_it_gets_405(
    make_harness: MakeHarness,
) -> None:
    harness, port = await irc_harness(make_harness, max_channels_per_user=2)
    await harness.user("alice")
    irc = await IrcClient.connect(port)
    await irc.login("alice")
    assert any(" 005 alice " in line and " CHANLIMIT=#:2 " in line for line in irc.seen)
    await irc.send("JOIN #a,#b,#c,#A", "PING done")
    await irc.expect(r"PONG \S+ :done$")
    after = irc.seen[irc.seen.index(f":{SERVER} 366 alice #b :End of /NAMES list") + 1 :]
    assert [line for line in after if "PONG" not in line] == [
        f":{SERVER} 405 alice #c :You have joined too many channels",  # #A: a member already
    ]
    await irc.send("PART #a", "JOIN #c")  # leaving makes room
    await irc.expect(r"^:alice!alice@chatd JOIN #c$")
    await irc.close()


async def test_registration_times_out(make_harness: MakeHarness) -> None:
    _, port = await irc_harness(make_harness, auth_timeout=0.5)
    irc = await IrcClient.connect(port)
    await irc.send("NICK slow")
    assert await irc.expect(r"^ERROR ") == "ERROR :Closing link: Registration timed out"
    assert await irc.reader.read() == b""
    await irc.close()


async def test_the_irc_flags_from_the_command_line(spawn: Spawn) -> None:
    port = free_port()
    process = await spawn("--irc-port", str(port), "--server-name", SERVER, env=fast_env())
    await process.wait_listening()
    irc = await IrcClient.connect(port)
    await irc.send("NICK nobody", "USER n 0 * :N")
    line = await irc.expect(r"FAIL")
    assert line == (
        f":{SERVER} FAIL * ACCOUNT_REQUIRED :Log in first: SASL PLAIN, or PASS name:password"
    )
    await irc.close()
    assert await process.stop() == 0


async def test_msgpack_client_still_works_alongside(make_harness: MakeHarness) -> None:
    harness, _ = await irc_harness(make_harness)
    client: Client = await harness.user("carol")
    assert await client.request("/ping") is None


async def test_irc_over_tls_next_to_plain_irc(make_harness: MakeHarness, tmp_path: Path) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(cert_file)
    certificate.private_key_pem.write_to_path(key_file)
    tls_port = free_port()
    harness, plain_port = await irc_harness(
        make_harness, irc_tls_port=tls_port, tls_cert=str(cert_file), tls_key=str(key_file)
    )
    context = ssl.create_default_context()
    authority.configure_trust(context)
    client = await Client.connect("127.0.0.1", harness.port, ssl=context)
    params = {"name": "ann", "password": PASSWORD, "password_repete": PASSWORD}
    await client.request("/register", params)
    await client.close()
    for port, tls in ((tls_port, context), (plain_port, None)):
        irc = await IrcClient.connect(port, tls)
        await irc.login("ann")
        await irc.send("PING tls")
        await irc.expect(r"PONG \S+ :tls$")
        await irc.close()


@pytest.mark.parametrize("front_end", ["msgpack", "irc"])
async def test_a_broken_tls_record_ends_the_connection_without_a_traceback(
    make_harness: MakeHarness, tmp_path: Path, caplog: pytest.LogCaptureFixture, front_end: str
) -> None:
    """Bytes that are no TLS record, after the handshake, are the peer's doing: the read
    raises ssl.SSLError (no ConnectionError), and the connection ends as on a reset, with
    no traceback logged."""
    caplog.set_level(logging.INFO)
    cert_file, key_file, context = certificate(tmp_path)
    tls_port = free_port()
    harness = await make_harness(
        irc_tls_port=tls_port, tls_cert=str(cert_file), tls_key=str(key_file)
    )
    tls = await RawTls.open(tls_port if front_end == "irc" else harness.port, context)
    await tls.handshake()
    tls.send(b"PING x\r\n" if front_end == "irc" else encode_frame({"op": "/ping", "id": 1}))
    assert await tls.receive()  # served: the connection is past the handshake
    tls.writer.write(b"\x17\x03\x03\x00\x10" + bytes(16))  # application data, undecryptable
    assert await tls.closed(within=5)
    tls.writer.close()
    probe = await Client.connect("127.0.0.1", harness.port, ssl=context)
    params = {"name": "ann", "password": PASSWORD, "password_repete": PASSWORD}
    await probe.request("/register", params)
    await probe.login("ann", PASSWORD)
    assert await settled_connections(probe, 1, within=5) == 1  # the broken one has ended
    await probe.close()
    troubles = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not troubles, [r.getMessage() for r in troubles]
    assert "connection error (SSLError)" in caplog.text


async def test_min_password_length_is_the_operators_on_every_front_end(
    make_harness: MakeHarness,
) -> None:
    harness, port = await irc_harness(make_harness, min_password_length=4)
    client = await harness.connect()
    params = {"name": "shorty", "password": "abcd", "password_repete": "abcd"}
    assert await client.request("/register", params) is None
    short = {"name": "shorter", "password": "abc", "password_repete": "abc"}
    refused = await client.call("/register", short)
    assert (refused["code"], refused["msg"]) == (1, "password must be at least 4 characters")
    irc = await IrcClient.connect(port)
    await irc.send("PASS shorty:abcd", "NICK shorty", "USER s 0 * :S")
    await irc.expect(r" 001 shorty ")
    await irc.close()


async def test_irc_on_postgres_guests_history_and_replay(tmp_path: Path) -> None:
    """The IRC front-end over the PostgreSQL store: the store methods it adds, for real."""
    async with fresh_database() as url:
        port = free_port()
        config = Config(
            host="127.0.0.1", port=0, db=url, irc_port=port, server_name=SERVER,
            irc_guests=True, **TEST_SETTINGS,
        )
        harness = Harness(config)
        await harness.start()
        try:
            bob = await harness.user("bob")
            await bob.request("/channel/join", {"name": "pg"})
            guest = await IrcClient.connect(port)
            await guest.send("CAP LS 302", "CAP REQ :batch message-tags draft/chathistory")
            await guest.send("NICK visitor", "USER v 0 * :V", "CAP END", "JOIN #pg")
            await guest.expect(r" 366 visitor #pg ")
            sent = await bob.request("/channel/send", {"name": "pg", "message": "on postgres"})
            line = await guest.expect(r"PRIVMSG #pg :on postgres$")
            assert msgid(line) == sent["id"]
            await guest.send("CHATHISTORY LATEST #pg * 10")
            await guest.expect(r"BATCH \+\S+ chathistory #pg")
            replayed = await guest.expect(r"PRIVMSG #pg :on postgres$")
            assert replayed.startswith("@batch=")
            await guest.send("PRIVMSG #pg :a guest's words")
            await guest.send("QUIT")
            await guest.expect(r"^ERROR ")
            await guest.close()
            history = await bob.request("/channel/history", {"name": "pg"})
            assert [m["name"] for m in history["messages"]] == ["bob", "visitor"]
            # The guest ends as its connection does; no event tells when the store is done.
            async with asyncio.timeout(10):
                while (await bob.call("/user/info", {"name": "visitor"}))["code"] != 5:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            await harness.stop()


async def test_a_taken_irc_port_fails_the_start_and_leaves_nothing_listening(
    config: Config,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        irc_port = taken.getsockname()[1]
        harness = Harness(dataclasses.replace(config, irc_port=irc_port))
        server = harness.server
        with pytest.raises(OSError):
            await server.start()
        assert server._listener is None  # the msgpack listener was closed again
        # The database was released too: a server can start on it at once.
        again = Harness(config)
        await again.start()
        await again.stop()
