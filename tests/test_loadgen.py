"""scripts/loadgen.py, the --peers load generator: it counts exactly and its checks bite.

The generator counts frames by their length prefixes while the clock runs and checks
everything afterwards; these tests pin both halves against a real chatd (in-process, on
an ephemeral port with a real SQLite file), and the counting against every split of a
stream a socket can produce.  No timing is asserted.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from chatd.codec import encode_frame
from tests.conftest import Harness, load_script

loadgen = load_script("loadgen")


class Recorder:
    """The bench's Check, reduced to what the scenarios call."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.details: dict[str, Any] = {}

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def expect(self, condition: bool, message: str) -> bool:
        if not condition:
            self.fail(message)
        return condition

    def equal(self, what: str, got: object, want: object) -> bool:
        return self.expect(got == want, f"{what}: got {got!r}, expected {want!r}")


class NoProbe:
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def small_sizes(**changes: Any) -> Any:
    base: dict[str, Any] = dict(
        pairs=3, messages=300, window=16, refill=3, members=6, senders=2,
        channel_messages=50, latency_rate=300.0, latency_seconds=0.3, latency_pairs=3,
        idle_connections=30, idle_users=3, timeout=30.0, prefix="lg")
    base.update(changes)
    return loadgen.LoadSizes(**base)


async def test_frames_are_counted_exactly_however_the_stream_is_cut() -> None:
    frames = [encode_frame({"event": "message", "data": {"id": i, "msg": "x" * (i * 37 % 300)}})
              for i in range(60)]
    stream = b"".join(frames)
    rng = random.Random(16)
    cuts_list = [list(range(1, len(stream))),  # one byte at a time: every header split
                 *(sorted(rng.sample(range(1, len(stream)), k)) for k in (1, 5, 40, 400))]
    for cuts in cuts_list:
        conn = loadgen.FrameConn()
        conn.count_from_now(len(frames))
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            conn.data_received(stream[start:end])
        assert conn.count == len(frames), len(cuts)
        assert conn._at_boundary()
        assert [b["data"]["id"] for b in conn.bodies()] == list(range(60))


async def test_a_frame_cut_before_its_end_is_not_yet_delivered() -> None:
    conn = loadgen.FrameConn()
    conn.count_from_now(1)
    frame = encode_frame({"event": "message", "data": {"id": 1}})
    conn.data_received(frame[:-1])
    await asyncio.sleep(0)
    assert conn.done_at == 0.0  # header seen, body unfinished: not reached
    conn.data_received(frame[-1:])
    await conn.reached(1.0)


async def test_irc_lines_are_counted_and_parsed() -> None:
    conn = loadgen.LineConn()
    conn.count_from_now(3)
    data = b":a!~a@h PRIVMSG b :0 xx\r\n:a!~a@h PRIVMSG b :1 xx\r\n:a!~a@h PRIVMSG b :2 xx\r\n"
    for i in range(0, len(data), 7):
        conn.data_received(data[i:i + 7])
    await conn.reached(1.0)
    check = Recorder()
    received, replied = loadgen.IrcWire("h", 1, "x").decode(conn, check, "irc")
    assert check.failures == [] and replied == []
    assert [(m.sender, m.text) for m in received] == [("a", f"{i} xx") for i in range(3)]


def test_the_checks_catch_loss_duplication_reordering_and_foreign_ids() -> None:
    def messages(seqs: list[int], sender: str = "s") -> list[Any]:
        return [loadgen.Received(sender, loadgen.make_text(i, 64), None) for i in seqs]

    def failures(received: list[Any], count: int = 4) -> list[str]:
        check = Recorder()
        loadgen.check_in_order(check, "x", received, "s", count, 64)
        return check.failures

    assert failures(messages([0, 1, 2, 3])) == []
    assert failures(messages([0, 1, 3]))  # one lost
    assert failures(messages([0, 1, 1, 2, 3], ))  # one twice
    assert failures(messages([0, 2, 1, 3]))  # out of order
    assert failures(messages([0, 1, 2, 3], sender="t"))  # from someone else
    check = Recorder()
    loadgen.check_ids(check, "x", [5, 6, 7], [5, 6, 7])
    assert check.failures == []
    loadgen.check_ids(check, "x", [5, 7, 6], [5, 7, 6])  # not increasing
    loadgen.check_ids(check, "x", [5, 6, 8], [5, 6, 7])  # not the ids replied
    assert len(check.failures) == 2


