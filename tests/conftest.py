"""Shared fixtures: a real chatd on an ephemeral port with a real SQLite file per test."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import itertools
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from chatd.client import Client
from chatd.config import Config
from chatd.server import Server
from tests.pg_helpers import fresh_database, unavailable

if TYPE_CHECKING:
    from tests.cluster_helpers import RedisServer

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (the scripts are not a package), registered under
    its name so that its dataclasses and pickles resolve."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module

PASSWORD = "correct horse battery"
# argon2 at its cheapest (test_auth.py checks the production default), no message rate limit.
TEST_SETTINGS: dict[str, Any] = {
    "argon2_time_cost": 1,
    "argon2_memory_cost": 8,
    "argon2_parallelism": 1,
    # Tests send thousands of messages in a second; test_limits.py checks the real limits.
    "message_rate": 1e6,
    "message_burst": 1_000_000,
    # Likewise joins, leaves, acks and subscribes (test_login_guard.py checks the real ones).
    "membership_rate": 1e6,
    "membership_burst": 1_000_000,
    "ack_rate": 1e6,
    "ack_burst": 1_000_000,
    "subscribe_rate": 1e6,
    "subscribe_burst": 1_000_000,
}


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(host="127.0.0.1", port=0, db=str(tmp_path / "chatd.sqlite3"), **TEST_SETTINGS)


class Harness:
    """Starts, restarts and stops a server, and hands out connected clients."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.server = Server(config)
        self._clients: list[Client] = []
        self._names = itertools.count(1)

    async def start(self) -> None:
        await self.server.start()
        # A restart must find the same port: pin the one the first start picked.
        self.config = dataclasses.replace(self.config, port=self.server.port)

    async def restart(self, **changes: Any) -> None:
        await self.close_clients()
        await self.server.close()
        self.config = dataclasses.replace(self.config, **changes)
        self.server = Server(self.config)
        await self.server.start()

    @property
    def port(self) -> int:
        return self.server.port

    async def connect(self, token: str | None = None) -> Client:
        client = await Client.connect("127.0.0.1", self.port, token=token, timeout=10)
        self._clients.append(client)
        return client

    async def user(self, name: str | None = None, password: str = PASSWORD) -> Client:
        """A connected client logged in as a freshly registered user."""
        name = name or f"user{next(self._names)}"
        client = await self.connect()
        await client.request(
            "/register", {"name": name, "password": password, "password_repete": password}
        )
        await client.login(name, password)
        return client

    async def close_clients(self) -> None:
        for client in self._clients:
            await client.close()
        self._clients.clear()

    async def stop(self) -> None:
        await self.close_clients()
        await self.server.close()


@pytest.fixture
async def harness(config: Config) -> AsyncIterator[Harness]:
    harness = Harness(config)
    await harness.start()
    yield harness
    await harness.stop()


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for the test, dropped after (tests/pg_helpers.py)."""
    async with fresh_database() as url:
        yield url


@contextlib.asynccontextmanager
async def harness_factory(db_for: Callable[[int], str]) -> AsyncIterator[MakeHarness]:
    """``make(**settings)`` starts a server on ``db_for(n)`` for the n-th server made
    (0, 1, ...) with those settings changed; every one is stopped at the end."""
    started: list[Harness] = []

    async def make(**changes: Any) -> Harness:
        base = Config(host="127.0.0.1", port=0, db=db_for(len(started)), **TEST_SETTINGS)
        harness = Harness(dataclasses.replace(base, **changes))
        await harness.start()
        started.append(harness)
        return harness

    try:
        yield make
    finally:
        for harness in started:
            await harness.stop()


@pytest.fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[MakeHarness]:
    """For tests that need non-default settings: ``await make_harness(max_frame_size=64)``."""
    # A database of its own for each server: a second one on a file is refused.
    async with harness_factory(lambda n: str(tmp_path / f"custom{n or ''}.sqlite3")) as make:
        yield make


LISTENING = re.compile(rb"listening on [^\s]+:(\d+)")


def fast_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({f"CHATD_{k.upper()}": str(v) for k, v in TEST_SETTINGS.items()})
    env.update(extra)
    return env


class Process:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr = b""

    async def wait_listening(self) -> int:
        assert self.proc.stderr is not None
        async with asyncio.timeout(120):
            while (match := LISTENING.search(self.stderr)) is None:
                line = await self.proc.stderr.readline()
                assert line, f"chatd exited before listening: {self.stderr.decode()}"
                self.stderr += line
        return int(match[1])

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        assert self.proc.stderr is not None
        async with asyncio.timeout(20):
            self.stderr += await self.proc.stderr.read()
            return await self.proc.wait()


Spawn = Callable[..., Awaitable[Process]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    procs: list[Process] = []

    async def start(
        *args: str, env: dict[str, str] | None = None, stdin: int = asyncio.subprocess.DEVNULL
    ) -> Process:
        # Standard input from /dev/null, not pytest's (a terminal when run by hand): in a
        # terminal chatd takes SIGHUP for "stop", not "reload".
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chatd", "--port", "0", "--db", str(tmp_path / "db.sqlite3"),
            *args, env=env or fast_env(), cwd=ROOT, stdin=stdin, stderr=asyncio.subprocess.PIPE,
        )
        procs.append(Process(proc))
        return procs[-1]

    yield start
    for p in procs:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    """A redis-server of the test's own on a spare loopback port (tests/cluster_helpers.py)."""
    from tests.cluster_helpers import redis_server  # which imports this module

    try:
        import redis as _  # noqa: F401
    except ImportError:
        unavailable("redis-py is not installed: pip install 'chatd[redis]'")
    async with redis_server() as server:
        yield server
