"""Hostile bytes against a live server process while two well-behaved clients chat.

The run is random but reproducible frame by frame: the seed is printed, and
``CHATD_FUZZ_SEED=<seed>`` replays the same frames (their interleaving across
connections still depends on timing).  ``CHATD_FUZZ_SECONDS`` sets the duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import signal
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from chatd.client import MAX_REPLY_SIZE, Client
from chatd.codec import HEADER, FrameDecoder, Malformed, Oversize, encode_frame
from chatd.handlers import OPS
from tests.conftest import PASSWORD, Process, Spawn

SECONDS = float(os.environ.get("CHATD_FUZZ_SECONDS", "3"))
HOSTILE_CONNECTIONS = 6
MAX_FRAME = 65536  # the server's default max_frame_size
# A leak keeps growing; the C heap's high-water mark under hostile traffic levels off
# (+50-90 MiB after a minute, most of it free memory glibc keeps: docs/benchmarks.md).
# Short runs (CI's) bound the growth; long ones bound its last quarter, and the total
# more loosely.
RSS_GROWTH_LIMIT = 64 * 1024 * 1024
LONG_RUN = 15.0  # seconds from which a run is judged by its last quarter
LONG_RUN_GROWTH_LIMIT = 128 * 1024 * 1024
LAST_QUARTER_GROWTH_LIMIT = 24 * 1024 * 1024
MIN_ROUNDS = 20  # messages the good clients exchange at least, however short the run
STEP_TIMEOUT = 15.0  # any single wait of a good client

# The well-behaved users have a password the fuzzers never use, so that no random
# /login can act for them.
GOOD = ("alice", "bob")
GOOD_PASSWORD = "well behaved and secret"
FUZZ_USERS = [f"fz{i}" for i in range(HOSTILE_CONNECTIONS)]
NAMES = [*GOOD, *FUZZ_USERS, "general", "nobody", "ALICE", "Straße", "名前", "a b", "", "x" * 33]
OP_NAMES = [*OPS, "/", "/nope", "/SEND", "send", "/send/", "/send\x00", ""]
EDGE_INTS = [0, 1, -1, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**31)]


async def send_fuzz(writer: asyncio.StreamWriter, data: bytes, rng: random.Random,
                    deadline: float) -> None:
    """Write ``data``, now and then dribbled out in small pieces, and wait for it to go
    (until ``deadline``, on the loop's clock; at least 50 ms)."""
    if rng.random() < 0.05:
        for start in range(0, min(len(data), 64), 7):
            writer.write(data[start : start + 7])
            await asyncio.sleep(0)
        data = data[64:]
    writer.write(data)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(max(deadline - loop.time(), 0.05)):
        await writer.drain()


async def hang_up(writer: asyncio.StreamWriter, rng: random.Random) -> None:
    """End a hostile connection: now and then with a reset (RST), else a clean close."""
    if rng.random() < 0.2:
        sock = writer.get_extra_info("socket")  # None once a TLS transport lost its socket
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()
    try:
        async with asyncio.timeout(2):
            await writer.wait_closed()
    except TimeoutError:
        # close() waits to flush what we wrote, and the server stopped reading a client
        # that does not read: give up the way a real client would.
        writer.transport.abort()
    except (ConnectionError, ssl.SSLError):
        pass  # the server hung up first, or (TLS) wrote on after our close_notify


def memory_problem(before: int, late: int, after: int, seconds: float) -> str | None:
    """What is wrong with a run's RSS (before it, at the start of its last quarter,
    after it), if anything: a short run's growth, a long one's last quarter and total."""
    growth, late_growth = after - before, after - late
    if seconds < LONG_RUN:
        return f"RSS grew by {growth >> 20} MiB" if growth >= RSS_GROWTH_LIMIT else None
    if late_growth >= LAST_QUARTER_GROWTH_LIMIT:
        return f"RSS grew by {late_growth >> 20} MiB in the last quarter"
    return f"RSS grew by {growth >> 20} MiB" if growth >= LONG_RUN_GROWTH_LIMIT else None


async def rss_at(pid: int, when: float) -> int:
    """The process's resident memory at loop time ``when`` (a measurement's clock)."""
    await asyncio.sleep(max(0.0, when - asyncio.get_running_loop().time()))
    return rss(pid)


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


# Random values and frames.


# A text is drawn from one of these: plain, controls and invisibles, beyond ASCII.
ALPHABETS = (
    "abcdefghijklmnopqrstuvwxyz0123456789_-.",
    "\x00\x01\t\n\r \x7f\u200b\ufeff\u202e",
    "éßЖ中名😀\U0010ffff\u0301",
)


def random_text(rng: random.Random, longest: int = 40,
                alphabets: Sequence[str] = ALPHABETS) -> str:
    alphabet = rng.choice(alphabets)
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(13 if depth < 3 else 9)
    if kind == 0:
        return rng.randint(-1000, 1000)
    if kind == 1:
        return rng.choice(EDGE_INTS)
    if kind == 2:
        return rng.choice([0.0, -1.5, 1e308, float("inf"), float("nan"), 3.0])
    if kind == 3:
        return rng.random() < 0.5
    if kind == 4:
        return None
    if kind == 5:
        return random_text(rng)
    if kind == 6:
        return rng.randbytes(rng.randint(0, 20))
    if kind == 7:
        return rng.choice(NAMES)
    if kind == 8:
        return msgpack.ExtType(rng.randint(0, 127), rng.randbytes(rng.randint(0, 8)))
    if kind == 9:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == 10:
        return {random_text(rng, 8): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if kind == 11:
        return {rng.randint(-5, 5): random_value(rng, depth + 1)}  # a key that is no string
    return {b"op": "/ping", b"name": b"alice"}  # bin keys


@dataclass
class Fuzzer:
    """Builds hostile frames for one connection from real requests."""

    rng: random.Random
    user: str

    def template(self) -> dict[str, Any]:
        rng = self.rng
        name = rng.choice(NAMES)
        text = random_text(rng, 60) or "hi"
        requests: list[dict[str, Any]] = [
            {"op": "/ping"},
            {"op": "/stats"},
            {
                "op": "/register",
                "params": {
                    "name": f"{self.user}-{rng.randrange(10**6)}",
                    "password": PASSWORD,
                    "password_repete": PASSWORD,
                },
            },
            {"op": "/login", "params": {"name": "fzlogin", "password": PASSWORD}},
            {"op": "/login", "params": {"name": self.user, "password": PASSWORD}},
            {"op": "/logout"},
            {"op": "/user/info", "params": {"name": name}},
            {"op": "/send", "params": {"name": rng.choice(GOOD), "msg": text}},
            {
                "op": "/send",
                "params": {
                    "name": name,
                    "msg": text,
                    "client_id": str(rng.randrange(50)),
                },
            },
            {"op": "/receive"},
            {"op": "/receive", "params": {"name": name}},
            {
                "op": "/history",
                "params": {
                    "name": name,
                    "before": rng.choice(EDGE_INTS),
                    "limit": rng.choice(EDGE_INTS),
                },
            },
            {"op": "/subscribe"},
            {"op": "/unsubscribe"},
            {"op": "/ack", "params": {"id": rng.choice(EDGE_INTS)}},
            {"op": "/ack", "params": {"id": rng.randrange(100), "channel": "general"}},
            {"op": "/channel/send", "params": {"name": "general", "message": text}},
            {
                "op": "/channel/send",
                "params": {
                    "name": name,
                    "message": text,
                    "client_id": str(rng.randrange(50)),
                },
            },
            {"op": "/channel/receive", "params": {"name": "general"}},
            {"op": "/channel/history", "params": {"name": "general", "limit": 5}},
            {"op": "/channel/join", "params": {"name": name}},
            {"op": "/channel/leave", "params": {"name": rng.choice(["general", name])}},
            {"op": "/channel/list"},
            {"op": "/channel/list_users", "params": {"name": name}},
        ]
        body = rng.choice(requests)
        if rng.random() < 0.5:
            body["id"] = rng.choice([*EDGE_INTS, rng.randrange(1000)])
        if rng.random() < 0.1:
            body["token"] = rng.choice([random_text(rng, 43), "A" * 43, ""])
        return body

    def frame(self) -> bytes:
        """Bytes to write: one frame, several, part of one, or garbage."""
        rng = self.rng
        kind = rng.randrange(16)
        if kind <= 2:
            return encode_frame(self.template())
        if kind == 3:  # a real request with a parameter of a random type
            body = self.template()
            params = body.setdefault("params", {})
            params[rng.choice([*params, "name", "msg", "id", "x"])] = random_value(rng)
            return encode_frame(body)
        if kind == 4:  # a random op with random params, id and token
            body = {
                "op": rng.choice([*OP_NAMES, random_value(rng)]),
                "params": random_value(rng)
                if rng.random() < 0.3
                else {random_text(rng, 8): random_value(rng) for _ in range(rng.randint(0, 5))},
            }
            for key in ("id", "token"):
                if rng.random() < 0.5:
                    body[key] = random_value(rng)
            return encode_frame(body)
        if kind <= 7:  # a real request with bytes flipped, inserted or deleted
            mutated = bytearray(msgpack.packb(self.template(), use_bin_type=True))
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(mutated) + 1)
                action = rng.randrange(3)
                if action == 0 and at < len(mutated):
                    mutated[at] ^= 1 << rng.randrange(8)
                elif action == 1:
                    mutated[at:at] = rng.randbytes(rng.randint(1, 4))
                elif at < len(mutated):
                    del mutated[at : at + rng.randint(1, 3)]
            # Usually the header is right; sometimes the old one stays, out of step.
            return HEADER.pack(len(mutated)) + mutated
        if kind == 8:  # a frame cut short: what follows is read as its rest
            whole = encode_frame(self.template())
            return whole[: rng.randrange(1, len(whole))]
        if kind == 9:  # a length header over the limit: the server closes
            size = rng.choice([MAX_FRAME + 1, 2**31, 2**32 - 1, rng.randrange(MAX_FRAME, 2**32)])
            return HEADER.pack(size) + rng.randbytes(rng.randint(0, 64))
        if kind == 10:  # random bytes, random header included
            return rng.randbytes(rng.randint(1, 256))
        if kind == 11:  # deep nesting, inside and instead of the params
            depth = rng.choice([10, 100, 1000, 5000, 30000])
            opener = rng.choice([b"\x91", b"\x81\xa1k"])
            nested = opener * depth + b"\xc0"
            if rng.random() < 0.5:
                payload = b"\x82\xa2op\xa5/send\xa6params" + nested
            else:
                payload = b"\x83\xa2op\xa5/send\xa6params\x82\xa4name\xa3bob\xa3msg" + nested
            payload = payload[:MAX_FRAME]
            return HEADER.pack(len(payload)) + payload
        if kind == 12:  # huge strings, up to the frame limit
            unit = rng.choice(["x", "é", "名", "😀"])
            room = (MAX_FRAME - 100) // len(unit.encode())
            text = unit * rng.randint(room // 2, room)
            key = rng.choice(["msg", "name", "password", "client_id", "token"])
            body = {
                "op": rng.choice(["/send", "/register", "/login"]),
                "params": {"name": "bob", "msg": "x", "password": PASSWORD},
            }
            if key == "token":
                body["token"] = text
            else:
                body["params"][key] = text
            return encode_frame(body)
        if kind == 13:  # bodies that never decode to a request
            return (
                HEADER.pack(0)
                if rng.random() < 0.3
                else rng.choice(
                    [
                        encode_frame([1, 2, 3]),
                        encode_frame("just a string"),
                        encode_frame(None),
                        HEADER.pack(3) + b"\xa3\xff\xfe",  # invalid UTF-8
                        HEADER.pack(3) + b"\x81\xc0\xc0",  # a nil key
                        HEADER.pack(6) + b"\xd6\xff\x00\x00\x00\x01",  # a timestamp ext
                        HEADER.pack(2) + b"\x80\x80",  # bytes after the value
                        HEADER.pack(5) + b"\xdf\xff\xff\xff\xff",  # a map claiming 4 billion keys
                        HEADER.pack(5) + b"\xdb\x7f\xff\xff\xff",  # a str claiming 2 GiB
                    ]
                )
            )
        if kind == 14:  # a burst of pipelined frames
            return b"".join(encode_frame(self.template()) for _ in range(rng.randint(10, 300)))
        # A real request padded (with a parameter nobody reads) to exactly the limit.
        body = self.template()
        body.setdefault("params", {})["padding"] = "x" * 1000
        size = len(msgpack.packb(body, use_bin_type=True))
        body["params"]["padding"] = "x" * (1000 + MAX_FRAME - size)
        return encode_frame(body)


@dataclass
class Report:
    connections: int = 0
    frames: int = 0
    replies: int = 0
    events: int = 0
    codes: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


async def read_replies(reader: asyncio.StreamReader, report: Report) -> None:
    """Takes whatever the server says to a hostile client, and checks it is well formed."""
    decoder = FrameDecoder(MAX_REPLY_SIZE)
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            for body in decoder.feed(data):
                if isinstance(body, Malformed | Oversize) or not isinstance(body, dict):
                    report.problems.append(f"server sent a bad frame: {body!r:.200}")
                elif "event" in body:
                    report.events += 1
                    if "id" in body:
                        report.problems.append(f"event with an id: {body!r:.200}")
                else:
                    report.replies += 1
                    code = body.get("code")
                    if not isinstance(code, int) or not isinstance(body.get("msg"), str):
                        report.problems.append(f"bad reply: {body!r:.200}")
                    elif code not in range(9):  # 9 is a server error: a bug
                        report.problems.append(f"code {code} for a hostile frame: {body!r:.200}")
                    else:
                        report.codes[code] = report.codes.get(code, 0) + 1


async def hostile(port: int, fuzzer: Fuzzer, deadline: float, report: Report) -> None:
    """Connect, throw frames, and connect again whenever the server hangs up."""
    loop = asyncio.get_running_loop()
    rng = fuzzer.rng
    while loop.time() < deadline:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        report.connections += 1
        # Most connections read their replies; a few never do.
        reading = asyncio.create_task(read_replies(reader, report)) if rng.random() < 0.9 else None
        try:
            if rng.random() < 0.7:  # most start logged in, to reach past the gate
                login = {"op": "/login", "params": {"name": fuzzer.user, "password": PASSWORD}}
                writer.write(encode_frame(login))
            for _ in range(rng.randint(1, 40)):
                if loop.time() >= deadline or (reading is not None and reading.done()):
                    break
                report.frames += 1
                await send_fuzz(writer, fuzzer.frame(), rng, deadline)
        except (ConnectionError, TimeoutError):
            pass  # the server hung up, or stopped reading a client that does not read
        finally:
            await hang_up(writer, rng)
            if reading is not None:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)


@dataclass
class Chat:
    """Two well-behaved clients that message each other and check every delivery."""

    clients: dict[str, Client]
    received: dict[str, list[str]] = field(default_factory=lambda: {n: [] for n in GOOD})
    sent: dict[str, list[str]] = field(default_factory=lambda: {n: [] for n in GOOD})
    other_events: int = 0
    numbers: int = 0  # messages sent so far: unique texts and client_ids

    async def next_from(self, name: str, sender: str) -> dict[str, Any]:
        """The next message pushed to ``name`` by ``sender``; other events are skipped."""
        while True:
            event = await self.clients[name].next_event(timeout=STEP_TIMEOUT)
            data = event.get("data", {})
            if event.get("event") == "message" and data["name"] == sender and "to" not in data:
                return dict(data)
            self.other_events += 1

    async def run(self, deadline: float) -> int:
        """Exchange messages until the deadline (at least MIN_ROUNDS); returns how many."""
        loop = asyncio.get_running_loop()
        rounds = 0
        while rounds < MIN_ROUNDS or loop.time() < deadline:
            number = self.numbers
            self.numbers += 1
            sender, recipient = GOOD if number % 2 == 0 else GOOD[::-1]
            text = f"{sender} to {recipient}, number {number}"
            params = {"name": recipient, "msg": text, "client_id": f"good-{number}"}
            reply = await self.clients[sender].call("/send", params, timeout=STEP_TIMEOUT)
            assert reply["code"] == 0, reply
            self.sent[recipient].append(text)
            message = await self.next_from(recipient, sender)
            self.received[recipient].append(message["msg"])
            assert message["msg"] == text, "a message was lost, repeated or reordered"
            assert message["id"] == reply["data"]["id"]
            ack = await self.clients[recipient].call(
                "/ack", {"id": message["id"]}, timeout=STEP_TIMEOUT
            )
            assert ack["code"] == 0, ack
            rounds += 1
        return rounds

    async def check_nothing_more(self) -> None:
        """After a round trip, no message from the other good client is left over."""
        for name in GOOD:
            client = self.clients[name]
            assert (await client.call("/ping", timeout=STEP_TIMEOUT))["code"] == 0
            for event in client.waiting_events():
                data = event.get("data", {})
                assert not (event.get("event") == "message" and data.get("name") in GOOD), event


async def account(
    port: int, name: str, password: str, tls: ssl.SSLContext | None = None
) -> None:
    async with await Client.connect("127.0.0.1", port, ssl=tls, timeout=STEP_TIMEOUT) as client:
        await client.request(
            "/register", {"name": name, "password": password, "password_repete": password}
        )


# A chatd bug the fuzzer finds on most runs, pinned down by test_faults.py's
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ", re.MULTILINE)


def troubling_records(log: str) -> list[str]:
    """Log records at WARNING or above, or with a traceback."""
    starts = [m.start() for m in LOG_RECORD.finditer(log)] + [len(log)]
    records = [log[a:b] for a, b in itertools.pairwise(starts)]
    return [
        r
        for r in records
        if r.split(" ", 3)[2] in ("WARNING", "ERROR", "CRITICAL") or "Traceback" in r
    ]


async def settled_connections(client: Client, expected: int, within: float) -> int:
    """The server's connection count, once it is down to ``expected`` or ``within`` passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        count: int = (await client.request("/stats"))["connections"]
        if count <= expected or loop.time() > deadline:
            return count
        await asyncio.sleep(0.05)


async def test_hostile_clients_do_not_disturb_well_behaved_ones(spawn: Spawn) -> None:
    seed = int(os.environ.get("CHATD_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    rerun = f"seed {seed}: rerun with CHATD_FUZZ_SEED={seed}"
    print(rerun)  # shown by pytest when the test fails
    # The default event loop (uvloop), and a short shutdown grace: nothing should need it.
    server = await spawn("--graceful-timeout", "1")
    port = await server.wait_listening()
    log = asyncio.create_task(read_log(server))
    report = Report()
    clients: dict[str, Client] = {}
    troubles: list[str] = []  # checked last: a leak or a log error is worth the whole report
    try:
        async with asyncio.timeout(SECONDS + 60):
            for name in GOOD:
                await account(port, name, GOOD_PASSWORD)
            for name in FUZZ_USERS:
                await account(port, name, PASSWORD)
            for name in GOOD:
                clients[name] = await Client.connect("127.0.0.1", port, timeout=STEP_TIMEOUT)
                await clients[name].login(name, GOOD_PASSWORD)
                await clients[name].request("/subscribe")
            chat = Chat(clients)
            rounds, growth, _ = await storm(server, chat, report, SECONDS, rerun, lambda end: [
                hostile(port, Fuzzer(random.Random(f"{seed}/{i}"), user), end, report)
                for i, user in enumerate(FUZZ_USERS)
            ])
            assert report.codes.get(1), report  # the fuzzers reached the request parser

            # A newcomer is served as usual.
            await account(port, "carol", PASSWORD)
            async with await Client.connect("127.0.0.1", port, timeout=STEP_TIMEOUT) as carol:
                await carol.login("carol", PASSWORD)
                reply = await carol.request("/send", {"name": "alice", "msg": "after the storm"})
                message = await chat.next_from("alice", "carol")
                assert (message["id"], message["msg"]) == (reply["id"], "after the storm")

            # Every hostile connection is closed: the server lets go of them all.
            left = await settled_connections(clients["alice"], len(GOOD), within=2)
            if left > len(GOOD):
                troubles.append(f"{left - len(GOOD)} hostile connections still open")
            await shut_down(server, clients.values(), log)
    finally:
        for client in clients.values():
            await client.close()
        log.cancel()
    print(f"{rounds} good rounds, RSS growth {growth >> 10} KiB; {report} ({rerun})")
    records = troubling_records(server.stderr.decode(errors="replace"))
    assert_untroubled(records, troubles, rerun)


class Closing(Protocol):
    async def close(self) -> None: ...


async def shut_down(server: Process, clients: Iterable[Closing], log: asyncio.Task[None]
                    ) -> None:
    """The good clients gone, the server stops on SIGTERM, its log read to the end,
    and exits 0."""
    for client in clients:
        await client.close()
    server.proc.send_signal(signal.SIGTERM)
    await log
    assert await server.proc.wait() == 0, server.stderr.decode()[-3000:]


def assert_untroubled(records: list[str], troubles: list[str], rerun: str) -> None:
    """Checked last: a log error or a leak is worth more than the run's report."""
    assert not records, f"the server logged trouble ({rerun}):\n" + "".join(records[:3])[:6000]
    assert not troubles, f"{troubles[:3]} ({rerun})"


class GoodChat(Protocol):
    """The well-behaved clients of a fuzz test (this one's Chat, test_irc_fuzz's)."""

    sent: dict[str, list[str]]
    received: dict[str, list[str]]

    async def run(self, deadline: float) -> int: ...
    async def check_nothing_more(self) -> None: ...


class FuzzReport(Protocol):
    connections: int
    problems: list[str]


async def storm(
    server: Process, chat: GoodChat, report: FuzzReport, seconds: float, rerun: str,
    hostiles: Callable[[float], list[Awaitable[None]]],
) -> tuple[int, int, float]:
    """The good clients chat for ``seconds`` while ``hostiles(deadline)`` run beside
    them; then the server is alive, its memory within bounds (memory_problem), every
    good message came once, and the hostile side made HOSTILE_CONNECTIONS or more
    connections and saw no problem. (good rounds, RSS growth, the deadline)."""
    loop = asyncio.get_running_loop()
    await chat.run(loop.time())  # warm up before measuring memory
    rss_before = rss(server.proc.pid)
    deadline = loop.time() + seconds
    last_quarter = asyncio.ensure_future(rss_at(server.proc.pid, deadline - seconds / 4))
    talking = asyncio.ensure_future(chat.run(deadline))
    await asyncio.gather(talking, *hostiles(deadline))
    await chat.check_nothing_more()

    assert server.proc.returncode is None, f"the server died ({rerun})"
    rss_after = rss(server.proc.pid)
    problem = memory_problem(rss_before, await last_quarter, rss_after, seconds)
    assert problem is None, f"{problem} ({rerun})"
    assert not report.problems, f"{report.problems[:10]} ({rerun})"
    assert chat.received == chat.sent
    assert report.connections >= HOSTILE_CONNECTIONS
    return talking.result(), rss_after - rss_before, deadline


async def read_log(server: Process) -> None:
    """Keep reading the server's log, so that a full pipe never blocks it."""
    assert server.proc.stderr is not None
    while chunk := await server.proc.stderr.read(65536):
        server.stderr += chunk
