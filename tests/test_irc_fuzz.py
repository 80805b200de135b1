"""Hostile lines against a live server's IRC ports while two well-behaved IRC clients chat.

The IRC twin of test_fuzz.py: random but reproducible line by line (the seed is
printed; ``CHATD_FUZZ_SEED=<seed>`` replays the same lines, their interleaving across
connections still depending on timing), for ``CHATD_FUZZ_SECONDS`` (default 2) each.
Part of the hostile connections, and one good client, go over TLS; some of them
mistreat TLS itself (plain text, a handshake left half-way, garbage records, no
close_notify). The run is made with guests off, then on (protocol.md, section 12.6).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chatd.client import Client
from chatd.irc.lines import MAX_LINE, MAX_TAGS, LineError, parse
from chatd.irc.machine import CAPABILITIES
from chatd.irc.session import _COMMANDS  # the command table, so that new commands get fuzzed
from tests.conftest import PASSWORD, Spawn
from tests.test_fuzz import ALPHABETS as FRAME_ALPHABETS
from tests.test_fuzz import (
    GOOD_PASSWORD,
    account,
    assert_untroubled,
    hang_up,
    read_log,
    send_fuzz,
    settled_connections,
    shut_down,
    storm,
    troubling_records,
)
from tests.test_fuzz import random_text as fuzz_text
from tests.test_irc_live import free_port
from tests.tls_helpers import READ_CHUNK, RawTls, certificate

# Each of the two runs (guests off, then on): 4 s in all by default, CI's time.
SECONDS = float(os.environ.get("CHATD_FUZZ_SECONDS", "2"))
HOSTILE_CONNECTIONS = 6
MIN_ROUNDS = 20  # messages the good clients exchange at least, however short the run
STEP_TIMEOUT = 15.0  # any single wait of a good client
SERVER = "irc.fuzz"
ROOM = "#fuzzroom"

GOOD = ("alice", "bob")
FUZZ_USERS = [f"fz{i}" for i in range(HOSTILE_CONNECTIONS)]
# Nicks guests take (when guests are on): free names the fuzzers fight over, account
# names, and names that are no valid new name.
GUESTS = ["gu0", "gu1", "gu2"]
GUEST_NICKS = [*GUESTS, *GUESTS, *GOOD, *FUZZ_USERS, "ALICE", "Gu0", "gu0_", "x" * 33, "名前", "*"]
# Every command the machine or the session knows, and some it does not.
KNOWN = ["CAP", "PING", "PONG", "QUIT", "NICK", "USER", "PASS", "AUTHENTICATE", *_COMMANDS]
COMMANDS = [*KNOWN, "TAGMSG", "KICK", "INVITE", "AWAY", "ISON", "MOTD", "privmsg", "Join", "001"]
NAMES = [
    *GOOD, *FUZZ_USERS, *GUESTS, "nobody", "ALICE", "Straße", "名前", "*", "-", "+", ":", "a:b",
    "x" * 33, "x" * 300,
]
CHANNELS = [
    ROOM, "#fz", "#", "##", "#a,#b", "#,", ",", "#Straße", "#" + "y" * 40, "#名前", "#\u200b",
]
REFERENCES = [
    "*", "msgid=1", "msgid=0", "msgid=-1", "msgid=" + "9" * 30, "msgid=²", "msgid=١٢", "msgid=",
    "timestamp=2024-01-01T00:00:00.000Z", "timestamp=0000-01-01T00:00:00Z",
    "timestamp=9999-12-31T23:59:59.999999Z", "timestamp=2024-02-30T25:61:61Z",
    "timestamp=now", "timestamp=", "=", "msgid=1=2",
]
NUMBERS = ["0", "1", "-1", "10", "200", "201", "9" * 40, "+5", " 5", "1_0", "1e9", "٣", "nan"]


# As test_fuzz's, with IRC's separators for controls (CR, LF and NUL end or break a line).
ALPHABETS = (
    FRAME_ALPHABETS[0], " :,#*=;@!\\\x01\x02\t\x7f\u200b\ufeff\u202e", FRAME_ALPHABETS[2],
)


def random_text(rng: random.Random, longest: int = 40) -> str:
    return fuzz_text(rng, longest, ALPHABETS)


def random_param(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice(NAMES)
    if kind == 1:
        return rng.choice(CHANNELS)
    if kind == 2:
        return rng.choice(REFERENCES)
    if kind == 3:
        return rng.choice(NUMBERS)
    if kind == 4:
        return ",".join(rng.choice([*NAMES, *CHANNELS, ""]) for _ in range(rng.randint(0, 6)))
    if kind == 5:
        return rng.choice(["LATEST", "BEFORE", "AFTER", "AROUND", "BETWEEN", "TARGETS", "LS",
                           "REQ", "END", "LIST", "PLAIN", "+", "*", "+b", "b", "-i", "+o"])
    if kind == 6:
        return "x" * rng.choice([100, 400, 500, 600])
    return random_text(rng)


def line(command: str, params: list[str], trailing: bool | None = None) -> str:
    """Parameters written as given: a middle one may hold a space (on purpose)."""
    if params and (trailing or (trailing is None and " " in params[-1])):
        return " ".join([command, *params[:-1], ":" + params[-1]])
    return " ".join([command, *params])


def junk_tags(rng: random.Random) -> str:
    tags = rng.choice(
        [
            "label=" + random_text(rng, 10).replace(" ", ""),
            "+draft/reply=1;+typing=active",
            "a=b;a=c;;=;x",
            "time=2024-01-01T00:00:00Z;msgid=99;batch=B1;account=alice",
            "k=\\:\\s\\\\\\r\\n\\",
            "=" * rng.randint(1, 20),
            ";".join(f"k{i}=v" for i in range(rng.randint(1, 400))),
        ]
    )
    return "@" + tags


@dataclass
class Fuzzer:
    """Builds hostile lines for one connection."""

    rng: random.Random
    user: str
    guests: bool = False  # the server takes guests: some connections never log in

    def command(self) -> str:
        """A command chatd knows (or not), with random, missing, extra or huge parameters."""
        rng = self.rng
        command = rng.choice(COMMANDS)
        params = [random_param(rng) for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4, 8, 20]))]
        if command == "QUIT" and rng.random() < 0.8:
            command = "PING"  # a QUIT ends the connection: rarely
        text = line(command, params, trailing=rng.random() < 0.5 or None)
        return (junk_tags(rng) + " " + text) if rng.random() < 0.15 else text

    def typical(self) -> str:
        """Commands a real client sends, with junk in places."""
        rng = self.rng
        target = rng.choice([ROOM, ROOM, "#fz", *GOOD, rng.choice(FUZZ_USERS), rng.choice(GUESTS)])
        text = random_text(rng, 80) or "hi"
        if self.guests and rng.random() < 0.01:
            return f"QUIT :{text}"  # a guest ends: its name is free again
        return rng.choice(
            [
                f"PRIVMSG {target} :{text}",
                f"NOTICE {target} :{text}",
                f"PRIVMSG {target},{target},#fz,nobody,{ROOM} :{text}",
                f"PRIVMSG {target} :\x01ACTION {text}\x01",
                f"PRIVMSG {target} :\x01VERSION\x01",
                f"@+typing=active TAGMSG {target}",
                f"JOIN {rng.choice(CHANNELS)}",
                f"PART {rng.choice(CHANNELS)} :{text}",
                f"CHATHISTORY {rng.choice(['LATEST', 'BEFORE', 'AFTER', 'AROUND'])} {target}"
                f" {rng.choice(REFERENCES)} {rng.choice(NUMBERS)}",
                f"CHATHISTORY BETWEEN {target} {rng.choice(REFERENCES)}"
                f" {rng.choice(REFERENCES)} {rng.choice(NUMBERS)}",
                f"CHATHISTORY TARGETS {rng.choice(REFERENCES)} {rng.choice(REFERENCES)}"
                f" {rng.choice(NUMBERS)}",
                f"MARKREAD {target} {rng.choice(REFERENCES)}",
                f"MARKREAD {target}",
                f"WHO {target}",
                f"WHOIS {target}",
                f"NAMES {target}",
                "LIST",
                f"MODE {target} {random_param(rng)}",
                f"TOPIC {target} :{text}",
                f"PING :{text}",
                f"PONG :{text}",
                f"@label={rng.randrange(99)} PING x",
                f"CAP REQ :{' '.join(rng.sample(sorted(CAPABILITIES), rng.randint(1, 4)))}",
                f"NICK {rng.choice(GUEST_NICKS)}",
            ]
        )

    def registration(self) -> list[str]:
        """CAP, SASL, PASS, NICK and USER, in order or not, repeated or not."""
        rng = self.rng
        plain = base64.b64encode(f"\0{self.user}\0{PASSWORD}".encode()).decode()
        wrong = base64.b64encode(f"\0{rng.choice(GOOD)}\0guess".encode()).decode()
        pieces = [
            "CAP LS 302", "CAP LS", "CAP LIST", "CAP END", "CAP REQ :sasl", "CAP REQ :nope",
            "CAP REQ :-sasl message-tags", "CAP", "CAP BOGUS",
            "AUTHENTICATE PLAIN", "AUTHENTICATE EXTERNAL", "AUTHENTICATE *", "AUTHENTICATE +",
            f"AUTHENTICATE {plain}", f"AUTHENTICATE {wrong}", "AUTHENTICATE " + "A" * 400,
            "AUTHENTICATE !!!!", "AUTHENTICATE", "AUTHENTICATE " + "QUFB" * 100,
            f"PASS {self.user}:{PASSWORD}", f"PASS :{self.user}:{PASSWORD}", "PASS", "PASS x:",
            f"PASS {rng.choice(GOOD)}:guess", f"NICK {self.user}", f"NICK {rng.choice(NAMES)}",
            "NICK", f"USER {self.user} 0 * :{self.user}", "USER a", "USER a b c :d",
            f"NICK {rng.choice(GUEST_NICKS)}",
        ]
        return [rng.choice(pieces) for _ in range(rng.randint(1, 12))]

    def login(self) -> list[str]:
        """A proper registration, so that the lines after reach past the gate."""
        if self.guests and self.rng.random() < 0.4:
            return self.guest_login()
        if self.rng.random() < 0.5:
            plain = base64.b64encode(f"\0{self.user}\0{PASSWORD}".encode()).decode()
            return [
                "CAP LS 302", f"NICK {self.user}", f"USER {self.user} 0 * :x",
                "CAP REQ :sasl message-tags server-time batch labeled-response echo-message",
                "AUTHENTICATE PLAIN", f"AUTHENTICATE {plain}", "CAP END",
            ]
        # The trailing form: the password has spaces.
        return [f"PASS :{self.user}:{PASSWORD}", f"NICK {self.user}", f"USER {self.user} 0 * :x"]

    def guest_login(self) -> list[str]:
        """NICK and USER without a login: a guest, unless the nick is taken or invalid
        (433, 432), when the NICKs after it are tried in turn."""
        rng = self.rng
        nicks = [rng.choice(GUEST_NICKS) for _ in range(rng.randint(1, 3))]
        return [f"NICK {nicks[0]}", "USER guest 0 * :guest", *(f"NICK {n}" for n in nicks[1:])]

    def chunk(self) -> bytes:
        """Bytes to write: one line, several, part of one, or garbage."""
        rng = self.rng
        end = rng.choice([b"\r\n", b"\r\n", b"\n", b"\r\r\n"])
        kind = rng.randrange(16)
        if kind <= 2:
            return self.command().encode() + end
        if kind <= 5:
            return self.typical().encode() + end
        if kind == 6:
            return b"".join(text.encode() + end for text in self.registration())
        if kind == 7:  # random bytes, line ends included
            return rng.randbytes(rng.randint(1, 300))
        if kind == 8:  # over 512 bytes, or over the tag limit, or over what is buffered
            size = rng.choice([511, 512, 513, 600, 4095, 5000, 9000, 20000])
            if rng.random() < 0.5:
                return b"@t=" + b"v" * size + b" PING x" + end
            return b"PRIVMSG " + ROOM.encode() + b" :" + b"z" * size + rng.choice([end, b""])
        if kind == 9:  # a line without its end: the next one is read as its rest
            return self.typical().encode()[: rng.randint(1, 60)]
        if kind == 10:  # not UTF-8
            text = self.typical().encode()
            at = rng.randrange(len(text) + 1)
            bad = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
            return text[:at] + bad + text[at:] + end
        if kind == 11:  # NUL bytes
            text = self.typical().encode()
            at = rng.randrange(len(text) + 1)
            return text[:at] + b"\x00" * rng.randint(1, 3) + text[at:] + end
        if kind == 12:  # a flood of pipelined lines
            many = [self.typical() for _ in range(rng.randint(20, 200))]
            return "".join(text + "\r\n" for text in many).encode()
        if kind == 13:  # a real line with bytes flipped, inserted or deleted
            mutated = bytearray(self.typical().encode())
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(mutated) + 1)
                if at < len(mutated) and rng.random() < 0.5:
                    mutated[at] ^= 1 << rng.randrange(8)
                else:
                    mutated[at:at] = rng.randbytes(rng.randint(1, 3))
            return bytes(mutated) + end
        if kind == 14:  # junk tags on a real line
            return (junk_tags(rng) + " " + self.typical()).encode() + end
        return rng.choice([b"\r\n", b"\n", b" \r\n", b"@\r\n", b":src\r\n", b"@a :src\r\n", b":"])


@dataclass
class Report:
    connections: int = 0
    chunks: int = 0
    lines: int = 0
    commands: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    tls_sessions: int = 0  # connections that fuzz IRC over TLS
    tls_mischief: dict[str, int] = field(default_factory=dict)  # TLS itself mistreated
    guests: int = 0  # welcomes of a guest


def line_problem(raw: bytes) -> str | None:
    """What is wrong with a line the server sent (with its line end), if anything."""
    if not raw.endswith(b"\r\n") or b"\r" in raw[:-2]:
        return "no CRLF"
    body = raw[:-2]
    tags, rest = b"", body
    if body.startswith(b"@"):
        tags, _, rest = body.partition(b" ")
    if len(tags) + 1 > MAX_TAGS or len(rest) + 2 > MAX_LINE:
        return "too long"
    if b"\x00" in body:
        return "NUL"
    # Parameters are separated by one space: two mean an empty middle parameter.
    middle = rest.partition(b" :")[0]
    if b"  " in middle or middle.endswith(b" "):
        return "empty parameter"
    try:
        message = parse(body)
    except LineError as error:
        return f"unparsable ({error.kind})"
    if message is None:
        return "blank"
    return None


async def read_lines(
    reader: asyncio.StreamReader, report: Report, welcomed: asyncio.Event
) -> None:
    """Takes whatever the server says to a hostile client, and checks it is well formed."""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while raw := await reader.readline():
            if not raw.endswith(b"\n"):  # the end of the stream cut a line
                report.problems.append(f"line cut at the close: {raw!r:.200}")
                return
            report.lines += 1
            problem = line_problem(raw)
            if problem is not None:
                report.problems.append(f"{problem}: {raw!r:.300}")
                continue
            message = parse(raw[:-2])
            assert message is not None
            report.commands[message.command] = report.commands.get(message.command, 0) + 1
            if message.command == "001" and message.params[0] in GUEST_NICKS:
                report.guests += message.params[0] not in (*GOOD, *FUZZ_USERS)
            if message.command in ("001", "464", "904", "432", "433"):
                welcomed.set()


@dataclass(frozen=True)
class Ports:
    """The server's IRC ports, and a TLS context that trusts its certificate."""

    plain: int
    tls: int
    context: ssl.SSLContext


