"""The IRC transport: sockets in and out of the session core, and the listener.

Thin on purpose: it reads, feeds :class:`~chatd.irc.session.IrcCore`, writes
what comes back with backpressure, and keeps the timeouts (protocol.md, section 12.1,
"Timeouts"): registration (``auth_timeout``), idle (``ping_interval``, then a
PING answered within ``ping_timeout``), writes (``write_timeout``), and a
client that lets ``max_outbound_buffer`` bytes pile up is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from typing import cast

from chatd import streams
from chatd.app import App
from chatd.irc.lines import format_line
from chatd.irc.session import IrcCore
from chatd.limits import address_key
from chatd.streams import PEER_ERRORS, LeanStreamReader

log = logging.getLogger(__name__)

READ_CHUNK = 16 * 1024
DRAIN_ABOVE = 64 * 1024
# After delivering messages, a PING this soon lets a silent client show it is alive,
# so what it was sent counts as received (protocol.md, section 12.4).
ACK_PROBE_DELAY = 2.0
TLS_HANDSHAKE_TIMEOUT = 10.0


class IrcConnection:
    def __init__(
        self, reader: LeanStreamReader, writer: asyncio.StreamWriter, app: App
    ) -> None:
        self._reader, self._writer, self._app = reader, writer, app
        peer = writer.get_extra_info("peername")
        address, port = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("-", None)
        self.address = address
        self.core = IrcCore(app, self, address, port)
        self._probe: asyncio.TimerHandle | None = None
        self._dropped: str | None = None
        self.task: asyncio.Task[None] | None = None

    def __str__(self) -> str:
        return f"IRC {self.core.session.peer}"

    async def run(self) -> None:
        reason = "peer"
        try:
            reason = await self._serve()
        except (*PEER_ERRORS, TimeoutError) as exc:
            reason = self._dropped or f"connection error ({type(exc).__name__})"
        except asyncio.CancelledError:
            reason = "shutdown"
            raise
        # Not tested: the core turns every chatd refusal into a reply, so only a bug (or
        # a store failure outside the handlers) gets here; logged, and cleaned up below.
        except Exception:  # pragma: no cover
            log.exception("%s failed", self)
            reason = "error"
        finally:
            if self._probe is not None:
                self._probe.cancel()
            await self.core.close()
            self._writer.close()
            log.info("connection closed %s: %s", self, self._dropped or reason)

    async def _serve(self) -> str:
        config = self._app.config
        loop = asyncio.get_running_loop()
        registration_deadline = loop.time() + config.auth_timeout
        pinged = False
        reader = self._reader
        while not self.core.closed:
            if self.core.machine.registered:
                timeout = config.ping_timeout if pinged else config.ping_interval
            else:
                timeout = registration_deadline - loop.time()
            try:
                async with asyncio.timeout(max(timeout, 0)):
                    # The reader's future awaited here, not a read() coroutine: one frame
                    # less under every idle connection (chatd/streams.py). The timeout
                    # cancels the future; the next read_now() replaces it.
                    got = reader.read_now(READ_CHUNK)
                    while not isinstance(got, bytes):
                        await got
                        got = reader.read_now(READ_CHUNK)
                    data = got
            except TimeoutError:
                if not self.core.machine.registered:
                    self._say_goodbye("Registration timed out")
                    return "timeout"
                if pinged:
                    self._say_goodbye("Ping timeout")
                    return "timeout"
                self._ping()
                pinged = True
                continue
            if not data:
                return self._dropped or "peer"
            pinged = False
            await self.core.receive(data)
            await self.drain()
        await self.drain()
        return "quit"

    def _say_goodbye(self, reason: str) -> None:
        self.core.machine.close(reason)
        self.write(self.core.machine.take_output())

    def _ping(self) -> None:
        self.write(format_line("PING", [self._app.config.server_name]))

    # The Transport interface of the core.

    def write(self, data: bytes) -> None:
        if self._writer.is_closing():
            return
        self._writer.write(data)
        if self._writer.transport.get_write_buffer_size() > self._app.config.max_outbound_buffer:
            self.abort("dropped: outbound buffer full (client not reading)")

    async def drain(self) -> None:
        if self._writer.transport.get_write_buffer_size() <= DRAIN_ABOVE:
            return
        async with asyncio.timeout(self._app.config.write_timeout):
            await self._writer.drain()

    def abort(self, reason: str) -> None:
        self._dropped = self._dropped or reason
        self._writer.transport.abort()
        self._reader.feed_eof()

    def probe_soon(self) -> None:
        if self._probe is None:
            self._probe = asyncio.get_running_loop().call_later(ACK_PROBE_DELAY, self._probed)

    def _probed(self) -> None:
        self._probe = None
        self._ping()

    def shutdown(self) -> None:
        self._say_goodbye("Server shutting down")
        # Nothing more is read: bytes the client sends after the end of stream is fed
        # would be a fatal error in feed_data(), logged, and the goodbye cut off.
        transport = cast(asyncio.Transport, self._writer.transport)  # a socket's: it reads
        if not transport.is_closing():
            transport.pause_reading()
        self._reader.feed_eof()


class IrcListener:
    """The IRC ports (plain and TLS) and their connections."""

    def __init__(self, app: App, tls: ssl.SSLContext | None) -> None:
        self._app = app
        self._tls = tls
        self._servers: list[asyncio.Server] = []
        self._connections: set[IrcConnection] = set()
        self._per_address: Counter[str] = Counter()

    async def start(self) -> None:
        config = self._app.config
        await self._app.store.release_guests()  # left over if the last run crashed
        for port, tls in ((config.irc_port, None), (config.irc_tls_port, self._tls)):
            if port:
                self._servers.append(await self._listen(port, tls))
                log.info("IRC on %s:%d (%s)", config.host, port, "tls" if tls else "plain")

    async def _listen(self, port: int, tls: ssl.SSLContext | None) -> asyncio.Server:
        # chatd's lean streams, as on the msgpack port: less held per idle connection,
        # and a LeanStreamReader, whose read_now() _serve uses.
        return await streams.start_server(
            self._accept,
            self._app.config.host,
            port,
            reuse_address=True,
            reuse_port=self._app.config.reuse_port,  # nodes sharing the port (README)
            ssl=tls,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if tls else None,
        )

    def _accept(self, reader: LeanStreamReader, writer: asyncio.StreamWriter) -> None:
        connection = IrcConnection(reader, writer, self._app)
        key = address_key(connection.address)
        config = self._app.config
        trusted = connection.address in self._app.guards.trusted
        if not trusted and self._per_address[key] >= config.max_connections_per_address:
            writer.write(format_line("ERROR", ["Too many connections from your address"]))
            writer.close()
            return
        self._per_address[key] += 1
        self._connections.add(connection)
        self._app.metrics.connection_opened()
        log.info("connection opened %s", connection)
        connection.task = asyncio.create_task(connection.run())
        connection.task.add_done_callback(lambda _: self._closed(connection, key))

    def _closed(self, connection: IrcConnection, key: str) -> None:
        self._connections.discard(connection)
        self._per_address[key] -= 1
        if not self._per_address[key]:
            del self._per_address[key]
        self._app.metrics.connection_closed("irc")

    async def close(self, timeout: float) -> None:
        for server in self._servers:
            server.close()
        for connection in list(self._connections):
            connection.shutdown()
        tasks = {c.task for c in self._connections if c.task is not None}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
