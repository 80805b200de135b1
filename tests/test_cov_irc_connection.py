"""The IRC transport's timeouts, caps and drops, over real sockets (chatd/irc/connection.py):
what happens to a client that goes silent, resets, does not read, or is busy at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import time

import pytest

from chatd.irc.connection import IrcConnection
from tests.conftest import Harness, MakeHarness
from tests.test_irc_live import SERVER, IrcClient, irc_harness

CLOSED = "chatd.irc.connection"  # the logger of "connection closed <peer>: <reason>"


def the_connection(harness: Harness) -> IrcConnection:
    irc = harness.server.irc
    assert irc is not None
    (connection,) = irc._connections  # the one open: nothing public lists them
    return connection


async def closed_reason(harness: Harness, caplog: pytest.LogCaptureFixture) -> str:
    """Wait for the one connection's task to end; the reason it logged."""
    task = the_connection(harness).task
    assert task is not None
    await asyncio.wait_for(asyncio.shield(task), 10)
    (record,) = [r for r in caplog.records if r.getMessage().startswith("connection closed")]
    return record.getMessage().split(": ", 1)[1]


async def read_line(irc: IrcClient) -> str:
    raw = await asyncio.wait_for(irc.reader.readline(), 10)
    return raw.decode().rstrip("\r\n")


async def test_a_silent_client_is_pinged_then_closed(make_harness: MakeHarness) -> None:
    harness, port = await irc_harness(make_harness, ping_interval=0.2, ping_timeout=0.3)
    await harness.user("alice")
    irc = await IrcClient.connect(port)
    await irc.login("alice")
    assert await read_line(irc) == f"PING {SERVER}"
    await irc.send(f"PONG {SERVER}")  # alive: the next silence gets a new PING, not the end
    assert await read_line(irc) == f"PING {SERVER}"
    assert await read_line(irc) == "ERROR :Closing link: Ping timeout"
    assert await irc.reader.read() == b""
    await irc.close()


async def test_a_reset_connection_ends_the_session(
    make_harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CLOSED)
    harness, port = await irc_harness(make_harness)
    bob = await harness.user("bob")
    await (await harness.user("alice")).close()  # registered; online only on IRC now
    irc = await IrcClient.connect(port)
    await irc.login("alice")
    assert (await bob.request("/user/info", {"name": "alice"}))["online"] is True
    sock = irc.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    irc.writer.transport.abort()  # closed with linger 0: the server gets a reset (RST)
    assert await closed_reason(harness, caplog) == "connection error (ConnectionResetError)"
    assert (await bob.request("/user/info", {"name": "alice"}))["online"] is False


async def test_connections_over_the_per_address_cap_get_one_error_line(
    make_harness: MakeHarness,
) -> None:
    _, port = await irc_harness(make_harness, trusted_networks="", max_connections_per_address=1)
    first = await IrcClient.connect(port)
    await first.send("PING one")
    assert await read_line(first) == f":{SERVER} PONG {SERVER} :one"
    second = await IrcClient.connect(port)
    assert await second.reader.read() == b"ERROR :Too many connections from your address\r\n"
    await second.close()
    await first.send("PING two")  # the first is untouched
    assert await read_line(first) == f":{SERVER} PONG {SERVER} :two"
    await first.close()