async def test_every_scenario_verifies_against_a_real_chatd(harness: Harness) -> None:
    wire = loadgen.FrameWire("127.0.0.1", harness.port)
    sizes = small_sizes()
    check = Recorder()
    dm = await loadgen.scenario_dm(wire, sizes, NoProbe(), check)
    assert check.failures == []
    assert dm["delivered"] == 3 * 300
    check = Recorder()
    fanout = await loadgen.scenario_fanout(wire, small_sizes(prefix="lf"), NoProbe(), check)
    assert check.failures == []
    assert fanout["deliveries"] == 2 * 50 * (6 - 1)
    check = Recorder()
    latency = await loadgen.scenario_latency(wire, small_sizes(prefix="ll"), NoProbe(), check)
    assert check.failures == []
    assert latency["messages"] == 90 and latency["p99_ms"] >= latency["p50_ms"] > 0
    check = Recorder()
    idle = await loadgen.scenario_idle(wire, small_sizes(prefix="li"), NoProbe(), check,
                                       lambda: None)
    assert check.failures == [] and check.details["alive"] == 30
    assert idle["connections"] == 30


async def test_a_message_the_server_never_delivered_fails_the_run(harness: Harness) -> None:
    # A receiver that is never subscribed gets nothing: the run must end in a LoadError
    # (silence), never in a figure.
    wire = loadgen.FrameWire("127.0.0.1", harness.port)

    class Deaf(type(wire)):  # type: ignore[misc]
        async def listen(self, conns: Any) -> None:
            return None

    with pytest.raises(loadgen.LoadError):
        await loadgen.scenario_dm(Deaf("127.0.0.1", harness.port),
                                  small_sizes(pairs=1, messages=20, timeout=1.0),
                                  NoProbe(), Recorder())


class Wrote:
    """A transport that keeps what is written."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += bytes(data)

    def is_closing(self) -> bool:
        return False


async def test_server_pings_are_answered_and_not_counted_while_counting() -> None:
    conn = loadgen.LineConn()
    transport = Wrote()
    conn.transport = transport
    conn.count_from_now(3)
    data = (b":a!~a@h PRIVMSG b :0 xx\r\nPING vm\r\n:a!~a@h PRIVMSG b :1 xx\r\n"
            b":srv PING :tok\r\n:a!~a@h PRIVMSG b :2 xx\r\n")
    cut = data.index(b"NG vm")  # a PING cut in two by the reads
    for piece in (data[:cut], data[cut:cut + 30], data[cut + 30:]):
        conn.data_received(piece)
    await conn.reached(1.0)
    assert conn.count == 3
    assert transport.data == b"PONG vm\r\nPONG :tok\r\n"
    check = Recorder()
    received, _ = loadgen.IrcWire("h", 1, "x").decode(conn, check, "irc")
    assert check.failures == [] and [m.text for m in received] == ["0 xx", "1 xx", "2 xx"]


async def test_a_run_still_delivering_is_not_a_stall_however_long_it_lasts() -> None:
    # The timeout bounds silence, not the whole run: a full-size run lasts longer than
    # it, and was once reported as "then nothing for 60 s" while messages still came.
    conn = loadgen.LineConn()
    conn.count_from_now(25)
    silence = 1.5

    async def trickle() -> None:
        for i in range(25):  # 2.5 s in all, a line every 0.1 s
            await asyncio.sleep(0.1)
            conn.data_received(f":a!~a@h PRIVMSG b :{i} xx\r\n".encode())

    feeding = asyncio.create_task(trickle())
    await conn.reached(silence)
    await feeding
    assert conn.count == 25


async def test_silence_while_messages_are_expected_fails() -> None:
    conn = loadgen.LineConn()
    conn.count_from_now(2)
    conn.data_received(b":a!~a@h PRIVMSG b :0 xx\r\n")
    with pytest.raises(loadgen.LoadError, match="got 1 of 2 messages, then nothing for 0 s"):
        await conn.reached(0.2)