async def hostile(ports: Ports, fuzzer: Fuzzer, deadline: float, report: Report) -> None:
    """Connect, throw lines, and connect again whenever the server hangs up: to the
    plain port mostly, to the TLS port often, and now and then mistreating TLS."""
    loop = asyncio.get_running_loop()
    rng = fuzzer.rng
    while loop.time() < deadline:
        report.connections += 1
        roll = rng.random()
        if roll < 0.1:
            await tls_mischief(ports, fuzzer, deadline, report)
        elif roll < 0.35:
            report.tls_sessions += 1
            await hostile_session(ports.tls, ports.context, fuzzer, deadline, report)
        else:
            await hostile_session(ports.plain, None, fuzzer, deadline, report)


async def hostile_session(
    port: int, tls: ssl.SSLContext | None, fuzzer: Fuzzer, deadline: float, report: Report
) -> None:
    """One connection that speaks IRC, badly."""
    loop = asyncio.get_running_loop()
    rng = fuzzer.rng
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    reader._limit = 2**20  # type: ignore[attr-defined]  # readline() takes any line
    # Most connections read what they are sent; a few never do.
    welcomed = asyncio.Event()
    reading = (
        asyncio.create_task(read_lines(reader, report, welcomed))
        if rng.random() < 0.9
        else None
    )
    try:
        if rng.random() < 0.7:  # most log in first, to reach past the gate
            writer.write("".join(text + "\r\n" for text in fuzzer.login()).encode())
            if reading is not None:  # and wait for it, else the lines after hit 451
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(2, max(deadline - loop.time(), 0))):
                        await welcomed.wait()
        for _ in range(rng.randint(1, 60)):
            if loop.time() >= deadline or (reading is not None and reading.done()):
                break
            report.chunks += 1
            await send_fuzz(writer, fuzzer.chunk(), rng, deadline)
    except (ConnectionError, TimeoutError, ssl.SSLError):
        pass  # the server hung up, or stopped reading a client that does not read
    finally:
        await hang_up(writer, rng)
        if reading is not None:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)


