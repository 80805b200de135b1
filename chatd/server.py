"""The listening server: accepts connections, tracks them, and shuts down gracefully."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket

from chatd.app import App
from chatd.auth import Hasher
from chatd.config import FIELDS, RELOADABLE, Config
from chatd.connection import Connection
from chatd.handlers import OPS
from chatd.hub import Hub
from chatd.metrics import create as create_metrics
from chatd.store import Store

log = logging.getLogger(__name__)


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._listener: asyncio.Server | None = None
        self._app: App | None = None
        self._connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

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
        store = await Store.open(
            self.config.db, self.config.db_synchronous, self.config.db_busy_timeout
        )
        hasher = await asyncio.to_thread(Hasher, self.config)
        self._app = App(self.config, store, Hub(), hasher, metrics)
        try:
            if self.config.metrics_port:
                metrics.serve(self.config.metrics_host, self.config.metrics_port)
            self._listener = await asyncio.start_server(
                self._serve_client, self.config.host, self.config.port, reuse_address=True
            )
        except BaseException:
            await self._close_app()
            raise
        log.info("listening on %s:%d", self.config.host, self.port)

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        connection = Connection(reader, writer, self.config, self.app.handle, self.app.metrics)
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(connection)
        self._tasks.add(task)
        _enable_keepalive(writer)
        log.info("connection opened %s", connection.peer)
        self.app.metrics.connection_opened()
        reason = "error"
        try:
            reason = await connection.run()
        finally:
            self.app.metrics.connection_closed(reason)
            self.app.hub.unbind(connection)
            self._connections.discard(connection)
            self._tasks.discard(task)

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish, then close the database."""
        if self._listener is not None:
            self._listener.close()
        for connection in list(self._connections):
            connection.shutdown()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.config.graceful_timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("cancelled %d connections still busy at shutdown", len(pending))
                await asyncio.wait(pending)
        await self._close_app()
        log.info("stopped")

    async def _close_app(self) -> None:
        if self._app is not None:
            await self._app.store.close()
            self._app.hasher.close()
            self._app.metrics.close()
            self._app = None

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
        self.app.config = self.config
        for connection in self._connections:
            connection.reconfigure(self.config)
        return sorted(changes)


def _enable_keepalive(writer: asyncio.StreamWriter) -> None:
    # Lets the kernel notice peers that vanished without a FIN (pulled cable, dead NAT).
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
