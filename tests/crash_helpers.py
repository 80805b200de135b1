"""Helpers of the crash tests, on either store: a server process's log and exit, users,
and a stream of sends whose every reply is recorded (tests/test_faults.py,
tests/test_postgres_e2e.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import signal
from typing import Any

from chatd.client import Client
from tests.conftest import PASSWORD, Process

SENDER, RECIPIENT = "sender", "recipient"
CONNECTIONS = 4  # the sender's connections: concurrent sends share commits (group commit)
WINDOW = 8  # requests in flight per connection, 32 in all
KILL_AFTER_SECONDS = 0.5
KILL_AFTER_ACKS = 500


def read_stderr(server: Process) -> asyncio.Task[None]:
    """Keep reading the server's log, so that a full pipe never blocks it."""

    async def read() -> None:
        assert server.proc.stderr is not None
        while chunk := await server.proc.stderr.read(65536):
            server.stderr += chunk

    return asyncio.create_task(read())


async def terminate(server: Process, reader: asyncio.Task[None]) -> int:
    """SIGTERM, then the exit status, once the whole log has been read."""
    server.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        await reader
        return await server.proc.wait()


async def connect(port: int, name: str | None = None) -> Client:
    client = await Client.connect("127.0.0.1", port, timeout=10)
    if name is not None:
        await client.login(name, PASSWORD)
    return client


async def register(port: int, *names: str) -> None:
    client = await connect(port)
    try:
        for name in names:
            await client.request(
                "/register", {"name": name, "password": PASSWORD, "password_repete": PASSWORD}
            )
    finally:
        await client.close()


async def drain_inbox(client: Client) -> list[str]:
    """Every private message waiting for the client, from the sender, oldest first."""
    texts: list[str] = []
    async with asyncio.timeout(30):
        while True:
            batch = await client.request("/receive")
            assert set(batch["messages"]) <= {SENDER}, batch["messages"].keys()
            texts += batch["messages"].get(SENDER, [])
            if not batch["more"]:
                return texts


async def conversation_ids(client: Client, other: str) -> dict[str, int]:
    """Message text -> id for every message of a conversation, read with /history."""
    found: dict[str, int] = {}
    params: dict[str, Any] = {"name": other, "limit": 200}
    async with asyncio.timeout(30):
        while True:
            page = await client.request("/history", params)
            for message in page["messages"]:
                assert message["msg"] not in found, f"{message['msg']} stored twice"
                found[message["msg"]] = message["id"]
            if not page["more"]:
                return found
            params["before"] = page["messages"][0]["id"]


class Stream:
    """Keeps WINDOW sends in flight on each connection until stopped."""

    def __init__(self, clients: list[Client]) -> None:
        self.clients = clients
        self.numbers = itertools.count()
        self.sent: list[list[str]] = [[] for _ in clients]  # per connection, in order
        self.tasks: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self.acked: dict[str, int] = {}  # text -> id in the reply
        self.refused: dict[str, dict[str, Any]] = {}  # text -> a reply with a non-zero code
        self.stopped = False
        self.enough = asyncio.Event()  # set at KILL_AFTER_ACKS acknowledgements
        # Once the kill is due, set by the next pump that puts new sends in flight: they
        # are written in this loop turn, and no reply can come back before the kill.
        self.kill_due = False
        self.refilled = asyncio.Event()

    async def pump(self, index: int) -> None:
        client = self.clients[index]
        in_flight: set[asyncio.Task[dict[str, Any]]] = set()
        while not self.stopped:
            while len(in_flight) < WINDOW:
                number = next(self.numbers)
                text = f"m{number}"
                params = {"name": RECIPIENT, "msg": text, "client_id": f"c{number}"}
                task = asyncio.create_task(client.call("/send", params))
                task.add_done_callback(functools.partial(self._record, text))
                self.sent[index].append(text)
                self.tasks[text] = task
                in_flight.add(task)
            if self.kill_due:
                self.refilled.set()
            _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)

    def _record(self, text: str, task: asyncio.Task[dict[str, Any]]) -> None:
        if task.cancelled() or task.exception() is not None:
            return  # unknown outcome: the connection went away before the reply
        reply = task.result()
        if reply["code"] == 0:
            self.acked[text] = reply["data"]["id"]
            if len(self.acked) >= KILL_AFTER_ACKS:
                self.enough.set()
        else:
            self.refused[text] = reply

    @property
    def unknown(self) -> list[str]:
        return [text for text in self.tasks if text not in self.acked]


async def kill_during_sends(server: Process, port: int, wait: float) -> Stream:
    """Register the sender and recipient, keep sends in flight on CONNECTIONS connections,
    and SIGKILL the server once KILL_AFTER_ACKS are acknowledged (or after ``wait``
    seconds): the stream, with every reply that came back, as the crash left it."""
    log_reader = read_stderr(server)
    await register(port, SENDER, RECIPIENT)
    clients = [await connect(port, SENDER) for _ in range(CONNECTIONS)]
    stream = Stream(clients)
    pumps = [asyncio.create_task(stream.pump(i)) for i in range(CONNECTIONS)]
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await stream.enough.wait()
        assert stream.acked, f"no send acknowledged in {wait}s"
        # Not at once: the replies of a whole window may have come back in one read, and
        # the kill must find sends in flight (a faster server answered them all first).
        stream.kill_due = True
        async with asyncio.timeout(10):
            await stream.refilled.wait()
        stream.stopped = True  # no new sends; those in flight stay in flight
        server.proc.kill()  # SIGKILL, in the middle of the stream
        async with asyncio.timeout(10):
            assert await server.proc.wait() == -signal.SIGKILL
        async with asyncio.timeout(15):
            await asyncio.gather(*pumps, return_exceptions=True)
            await asyncio.gather(*stream.tasks.values(), return_exceptions=True)
    finally:
        stream.stopped = True
        for pump in pumps:
            pump.cancel()
        for client in clients:
            await client.close()
        log_reader.cancel()
    assert not stream.refused, f"sends refused before the kill: {stream.refused}"
    return stream


def check_received(stream: Stream, received: list[str]) -> None:
    """What the recipient got after the restart: each message once, nothing acknowledged
    lost, and each connection's sends stored as a prefix of what it sent, in order (its
    requests run one after another)."""
    assert len(received) == len(set(received)), "a message was stored twice"
    assert set(received) <= set(stream.tasks)
    missing = set(stream.acked) - set(received)
    assert not missing, f"{len(missing)} acknowledged messages lost: {sorted(missing)[:10]}"
    for texts in stream.sent:
        own = set(texts)
        mine = [text for text in received if text in own]
        assert mine == texts[: len(mine)]
