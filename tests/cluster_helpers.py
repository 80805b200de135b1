"""Real services for multi-node tests: chatd nodes, redis-server, a black-hole proxy, a
PostgreSQL cluster of the test's own.  All on 127.0.0.1, every wait bounded, every
process and directory removed in teardown.

Where redis-server, initdb or pg_ctl is missing the test is skipped with the reason,
unless CHATD_REQUIRE_POSTGRES=1 (CI): then it fails (tests/pg_helpers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from chatd.client import Client
from tests.conftest import LISTENING, PASSWORD, ROOT, fast_env
from tests.pg_helpers import unavailable

START_TIMEOUT = 60.0  # a loaded 2-core machine starts a node in seconds, not minutes
STOP_TIMEOUT = 20.0
STOP_GRACE = 10.0  # a node's own shutdown at teardown, before kill -9


def spare_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def require_program(name: str) -> str:
    # Debian keeps PostgreSQL's server programs off PATH, under its version's directory.
    path = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if path is None:
        unavailable(f"{name} is not installed")
    return path


async def wait_for_port(port: int, timeout: float = START_TIMEOUT) -> None:
    """Until something accepts on 127.0.0.1:``port``."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


async def _end(proc: asyncio.subprocess.Process, signum: int = signal.SIGKILL) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)
        async with asyncio.timeout(STOP_TIMEOUT):
            await proc.wait()


# Redis.


