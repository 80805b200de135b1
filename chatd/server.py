"""The listening server: accepts connections, tracks them, and shuts down gracefully."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
from collections import Counter
from typing import TYPE_CHECKING, Any

from chatd import streams, systemd
from chatd.app import App
from chatd.auth import Hasher
from chatd.codec import encode_frame
from chatd.config import FIELDS, RELOADABLE, Config, node_name
from chatd.connection import BodiesHandler, Connection, ReadTimer
from chatd.dbfile import InstanceLock
from chatd.errors import RateLimited
from chatd.handlers import OPS
from chatd.hub import Hub
from chatd.irc.connection import IrcListener
from chatd.limits import address_key
from chatd.metrics import create as create_metrics
from chatd.protocol import failure
from chatd.store import MessageStore, is_postgres_url, open_store
from chatd.streams import LeanStreamReader

if TYPE_CHECKING:
    from chatd.cluster import ClusterBus

log = logging.getLogger(__name__)

TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds; a client that stalls the handshake is dropped
ABORT_GRACE = 1.0  # seconds a reset connection gets to end before its task is cancelled


class Server:
    _handle_bodies: BodiesHandler  # the app's handle_many(), set by start()

    def __init__(self, config: Config) -> None:
        self.config = config
        self._listener: asyncio.Server | None = None
        self._app: App | None = None
        self._connections: set[Connection] = set()
        self._read_timer = ReadTimer(config)
        # Bound once, not per connection: every connection keeps these (64 bytes each).
        self._report_closed = self._closed
        self._per_address: Counter[str] = Counter()
        self._token_sweeper: asyncio.Task[None] | None = None
        self._instance: InstanceLock | None = None
        self.irc: IrcListener | None = None
        self._cluster: ClusterBus | None = None

    @property
    def app(self) -> App:
        assert self._app is not None, "server not started"
        return self._app

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._listener is not None, "server not started"
        port: int = self._listener.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Open the database, then listen. Raises StoreError or OSError if either fails."""
        metrics = create_metrics(self.config.metrics_port > 0, OPS)
        store = await self._open_store()
        hasher = await asyncio.to_thread(Hasher, self.config)
        self._app = App(self.config, store, Hub(), hasher, metrics)
        self._handle_bodies = self._app.handle_many
        try:
            await self._join_cluster()
            metrics.watch_disk(lambda: store.disk_full)
            if self.config.metrics_port:
                metrics.serve(self.config.metrics_host, self.config.metrics_port)
            self._listener = await self._listen()
            _enable_keepalive(self._listener)
            if self.config.irc_port or self.config.irc_tls_port:  # the IRC front-end
                self.irc = IrcListener(self._app, _tls_context(self.config))
                await self.irc.start()
        except BaseException:
            if self._listener is not None:  # e.g. the IRC port was taken: stop listening
                self._listener.close()
                await self._listener.wait_closed()
                self._listener = None
            await self._close_app()
            raise
        self._token_sweeper = asyncio.create_task(self._sweep_tokens())
        scheme = "tls" if self.config.tls_cert else "tcp"
        log.info("listening on %s:%d (%s)", self.config.host, self.port, scheme)

    async def _open_store(self) -> MessageStore:
        """The database, if it may be served.

        A SQLite file is served by one server at a time (the instance lock beside it),
        must not be missing where one existed, and must be writable (open_store checks
        that); a PostgreSQL database guards itself and may serve several nodes.
        """
        if is_postgres_url(self.config.db):
            return await open_store(self.config.db, self.config)
        self._instance = await asyncio.to_thread(InstanceLock.acquire, self.config.db)
        try:
            await asyncio.to_thread(self._instance.require_database)
            store = await open_store(self.config.db, self.config)
            try:
                await asyncio.to_thread(self._instance.record_database)
            except BaseException:
                await store.close()
                raise
        except BaseException:
            await self._release_instance()
            raise
        return store

    async def _release_instance(self) -> None:
        if self._instance is not None:
            await asyncio.to_thread(self._instance.release)
            self._instance = None

    async def _listen(self) -> asyncio.Server:
        tls = _tls_context(self.config)
        # Under systemd socket activation the port is already open and handed to us.
        inherited = systemd.listen_sockets()
        if inherited:
            return await streams.start_server(
                self._accept,
                sock=inherited[0],
                ssl=tls,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if tls else None,
            )
        return await streams.start_server(
            self._accept,
            self.config.host,
            self.config.port,
            reuse_address=True,
            # Several nodes on one host, one port: the kernel spreads the connections.
            reuse_port=self.config.reuse_port,
            ssl=tls,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if tls else None,
            backlog=1024,
        )

    def _accept(self, reader: LeanStreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: the connection makes its own task, so no
        # wrapper coroutine stays suspended above it (250 bytes per idle connection).
        app = self.app
        connection = Connection(
            reader, writer, self.config, self._handle_bodies, app.metrics, self._read_timer
        )
        refusal = self._over_capacity(connection.address)
        if refusal is not None:
            log.warning("refused connection from %s: %s", connection, refusal)
            writer.write(encode_frame(failure(None, RateLimited(refusal, retry_after=10.0))))
            writer.close()
            return
        self._per_address[address_key(connection.address)] += 1
        self._connections.add(connection)
        log.info("connection opened %s", connection)
        app.metrics.connection_opened()
        connection.start(self._report_closed)

    def _closed(self, connection: Connection, reason: str) -> None:
        self.app.metrics.connection_closed(reason)
        self.app.hub.unbind(connection)
        self._connections.discard(connection)
        counted_as = address_key(connection.address)
        self._per_address[counted_as] -= 1
        if not self._per_address[counted_as]:
            del self._per_address[counted_as]

    async def _sweep_tokens(self) -> None:
        """End sessions whose token was revoked or deleted elsewhere (`chatd admin`).

        Requests re-check their token too; this also reaches connections that only
        listen, so a revoked session stops receiving pushes within token_recheck.
        """
        while True:
            await asyncio.sleep(max(self.config.token_recheck, 1.0))
            try:
                await self._drop_dead_sessions()
            except Exception:
                log.exception("token sweep failed; trying again later")

    async def _drop_dead_sessions(self) -> None:
        hub, now = self.app.hub, self.app.clock()
        checked = [(s, s.token_digest) for s in hub.bound_sessions() if s.token_digest]
        live = await self.app.store.live_tokens(list({d for _, d in checked if d}), now)
        for session, digest in checked:
            # Skip sessions that logged in again meanwhile: their new token was not checked.
            if digest not in live and session.token_digest == digest:
                log.info("session on %s ended: its token was revoked", session)
                hub.unbind(session)

    def _over_capacity(self, address: str) -> str | None:
        if len(self._connections) >= self.config.max_connections:
            return "too many connections"
        if address in self.app.guards.trusted:
            return None
        if self._per_address[address_key(address)] >= self.config.max_connections_per_address:
            return "too many connections from your address"
        return None

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish, then close the database."""
        if self._listener is not None:
            self._listener.close()
        if self._token_sweeper is not None:
            self._token_sweeper.cancel()
        if self.irc is not None:
            await self.irc.close(self.config.graceful_timeout)
        for connection in list(self._connections):
            connection.shutdown()
        tasks = {c.task for c in self._connections if c.task is not None}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.config.graceful_timeout)
            if pending:
                await self._drop_busy(pending)
        self._read_timer.close()
        await self._close_app()
        log.info("stopped")

    async def _drop_busy(self, pending: set[asyncio.Task[None]]) -> None:
        """Reset connections still busy after graceful_timeout (most often a client that
        stopped reading its replies), so that each ends through its own clean-up."""
        log.warning("closing %d connections still busy at shutdown", len(pending))
        for connection in list(self._connections):
            connection.abort("dropped: still busy at shutdown")
        _, pending = await asyncio.wait(pending, timeout=ABORT_GRACE)
        for task in pending:  # a bug: say where it was stuck, then cancel as a last resort
            log.warning("cancelling a connection that did not end when reset: %s", _awaiting(task))
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _join_cluster(self) -> None:
        """With ``--bus redis://...``: the bus, presence and revocations shared with the
        other nodes (chatd.cluster). Raises RuntimeError if Redis cannot be reached."""
        if self.config.bus == "local":
            return
        from chatd.cluster import ClusterBus, require_redis

        require_redis()
        app = self.app
        self._cluster = ClusterBus(self.config, app.hub, app.store, node_name(self.config))
        try:
            await self._cluster.start()
        except ConnectionError as exc:
            raise RuntimeError(str(exc)) from None
        app.bus = self._cluster

    async def _close_app(self) -> None:
        if self._cluster is not None:
            await self._cluster.close()  # before the store: it reads the store
            self._cluster = None
        if self._app is not None:
            await self._app.store.close()
            self._app.hasher.close()
            self._app.metrics.close()
            self._app = None
        await self._release_instance()  # last: the database is closed

    def reload(self, loaded: Config) -> list[str]:
        """Apply what can change while serving (RELOADABLE); returns the settings changed.

        Settings that need a restart keep their running values, with a warning.
        """
        changes = {
            name: getattr(loaded, name)
            for name in RELOADABLE
            if getattr(loaded, name) != getattr(self.config, name)
        }
        for name in sorted(FIELDS.keys() - RELOADABLE):
            if getattr(loaded, name) != getattr(self.config, name):
                log.warning("reload: %s changed but needs a restart to take effect", name)
        self.config = dataclasses.replace(self.config, **changes)
        self.app.reconfigure(self.config)
        self._read_timer.reconfigure(self.config)
        for connection in self._connections:
            connection.reconfigure(self.config)
        return sorted(changes)


class TlsError(RuntimeError):
    """The certificate or key cannot be used."""


def _tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load tls_cert/tls_key: {exc}") from exc
    return context


def _enable_keepalive(listener: asyncio.Server) -> None:
    """TCP keepalive finds peers that vanished without a FIN. Set on the listening
    socket, it is inherited by every accepted one (Linux, the BSDs)."""
    for sock in listener.sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def _awaiting(task: asyncio.Task[None]) -> str:
    """Where a task is suspended: its chain of awaits, outermost first."""
    places = []
    awaited: Any = task.get_coro()
    while awaited is not None and hasattr(awaited, "cr_frame"):
        frame = awaited.cr_frame
        if frame is not None:
            places.append(f"{frame.f_code.co_qualname} (line {frame.f_lineno})")
        awaited = awaited.cr_await
    if awaited is not None:
        places.append(repr(awaited))
    return " -> ".join(places)