async def not_reading_client(port: int) -> IrcClient:
    """A client whose receive buffer is tiny, so what it does not read piles up in the
    server's own buffer soon."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    return IrcClient(reader, writer)


async def flood_pings(irc: IrcClient) -> None:
    """PINGs (each answered with a PONG) without reading, until the server gives up."""
    line = ("PING :" + "x" * 400 + "\r\n").encode()
    with contextlib.suppress(ConnectionError):
        for _ in range(100_000):
            irc.writer.write(line * 20)
            await asyncio.wait_for(irc.writer.drain(), 10)


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        # Replies pile up past the buffer cap: dropped at once.
        ({"max_outbound_buffer": 4096}, "dropped: outbound buffer full (client not reading)"),
        # Under the cap, but nothing read for write_timeout: dropped then.
        ({"write_timeout": 0.3}, "connection error (TimeoutError)"),
    ],
)
async def test_a_client_that_does_not_read_is_dropped(
    make_harness: MakeHarness,
    caplog: pytest.LogCaptureFixture,
    settings: dict[str, object],
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, logger=CLOSED)
    harness, port = await irc_harness(make_harness, **settings)
    irc = await not_reading_client(port)
    flooding = asyncio.create_task(flood_pings(irc))
    assert await closed_reason(harness, caplog) == reason
    irc.writer.transport.abort()
    await asyncio.wait_for(flooding, 10)


async def test_shutdown_does_not_wait_for_a_held_line(
    make_harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CLOSED)
    harness, port = await irc_harness(
        make_harness, message_rate=0.2, message_burst=1, graceful_timeout=0.2
    )
    await harness.user("bob")
    await harness.user("alice")
    irc = await IrcClient.connect(port)
    await irc.login("alice", "echo-message")
    # The second message waits 5 s for the rate (held, 12.3): the shutdown will not.
    await irc.send("PRIVMSG bob :first", "PRIVMSG bob :second")
    await irc.expect(r"PRIVMSG bob :first$")
    started = time.monotonic()
    await harness.server.close()
    assert time.monotonic() - started < 4
    assert await irc.expect(r"^ERROR") == "ERROR :Closing link: Server shutting down"
    closed = [r.getMessage() for r in caplog.records if "connection closed" in r.getMessage()]
    assert [message.split(": ", 1)[1] for message in closed] == ["shutdown"]
    await irc.close()


async def test_shutdown_right_after_a_drop_says_no_goodbye(
    make_harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CLOSED)
    harness, port = await irc_harness(make_harness)
    irc = await IrcClient.connect(port)
    await irc.send("PING x")
    await read_line(irc)
    # Dropped (as a stalled catch-up drops a client) in the same step as the shutdown:
    # its transport is already closing, so no goodbye is written and none is read.
    the_connection(harness).abort("dropped: catch-up stalled (client not reading)")
    await harness.server.close()
    with contextlib.suppress(ConnectionError):
        assert await irc.reader.read() == b""
    closed = [r.getMessage() for r in caplog.records if "connection closed" in r.getMessage()]
    reasons = [m.split(": ", 1)[1] for m in closed]
    assert reasons == ["dropped: catch-up stalled (client not reading)"]
    await irc.close()


async def test_a_client_that_does_not_read_its_catch_up_is_dropped_and_another_reads_on(
    make_harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """A catch-up waits for the client between events (push_paced); when it waits longer
    than write_timeout, the subscription drops the session (IrcSession.abort), not only
    the catch-up: the client is gone, and a client catching up beside it reads on."""
    caplog.set_level(logging.INFO, logger=CLOSED)
    # The outbound cap above what a catch-up lets pile up (64 KiB, then a wait, and one
    # message more): the stalled wait ends this connection, not the cap.
    harness, port = await irc_harness(
        make_harness, write_timeout=0.3, max_outbound_buffer=512 * 1024
    )
    bob = await harness.user("bob")
    await (await harness.user("alice")).close()  # registered; online only on IRC then
    await (await harness.user("carol")).close()
    text = "x" * 4000  # ten lines or so on IRC
    for i in range(100):  # about 450 KB of lines for each
        await bob.request("/send", {"name": "alice", "msg": f"{i} {text}"})
        await bob.request("/send", {"name": "carol", "msg": f"{i} {text}"})

    alice = await not_reading_client(port)
    await alice.send("PING accepted")
    await read_line(alice)
    dropped = the_connection(harness)
    # The kernel's send buffer held fixed and small (it grows to 4 MiB on its own): what
    # alice does not read piles up in the server's own buffer after a few KiB.
    server_side = dropped._writer.get_extra_info("socket")
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    await alice.login("alice")
    alice.writer.transport.pause_reading()  # type: ignore[attr-defined]  # nothing read now
    assert (await bob.request("/user/info", {"name": "alice"}))["online"] is True
    carol = await IrcClient.connect(port)
    await carol.login("carol")
    await carol.expect(r"PRIVMSG carol :99 x+$")  # her whole catch-up

    assert dropped.task is not None
    await asyncio.wait_for(asyncio.shield(dropped.task), 10)
    closed = [r.getMessage() for r in caplog.records if "connection closed" in r.getMessage()]
    reason = "dropped: catch-up stalled (client not reading)"
    assert closed == [f"connection closed {dropped}: {reason}"]
    assert (await bob.request("/user/info", {"name": "alice"}))["online"] is False

    # Carol's connection is untouched: her catch-up came whole and in order, live delivery
    # and her commands go on.
    firsts = [re.search(r"PRIVMSG carol :(\d+) x", line) for line in carol.seen]
    assert [int(m[1]) for m in firsts if m] == list(range(100))
    await bob.request("/send", {"name": "carol", "msg": "after the drop"})
    await carol.expect(r"PRIVMSG carol :after the drop$")
    await carol.send("PING still")
    await carol.expect(f"^:{SERVER} PONG {SERVER} :still$")
    await carol.close()

    # And alice's end sees the connection closed once it reads again.
    alice.writer.transport.resume_reading()  # type: ignore[attr-defined]
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(alice.reader.read(65536), 10):
            pass
    await alice.close()
