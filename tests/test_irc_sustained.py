"""The IRC front-end under sustained pipelined traffic, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import pytest

from tests.conftest import MakeHarness
from tests.test_irc_live import IrcClient, irc_harness

MESSAGES = 4000
WINDOW = 256  # messages the sender may be ahead of its receiver, as in the benchmark
SENDERS = 6  # clients still sending when the server shuts down


async def test_a_pipelined_dm_stream_arrives_whole_in_order_exactly_once(
    make_harness: MakeHarness,
) -> None:
    # Token rechecks every 0.2 s and the 2 s read probes (PING, then /ack) happen during
    # the stream: neither may interrupt live delivery.
    harness, port = await irc_harness(make_harness, token_recheck=0.2)
    for name in ("sender", "receiver"):
        await (await harness.user(name)).close()
    receiver = await IrcClient.connect(port)
    await receiver.login("receiver", "")
    sender = await IrcClient.connect(port)
    await sender.login("sender", "")
    received: list[int] = []
    more = asyncio.Event()

    async def read() -> None:
        while len(received) < MESSAGES:
            line = await receiver.expect(r"PRIVMSG receiver :", timeout=30)
            received.append(int(re.findall(r":m(\d+)$", line)[0]))
            more.set()

    reading = asyncio.create_task(read())
    for index in range(MESSAGES):
        while index - len(received) >= WINDOW and not reading.done():
            more.clear()
            await asyncio.wait([reading, asyncio.create_task(more.wait())], timeout=30,
                               return_when=asyncio.FIRST_COMPLETED)
        if reading.done():
            break  # reading failed: its error is raised below
        await sender.send(f"PRIVMSG receiver :m{index}")
        if index % 500 == 0:
            await asyncio.sleep(0.3)  # the stream outlasts the 2 s probe
    await reading
    await sender.close()
    await receiver.close()
    assert received == list(range(MESSAGES))


async def test_shutdown_while_a_client_keeps_sending_logs_no_transport_error(
    make_harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    # Bytes that arrive after the server's goodbye are not read: fed to a reader already
    # at end of stream they were a fatal transport error ("feed_data after feed_eof").
    harness, port = await irc_harness(make_harness)
    await (await harness.user("receiver")).close()
    senders = []
    for index in range(SENDERS):
        await (await harness.user(f"sender{index}")).close()
        sender = await IrcClient.connect(port)
        await sender.login(f"sender{index}", "")
        senders.append(sender)

    async def trickle(sender: IrcClient) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            for index in range(100_000):
                if sender.writer.is_closing():
                    return
                sender.writer.write(f"PRIVMSG receiver :m{index}\r\n".encode())
                await asyncio.sleep(0.001)

    sending = [asyncio.create_task(trickle(sender)) for sender in senders]
    await asyncio.sleep(0.3)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        await harness.server.close()
        await asyncio.wait_for(asyncio.gather(*sending), 30)
    assert not [r for r in caplog.records if "Fatal error" in r.getMessage()]
    for sender in senders:
        await sender.close()