TLS_MISCHIEF = ["plain text", "half handshake", "garbage records", "no close_notify"]


def garbage_record(rng: random.Random) -> bytes:
    """A whole TLS record that cannot be decrypted, one longer than TLS allows, or a
    plain-text line: the end of the connection, whichever the server reads."""
    kind = rng.randrange(4)
    if kind == 0:  # a record of any content type with a payload of random bytes
        # (never 1 byte: a change_cipher_spec of 1 byte may be ignored in TLS 1.3)
        payload = rng.randbytes(rng.choice([2, 16, 300, 2**14]))
        header = bytes([rng.choice([0x14, 0x15, 0x16, 0x17, rng.randrange(256)]), 3, 3])
        return header + len(payload).to_bytes(2, "big") + payload
    if kind == 1:  # application data over the record size limit (2**14 + 256)
        return b"\x17\x03\x03\xff\xff" + rng.randbytes(rng.choice([0, 100]))
    if kind == 2:  # a TLS record header announcing an unknown version
        return b"\x17\xfe\xff\x00\x10" + rng.randbytes(16)
    return b"PRIVMSG #fuzzroom :in the clear\r\n"


async def tls_mischief(ports: Ports, fuzzer: Fuzzer, deadline: float, report: Report) -> None:
    """A connection to the TLS port that mistreats TLS itself: the server must end it
    (when it can tell), and log no more than a line about it."""
    rng = fuzzer.rng
    kind = rng.choice(TLS_MISCHIEF)
    report.tls_mischief[kind] = report.tls_mischief.get(kind, 0) + 1
    async with asyncio.timeout(5):
        tls = await RawTls.open(ports.tls, ports.context)
    reader, writer = tls.reader, tls.writer
    login = "".join(text + "\r\n" for text in fuzzer.login()).encode()
    try:
        if kind == "plain text":  # IRC in the clear, as to the plain port
            writer.write(login + fuzzer.chunk())
            await must_close(tls, report, kind)
        elif kind == "half handshake":  # a ClientHello, then silence or garbage
            tls.hello()
            if rng.random() < 0.5:
                await reader.read(READ_CHUNK)  # the server's answer, left unanswered
            if rng.random() < 0.5:
                writer.write(garbage_record(rng))
                await must_close(tls, report, kind)
            else:  # stalled: let it wait a little, then hang up mid-handshake
                left = deadline - asyncio.get_running_loop().time()
                await asyncio.sleep(min(rng.uniform(0, 0.5), max(left, 0)))
        else:
            await tls.handshake()
            tls.send(login)
            for _ in range(rng.randint(0, 5)):
                tls.send(fuzzer.chunk())
            if kind == "garbage records":
                writer.write(garbage_record(rng))
            else:  # the end of the stream with no close_notify before it
                writer.write_eof()
            await must_close(tls, report, kind)
    except (ConnectionError, TimeoutError, ssl.SSLError):
        pass  # the server hung up first, or sent what our TLS could not take
    finally:
        await hang_up(writer, rng)