class RedisServer:
    """A redis-server of the test's own on a spare port, without persistence."""

    def __init__(
        self, directory: Path, password: str | None = None, tls: bool = False,
        unix: bool = False, tls_options: tuple[str, ...] = (),
    ) -> None:
        self.binary = require_program("redis-server")
        self.directory = directory
        self.port = spare_port()
        self.password = password  # --requirepass: clients must AUTH
        # TLS only, with a certificate of its own for 127.0.0.1 (``certificate``).
        self.certificate = directory / "cert.pem" if tls else None
        # Or TLS as the test configures it (--tls-* options: certificates of its own).
        self.tls_options = tls_options
        # Or a unix socket only (no TCP port): unix:// URLs.
        self.socket = directory / "redis.sock" if unix else None
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The server's URL; with TLS, trusting its certificate (redis-py's ssl_ca_certs)."""
        auth = "" if self.password is None else f":{self.password}@"
        if self.socket is not None:
            return f"unix://{auth}{self.socket}?db=0"
        if self.tls_options:
            return f"rediss://{auth}127.0.0.1:{self.port}/0"  # the test adds its query
        if self.certificate is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.certificate}"

    async def start(self) -> None:
        listen: tuple[str, ...] = ("--port", str(self.port))
        if self.certificate is not None:
            key = self.directory / "key.pem"
            if not self.certificate.exists():
                await _self_signed(self.certificate, key)
            listen = ("--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no",
                      "--tls-cert-file", str(self.certificate), "--tls-key-file", str(key),
                      "--tls-ca-cert-file", str(self.certificate))
        elif self.tls_options:
            listen = ("--port", "0", "--tls-port", str(self.port), *self.tls_options)
        elif self.socket is not None:
            listen = ("--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700")
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, *listen, "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.directory),
            *(() if self.password is None else ("--requirepass", self.password)),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        await self.ping()

    async def ping(self, timeout: float = START_TIMEOUT) -> None:
        """Until the server answers PING (RESP, no client library needed)."""
        if self.tls_options:
            # Client certificates the test's own: until it accepts, which it does once up.
            await wait_for_port(self.port, timeout)
            return
        async with asyncio.timeout(timeout):
            while True:
                try:
                    reader, writer = await self._open()
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                try:
                    # Without the password Redis answers NOAUTH: up all the same.
                    writer.write(b"PING\r\n")
                    if (await reader.readline()).startswith((b"+PONG", b"-NOAUTH")):
                        return
                finally:
                    writer.close()
                await asyncio.sleep(0.05)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.socket is not None:
            return await asyncio.open_unix_connection(self.socket)
        return await asyncio.open_connection("127.0.0.1", self.port, ssl=self._client_tls())

    def _client_tls(self) -> ssl.SSLContext | None:
        if self.certificate is None:
            return None
        return ssl.create_default_context(cafile=str(self.certificate))

    async def kill(self) -> None:
        """kill -9: clients see their connections reset."""
        if self.proc is not None:
            await _end(self.proc, signal.SIGKILL)

    async def restart(self) -> None:
        await self.kill()
        await self.start()


async def _self_signed(certificate: Path, key: Path) -> None:
    """A certificate for 127.0.0.1, signed by its own key (openssl)."""
    proc = await asyncio.create_subprocess_exec(
        require_program("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes",
        "-keyout", str(key), "-out", str(certificate), "-days", "1",
        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(START_TIMEOUT):
        assert await proc.wait() == 0, "openssl could not make a certificate"


@asynccontextmanager
async def redis_server(
    password: str | None = None, tls: bool = False, unix: bool = False,
    tls_options: tuple[str, ...] = (),
) -> AsyncIterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="chatd-redis-") as directory:
        server = RedisServer(Path(directory), password, tls, unix, tls_options)
        try:
            await server.start()
            yield server
        finally:
            await server.kill()


# A TCP proxy whose link can be black-holed.


class Proxy:
    """Forwards 127.0.0.1:``port`` to ``target``; ``black_hole()`` stops forwarding in
    both directions while every socket stays open (a partition that no RST reveals),
    ``restore()`` forwards again what piled up and what follows."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def black_hole(self) -> None:
        self._flowing.clear()

    def restore(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await source.read(65536)
                await self._flowing.wait()  # bytes read just before the black hole wait too
                if not data:
                    break
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()


@asynccontextmanager
async def proxy(target_port: int) -> AsyncIterator[Proxy]:
    link = Proxy(target_port)
    await link.start()
    try:
        yield link
    finally:
        await link.close()


# PostgreSQL of the test's own.


def _as_postgres(*argv: str) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the postgres user."""
    if os.geteuid() == 0:
        return [require_program("runuser"), "-u", "postgres", "--", *argv]
    return list(argv)


class PostgresCluster:
    """``initdb`` in a temp dir, ``pg_ctl`` on a spare port, trust auth on loopback."""

    def __init__(self, directory: Path) -> None:
        self.initdb = require_program("initdb")
        self.pg_ctl = require_program("pg_ctl")
        self.directory = directory
        self.data = directory / "data"
        self.port = spare_port()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def _run(self, *argv: str, timeout: float = START_TIMEOUT) -> None:
        proc = await asyncio.create_subprocess_exec(
            *_as_postgres(*argv),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(timeout):
                output, _ = await proc.communicate()
        finally:
            await _end(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {output.decode()}")

    async def create(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        await self._run(self.initdb, "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8")
        await self.start()

    async def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1"
                   f" -k {self.directory} -c fsync=off -c max_connections=200")
        await self._run(self.pg_ctl, "-D", str(self.data), "-o", options,
                        "-l", str(self.directory / "log"), "-w", "-t", "60", "start")

    async def stop(self, mode: str = "fast") -> None:
        await self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60",
                        "stop")

    async def restart(self, mode: str = "immediate") -> None:
        """``immediate``: no checkpoint, every connection cut (as a crash, then recovery)."""
        await self.stop(mode)
        await self.start()


@asynccontextmanager
async def postgres_cluster() -> AsyncIterator[PostgresCluster]:
    with tempfile.TemporaryDirectory(prefix="chatd-pg-") as directory:
        cluster = PostgresCluster(Path(directory))
        try:
            await cluster.create()
            yield cluster
        finally:
            with contextlib.suppress(Exception):
                await cluster.stop("immediate")


# chatd nodes.


class Node:
    """One ``python -m chatd`` process, with its stderr kept for failure messages."""

    def __init__(
        self, name: str, db: str, bus: str, extra: dict[str, str], env: dict[str, str]
    ) -> None:
        self.name, self.db, self.bus = name, db, bus
        self.extra, self.env = extra, env
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr = b""
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        env = fast_env(**{f"CHATD_{k.upper()}": v for k, v in self.extra.items()}, **self.env)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chatd", "--port", str(self.port), "--db", self.db,
            "--bus", self.bus, "--node-id", self.name,
            env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self.stderr = b""
        self.port = await self._wait_listening()
        self._reader = asyncio.create_task(self._keep_stderr())

    async def _wait_listening(self) -> int:
        assert self.proc is not None and self.proc.stderr is not None
        async with asyncio.timeout(START_TIMEOUT):
            while (match := LISTENING.search(self.stderr)) is None:
                line = await self.proc.stderr.readline()
                if not line:
                    raise AssertionError(
                        f"node {self.name} exited before listening:\n{self.stderr.decode()}"
                    )
                self.stderr += line
        return int(match[1])

    async def _keep_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr += line

    async def stop(self, signum: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        await _end(self.proc, signum)
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self._reader
        return self.proc.returncode

    async def kill(self) -> None:
        """kill -9: no goodbye to Redis or PostgreSQL."""
        await self.stop(signal.SIGKILL)

    async def end(self) -> None:
        """Stop gracefully (SIGTERM), or kill -9 if that takes more than STOP_GRACE s."""
        try:
            async with asyncio.timeout(STOP_GRACE):
                await self.stop(signal.SIGTERM)
        except TimeoutError:
            await self.kill()

    async def connect(self, token: str | None = None) -> Client:
        return await Client.connect("127.0.0.1", self.port, token=token, timeout=30)


class Cluster:
    """N nodes on one database and one bus; hands out clients and cleans up."""

    def __init__(self, db: str, bus: str, **settings: Any) -> None:
        self.db, self.bus = db, bus
        self.settings = {k: str(v) for k, v in settings.items()}
        self.nodes: list[Node] = []
        self._clients: list[Client] = []
        self._registered = 0

    async def add_nodes(
        self, count: int, bus: str | None = None, env: dict[str, str] | None = None,
        port: int = 0,
    ) -> list[Node]:
        """``bus``: another URL for these nodes' bus (a proxy); ``env``: extra variables;
        ``port``: the port to listen on (0: a free one each)."""
        # One after the other: the first creates the schema (a race is tested elsewhere).
        new = []
        for _ in range(count):
            name = f"n{len(self.nodes) + 1}"
            node = Node(name, self.db, bus or self.bus, self.settings, env or {})
            node.port = port
            self.nodes.append(node)
            await node.start()
            new.append(node)
        return new

    async def connect(self, node: Node, token: str | None = None) -> Client:
        client = await node.connect(token)
        self._clients.append(client)
        return client

    async def user(self, node: Node, name: str | None = None) -> Client:
        """A client on ``node``, logged in as a freshly registered user."""
        if name is None:
            self._registered += 1
            name = f"user{self._registered}"
        client = await self.connect(node)
        await client.request(
            "/register", {"name": name, "password": PASSWORD, "password_repete": PASSWORD}
        )
        await client.login(name, PASSWORD)
        return client

    async def login(self, node: Node, name: str) -> Client:
        client = await self.connect(node)
        await client.login(name, PASSWORD)
        return client

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.stderr.decode(errors='replace')}" for n in self.nodes)

    async def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close()
        # SIGTERM first: a node that exits through its own shutdown writes its coverage
        # data (coverage's patch = subprocess), which a kill -9 loses; all at once, so
        # that teardown takes one node's shutdown.  Killed if one does not end in time.
        await asyncio.gather(*(node.end() for node in self.nodes))


@asynccontextmanager
async def cluster(db: str, bus: str = "local", nodes: int = 2, **settings: Any
                  ) -> AsyncIterator[Cluster]:
    group = Cluster(db, bus, **settings)
    try:
        await group.add_nodes(nodes)
        yield group
    finally:
        await group.close()
