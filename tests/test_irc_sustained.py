"""The IRC front-end under sustained pipelined traffic, over real sockets."""

from __future__ import annotations

import asyncio
import re

from tests.conftest import MakeHarness
from tests.test_irc_live import IrcClient, irc_harness

MESSAGES = 4000
WINDOW = 256  # messages the sender may be ahead of its receiver, as in the benchmark


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