async def must_close(tls: RawTls, report: Report, kind: str) -> None:
    if not await tls.closed(within=STEP_TIMEOUT / 3):
        report.problems.append(f"TLS port, {kind}: the connection was not closed")


class GoodIrc:
    """A well-behaved IRC client: its lines in a queue, PINGs answered as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.lines: asyncio.Queue[str] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())
        self.pings = 0

    @classmethod
    async def connect(cls, port: int, tls: ssl.SSLContext | None = None) -> GoodIrc:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
        return cls(reader, writer)

    async def _read(self) -> None:
        while raw := await self.reader.readline():
            text = raw.decode().removesuffix("\r\n")
            if text.startswith("PING "):
                self.send("PONG " + text[5:])
            else:
                self.lines.put_nowait(text)
        self.lines.put_nowait("")  # the end

    def send(self, *lines: str) -> None:
        self.writer.write("".join(text + "\r\n" for text in lines).encode())

    async def expect(self, pattern: str) -> str:
        """The next line matching; an error reply on the way is a failure."""
        wanted = re.compile(pattern)
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                text = await self.lines.get()
                assert text, f"closed while waiting for {pattern!r}"
                if wanted.search(text):
                    return text
                words = text.split(" ")
                if words[0] == f":{SERVER}":
                    assert not re.fullmatch(r"[45]\d\d|FAIL|ERROR", words[1]), text

    async def round_trip(self, token: str) -> list[str]:
        """Every line before the PONG to a PING sent now."""
        self.pings += 1
        self.send(f"PING {token}")
        before: list[str] = []
        async with asyncio.timeout(STEP_TIMEOUT):
            while (text := await self.lines.get()) != f":{SERVER} PONG {SERVER} :{token}":
                assert text, "closed during a PING"
                before.append(text)
        return before

    async def close(self) -> None:
        self.writer.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def good_login(
    port: int, name: str, password: str, sasl: bool, tls: ssl.SSLContext | None = None
) -> GoodIrc:
    client = await GoodIrc.connect(port, tls)
    if sasl:
        plain = base64.b64encode(f"\0{name}\0{password}".encode()).decode()
        client.send("CAP LS 302", f"NICK {name}", f"USER {name} 0 * :{name}", "CAP REQ :sasl")
        client.send("AUTHENTICATE PLAIN")
        await client.expect(r"^AUTHENTICATE \+$")
        client.send(f"AUTHENTICATE {plain}")
        await client.expect(f" 903 {name} ")
        client.send("CAP END")
    else:
        client.send(f"PASS :{name}:{password}", f"NICK {name}", f"USER {name} 0 * :{name}")
    await client.expect(f" 422 {name} ")
    return client


@dataclass
class Chat:
    """Two IRC clients that message each other, in a channel and privately."""

    clients: dict[str, GoodIrc]
    sent: dict[str, list[str]] = field(default_factory=lambda: {n: [] for n in GOOD})
    received: dict[str, list[str]] = field(default_factory=lambda: {n: [] for n in GOOD})
    numbers: int = 0
    other_lines: int = 0
    finished: list[float] = field(default_factory=list)  # loop time of each round's end

    async def next_from(self, name: str, sender: str) -> tuple[str, str]:
        """The next PRIVMSG to ``name`` from ``sender``: (target, text); others skipped."""
        prefix = f":{sender}!{sender}@chatd PRIVMSG "
        text = await self.clients[name].expect(f"^{re.escape(prefix)}")
        target, _, body = text.removeprefix(prefix).partition(" :")
        return target, body

    async def run(self, deadline: float) -> int:
        loop = asyncio.get_running_loop()
        rounds = 0
        while rounds < MIN_ROUNDS or loop.time() < deadline:
            number = self.numbers
            self.numbers += 1
            sender, recipient = GOOD if number % 2 == 0 else GOOD[::-1]
            target = ROOM if number % 4 < 2 else recipient
            text = f"{sender} to {target}, number {number} é😀"
            self.clients[sender].send(f"PRIVMSG {target} :{text}")
            self.sent[recipient].append(text)
            # Nothing but its PONG (or others' traffic) answers a PRIVMSG that went well.
            for before in await self.clients[sender].round_trip(f"good-{number}"):
                words = before.split(" ")
                assert words[0] != f":{SERVER}" or words[1] == "MARKREAD", before
            shown, body = await self.next_from(recipient, sender)
            self.received[recipient].append(body)
            assert (shown, body) == (target, text), "a message was lost, repeated or reordered"
            rounds += 1
            self.finished.append(loop.time())
        return rounds

    def rates(self, start: float, end: float, parts: int = 4) -> list[float]:
        """Rounds per second in each of ``parts`` equal stretches of [start, end]: a
        server that slows down under hostile traffic shows here."""
        length = (end - start) / parts
        counts = [0] * parts
        for when in self.finished:
            if start <= when < end:
                counts[int((when - start) / length)] += 1
        return [round(count / length, 1) for count in counts]

    async def check_nothing_more(self) -> None:
        """After a round trip, no message from the other good client is left over."""
        for name in GOOD:
            for text in await self.clients[name].round_trip("end"):
                assert not any(text.startswith(f":{g}!") for g in GOOD), text


@pytest.mark.parametrize("guests", [False, True], ids=["accounts-only", "guests"])
async def test_hostile_irc_clients_do_not_disturb_well_behaved_ones(
    spawn: Spawn, tmp_path: Path, guests: bool
) -> None:
    seed = int(os.environ.get("CHATD_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    rerun = f"seed {seed}: rerun with CHATD_FUZZ_SEED={seed}"
    print(rerun)  # shown by pytest when the test fails
    cert_file, key_file, context = certificate(tmp_path)
    ports = Ports(free_port(), free_port(), context)
    server = await spawn(
        "--graceful-timeout", "1", "--server-name", SERVER, "--irc-port", str(ports.plain),
        "--irc-tls-port", str(ports.tls), "--tls-cert", str(cert_file), "--tls-key", str(key_file),
        f"--{'' if guests else 'no-'}irc-guests",
    )
    port = await server.wait_listening()  # logged once the IRC ports listen too
    log = asyncio.create_task(read_log(server))
    report = Report()
    clients: dict[str, GoodIrc] = {}
    troubles: list[str] = []  # checked last: a leak or a log error is worth the whole report
    try:
        async with asyncio.timeout(SECONDS + 60):
            for name in GOOD:
                await account(port, name, GOOD_PASSWORD, context)
            for name in FUZZ_USERS:
                await account(port, name, PASSWORD, context)
            # alice: SASL on the plain port; bob: PASS over TLS.
            for name, sasl, tls in zip(GOOD, (True, False), (None, context), strict=True):
                irc_port = ports.tls if tls else ports.plain
                clients[name] = await good_login(irc_port, name, GOOD_PASSWORD, sasl, tls)
                clients[name].send(f"JOIN {ROOM}")
                await clients[name].expect(f" 366 {name} {ROOM} ")
            chat = Chat(clients)
            rounds, growth, deadline = await storm(
                server, chat, report, SECONDS, rerun, lambda end: [
                    hostile(ports, Fuzzer(random.Random(f"{seed}/{i}"), user, guests), end,
                            report)
                    for i, user in enumerate(FUZZ_USERS)
                ])
            assert report.commands.get("001"), report  # the fuzzers got past registration
            assert report.tls_sessions and report.tls_mischief, report
            assert report.guests if guests else not report.guests, report

            # A newcomer is served as usual.
            await account(port, "carol", PASSWORD, context)
            carol = await good_login(ports.tls, "carol", PASSWORD, sasl=True, tls=context)
            carol.send("PRIVMSG alice :after the storm")
            await carol.round_trip("sent")
            assert await chat.next_from("alice", "carol") == ("alice", "after the storm")
            await carol.close()

            # Every hostile connection is closed: the server lets go of them all.
            probe = await Client.connect("127.0.0.1", port, ssl=context, timeout=STEP_TIMEOUT)
            async with probe:
                await probe.login("carol", PASSWORD)
                left = await settled_connections(probe, len(GOOD) + 1, within=2)
                # and every guest with it: its name is free again
                for name in GUESTS:
                    reply = await probe.call("/user/info", {"name": name})
                    if reply["code"] != 5:
                        troubles.append(f"guest {name} outlived its connection: {reply}")
            if left > len(GOOD) + 1:
                troubles.append(f"{left - len(GOOD) - 1} hostile connections still open")
            await shut_down(server, clients.values(), log)
    finally:
        for client in clients.values():
            await client.close()
        log.cancel()
    rates = "/".join(map(str, chat.rates(deadline - SECONDS, deadline)))
    print(f"{rounds} good rounds ({rates} a second by quarter), RSS growth {growth >> 10} KiB;"
          f" {report} ({rerun})")
    text = server.stderr.decode(errors="replace")
    records = troubling_records(text)
    if "Unhandled" in text:
        records.append(text[text.index("Unhandled") - 200 :][:3000])
    assert_untroubled(records, troubles, rerun)
