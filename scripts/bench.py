#!/usr/bin/env python3
"""chatd's benchmark: throughput, latency, memory and login cost, each result verified.

    python scripts/bench.py                      # every scenario, full size (minutes)
    python scripts/bench.py --quick              # every scenario, small (seconds)
    python scripts/bench.py --pin --baseline     # the documented run (docs/benchmarks.md)
    python scripts/bench.py --scenario dm --scenario store --db-synchronous FULL
    python scripts/bench.py --target 127.0.0.1:7777 --target-pid 1234 --scenario latency
    python scripts/bench.py --scenario wal       # WAL size under a 2-minute write flood
    python scripts/bench.py --db-url postgresql://postgres@127.0.0.1/postgres  # on PostgreSQL
    python scripts/bench.py --db-url postgresql://... --compare  # dm, store, latency on both
    python scripts/bench.py --db-url postgresql://... --cluster --shared-port  # 2 nodes, 1 port

It starts its own chatd (``python -m chatd``) on a temporary database for each
scenario, or drives an already running one (``--target``).  Every scenario
checks what it measured -- exact counts, order, no loss, no duplicates, ids
matching the replies -- and reports ``"verified": true/false``; any failed
check makes the exit status 1.  One JSON line per scenario goes to stdout
(and to ``--output``), then a short table to stderr (``--json-only`` drops it).

Everything that speaks the protocol goes through ``chatd.client.Client``.  The
``--baseline`` relay (``--relay-server PORT``, started by the benchmark itself)
is a few lines over ``chatd.codec``: it answers the same ops with no storage and
no validation, so the same ``dm`` code drives both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import itertools
import json
import math
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

from chatd.client import Client
from chatd.codec import FrameDecoder, decode_body, encode_frame

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen

ROOT = Path(__file__).resolve().parent.parent
Unpack = Callable[[bytes], Any]  # decodes one frame body (chatd.codec.FrameDecoder)
SCRIPT = Path(__file__).resolve()
PASSWORD = "bench password 1234"
SCENARIOS = ("dm", "fanout", "latency", "idle", "logins", "catchup", "store", "hostile")
# Run only when named: `wal` floods the server for minutes by design.
EXTRA_SCENARIOS = ("wal",)
# The WAL bound the `wal` scenario holds chatd to (README, "Disk use"): twice the
# default db_wal_limit (16 MiB), i.e. the limit plus what one checkpoint interval writes.
WAL_BOUND_MIB = 32
MIB = 1024 * 1024

# Flood control and connection caps out of the way: the benchmark measures throughput,
# tests/test_limits.py checks the limits.  The load generator plays every client on one
# core and may read a burst of pushes late: it must not be dropped as a slow consumer
# (that cap is tested elsewhere), hence the larger outbound buffer.
UNLIMITED = [
    "--message-rate", "1e9",
    "--message-burst", "1000000000",
    "--max-connections", "1000000",
    "--max-connections-per-address", "1000000",
    "--max-outbound-buffer", str(256 * MIB),
    # idle binds 100 connections per user and subscribes each at once.
    "--subscribe-rate", "1e9", "--subscribe-burst", "1000000000",
]
# The `wal` scenario floods every write op: the WAL bound must hold whatever the limits.
WAL_UNLIMITED = [
    "--membership-rate", "1e9", "--membership-burst", "1000000000",
    "--ack-rate", "1e9", "--ack-burst", "1000000000",
]
# Cheap password hashing for setup logins; the `logins` scenario keeps the default.
CHEAP_ARGON2 = [
    "--argon2-time-cost", "1", "--argon2-memory-cost", "8", "--argon2-parallelism", "1",
]
CLIENT_TIMEOUT = 120.0  # any single request
# Silence on a connection that still expects pushes (BENCH_EVENT_TIMEOUT, for debugging).
EVENT_TIMEOUT = float(os.environ.get("BENCH_EVENT_TIMEOUT", "60"))
START_TIMEOUT = 60.0  # a server until it listens
STOP_TIMEOUT = 30.0  # a server after SIGTERM
LISTENING = re.compile(r"(?:listening on|serving on) (\S+):(\d+)")

T = TypeVar("T")

# Every child process, so that any exit kills what is left of them.
_CHILDREN: list[subprocess.Popen[bytes]] = []


class BenchError(Exception):
    """The benchmark cannot go on (a setup request failed, a server did not start...)."""


# Sizes.


@dataclass(frozen=True)
class Sizes:
    dm_pairs: int = 20
    dm_messages: int = 20_000  # per sender
    ack_every: int = 100
    fanout_members: int = 100
    fanout_senders: int = 5  # members 0..senders-1 also send, on their subscribed connection
    fanout_messages: int = 2_000  # per sender
    latency_rate: float = 2_000.0  # messages per second offered, all pairs together
    latency_seconds: float = 10.0
    latency_pairs: int = 20
    idle_connections: int = 10_000
    idle_users: int = 100
    idle_concurrency: int = 200  # connections being opened at once
    peer_idle_connections: int = 1_000  # --peers idle: miniircd dies past ~1,019 (select)
    logins: int = 200
    login_users: int = 200
    ping_interval: float = 0.005
    catchup_messages: int = 50_000
    store_senders: int = 50
    store_messages: int = 2_000  # per sender
    message_size: int = 64  # characters of a message text (sequence number, then padding)
    wal_seconds: float = 120.0  # the write flood of the `wal` scenario
    wal_workers: int = 16  # connections flooding, one user each
    wal_window: int = 8  # op cycles in flight per connection
    hostile_pings: int = 2_000  # round trips timed, quiet and again under attack
    hostile_burst: int = 10_000  # /ping frames in each of the hostile connection's writes


# About 20-100x smaller: every scenario and every check, in a few seconds.
QUICK = Sizes(
    dm_pairs=4,
    dm_messages=400,
    ack_every=50,
    fanout_members=10,
    fanout_senders=2,
    fanout_messages=100,
    latency_rate=400.0,
    latency_seconds=1.0,
    latency_pairs=4,
    idle_connections=200,
    idle_users=10,
    logins=10,
    login_users=5,
    catchup_messages=2_500,
    store_senders=10,
    store_messages=100,
    wal_seconds=3.0,
    wal_workers=4,
    hostile_pings=100,
    hostile_burst=2_000,
    peer_idle_connections=50,
)


def apply_overrides(sizes: Sizes, overrides: Sequence[str]) -> Sizes:
    changes: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(Sizes)}
    for item in overrides:
        name, _, raw = item.partition("=")
        if name not in fields or not raw:
            raise SystemExit(f"bench: --set {item!r}: expected NAME=VALUE, NAME one of "
                             + ", ".join(fields))
        kind = type(getattr(sizes, name))
        try:
            changes[name] = kind(raw)
        except ValueError:
            raise SystemExit(f"bench: --set {item!r}: not a valid {kind.__name__}") from None
    return dataclasses.replace(sizes, **changes)


# Verification.


class Check:
    """Collects the failed checks of one scenario; ``ok`` when there are none."""

    LIMIT = 20

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.error_count = 0
        self.details: dict[str, Any] = {}

    def fail(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < self.LIMIT:
            self.errors.append(message)

    def expect(self, condition: bool, message: str) -> bool:
        if not condition:
            self.fail(message)
        return condition

    def equal(self, what: str, got: object, want: object) -> bool:
        return self.expect(got == want, f"{what}: got {got!r}, expected {want!r}")

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def report(self) -> dict[str, Any]:
        return {**self.details, "error_count": self.error_count, "errors": self.errors}


def seq_of(text: object) -> int:
    """The sequence number a benchmark message starts with (-1 if it has none)."""
    if not isinstance(text, str):
        return -1
    head = text.split(" ", 1)[0]
    return int(head) if head.isdigit() else -1


def make_text(seq: int, size: int) -> str:
    head = f"{seq} "
    return head + "x" * max(1, size - len(head))


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (nan if empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def r3(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 3)


def check_sequence(check: Check, what: str, seqs: Sequence[int], expected: int) -> None:
    """``seqs`` must be exactly 0..expected-1, in order."""
    if list(seqs) == list(range(expected)):
        return
    if len(seqs) != expected:
        check.fail(f"{what}: {len(seqs)} messages, expected {expected}")
    missing = expected - len(set(seqs) & set(range(expected)))
    duplicated = len(seqs) - len(set(seqs))
    out_of_order = sum(1 for a, b in itertools.pairwise(seqs) if b <= a)
    check.fail(f"{what}: sequence wrong: {missing} missing, {duplicated} duplicated, "
               f"{out_of_order} out of order")


def check_ids(check: Check, what: str, ids: Sequence[int], replied: Sequence[int]) -> None:
    """Pushed ids strictly increase, none repeats, and they are the ids the sends got."""
    increasing = all(b > a for a, b in itertools.pairwise(ids))
    check.expect(increasing, f"{what}: pushed ids do not strictly increase")
    check.expect(len(set(ids)) == len(ids), f"{what}: {len(ids) - len(set(ids))} duplicate ids")
    if list(ids) != list(replied):
        check.fail(f"{what}: pushed ids differ from the ids in the /send replies")


# Processes: chatd, the relay, CPU and memory.


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the benchmark dies, whatever kills it."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _proc_cpu_seconds(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (all threads)
    return ticks / os.sysconf("SC_CLK_TCK")


def _proc_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _machine_busy_seconds() -> float | None:
    """CPU time spent by everything on the machine (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _spawn(argv: list[str], log_path: Path, env: dict[str, str], cwd: Path
           ) -> subprocess.Popen[bytes]:
    """Start a child with its output in ``log_path`` (a file never fills up as a pipe can)."""
    with open(log_path, "wb") as log_file:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            env=env, cwd=cwd, preexec_fn=_die_with_parent,
        )
    _CHILDREN.append(popen)
    return popen


class ServerProcess:
    """A chatd or relay child process, found ready through sd_notify or its stderr line."""

    def __init__(self, host: str, port: int, pid: int | None,
                 popen: subprocess.Popen[bytes] | None, log: Path | None,
                 notify: socket.socket | None = None) -> None:
        self.host, self.port, self.pid = host, port, pid
        self._popen = popen
        self._log = log
        self._notify = notify  # kept open while it runs: chatd also says STOPPING=1
        self.exit_code: int | None = None

    @classmethod
    async def start(cls, argv: list[str], workdir: Path, label: str, pin: bool) -> ServerProcess:
        # chatd logs "listening on HOST:PORT" at INFO only; at WARNING its readiness comes
        # from sd_notify ("STATUS=serving on HOST:PORT"), which it sends to NOTIFY_SOCKET.
        notify_path = workdir / f"{label}.notify"
        log_path = workdir / f"{label}.log"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.setblocking(False)
        server = cls("127.0.0.1", 0, None, None, log_path, notify)
        # chatd's settings come from the command line only; the tracer's file
        # (chatd/trace.py, scripts/tail_trace.py) is not a setting and passes.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CHATD_") or k == "CHATD_TRACE_FILE"}
        env["NOTIFY_SOCKET"] = str(notify_path)
        if pin:
            argv = ["taskset", "-c", "0", *argv]
        try:
            popen = _spawn(argv, log_path, env, workdir)
            server.pid, server._popen = popen.pid, popen
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                found = None
                with contextlib.suppress(BlockingIOError):
                    found = LISTENING.search(notify.recv(4096).decode(errors="replace"))
                found = found or LISTENING.search(log_path.read_text(errors="replace"))
                if found:
                    server.host, server.port = found[1], int(found[2])
                    return server
                if popen.poll() is not None:
                    raise BenchError(f"{label} exited with {popen.returncode} before "
                                     f"listening:\n{server.log_tail()}")
                if time.monotonic() > deadline:
                    raise BenchError(f"{label} did not listen within {START_TIMEOUT:.0f} s")
                await asyncio.sleep(0.02)
        except BaseException:
            await server.stop()
            raise

    def log_tail(self, size: int = 4000) -> str:
        if self._log is None:
            return ""
        return self._log.read_text(errors="replace")[-size:]

    def error_lines(self) -> list[str]:
        """Log lines at ERROR level, and tracebacks: a benchmark run must cause none."""
        if self._log is None:
            return []
        text = self._log.read_text(errors="replace")
        return [line for line in text.splitlines()
                if " ERROR " in line or line.startswith("Traceback")]

    def rss_kib(self) -> int | None:
        return None if self.pid is None else _proc_rss_kib(self.pid)

    def cpu_seconds(self) -> float | None:
        return None if self.pid is None else _proc_cpu_seconds(self.pid)

    async def stop(self) -> None:
        try:
            await self._stop()
        finally:
            if self._notify is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._notify.getsockname())
                self._notify.close()
                self._notify = None

    async def _stop(self) -> None:
        popen = self._popen
        if popen is None or popen.poll() is not None:
            self.exit_code = None if popen is None else popen.returncode
            return
        popen.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(popen.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            popen.kill()
            await asyncio.to_thread(popen.wait, 10)
        self.exit_code = popen.returncode


def kill_children() -> None:
    for popen in _CHILDREN:
        if popen.poll() is None:
            popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(10)


GENERATOR_BOUND_PCT = 80.0  # generator CPU (% of a core) above which a figure is a lower bound


class Probe:
    """CPU used by the server and by the benchmark over the measured phase.

    The benchmark's own garbage collector is off meanwhile: a full collection over the
    replies and tasks of a run stalls the load generator for tens of milliseconds, which
    would show up as server latency (and slow the generator down).
    """

    def __init__(self, server: ServerProcess | None) -> None:
        self._server = server
        self._started: tuple[float, float, float | None, float | None] | None = None
        self.result: dict[str, Any] = {}
        # On PostgreSQL (--db-url): the CPU seconds of the database's backends, by pid.
        self.database_cpu: Callable[[], dict[int, float]] | None = None
        self._database0: dict[int, float] = {}
        # More processes to account for (--cluster: the second node, redis-server), by
        # name: each gets NAME_cpu_pct, and none of it counts as other_cpu_pct.
        self.processes: dict[str, Callable[[], float | None]] = {}
        self._processes0: dict[str, float | None] = {}

    def start(self) -> None:
        server_cpu = None if self._server is None else self._server.cpu_seconds()
        gc.collect()
        gc.freeze()
        gc.disable()
        self._database0 = self.database_cpu() if self.database_cpu else {}
        self._processes0 = {name: cpu() for name, cpu in self.processes.items()}
        self._started = (time.perf_counter(), _own_cpu_seconds(), server_cpu,
                         _machine_busy_seconds())

    def stop(self) -> None:
        if self._started is None:
            return
        wall0, own0, server0, busy0 = self._started
        wall = max(time.perf_counter() - wall0, 1e-9)
        server_cpu = None if self._server is None else self._server.cpu_seconds()
        processes = self._processes_cpu(wall)  # into the result once it is made
        own = _own_cpu_seconds()
        busy = _machine_busy_seconds()
        gc.enable()
        gc.unfreeze()
        self.result = {
            "measured_s": round(wall, 3),
            "client_cpu_pct": round(100 * (own - own0) / wall, 1),
            "server_cpu_pct": None if server_cpu is None or server0 is None
            else round(100 * (server_cpu - server0) / wall, 1),
        }
        self.result.update(processes[1])
        # A figure the generator may have limited is a lower bound, never a target met.
        self.result["lower_bound"] = self.result["client_cpu_pct"] > GENERATOR_BOUND_PCT
        database = 0.0
        if self.database_cpu is not None:
            now = self.database_cpu()
            database = sum(cpu - self._database0.get(pid, 0.0) for pid, cpu in now.items())
            self.result["postgres_cpu_pct"] = round(100 * database / wall, 1)
        # Everything else the machine ran meanwhile: a busy neighbour makes a noisy run.
        if (busy is not None and busy0 is not None and server_cpu is not None
                and server0 is not None):  # 0.0 for a server that has not run yet
            other = ((busy - busy0) - (own - own0) - (server_cpu - server0) - database
                     - processes[0])
            self.result["other_cpu_pct"] = round(max(0.0, 100 * other / wall), 1)

    def _processes_cpu(self, wall: float) -> tuple[float, dict[str, float | None]]:
        """``processes``' CPU seconds together, and each one's NAME_cpu_pct."""
        total, percents = 0.0, {}
        for name, cpu in self.processes.items():
            now, then = cpu(), self._processes0.get(name)
            used = None if now is None or then is None else now - then
            percents[f"{name}_cpu_pct"] = None if used is None else round(100 * used / wall, 1)
            total += used or 0.0
        return total, percents


# --cluster --shared-port: two nodes listening on one port, the kernel choosing the node of
# each connection.  Which node holds which connection is read from /proc, as ss(8) does.

TCP_ESTABLISHED, TCP_LISTEN = "01", "0A"  # the st column of /proc/net/tcp


def _socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` holds open."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    found.add(int(target[8:-1]))
    return found


def _tcp_sockets(port: int) -> list[tuple[str, int, int]]:
    """(state, remote port, inode) of every TCP socket of this host on local ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                if int(local.rsplit(":", 1)[1], 16) == port:
                    found.append((state, int(remote.rsplit(":", 1)[1], 16), int(inode)))
    return found


@dataclass
class SharedPort:
    """Nodes sharing ``port`` (SO_REUSEPORT): where the kernel put each connection."""

    port: int
    nodes: dict[str, ServerProcess]  # by label: "a", "b"
    listening: dict[str, bool] = field(default_factory=dict)  # a listening socket on port
    connections: dict[str, int] = field(default_factory=dict)  # established, at the census
    node_of: dict[int, str] = field(default_factory=dict)  # id(client) -> node label
    pairs_across: int | None = None  # dm, latency: pairs whose two ends are on two nodes

    def census(self, clients: Sequence[Client]) -> None:
        """Which node accepted each of ``clients`` (by their local port), and which
        nodes listen on the port: a node's sockets are the inodes among its fds."""
        owner = {inode: label for label, node in self.nodes.items() if node.pid is not None
                 for inode in _socket_inodes(node.pid)}
        by_peer_port: dict[int, str] = {}
        self.listening = dict.fromkeys(self.nodes, False)
        for state, remote_port, inode in _tcp_sockets(self.port):
            label = owner.get(inode)
            if label is not None and state == TCP_LISTEN:
                self.listening[label] = True
            elif label is not None and state == TCP_ESTABLISHED:
                by_peer_port[remote_port] = label
        self.node_of = {id(c): by_peer_port.get(c.local_address[1], "?") for c in clients}
        self.connections = {label: sum(1 for n in self.node_of.values() if n == label)
                            for label in self.nodes}

    def check(self, check: Check, clients: int) -> None:
        """The run showed two nodes on one port only if each listened on it, each got
        connections, and every connection was on one of them."""
        for label in self.nodes:
            check.expect(self.listening.get(label, False),
                         f"node {label} has no listening socket on port {self.port}")
            check.expect(self.connections.get(label, 0) > 0,
                         f"node {label} got none of the {clients} connections")
        check.equal("connections found on a node", sum(self.connections.values()), clients)

    def report(self) -> dict[str, Any]:
        found: dict[str, Any] = {"port": self.port, "listening": self.listening,
                                 "connections": self.connections}
        if self.pairs_across is not None:
            found["pairs_across_nodes"] = self.pairs_across
        return found


# Talking to the server: always through chatd.client.Client.


@dataclass
class Run:
    """What one scenario gets: where the server is, its sizes, and where to report."""

    args: argparse.Namespace
    sizes: Sizes
    host: str
    port: int
    prefix: str  # makes user and channel names unique per run (for --target)
    server: ServerProcess | None
    db: Path | None = None  # the server's database, when the benchmark started it
    # --cluster: where receiving connections go (another node); None: the same server.
    receivers_at: tuple[str, int] | None = None
    # --cluster --shared-port: the nodes behind ``port``, the kernel choosing among them.
    shared: SharedPort | None = None
    check: Check = field(default_factory=Check)
    probe: Probe = field(init=False)
    clients: list[Client] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.probe = Probe(self.server)

    def name(self, role: str, index: int) -> str:
        return f"{self.prefix}{role}{index}"

    async def connect(self, token: str | None = None, unpack: Unpack | None = None,
                      receiving: bool = False) -> Client:
        """A connection to the server, or with ``receiving`` to the receivers' node."""
        host, port = (self.receivers_at if receiving and self.receivers_at
                      else (self.host, self.port))
        client = await Client.connect(
            host, port, token=token, timeout=CLIENT_TIMEOUT, unpack=unpack
        )
        self.clients.append(client)
        return client

    async def user(
        self, name: str, retries: list[int] | None = None, unpack: Unpack | None = None,
        receiving: bool = False,
    ) -> Client:
        """A new connection logged in as a newly registered user."""
        client = await self.connect(unpack=unpack, receiving=receiving)
        params = {"name": name, "password": PASSWORD, "password_repete": PASSWORD}
        await call_ok(client, "/register", params, retries)
        await call_ok(client, "/login", {"name": name, "password": PASSWORD}, retries)
        return client

    async def close_clients(self) -> None:
        clients, self.clients = self.clients, []
        for start in range(0, len(clients), 1000):
            chunk = clients[start : start + 1000]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await asyncio.gather(*(c.close() for c in chunk), return_exceptions=True)


async def call_ok(
    client: Client, op: str, params: dict[str, Any] | None = None,
    retries: list[int] | None = None,
) -> dict[str, Any]:
    """A request that must succeed; code 8 (busy) is retried after its retry_after."""
    for _ in range(1000):
        reply = await client.call(op, params)
        code = reply.get("code")
        if code == 8:
            if retries is not None:
                retries[0] += 1
            await asyncio.sleep(float(reply.get("retry_after", 1.0)))
            continue
        if code != 0:
            raise BenchError(f"{op} failed: code {code}: {reply.get('msg')}")
        return reply
    raise BenchError(f"{op}: still busy after 1000 tries")


async def gather_limited(limit: int, coros: Iterable[Awaitable[T]]) -> list[T]:
    """Await every coroutine, at most ``limit`` at once, results in order."""
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[T]) -> T:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


async def users(
    run: Run, role: str, count: int, limit: int = 32, unpack: Unpack | None = None,
    receiving: Callable[[int], bool] = lambda index: False,
) -> list[Client]:
    """``count`` new users; user ``i`` on the receivers' node when ``receiving(i)``."""
    return await gather_limited(limit, (
        run.user(run.name(role, i), unpack=unpack, receiving=receiving(i))
        for i in range(count)
    ))


class SharedFrames:
    """Decodes each distinct event frame once for all the connections that receive it.

    A channel message is one frame, byte for byte, for every recipient (chatd encodes
    it once), so the same bytes carry the same content. The load generator plays all
    the members on one core: decoding every delivery again made it, not chatd, the
    limit of the fanout figure. Every delivery is still read and checked.
    """

    def __init__(self) -> None:
        self._decoded: dict[bytes, Any] = {}

    def unpack(self, body: bytes) -> Any:
        found = self._decoded.get(body)
        if found is None:
            found = decode_body(body)
            if isinstance(found, dict) and "event" in found:  # replies are all different
                self._decoded[body] = found
        return found


async def send_window(
    client: Client, count: int, window: int, params: Callable[[int], dict[str, Any]],
    replied: list[int], check: Check, what: str, op: str = "/send",
) -> None:
    """Send ``count`` messages keeping ``window`` requests in flight; ``replied[seq]`` = id.

    Each worker takes the next sequence number and writes its request before it first
    waits, so requests leave in sequence order and the server stores them in that order.
    """
    seqs = iter(range(count))

    async def worker() -> None:
        for seq in seqs:
            reply = await client.call(op, params(seq))
            if reply.get("code") == 0:
                replied[seq] = reply["data"]["id"]
            else:
                check.fail(f"{what}: {op} #{seq} failed: code {reply.get('code')}: "
                           f"{reply.get('msg')}")

    await asyncio.gather(*(worker() for _ in range(max(1, min(window, count)))))


@dataclass
class Inbox:
    """What a subscribed receiver of private messages saw."""

    ids: list[int] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    latencies_ns: list[int] = field(default_factory=list)
    stray: int = 0  # events that are not this sender's messages
    last_at: float = 0.0  # when the last message was processed
    acked_at: float = 0.0  # when the final /ack's reply came
    position: int | None = None  # the final /ack's reply
    ack_failures: int = 0


async def next_events(client: Client, progress: str) -> list[dict[str, Any]]:
    """The next event and any already waiting; BenchError after EVENT_TIMEOUT of nothing."""
    try:
        first = await client.next_event(timeout=EVENT_TIMEOUT)
    except TimeoutError:
        raise BenchError(f"{progress}, then nothing for {EVENT_TIMEOUT:.0f} s") from None
    return [first, *client.waiting_events()]


async def receive_private(
    client: Client, sender: str, expected: int, ack_every: int, stamped: bool = False
) -> Inbox:
    """Take ``expected`` pushed messages from ``sender``, acking the newest every ``ack_every``.

    With ``stamped``, each text is "SEQ PERF_COUNTER_NS" and the latency is recorded.
    """
    inbox = Inbox()
    acks: list[asyncio.Task[dict[str, Any]]] = []
    since_ack = 0
    while len(inbox.ids) < expected:
        batch = await next_events(client, f"a receiver got {len(inbox.ids)} of {expected} messages")
        now_ns = time.perf_counter_ns()
        for event in batch:
            data = event.get("data") or {}
            if event.get("event") != "message" or "to" in data or data.get("name") != sender:
                inbox.stray += 1
                continue
            inbox.ids.append(data["id"])
            text = data.get("msg")
            inbox.seqs.append(seq_of(text))
            if stamped and isinstance(text, str):
                inbox.latencies_ns.append(now_ns - int(text.split(" ", 1)[1]))
            since_ack += 1
            if since_ack >= ack_every:
                since_ack = 0
                acks.append(asyncio.create_task(client.call("/ack", {"id": data["id"]})))
        inbox.last_at = now_ns / 1e9
    if not inbox.ids:
        return inbox
    final = await client.call("/ack", {"id": inbox.ids[-1]})
    replies = [*await asyncio.gather(*acks), final]
    inbox.acked_at = time.perf_counter()
    inbox.ack_failures = sum(1 for reply in replies if reply.get("code") != 0)
    inbox.position = (final.get("data") or {}).get("position")
    # Anything pushed to this connection before the last message was is in the stream
    # before the final /ack's reply: a duplicate or a stray would be waiting by now.
    inbox.stray += len(client.waiting_events())
    return inbox


def check_inbox(check: Check, what: str, inbox: Inbox, expected: int,
                replied: Sequence[int]) -> None:
    check_sequence(check, what, inbox.seqs, expected)
    check_ids(check, what, inbox.ids, replied)
    check.equal(f"{what}: stray or extra events", inbox.stray, 0)
    check.equal(f"{what}: failed acks", inbox.ack_failures, 0)
    if inbox.ids:
        check.equal(f"{what}: final ack position", inbox.position, inbox.ids[-1])


async def settle(client: Client) -> None:
    """Wait until no subscription is still catching up (/stats), so measuring starts clean.

    The relay has no /stats: its catch-ups are instant anyway.
    """
    async with asyncio.timeout(60):
        while True:
            reply = await client.call("/stats")
            if (reply.get("data") or {}).get("catching_up", 0) == 0:
                return
            await asyncio.sleep(0.05)


async def settle_servers(run: Run, *clients: Client) -> None:
    """``settle`` through each of ``clients``; with --shared-port, through one connection
    on each node instead (the kernel chose the nodes), after the census of connections."""
    if run.shared is None:
        for client in clients:
            await settle(client)
        return
    run.shared.census(run.clients)
    run.shared.check(run.check, len(run.clients))
    for label in run.shared.nodes:
        on_node = [c for c in run.clients if run.shared.node_of[id(c)] == label]
        if on_node:
            await settle(on_node[0])


async def private_pairs(run: Run, role: str, pairs: int) -> tuple[list[Client], list[Client]]:
    senders = await users(run, role + "s", pairs)
    receivers = await users(run, role + "r", pairs, receiving=lambda index: True)
    await asyncio.gather(*(call_ok(r, "/subscribe") for r in receivers))
    await settle_servers(run, senders[0], receivers[0])  # --cluster: two nodes
    if run.shared is not None:
        node_of = run.shared.node_of
        run.shared.pairs_across = sum(
            1 for s, r in zip(senders, receivers, strict=True) if node_of[id(s)] != node_of[id(r)])
    return senders, receivers


# Scenarios.  Each returns its metrics and records its checks in run.check.


def private_to(name: str, size: int) -> Callable[[int], dict[str, Any]]:
    """The /send parameters of message ``seq`` to ``name``."""
    return lambda seq: {"name": name, "msg": make_text(seq, size)}


async def scenario_dm(run: Run) -> dict[str, Any]:
    s = run.sizes
    pairs, count, window = s.dm_pairs, s.dm_messages, run.args.window
    senders, receivers = await private_pairs(run, "d", pairs)
    sender_names = [run.name("ds", i) for i in range(pairs)]
    receiver_names = [run.name("dr", i) for i in range(pairs)]
    replied = [[0] * count for _ in range(pairs)]
    run.probe.start()
    started = time.perf_counter()
    receiving = [
        asyncio.create_task(receive_private(receivers[i], sender_names[i], count, s.ack_every))
        for i in range(pairs)
    ]
    await asyncio.gather(*(
        send_window(senders[i], count, window, private_to(receiver_names[i], s.message_size),
                    replied[i], run.check, f"pair {i}")
        for i in range(pairs)
    ))
    sent = time.perf_counter()
    inboxes = await asyncio.gather(*receiving)
    run.probe.stop()
    for i, inbox in enumerate(inboxes):
        check_inbox(run.check, f"pair {i}", inbox, count, replied[i])
    delivered = sum(len(inbox.ids) for inbox in inboxes)
    last = max(inbox.last_at for inbox in inboxes)
    run.check.details = {"delivered": delivered, "expected": pairs * count}
    return {
        "pairs": pairs,
        "messages_per_sender": count,
        "window": window,
        "ack_every": s.ack_every,
        "delivered": delivered,
        "duration_s": r3(last - started),
        "delivered_per_s": round(delivered / (last - started)),
        "sends_done_s": r3(sent - started),
        "all_acked_s": r3(max(inbox.acked_at for inbox in inboxes) - started),
    }


async def scenario_fanout(run: Run) -> dict[str, Any]:
    s = run.sizes
    members_count, sender_count, count = s.fanout_members, s.fanout_senders, s.fanout_messages
    window = run.args.window
    # --cluster: the senders on the first node, the other members on the second.
    members = await users(run, "fm", members_count, unpack=SharedFrames().unpack,
                          receiving=lambda index: index >= sender_count)
    names = [run.name("fm", i) for i in range(members_count)]
    channel = run.name("fan", 0)
    # Everyone joins before anyone subscribes: no join events, and no backlog (protocol.md
    # section 9: a channel without a position starts at its newest message).
    await gather_limited(32, (call_ok(m, "/channel/join", {"name": channel}) for m in members))
    # A channel without a position is caught up from its newest message *when the catch-up
    # reads the positions*, which may be after the first sends: acknowledging id 0 gives
    # the channel a position, so every message from then on is delivered (section 9).
    await gather_limited(32, (call_ok(m, "/ack", {"channel": channel, "id": 0}) for m in members))
    await asyncio.gather(*(call_ok(m, "/subscribe") for m in members))
    await settle_servers(run, members[0], members[-1])  # --cluster: two nodes
    sender_index = {names[i]: i for i in range(sender_count)}
    # A message goes to every subscribed connection of every member except the calling
    # connection (protocol.md, /channel/send): the senders send on their subscribed
    # connection, so each receives everything but its own messages.
    expected = [sender_count * count - (count if i < sender_count else 0)
                for i in range(members_count)]
    replied = [[0] * count for _ in range(sender_count)]

    @dataclass
    class Seen:
        full: bool  # also keeps every message's sender and sequence number, to check them
        ids: array[int] = field(default_factory=lambda: array("q"))
        kept: list[dict[str, Any]] = field(default_factory=list)
        senders: array[int] = field(default_factory=lambda: array("h"))
        seqs: array[int] = field(default_factory=lambda: array("l"))
        other: int = 0
        stray: int = 0
        last_at: float = 0.0
        position: int | None = None

        def tally(self) -> None:
            """Sender and sequence of each kept message, once the clock has stopped."""
            for data in self.kept:
                index = sender_index.get(str(data.get("name")), -1)
                if index < 0:
                    self.stray += 1
                    continue
                self.senders.append(index)
                self.seqs.append(seq_of(data.get("msg")))

    async def receive(member: Client, want: int, full: bool) -> Seen:
        # As little as possible per event while the clock runs: on one core the load
        # generator decodes every delivery, and must not be what limits the rate.
        seen = Seen(full)
        ids, kept = seen.ids, seen.kept
        while len(ids) < want:
            batch = await next_events(member, f"a member got {len(ids)} of {want} messages")
            for event in batch:
                if event.get("event") != "channel_message":
                    seen.other += 1  # presence, join: not counted, not an error
                    continue
                data = event["data"]
                if data.get("channel") != channel:
                    seen.stray += 1
                    continue
                ids.append(data["id"])
                if full:
                    kept.append(data)
            seen.last_at = time.perf_counter()
        if want:
            reply = await member.call("/ack", {"channel": channel, "id": ids[-1]})
            seen.position = (reply.get("data") or {}).get("position")
        seen.stray += sum(1 for e in member.waiting_events() if e.get("event") == "channel_message")
        return seen

    run.probe.start()
    started = time.perf_counter()
    # Every sender checks the content of what it receives, and one member that does not
    # send; the others check ids only. Ids name stored messages, and a channel message's
    # frame is encoded once for all its recipients, so the same ids mean the same content.
    receiving = [asyncio.create_task(receive(members[i], expected[i], i <= sender_count))
                 for i in range(members_count)]
    await asyncio.gather(*(
        send_window(
            members[i], count, window,
            lambda seq: {"name": channel, "message": make_text(seq, s.message_size)},
            replied[i], run.check, f"sender {i}", op="/channel/send",
        )
        for i in range(sender_count)
    ))
    seens = await asyncio.gather(*receiving)
    run.probe.stop()
    for seen in seens:
        seen.tally()
    all_ids = sorted(itertools.chain.from_iterable(replied))
    check = run.check
    for m, seen in enumerate(seens):
        what = f"member {m}"
        check.equal(f"{what}: messages", len(seen.ids), expected[m])
        check.equal(f"{what}: stray or extra channel messages", seen.stray, 0)
        check.expect(all(b > a for a, b in itertools.pairwise(seen.ids)),
                     f"{what}: ids do not strictly increase")
        own = set(replied[m]) if m < sender_count else set()
        check.expect(list(seen.ids) == [i for i in all_ids if i not in own],
                     f"{what}: ids differ from the ids the /channel/send replies gave")
        for j in range(sender_count if seen.full else 0):
            from_j = [seq for seq, k in zip(seen.seqs, seen.senders, strict=True) if k == j]
            check_sequence(check, f"{what} from sender {j}", from_j, 0 if j == m else count)
        if seen.ids:
            check.equal(f"{what}: final ack position", seen.position, seen.ids[-1])
    deliveries = sum(len(seen.ids) for seen in seens)
    last = max(seen.last_at for seen in seens)
    messages = sender_count * count
    check.details = {"deliveries": deliveries, "expected": sum(expected),
                     "other_events": sum(seen.other for seen in seens)}
    return {
        "members": members_count,
        "senders": sender_count,
        "messages_per_sender": count,
        "window": window,
        "messages": messages,
        "deliveries": deliveries,
        "duration_s": r3(last - started),
        "deliveries_per_s": round(deliveries / (last - started)),
        "messages_per_s": round(messages / (last - started)),
    }


async def scenario_latency(run: Run) -> dict[str, Any]:
    s = run.sizes
    pairs, rate = s.latency_pairs, s.latency_rate
    total = int(rate * s.latency_seconds)
    per_pair = [len(range(p, total, pairs)) for p in range(pairs)]
    senders, receivers = await private_pairs(run, "l", pairs)
    sender_names = [run.name("ls", i) for i in range(pairs)]
    receiver_names = [run.name("lr", i) for i in range(pairs)]
    replied = [[0] * per_pair[p] for p in range(pairs)]
    # Send -> its reply (the commit), by pair and sequence number, beside send -> push.
    reply_ns = [[0] * per_pair[p] for p in range(pairs)]

    async def send(pair: int, seq: int) -> None:
        # Stamped as it starts: the request is written before this coroutine first waits.
        started_ns = time.perf_counter_ns()
        text = f"{seq} {started_ns}"
        reply = await senders[pair].call("/send", {"name": receiver_names[pair], "msg": text})
        reply_ns[pair][seq] = time.perf_counter_ns() - started_ns
        if reply.get("code") == 0:
            replied[pair][seq] = reply["data"]["id"]
        else:
            run.check.fail(f"pair {pair}: /send #{seq}: code {reply.get('code')}")

    run.probe.start()
    receiving = [
        asyncio.create_task(
            receive_private(receivers[p], sender_names[p], per_pair[p], s.ack_every, True))
        for p in range(pairs)
    ]
    # Open loop: the clock decides when each message goes, not the replies.
    tasks: list[asyncio.Task[None]] = []
    max_lag = 0.0
    started = time.perf_counter()
    sent = 0
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - started) * rate) + 1)
        while sent < due:
            max_lag = max(max_lag, now - (started + sent / rate))
            tasks.append(asyncio.create_task(send(sent % pairs, sent // pairs)))
            sent += 1
        if sent < total:
            # At least a millisecond: the loop's timers are no finer, and a shorter sleep spins.
            await asyncio.sleep(max(0.001, started + sent / rate - time.perf_counter()))
    offered_for = time.perf_counter() - started
    await asyncio.gather(*tasks)
    inboxes = await asyncio.gather(*receiving)
    run.probe.stop()
    for p, inbox in enumerate(inboxes):
        check_inbox(run.check, f"pair {p}", inbox, per_pair[p], replied[p])
    latencies = sorted(lat / 1e6 for inbox in inboxes for lat in inbox.latencies_ns)
    replies = sorted(lat / 1e6 for lats in reply_ns for lat in lats)
    # What delivery adds to the commit, message by message (negative: pushed before the
    # sender had its reply); on --cluster, the bus's part of the latency.
    after_reply = sorted(
        (lat - reply_ns[p][seq]) / 1e6
        for p, inbox in enumerate(inboxes)
        for seq, lat in zip(inbox.seqs, inbox.latencies_ns, strict=True)
        if 0 <= seq < per_pair[p]
    )
    run.check.equal("latency samples", len(latencies), total)
    run.check.details = {"delivered": sum(len(i.ids) for i in inboxes), "expected": total}
    placed = ({} if run.shared is None
              else latency_by_placement(run.shared, senders, receivers, inboxes))
    return {
        **placed,
        "pairs": pairs,
        "offered_per_s": rate,
        "messages": total,
        "offered_for_s": r3(offered_for),
        "max_send_lag_ms": r3(max_lag * 1000),
        "p50_ms": r3(percentile(latencies, 50)),
        "p90_ms": r3(percentile(latencies, 90)),
        "p99_ms": r3(percentile(latencies, 99)),
        "p999_ms": r3(percentile(latencies, 99.9)),
        "max_ms": r3(latencies[-1] if latencies else math.nan),
        "reply_p50_ms": r3(percentile(replies, 50)),
        "reply_p99_ms": r3(percentile(replies, 99)),
        "push_after_reply_p50_ms": r3(percentile(after_reply, 50)),
        "push_after_reply_p99_ms": r3(percentile(after_reply, 99)),
    }


def latency_by_placement(shared: SharedPort, senders: Sequence[Client],
                         receivers: Sequence[Client], inboxes: Sequence[Inbox]
                         ) -> dict[str, float | None]:
    """--shared-port: the kernel put some pairs' two ends on one node and some on two; the
    latency of each kind, since only the second crosses Redis."""
    node_of = shared.node_of
    across: list[float] = []
    same: list[float] = []
    for sender, receiver, inbox in zip(senders, receivers, inboxes, strict=True):
        kind = across if node_of[id(sender)] != node_of[id(receiver)] else same
        kind.extend(lat / 1e6 for lat in inbox.latencies_ns)
    across.sort()
    same.sort()
    return {"across_nodes_p50_ms": r3(percentile(across, 50)),
            "across_nodes_p99_ms": r3(percentile(across, 99)),
            "same_node_p50_ms": r3(percentile(same, 50)),
            "same_node_p99_ms": r3(percentile(same, 99))}


async def scenario_idle(run: Run) -> dict[str, Any]:
    s = run.sizes
    user_count = s.idle_users
    per_user = max(1, s.idle_connections // user_count)
    total = per_user * user_count
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and total + 500 > soft:
        raise BenchError(
            f"RLIMIT_NOFILE is {soft} (hard {hard}): {total} connections need about "
            f"{total + 500} descriptors in the benchmark and as many in chatd; raise the "
            "hard limit (ulimit -Hn, or LimitNOFILE= as chatd.service does)")
    setup = await users(run, "iu", user_count)
    tokens = [c.token for c in setup]
    pusher = await run.user(run.name("ip", 0))
    await asyncio.gather(*(c.close() for c in setup))  # tokens stay valid
    await asyncio.sleep(0.5)
    rss_before = run.server.rss_kib() if run.server else None
    run.probe.start()
    started = time.perf_counter()

    async def open_one(index: int) -> Client:
        # The token binds the connection on its first request (protocol.md, section 5).
        client = await run.connect(token=tokens[index % user_count])
        await call_ok(client, "/subscribe")
        return client

    connections = await gather_limited(s.idle_concurrency, (open_one(i) for i in range(total)))
    await settle(pusher)
    opened = time.perf_counter() - started
    await asyncio.sleep(1.0)
    rss_after = run.server.rss_kib() if run.server else None
    run.probe.stop()
    # Alive: every connection answers a /ping, and every one gets a push.
    pings = await gather_limited(1000, (c.call("/ping") for c in connections))
    failed_pings = sum(1 for reply in pings if reply.get("code") != 0)
    run.check.equal("failed pings", failed_pings, 0)
    pusher_name = run.name("ip", 0)
    sent_ids = []
    for u in range(user_count):
        reply = await call_ok(pusher, "/send", {"name": run.name("iu", u), "msg": f"{u} hello"})
        sent_ids.append(reply["data"]["id"])

    async def pushed(index: int) -> bool:
        event = await connections[index].next_event(timeout=EVENT_TIMEOUT)
        data = event.get("data") or {}
        return (event.get("event") == "message" and data.get("name") == pusher_name
                and data.get("id") == sent_ids[index % user_count])

    got = await asyncio.gather(*(pushed(i) for i in range(total)))
    run.check.equal("connections that got the push", sum(got), total)
    await asyncio.sleep(0.2)
    extra = sum(len(c.waiting_events()) for c in connections)
    run.check.equal("extra events", extra, 0)
    run.check.details = {"connections": total, "pinged": len(pings) - failed_pings,
                         "pushed": sum(got)}
    per_connection = None
    if rss_before is not None and rss_after is not None:
        per_connection = round((rss_after - rss_before) / total, 2)
    return {
        "connections": total,
        "users": user_count,
        "connect_s": r3(opened),
        "connections_per_s": round(total / opened),
        "server_rss_before_kib": rss_before,
        "server_rss_after_kib": rss_after,
        "rss_per_connection_kib": per_connection,
    }


async def scenario_logins(run: Run) -> dict[str, Any]:
    s = run.sizes
    user_count, count = s.login_users, s.logins
    names = [run.name("g", i) for i in range(user_count)]
    setup = await run.connect()
    register_retries = [0]
    # Registered on this server, at its (default) cost: a login verifies at the cost of
    # the stored hash.  Few at a time: each is a 64 MiB argon2id hash.
    await gather_limited(4, (
        call_ok(setup, "/register",
                {"name": name, "password": PASSWORD, "password_repete": PASSWORD},
                register_retries)
        for name in names
    ))
    pinger = await run.connect()
    rtts: list[float] = []
    stop = asyncio.Event()

    async def ping_loop(into: list[float], until: asyncio.Event | None, times: int) -> None:
        for _ in range(times):
            if until is not None and until.is_set():
                return
            t0 = time.perf_counter()
            reply = await pinger.call("/ping")
            into.append(time.perf_counter() - t0)
            run.check.expect(reply.get("code") == 0, f"/ping failed: {reply}")
            await asyncio.sleep(s.ping_interval)

    idle_rtts: list[float] = []
    await ping_loop(idle_rtts, None, 100)
    retries = [0]

    async def login(index: int) -> tuple[dict[str, Any], float]:
        client = await run.connect()
        name = names[index % user_count]
        for _ in range(1000):
            reply = await client.call("/login", {"name": name, "password": PASSWORD})
            if reply.get("code") != 8:
                return reply, time.perf_counter()
            retries[0] += 1  # the hashing queue is full: come back after retry_after
            await asyncio.sleep(float(reply.get("retry_after", 1.0)))
        return reply, time.perf_counter()

    run.probe.start()
    started = time.perf_counter()
    pinging = asyncio.create_task(ping_loop(rtts, stop, 10**9))
    results = await asyncio.gather(*(login(i) for i in range(count)))
    finished = max(at for _, at in results)
    stop.set()
    await pinging
    run.probe.stop()
    ok = 0
    for i, (reply, _) in enumerate(results):
        data = reply.get("data") or {}
        good = (reply.get("code") == 0 and isinstance(data.get("token"), str)
                and len(data["token"]) == 43 and data.get("name") == names[i % user_count])
        ok += good
        run.check.expect(good, f"login {i}: {reply.get('code')}: {reply.get('msg')}")
    run.check.expect(len(rtts) > 0, "no /ping completed during the logins")
    run.check.details = {"logins_ok": ok, "expected": count}
    rtts.sort()
    idle_rtts.sort()
    return {
        "logins": count,
        "users": user_count,
        "duration_s": r3(finished - started),
        "logins_per_s": r3(count / (finished - started)),
        "busy_retries": retries[0],
        "register_busy_retries": register_retries[0],
        "pings": len(rtts),
        "ping_interval_ms": s.ping_interval * 1000,
        "ping_p50_ms": r3(percentile(rtts, 50) * 1000),
        "ping_p99_ms": r3(percentile(rtts, 99) * 1000),
        "ping_max_ms": r3(rtts[-1] * 1000 if rtts else math.nan),
        "idle_ping_p50_ms": r3(percentile(idle_rtts, 50) * 1000),
        "idle_ping_p99_ms": r3(percentile(idle_rtts, 99) * 1000),
    }


async def receive_all(run: Run, client: Client, limit_pages: int) -> tuple[dict[str, list[str]],
                                                                           int, bool]:
    """Drain the inbox with /receive: texts per sender, in order; pages; ended cleanly."""
    texts: dict[str, list[str]] = {}
    for pages in range(1, limit_pages + 1):
        reply = await call_ok(client, "/receive")
        data = reply["data"]
        for sender, messages in data["messages"].items():
            texts.setdefault(sender, []).extend(messages)
        if not data["more"]:
            return texts, pages, True
    return texts, limit_pages, False


async def scenario_catchup(run: Run) -> dict[str, Any]:
    s = run.sizes
    count = s.catchup_messages
    sender = await run.user(run.name("cs", 0))
    reader = await run.user(run.name("cr", 0))
    reader_name = run.name("cr", 0)
    replied = [0] * count
    filling = time.perf_counter()
    await send_window(
        sender, count, run.args.window,
        lambda seq: {"name": reader_name, "msg": make_text(seq, s.message_size)},
        replied, run.check, "fill",
    )
    filled = time.perf_counter() - filling
    run.probe.start()
    started = time.perf_counter()
    texts, pages, ended = await receive_all(run, reader, count // 1000 + 10)
    drained = time.perf_counter() - started
    run.probe.stop()
    sender_name = run.name("cs", 0)
    run.check.equal("senders in the inbox", sorted(texts), [sender_name])
    received = texts.get(sender_name, [])
    check_sequence(run.check, "inbox", [seq_of(t) for t in received], count)
    run.check.expect(ended, "/receive still had more after the expected pages")
    run.check.details = {"received": len(received), "expected": count}
    return {
        "messages": count,
        "pages": pages,
        "duration_s": r3(drained),
        "messages_per_s": round(count / drained),
        "fill_messages_per_s": round(count / filled),
    }


async def scenario_store(run: Run) -> dict[str, Any]:
    s = run.sizes
    sender_count, count, window = s.store_senders, s.store_messages, run.args.window
    recipient = run.name("sr", 0)
    setup = await run.connect()
    await call_ok(setup, "/register",
                  {"name": recipient, "password": PASSWORD, "password_repete": PASSWORD})
    senders = await users(run, "ss", sender_count)
    replied = [[0] * count for _ in range(sender_count)]
    run.probe.start()
    started = time.perf_counter()
    # The recipient is not subscribed, not even connected: no push work, only commits.
    await asyncio.gather(*(
        send_window(
            senders[i], count, window,
            lambda seq: {"name": recipient, "msg": make_text(seq, s.message_size)},
            replied[i], run.check, f"sender {i}",
        )
        for i in range(sender_count)
    ))
    elapsed = time.perf_counter() - started
    run.probe.stop()
    acknowledged = sum(1 for ids in replied for i in ids if i > 0)
    all_ids = [i for ids in replied for i in ids]
    run.check.equal("distinct ids in the replies", len(set(all_ids)), sender_count * count)
    await call_ok(setup, "/login", {"name": recipient, "password": PASSWORD})
    texts, _, ended = await receive_all(run, setup, sender_count * count // 1000 + 10)
    run.check.expect(ended, "/receive still had more after the expected pages")
    stored = sum(len(t) for t in texts.values())
    run.check.equal("messages received by /receive", stored, sender_count * count)
    for i in range(sender_count):
        name = run.name("ss", i)
        check_sequence(run.check, f"sender {i}", [seq_of(t) for t in texts.get(name, [])], count)
    run.check.details = {"acknowledged": acknowledged, "received": stored,
                         "expected": sender_count * count}
    return {
        "senders": sender_count,
        "messages_per_sender": count,
        "window": window,
        "messages": acknowledged,
        "duration_s": r3(elapsed),
        "messages_per_s": round(acknowledged / elapsed),
    }


# Every write op but the account ones, in one cycle: each stores or moves something.
WAL_CYCLE = ("/send", "/channel/send", "/channel/join", "/channel/leave", "/ack", "/receive")


async def scenario_wal(run: Run) -> dict[str, Any]:
    """Every write op, pipelined on every connection, for wal_seconds: the WAL stays bounded.

    The WAL file's size is sampled every 20 ms (from this process: a stat), and the
    largest size seen is checked against WAL_BOUND_MIB.
    """
    s = run.sizes
    if run.db is None:
        raise BenchError("the wal scenario needs a server it started (not --target)")
    wal_path = Path(f"{run.db}-wal")
    names = [run.name("w", i) for i in range(s.wal_workers)]
    clients = await users(run, "w", s.wal_workers)
    counts = dict.fromkeys(WAL_CYCLE, 0)
    latencies: list[float] = []
    stop = asyncio.Event()

    def cycle(worker: int, lane: int, turn: int) -> list[tuple[str, dict[str, Any]]]:
        text = make_text(turn, s.message_size)
        own = f"{run.prefix}w{worker}l{lane}c{turn % 8}"  # joined, then left again
        return [
            ("/send", {"name": names[(worker + 1) % len(names)], "msg": text}),
            ("/channel/send", {"name": f"{run.prefix}shared{worker % 4}", "message": text}),
            ("/channel/join", {"name": own}),
            ("/channel/leave", {"name": own}),
            ("/ack", {"id": 1 << 62}),
            ("/receive", {}),
        ]

    async def flood(worker: int, lane: int) -> None:
        for turn in itertools.count():
            if stop.is_set():
                return
            for op, params in cycle(worker, lane, turn):
                started = time.perf_counter()
                reply = await clients[worker].call(op, params)
                latencies.append(time.perf_counter() - started)
                if reply.get("code") != 0:
                    run.check.fail(f"worker {worker}: {op}: code {reply.get('code')}: "
                                   f"{reply.get('msg')}")
                    stop.set()
                    return
                counts[op] += 1

    sizes: list[int] = []

    async def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                sizes.append(os.stat(wal_path).st_size)
            await asyncio.sleep(0.02)

    run.probe.start()
    started = time.perf_counter()
    sampler = asyncio.create_task(sample())
    lanes = [asyncio.create_task(flood(w, k))
             for w in range(s.wal_workers) for k in range(s.wal_window)]
    await asyncio.wait(lanes, timeout=s.wal_seconds)
    stop.set()
    await asyncio.gather(*lanes, sampler)
    elapsed = time.perf_counter() - started
    run.probe.stop()
    stats = (await call_ok(clients[0], "/stats"))["data"]
    run.check.equal("messages stored", stats["messages_stored"],
                    counts["/send"] + counts["/channel/send"])
    largest = max(sizes, default=0)
    run.check.expect(largest <= WAL_BOUND_MIB * MIB,
                     f"WAL reached {largest / MIB:.1f} MiB, over {WAL_BOUND_MIB} MiB")
    run.check.expect(len(sizes) > 0, "the WAL was never sampled")
    latencies.sort()
    ops = sum(counts.values())
    run.check.details = {"ops": counts, "samples": len(sizes)}
    return {
        "workers": s.wal_workers,
        "window": s.wal_window,
        "duration_s": r3(elapsed),
        "ops": ops,
        "ops_per_s": round(ops / elapsed),
        "max_wal_mib": round(largest / MIB, 2),
        "final_wal_mib": round(sizes[-1] / MIB, 2) if sizes else None,
        "wal_bound_mib": WAL_BOUND_MIB,
        "db_mib": round(os.stat(run.db).st_size / MIB, 2),
        "op_p50_ms": r3(percentile(latencies, 50) * 1000),
        "op_p99_ms": r3(percentile(latencies, 99) * 1000),
        "op_max_ms": r3(latencies[-1] * 1000 if latencies else math.nan),
    }


class Burster:
    """A hostile connection: writes bursts of /ping frames back to back, each burst in
    one write, and checks every reply byte for byte (ids in order, code 0).

    It is the one client that does not go through ``chatd.client.Client``: an attacker
    does not decode what it gets, and decoding 10,000 replies per burst on the
    generator's one core would delay the good client's pings, measured on it too.
    """

    def __init__(self, burst: int) -> None:
        ids = range(burst)
        self._requests = b"".join(encode_frame({"op": "/ping", "id": i}) for i in ids)
        self._replies = b"".join(
            encode_frame({"id": i, "code": 0, "msg": "success"}) for i in ids)
        self.sent = 0  # bursts written
        self.answered = 0  # bursts whose every reply came back as expected
        self.wrong = 0  # bursts whose replies differed
        self.first_answered = asyncio.Event()

    async def run(self, host: str, port: int, stop: asyncio.Event) -> None:
        """Until ``stop``, then until every burst written is answered."""
        reader, writer = await asyncio.open_connection(host, port)
        reading = asyncio.create_task(self._read(reader, stop))
        try:
            while not stop.is_set():
                writer.write(self._requests)
                self.sent += 1
                await writer.drain()  # TCP holds the writer back once chatd stops reading
            if self.answered + self.wrong == self.sent:
                reading.cancel()  # it waits for a burst that was never sent
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        finally:
            reading.cancel()
            writer.close()

    async def _read(self, reader: asyncio.StreamReader, stop: asyncio.Event) -> None:
        while not (stop.is_set() and self.answered + self.wrong >= self.sent):
            got = await reader.readexactly(len(self._replies))
            if got == self._replies:
                self.answered += 1
            else:
                self.wrong += 1
            self.first_answered.set()


async def ping_rtts(client: Client, count: int, interval: float, check: Check) -> list[float]:
    """``count`` /ping round trips, ``interval`` apart, in seconds, sorted."""
    rtts = []
    for _ in range(count):
        started = time.perf_counter()
        reply = await client.call("/ping")
        rtts.append(time.perf_counter() - started)
        check.expect(reply.get("code") == 0, f"/ping failed: {reply}")
        await asyncio.sleep(interval)
    return sorted(rtts)


async def scenario_hostile(run: Run) -> dict[str, Any]:
    """A good client's /ping round trip, quiet and while one connection floods chatd with
    bursts of pipelined pings (issue 11, F1)."""
    s = run.sizes
    pinger = await run.connect()
    await ping_rtts(pinger, 20, s.ping_interval, run.check)  # warm up
    run.probe.start()
    quiet = await ping_rtts(pinger, s.hostile_pings, s.ping_interval, run.check)
    run.probe.stop()
    quiet_cpu = {f"quiet_{key}": value for key, value in run.probe.result.items()}
    burster, stop = Burster(s.hostile_burst), asyncio.Event()
    attack = asyncio.create_task(burster.run(run.host, run.port, stop))
    async with asyncio.timeout(EVENT_TIMEOUT):
        await burster.first_answered.wait()  # the flood is under way
    run.probe.start()
    started, answered_before = time.perf_counter(), burster.answered
    under_attack = await ping_rtts(pinger, s.hostile_pings, s.ping_interval, run.check)
    attack_s, answered = time.perf_counter() - started, burster.answered - answered_before
    run.probe.stop()
    stop.set()
    async with asyncio.timeout(EVENT_TIMEOUT):
        await attack
    run.check.equal("hostile bursts answered wrongly", burster.wrong, 0)
    run.check.equal("hostile bursts answered", burster.answered, burster.sent)
    run.check.expect(answered >= 2, f"only {answered} bursts answered while measuring")
    run.check.details = {"pings": 2 * s.hostile_pings, "bursts": burster.sent}
    quiet_p99, attack_p99 = percentile(quiet, 99), percentile(under_attack, 99)
    return {
        "pings": s.hostile_pings,
        "ping_interval_ms": s.ping_interval * 1000,
        "burst": s.hostile_burst,
        "quiet_p50_ms": r3(percentile(quiet, 50) * 1000),
        "quiet_p99_ms": r3(quiet_p99 * 1000),
        "quiet_max_ms": r3(quiet[-1] * 1000),
        "attack_p50_ms": r3(percentile(under_attack, 50) * 1000),
        "attack_p99_ms": r3(attack_p99 * 1000),
        "attack_max_ms": r3(under_attack[-1] * 1000),
        "p99_ratio": round(attack_p99 / quiet_p99, 2),
        "hostile_bursts": burster.sent,
        "hostile_pings_per_s": round(answered * s.hostile_burst / attack_s),
        **quiet_cpu,
    }


SCENARIO_FUNCTIONS: dict[str, Callable[[Run], Awaitable[dict[str, Any]]]] = {
    "dm": scenario_dm,
    "fanout": scenario_fanout,
    "latency": scenario_latency,
    "idle": scenario_idle,
    "logins": scenario_logins,
    "catchup": scenario_catchup,
    "store": scenario_store,
    "wal": scenario_wal,
    "hostile": scenario_hostile,
}


# The baseline: a frame relay with chatd's framing and op names, nothing else.


async def relay_server(port: int) -> None:
    """Binds a name on /login, forwards /send to that name's subscribed connections."""
    subscribers: dict[str, set[asyncio.StreamWriter]] = {}
    ids = itertools.count(1)
    stamp = "2020.01.01:00:00:00"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder, name = FrameDecoder(1 << 20), ""
        try:
            while data := await reader.read(65536):
                for body in decoder.feed(data):
                    if not isinstance(body, dict):
                        continue
                    op, params = body.get("op"), body.get("params") or {}
                    reply: dict[str, Any] = {"id": body.get("id"), "code": 0, "msg": "success"}
                    if op == "/login":
                        name = params["name"]
                        reply["data"] = {"token": name, "name": name}
                    elif op == "/subscribe":
                        subscribers.setdefault(name, set()).add(writer)
                    elif op == "/send":
                        message_id = next(ids)
                        push = encode_frame({"event": "message", "data": {
                            "id": message_id, "name": name, "msg": params["msg"],
                            "datetime": stamp}})
                        for peer in subscribers.get(params["name"], ()):
                            peer.write(push)
                        reply["data"] = {"id": message_id, "datetime": stamp}
                    elif op == "/ack":
                        reply["data"] = {"position": params["id"]}
                    writer.write(encode_frame(reply))
                    await writer.drain()  # as chatd: the next request once the reply is taken
        except ConnectionError:
            pass
        finally:
            subscribers.get(name, set()).discard(writer)
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on 127.0.0.1:{bound} (tcp)", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


# Running scenarios.


async def cancel_other_tasks() -> None:
    """What a failed or interrupted scenario left running (receivers, acks, senders)."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count()}


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10)
        if done.returncode == 0:
            return done.stdout.strip() or None
    return None


def chatd_modified() -> list[str] | None:
    """Files of chatd/ that differ from HEAD in the work tree (read-only git commands)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        tree = subprocess.run(["git", "ls-tree", "-r", "HEAD", "chatd"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10)
        if tree.returncode != 0:
            return None
        committed = {}
        for line in tree.stdout.splitlines():
            info, path = line.split("\t", 1)
            committed[path] = info.split()[2]
        present = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "chatd").rglob("*.py"))
        hashed = subprocess.run(["git", "hash-object", "--stdin-paths"], cwd=ROOT,
                                input="\n".join(present), capture_output=True, text=True,
                                timeout=10)
        if hashed.returncode != 0:
            return None
        now = dict(zip(present, hashed.stdout.split(), strict=True))
        return sorted(path for path in committed.keys() | now.keys()
                      if path.endswith(".py") and committed.get(path) != now.get(path))
    return None


def client_loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


@dataclass
class Bench:
    args: argparse.Namespace
    sizes: Sizes
    workdir: Path
    meta: dict[str, Any]
    prefix: str = field(default_factory=lambda: "b" + secrets.token_hex(3))
    on_postgres: bool = False  # start servers on a new PostgreSQL database each (--db-url)
    postgres_db: str | None = None  # the running server's PostgreSQL database, if on one
    made_databases: list[str] = field(default_factory=list)  # to drop after the scenario
    bus: BenchRedis | None = None  # --cluster: the Redis between the nodes

    def chatd_argv(self, label: str, default_argon2: bool, db: str | None = None) -> list[str]:
        db = db or self.postgres_db or str(self.workdir / f"{label}.sqlite3")
        argv = [sys.executable, "-m", "chatd", "--port", "0",
                "--db", db, "--log-level", "WARNING",
                "--db-synchronous", self.args.db_synchronous, *UNLIMITED]
        if label.startswith("wal-"):
            argv += WAL_UNLIMITED
        return argv if default_argon2 else [*argv, *CHEAP_ARGON2]

    async def start_server(self, label: str, relay: bool, default_argon2: bool
                           ) -> ServerProcess:
        if self.args.target and not relay:  # the relay is always the benchmark's own
            host, _, port = self.args.target.rpartition(":")
            return ServerProcess(host, int(port), self.args.target_pid, None, None)
        if self.on_postgres and not relay:
            self.postgres_db = await new_postgres_database(self.args.db_url)
            self.made_databases.append(self.postgres_db.rsplit("/", 1)[1])
        else:  # a retried scenario starts on a new database too
            for leftover in self.workdir.glob(f"{label}.sqlite3*"):
                leftover.unlink()
        argv = ([sys.executable, str(SCRIPT), "--relay-server", "0"] if relay
                else self.chatd_argv(label, default_argon2))
        return await ServerProcess.start(argv, self.workdir, label, self.args.pin)

    async def scenario(self, name: str, relay: bool = False) -> dict[str, Any]:
        label = f"{name}-{'relay' if relay else 'chatd'}"
        server = await self.start_server(label, relay, default_argon2=name == "logins")
        run = Run(self.args, self.sizes, server.host, server.port,
                  f"{self.prefix}{name[:2]}", server)
        if self.on_postgres and self.postgres_db and not relay:
            database = self.postgres_db.rsplit("/", 1)[1]
            run.probe.database_cpu = lambda: postgres_backends_cpu(database)
        if server.pid is not None and not relay and not self.args.target and not self.postgres_db:
            run.db = self.workdir / f"{label}.sqlite3"
        ours = server.pid is not None and not (self.args.target and not relay)
        metrics = await self.execute(name, run, [server] if ours else [], [server])
        return {
            "scenario": name,
            "server": "relay" if relay else "chatd",
            **self.meta,
            "db_synchronous": None if relay or self.args.target else self.args.db_synchronous,
            **metrics,
            **run.probe.result,
            "verified": run.check.ok,
            "verification": run.check.report(),
        }

    async def execute(self, name: str, run: Run, logged: list[ServerProcess],
                      servers: list[ServerProcess]) -> dict[str, Any]:
        """Scenario ``name`` on ``run``, then ``servers`` stopped; the scenario's metrics.
        ``logged``: the servers whose logs must hold no error and whose exit must be 0."""
        metrics: dict[str, Any] = {}
        try:
            async with asyncio.timeout(self.args.timeout):
                metrics = await SCENARIO_FUNCTIONS[name](run)
        except Exception as exc:  # a scenario that crashes has verified nothing
            what = "timed out" if isinstance(exc, TimeoutError) else "failed"
            run.check.fail(f"scenario {what}: {type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(60):
                    await cancel_other_tasks()
                    await run.close_clients()
            for server in servers:
                await server.stop()
        for server in logged:
            errors = server.error_lines()
            run.check.equal("server errors logged", errors[:5], [])
            run.check.expect(server.exit_code == 0,
                             f"server exit status {server.exit_code}: {server.log_tail(1500)}")
        return metrics

    async def cluster_scenario(self, name: str) -> dict[str, Any]:
        """``name`` on two nodes sharing a new PostgreSQL database and the Redis bus: the
        senders connect to node a, the receivers to node b (``Run.receivers_at``); with
        --shared-port every client connects to the one port both nodes listen on."""
        assert self.bus is not None and self.args.db_url
        shared = bool(self.args.shared_port)
        label = f"{name}-{'shared' if shared else 'cluster'}"
        url = await new_postgres_database(self.args.db_url)
        database = url.rsplit("/", 1)[1]
        self.made_databases.append(database)
        node_ids = [f"{self.prefix}-a", f"{self.prefix}-b"]
        port = spare_port() if shared else 0  # free now: both nodes are then told it
        nodes = await self.start_nodes(label, url, node_ids, port)
        a, b = nodes
        run = Run(self.args, self.sizes, a.host, a.port, f"{self.prefix}{name[:2]}", a,
                  receivers_at=None if shared else (b.host, b.port))
        if shared:
            run.shared = SharedPort(port, {"a": a, "b": b})
            run.check.equal("the nodes' ports", [a.port, b.port], [port, port])
        run.probe.database_cpu = lambda: postgres_backends_cpu(database)
        run.probe.processes = {"node_b": b.cpu_seconds, "redis": self.bus.cpu_seconds}
        metrics = await self.execute(name, run, nodes, nodes)
        result = {
            "scenario": name,
            "server": "chatd-shared-port" if shared else "chatd-cluster",
            "nodes": 2,
            "node_ids": node_ids,
            "bus": "redis",
            "bus_url": self.bus.url,
            **self.meta,
            "db_synchronous": None,
            **metrics,
            **(run.shared.report() if run.shared else {}),
            **run.probe.result,
            "verified": run.check.ok,
            "verification": run.check.report(),
        }
        # server_cpu_pct: both nodes together, as one server's figure is all of chatd.
        node_a, node_b = result.get("server_cpu_pct"), result.get("node_b_cpu_pct")
        result["node_a_cpu_pct"] = node_a
        if node_a is not None and node_b is not None:
            result["server_cpu_pct"] = round(node_a + node_b, 1)
        result["cpu_us_per_message"] = cpu_per_message(result)
        return result

    async def start_nodes(self, label: str, url: str, node_ids: list[str], port: int
                          ) -> list[ServerProcess]:
        """The nodes of --cluster on ``url`` and the bus, one after the other (the first
        makes the schema); on ``port`` with --reuse-port when it is not 0 (--shared-port)."""
        assert self.bus is not None
        nodes: list[ServerProcess] = []
        try:
            for node_id in node_ids:
                argv = [*self.chatd_argv(label, default_argon2=False, db=url),
                        "--bus", self.bus.url, "--node-id", node_id]
                if port:
                    argv[argv.index("--port") + 1] = str(port)
                    argv.append("--reuse-port")
                nodes.append(await ServerProcess.start(
                    argv, self.workdir, f"{label}-{node_id[-1]}", self.args.pin))
        except BaseException:
            for started in nodes:
                await started.stop()
            raise
        return nodes


NOISY_PCT = 20.0  # other_cpu_pct above which a result is called noisy


async def wait_idle(limit: float) -> float:
    """Wait (at most ``limit`` s) until the machine's cores are under 10% busy for a second."""
    started = time.perf_counter()
    cores = os.cpu_count() or 1
    while time.perf_counter() - started < limit:
        before = _machine_busy_seconds()
        await asyncio.sleep(1.0)
        after = _machine_busy_seconds()
        if before is None or after is None or after - before < 0.1 * cores:
            break
    return round(time.perf_counter() - started, 1)


async def measure(bench: Bench, name: str, relay: bool) -> dict[str, Any]:
    """One scenario, the quietest of its attempts (``quietest``)."""
    return await quietest(bench, lambda: bench.scenario(name, relay))


async def quietest(
    bench: Bench, run: Callable[[], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """``run`` once, and again while other processes made it noisy (``--retries-if-noisy``):
    the least noisy result is kept, ``attempt`` says which; a failed verification is
    returned at once, never retried."""
    best: dict[str, Any] | None = None
    for attempt in range(1, bench.args.retries_if_noisy + 2):
        waited = await wait_idle(bench.args.wait_idle) if bench.args.wait_idle else 0.0
        result = await run()
        result["attempt"], result["waited_idle_s"] = attempt, waited
        noise = result.get("other_cpu_pct") or 0.0
        if best is None or noise < (best.get("other_cpu_pct") or 0.0):
            best = result
        if not result["verified"]:
            return result
        if noise <= NOISY_PCT:
            break
    assert best is not None
    return best


# --compare: the scenarios run on SQLite then PostgreSQL, and the figure compared.
COMPARED = {"dm": "delivered_per_s", "store": "messages_per_s", "latency": "p50_ms"}


async def on_postgres_server(server_url: str, statement: str) -> None:
    import asyncpg  # chatd[postgresql]: needed only with --db-url

    admin = await asyncpg.connect(server_url, timeout=10)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


async def new_postgres_database(server_url: str) -> str:
    """The URL of a new database on the server of ``server_url``, for one server start."""
    from urllib.parse import urlunsplit

    name = f"chatd_bench_{secrets.token_hex(4)}"
    await on_postgres_server(server_url, f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


def postgres_backends_cpu(database: str) -> dict[int, float]:
    """CPU seconds of each local PostgreSQL backend serving ``database``, by pid.

    Backends set their process title to "postgres: [CLUSTER:] USER DATABASE HOST(PORT)
    STATE" (the benchmark's database names are unique).  Not counted: the server's shared
    processes (WAL writer, checkpointer), and any server on another machine.
    """
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").split()
        except OSError:
            continue
        if title[:1] == [b"postgres:"] and database.encode() in title:
            cpu = _proc_cpu_seconds(int(entry.name))
            if cpu is not None:
                found[int(entry.name)] = cpu
    return found


async def measure_on(bench: Bench, name: str, relay: bool, postgres: bool) -> dict[str, Any]:
    """``measure``, on a fresh PostgreSQL database when ``postgres``; says which store."""
    if not postgres or relay or bench.args.target:
        result = await measure(bench, name, relay)
        result["store"] = None if relay or bench.args.target else "sqlite"
        return result
    bench.on_postgres = True
    try:
        result = await measure(bench, name, relay)  # each attempt on a database of its own
    finally:
        bench.on_postgres, bench.postgres_db = False, None
        for made in bench.made_databases:
            await on_postgres_server(bench.args.db_url, f'DROP DATABASE "{made}" WITH (FORCE)')
        result_databases, bench.made_databases = bench.made_databases, []
    result["store"] = "postgresql"
    result["postgres_database"] = result_databases[-1]  # dropped by now
    return result


# --cluster: two nodes on PostgreSQL + Redis beside one node on SQLite.
CLUSTER_SCENARIOS = ("dm", "fanout", "latency")
CLUSTER_METRIC = {"dm": "delivered_per_s", "fanout": "deliveries_per_s", "latency": "p99_ms"}
CLUSTER_MESSAGES = {"dm": "delivered", "fanout": "messages", "latency": "messages"}
CLUSTER_P99_TARGET_MS = 10.0  # issue 14: cross-node p99 at 2,000 msg/s offered
CPU_PARTS = ("server", "node_a", "node_b", "postgres", "redis", "client")


def cpu_per_message(result: dict[str, Any]) -> dict[str, float]:
    """Microseconds of CPU each process spent per message sent: the cost that tells
    what a node adds on 2 cores, where throughput cannot grow with the node count."""
    messages = result.get(CLUSTER_MESSAGES.get(result["scenario"], ""))
    wall = result.get("measured_s")
    if not messages or not wall:
        return {}
    return {part: round(pct / 100 * wall / messages * 1e6, 1) for part in CPU_PARTS
            if (pct := result.get(f"{part}_cpu_pct")) is not None}


class BenchRedis:
    """The bus of --cluster: a redis-server of the benchmark's own on a spare port
    (Redis pub/sub channels are not per database: another cluster on a shared Redis
    would mix its notices in), or the one ``--bus`` names, its pid asked with INFO."""

    def __init__(self, url: str, pid: int | None, popen: subprocess.Popen[bytes] | None
                 ) -> None:
        self.url, self.pid, self._popen = url, pid, popen

    @classmethod
    async def start(cls, workdir: Path, url: str | None) -> BenchRedis:
        if url is not None:
            return cls(url, await redis_pid(url), None)
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("--cluster needs redis-server installed, or --bus redis://...")
        port = spare_port()
        popen = _spawn([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", str(workdir)],
                       workdir / "redis.log", dict(os.environ), workdir)
        redis = cls(f"redis://127.0.0.1:{port}/0", popen.pid, popen)
        try:
            await redis.wait_ready(port)
        except BaseException:
            await redis.stop()
            raise
        return redis

    async def wait_ready(self, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._popen is not None
            if self._popen.poll() is not None:
                break
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"PING\r\n")
                answer = await reader.readline()
                writer.close()
                if answer == b"+PONG\r\n":
                    return
            await asyncio.sleep(0.05)
        raise BenchError(f"redis-server did not answer on port {port}")

    def cpu_seconds(self) -> float | None:
        return None if self.pid is None else _proc_cpu_seconds(self.pid)

    async def stop(self) -> None:
        popen = self._popen
        if popen is not None and popen.poll() is None:
            popen.terminate()
            try:
                await asyncio.to_thread(popen.wait, STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                popen.kill()


async def redis_pid(url: str) -> int | None:
    """The process id of the Redis at ``url`` if it runs on this machine, else None."""
    from redis import asyncio as aioredis  # chatd[redis]: needed only with --cluster

    client = aioredis.Redis.from_url(url, socket_connect_timeout=10, socket_timeout=10)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    pid = info.get("process_id")
    host = urlsplit(url).hostname or ""
    if not isinstance(pid, int) or host not in ("127.0.0.1", "localhost", "::1"):
        return None
    return pid if _proc_cpu_seconds(pid) is not None else None


async def measure_cluster(bench: Bench, name: str) -> dict[str, Any]:
    """``name`` on two nodes (``Bench.cluster_scenario``), its databases dropped after."""
    try:
        result = await quietest(bench, lambda: bench.cluster_scenario(name))
    finally:
        made, bench.made_databases = bench.made_databases, []
        for database in made:
            await on_postgres_server(bench.args.db_url, f'DROP DATABASE "{database}" WITH (FORCE)')
    result["store"] = "postgresql"
    result["postgres_database"] = made[-1]  # dropped by now
    return result


async def cluster_main(bench: Bench, output: TextIO | None) -> list[dict[str, Any]]:
    """Each scenario on one SQLite node, on one PostgreSQL node, then on two nodes
    (PostgreSQL + Redis), in turns; each cluster figure also over the single nodes'
    (``vs_single``: SQLite's, the issue's comparison; ``vs_single_postgresql``: the same
    store without the bus, which tells the bus's part from the store's)."""
    bench.bus = await BenchRedis.start(bench.workdir, bench.args.bus)
    results: list[dict[str, Any]] = []
    try:
        for name in bench.args.scenario or CLUSTER_SCENARIOS:
            singles = [await measure_on(bench, name, relay=False, postgres=postgres)
                       for postgres in (False, True)]
            clustered = await measure_cluster(bench, name)
            key = CLUSTER_METRIC[name]
            for single, suffix in zip(singles, ("", "_postgresql"), strict=True):
                single["cpu_us_per_message"] = cpu_per_message(single)
                if single.get(key) and clustered.get(key):
                    clustered[f"vs_single{suffix}"] = round(clustered[key] / single[key], 3)
            if name == "latency":
                clustered["target"] = latency_target(clustered)
            for result in (*singles, clustered):
                results.append(result)
                emit(result, output)
    finally:
        await bench.bus.stop()
    return results


def latency_target(result: dict[str, Any]) -> dict[str, Any]:
    """Cross-node p99 <= 10 ms at 2,000 msg/s: met only by a verified figure at that
    rate whose generator was not the limit."""
    p99 = result.get("p99_ms")
    counted = bool(result["verified"] and not result.get("lower_bound")
                   and result.get("offered_per_s") == Sizes().latency_rate)
    return {"p99_ms_max": CLUSTER_P99_TARGET_MS, "p99_ms": p99, "counted": counted,
            "met": bool(counted and p99 is not None and p99 <= CLUSTER_P99_TARGET_MS)}


async def compare_stores(bench: Bench, output: TextIO | None) -> list[dict[str, Any]]:
    """dm, store and latency on SQLite, then on PostgreSQL; each PostgreSQL result gets
    ``vs_sqlite``, its figure divided by SQLite's (for latency: lower is better)."""
    results: list[dict[str, Any]] = []
    for name in bench.args.scenario or COMPARED:
        on_sqlite = await measure_on(bench, name, relay=False, postgres=False)
        on_postgres = await measure_on(bench, name, relay=False, postgres=True)
        key = COMPARED.get(name)
        if key and on_sqlite.get(key) and on_postgres.get(key):
            on_postgres["vs_sqlite"] = round(on_postgres[key] / on_sqlite[key], 3)
        for result in (on_sqlite, on_postgres):
            results.append(result)
            emit(result, output)
    return results


def emit(result: dict[str, Any], output: TextIO | None) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    if output is not None:
        output.write(line + "\n")
        output.flush()


async def bench_main(bench: Bench, output: TextIO | None) -> list[dict[str, Any]]:
    args = bench.args
    if args.compare:
        return await compare_stores(bench, output)
    if args.cluster:
        return await cluster_main(bench, output)
    results: list[dict[str, Any]] = []
    for name in args.scenario or SCENARIOS:
        runs = [True, False] if name == "dm" and args.baseline else [False]
        for relay in runs:
            result = await measure_on(bench, name, relay, postgres=bool(args.db_url))
            if name == "dm" and not relay and args.baseline:
                relay_rate = next((r.get("delivered_per_s") for r in results
                                   if r["scenario"] == "dm" and r["server"] == "relay"), None)
                rate = result.get("delivered_per_s")
                if relay_rate and rate:
                    result["relay_delivered_per_s"] = relay_rate
                    result["fraction_of_relay"] = round(rate / relay_rate, 3)
            results.append(result)
            emit(result, output)
    return results


def headline(result: dict[str, Any]) -> str:
    def g(key: str) -> Any:
        return result.get(key, "-")

    name = result["scenario"]
    if name == "dm":
        text = f"{g('delivered_per_s')} msg/s delivered, all acked in {g('all_acked_s')} s"
        if "fraction_of_relay" in result:
            text += f", {g('fraction_of_relay'):.0%} of the relay"
        return text
    if name == "fanout":
        return f"{g('deliveries_per_s')} deliveries/s ({g('messages_per_s')} msg/s)"
    if name == "latency":
        return (f"p50 {g('p50_ms')} ms, p99 {g('p99_ms')} ms, max {g('max_ms')} ms "
                f"at {g('offered_per_s')} msg/s")
    if name == "idle":
        return (f"{g('rss_per_connection_kib')} KiB per connection "
                f"({g('connections')} connections)")
    if name == "logins":
        return (f"{g('logins_per_s')} logins/s, ping p50 {g('ping_p50_ms')} / "
                f"p99 {g('ping_p99_ms')} / max {g('ping_max_ms')} ms, "
                f"{g('busy_retries')} busy retries")
    if name == "wal":
        return (f"WAL max {g('max_wal_mib')} MiB (bound {g('wal_bound_mib')}) over "
                f"{g('duration_s')} s at {g('ops_per_s')} write ops/s, "
                f"op p99 {g('op_p99_ms')} ms")
    if name == "hostile":
        return (f"ping p99 {g('quiet_p99_ms')} ms quiet, {g('attack_p99_ms')} ms under "
                f"attack ({g('p99_ratio')}x), {g('hostile_pings_per_s')} hostile pings/s")
    return f"{g('messages_per_s')} msg/s"


def bounded(result: dict[str, Any]) -> str:
    """The headline, marked when the generator may have been the limit."""
    if not result.get("lower_bound"):
        return headline(result)
    return (f"at least {headline(result)} (lower bound: generator at "
            f"{result.get('client_cpu_pct')}%)")


def cpu_cell(r: dict[str, Any]) -> str:
    server = f"{r.get('server_cpu_pct', '-')}%"
    if "node_b_cpu_pct" in r:  # --cluster: both nodes, then what serves them
        server = (f"{server} (a {r.get('node_a_cpu_pct')}% b {r.get('node_b_cpu_pct')}% "
                  f"pg {r.get('postgres_cpu_pct')}% redis {r.get('redis_cpu_pct')}%)")
    return f"{server} / {r.get('client_cpu_pct', '-')}% / {r.get('other_cpu_pct', '-')}%"


def _versus_single(result: dict[str, Any]) -> str:
    text = f" ({result['vs_single']}x one node)" if "vs_single" in result else ""
    if "connections" in result:  # --shared-port: what the kernel gave each node
        text += ", connections " + " ".join(f"{node} {count}" for node, count
                                            in result["connections"].items())
    target = result.get("target")
    if target:
        verdict = "met" if target["met"] else "not met" if target["counted"] else "not counted"
        text += f", target p99 <= {target['p99_ms_max']} ms {verdict}"
    return text


def print_table(results: list[dict[str, Any]]) -> None:
    rows = [(r["scenario"], f"{r['server']} on {r['store']}" if r.get("store") else r["server"],
             "yes" if r["verified"] else "NO", bounded(r) + _versus_sqlite(r) + _versus_single(r),
             cpu_cell(r))
            for r in results]
    header = ("scenario", "server", "verified", "result", "cpu server/bench/other")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)),
              file=sys.stderr)
    noisy = [f"{r['scenario']}/{r['server']} {r['other_cpu_pct']}%" for r in results
             if (r.get("other_cpu_pct") or 0) > 20]
    if noisy:
        print("bench: the machine ran other work meanwhile (other_cpu_pct, % of one core): "
              + ", ".join(noisy) + ": those figures are noisy", file=sys.stderr)
    for r in results:
        if not r["verified"]:
            print(f"{r['scenario']}/{r['server']} FAILED: {r['verification']['errors'][:5]}",
                  file=sys.stderr)


# Peers (--peers): the same load, from scripts/loadgen.py, against chatd and the IRC
# servers it is compared with, each fresh per scenario, pinned like chatd.

PEERS = ("miniircd", "ngircd")
PEER_SERVERS = ("chatd", "chatd-irc", *PEERS)
PEER_SCENARIOS = loadgen.SCENARIOS
PEERS_HOME = Path(os.environ.get("CHATD_BENCH_PEERS",
                                 Path.home() / ".cache" / "chatd-bench-peers"))
# The targets of issue 16, section 2, as ratios measured in one run: (scenario, metric,
# peer, "min" or "max", bound).  A figure whose generator was above GENERATOR_BOUND_PCT
# is a lower bound and never meets a target; nor does an unverified one.
PEER_TARGETS = (
    ("dm", "delivered_per_s", "miniircd", "min", 0.5),
    ("fanout", "deliveries_per_s", "miniircd", "min", 1.0),
    ("latency", "p99_ms", "miniircd", "max", 1.5),
    ("idle", "bytes_per_connection", "ngircd", "max", 1.5),
)
PEER_METRIC = {"dm": "delivered_per_s", "fanout": "deliveries_per_s", "latency": "p99_ms",
               "idle": "bytes_per_connection"}
PEER_RUNS = itertools.count(1)
MINIIRCD_MAX_CONNECTIONS = 1_000  # select() in miniircd: it dies at about 1,019


def find_peer(name: str, args: argparse.Namespace) -> list[str] | None:
    """The command that runs peer ``name``, or None (scripts/bench-peers-setup.sh installs)."""
    if name == "miniircd":
        given = args.miniircd or shutil.which("miniircd")
        installed = PEERS_HOME / "venv" / "bin" / "miniircd"
        path = given or (str(installed) if installed.exists() else None)
        return [path] if path else None
    path = args.ngircd or shutil.which("ngircd") or (
        "/usr/sbin/ngircd" if Path("/usr/sbin/ngircd").exists() else None)
    return [path] if path else None


def spare_port() -> int:
    """A loopback port free now (the peers cannot be told to pick one and say which)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def ngircd_config(port: int, workdir: Path) -> Path:
    """Limits out of the way, as chatd's UNLIMITED: penalties (flood delays) off, no
    per-address cap, no DNS/ident look-ups, pings far apart, long nicks."""
    motd = workdir / "ngircd.motd"
    motd.write_text("bench\n")
    path = workdir / f"ngircd-{port}.conf"
    path.write_text(f"""[Global]
Name = bench.ngircd.local
Info = chatd benchmark peer
Listen = 127.0.0.1
Ports = {port}
MotdFile = {motd}
PidFile = {workdir / f"ngircd-{port}.pid"}
[Limits]
MaxConnections = 0
MaxConnectionsIP = 0
MaxJoins = 0
MaxNickLength = 30
MaxPenaltyTime = 0
PingTimeout = 3600
PongTimeout = 3600
[Options]
DNS = no
Ident = no
PAM = no
""")
    return path


async def start_peer(name: str, command: list[str], bench: Bench, label: str
                     ) -> ServerProcess:
    """The peer on a spare port; again on another if someone took that port meanwhile."""
    for _ in range(3):
        server = await start_peer_on(name, command, bench, label, spare_port())
        if server is not None:
            return server
    raise BenchError(f"{name} could not listen on a spare port (three tries)")


async def accepting(name: str, server: ServerProcess, popen: subprocess.Popen[bytes]) -> None:
    """Until something accepts connections on the server's port; BenchError (the server
    stopped) if it exits first or START_TIMEOUT passes (peers say nothing when ready)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            _, writer = await asyncio.open_connection(server.host, server.port)
        except OSError:
            if popen.poll() is not None or time.monotonic() > deadline:
                await server.stop()
                raise BenchError(f"{name} did not listen on {server.port}:\n"
                                 f"{server.log_tail()}") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


async def start_peer_on(name: str, command: list[str], bench: Bench, label: str, port: int
                        ) -> ServerProcess | None:
    if name == "ngircd":
        argv = [*command, "--nodaemon", "--config", str(ngircd_config(port, bench.workdir))]
    else:
        argv = [*command, "--listen", "127.0.0.1", "--ports", str(port)]
        if os.geteuid() == 0:  # miniircd refuses to run as root without it
            argv += ["--setuid", "nobody"]
    if bench.args.pin:
        argv = ["taskset", "-c", "0", *argv]
    log_path = bench.workdir / f"{label}.log"
    popen = _spawn(argv, log_path, dict(os.environ), bench.workdir)
    server = ServerProcess("127.0.0.1", port, popen.pid, popen, log_path)
    await accepting(name, server, popen)
    # Something answered; it is the peer only if the peer is still running (a peer that
    # lost the port to another process exits at once).
    await asyncio.sleep(0.3)
    if popen.poll() is None:
        return server
    await server.stop()
    return None


def load_sizes(sizes: Sizes, args: argparse.Namespace, prefix: str, server: str
               ) -> loadgen.LoadSizes:
    idle = sizes.peer_idle_connections
    if server == "miniircd":
        idle = min(idle, MINIIRCD_MAX_CONNECTIONS)
    return loadgen.LoadSizes(
        pairs=sizes.dm_pairs, messages=sizes.dm_messages, window=args.peer_window,
        refill=args.peer_refill,
        members=sizes.fanout_members, senders=sizes.fanout_senders,
        channel_messages=sizes.fanout_messages, latency_rate=sizes.latency_rate,
        latency_seconds=sizes.latency_seconds, latency_pairs=sizes.latency_pairs,
        idle_connections=idle, idle_users=min(sizes.idle_users, idle),
        message_size=sizes.message_size, timeout=EVENT_TIMEOUT, prefix=prefix,
        # miniircd listens with a backlog of 5 (ngircd's is small too): more connects at
        # once are dropped and retried by the kernel seconds later.
        connect_concurrency=32 if server == "chatd" else 4,
        idle_concurrency=sizes.idle_concurrency if server == "chatd" else 4)


async def peer_scenario(bench: Bench, server_name: str, name: str) -> dict[str, Any]:
    """One scenario against one server, fresh, through scripts/loadgen.py."""
    args = bench.args
    # A fresh database for every attempt (--retries-if-noisy runs a scenario again).
    label = f"peer-{name}-{server_name}-{next(PEER_RUNS)}"
    if server_name in ("chatd", "chatd-irc"):
        # Pings an hour apart, as ngircd's: the receivers send nothing for the whole run,
        # and a ping event would be counted as a message.
        argv = [*bench.chatd_argv(label, default_argon2=False), "--ping-interval", "3600"]
        irc_port = spare_port() if server_name == "chatd-irc" else None
        if irc_port is not None:
            argv += ["--irc-port", str(irc_port)]  # chatd's IRC front-end (issue 15)
        server = await ServerProcess.start(argv, bench.workdir, label, args.pin)
    else:
        command = find_peer(server_name, args)
        assert command is not None
        server = await start_peer(server_name, command, bench, label)
    frames = loadgen.FrameWire(server.host, server.port)
    wire: loadgen.Wire = frames
    if server_name == "chatd-irc":
        assert irc_port is not None
        wire = loadgen.IrcWire(server.host, irc_port, server_name, account_wire=frames)
    elif server_name != "chatd":
        wire = loadgen.IrcWire(server.host, server.port, server_name)
    sizes = load_sizes(bench.sizes, args, f"{bench.prefix}{name[:2]}", server_name)
    check, probe = Check(), Probe(server)
    metrics: dict[str, Any] = {}
    try:
        async with asyncio.timeout(args.timeout):
            if name == "idle":
                metrics = await loadgen.scenario_idle(wire, sizes, probe, check, server.rss_kib)
            else:
                scenario = {"dm": loadgen.scenario_dm, "fanout": loadgen.scenario_fanout,
                            "latency": loadgen.scenario_latency}[name]
                metrics = await scenario(wire, sizes, probe, check)
    except Exception as exc:  # a scenario that crashes has verified nothing
        what = "timed out" if isinstance(exc, TimeoutError) else "failed"
        check.fail(f"scenario {what}: {type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                await cancel_other_tasks()
        await server.stop()
    if server_name.startswith("chatd"):
        check.equal("server errors logged", server.error_lines()[:5], [])
    return {
        "scenario": name,
        "server": server_name,
        "mode": "peers",
        "protocol": "msgpack" if server_name == "chatd" else "irc",
        **bench.meta,
        "db_synchronous": args.db_synchronous if server_name.startswith("chatd") else None,
        **metrics,
        **probe.result,
        "verified": check.ok,
        "verification": check.report(),
    }


async def quietest_peer_run(bench: Bench, server_name: str, name: str) -> dict[str, Any]:
    """One peer scenario, the quietest of its attempts (``quietest``)."""
    return await quietest(bench, lambda: peer_scenario(bench, server_name, name))


def per_cpu_ratio(name: str, mine: dict[str, Any], theirs: dict[str, Any]) -> float | None:
    """chatd / peer in messages per server CPU-second (throughput scenarios only)."""
    metric = PEER_METRIC[name]
    if name not in ("dm", "fanout") or not mine.get("server_cpu_pct") or not theirs.get(
            "server_cpu_pct"):
        return None
    ratio: float = (mine[metric] / mine["server_cpu_pct"]) / (
        theirs[metric] / theirs["server_cpu_pct"])
    return round(ratio, 3)


def peer_ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    """chatd / peer for each scenario's headline metric, from this one run, and the targets."""
    by = {(r["scenario"], r["server"]): r for r in results}
    ratios: dict[str, Any] = {}
    for (name, metric), (ours, key) in itertools.product(
            PEER_METRIC.items(), (("chatd", ""), ("chatd-irc", "irc "))):
        mine = by.get((name, ours))
        for peer in PEERS:
            theirs = by.get((name, peer))
            if not mine or not theirs or not mine.get(metric) or not theirs.get(metric):
                continue
            # "dm/miniircd": chatd over msgpack; "irc dm/miniircd": over its IRC port.
            ratios[f"{key}{name}/{peer}"] = {
                "metric": metric,
                "ratio": round(mine[metric] / theirs[metric], 3),
                "chatd": mine[metric], peer: theirs[metric],
                # Throughput per second of the server's own CPU: on a shared machine a
                # pinned server still loses its core to others now and then, which
                # lowers its rate but not this.
                "ratio_per_server_cpu": per_cpu_ratio(name, mine, theirs),
                # Which side's figure may be the generator's, not the server's, limit.
                "chatd_lower_bound": bool(mine.get("lower_bound")),
                "peer_lower_bound": bool(theirs.get("lower_bound")),
                "verified": bool(mine["verified"] and theirs["verified"]),
            }
    targets = []
    for name, metric, peer, direction, bound in PEER_TARGETS:
        found = ratios.get(f"{name}/{peer}")
        entry: dict[str, Any] = {"scenario": name, "metric": metric, "peer": peer,
                                 direction: bound, "ratio": None, "met": False}
        if found is not None:
            ratio = found["ratio"]
            meets = ratio >= bound if direction == "min" else ratio <= bound
            trusted = (found["verified"] and not found["chatd_lower_bound"]
                       and not found["peer_lower_bound"])
            if name == "fanout":  # "with chatd's CPU below 100%"
                cpu = (by[("fanout", "chatd")].get("server_cpu_pct") or 100.0)
                meets = meets and cpu < 100.0
            entry.update(ratio=ratio, met=bool(meets and trusted),
                         counted=trusted)
            if not trusted:
                entry["why_not_counted"] = "a figure is a lower bound or unverified"
        targets.append(entry)
    return {"ratios": ratios, "targets": targets}


async def peers_main(bench: Bench, output: TextIO | None) -> list[dict[str, Any]]:
    """Each scenario on every server in turn, interleaved, so the ratios share a time."""
    args = bench.args
    servers: list[str] = []
    skipped: dict[str, str] = {}
    for server in dict.fromkeys(args.peer or ("chatd", *PEERS)):
        if server in PEERS and find_peer(server, args) is None:
            skipped[server] = "not installed (scripts/bench-peers-setup.sh)"
        else:
            servers.append(server)
    results: list[dict[str, Any]] = []

    def emit(line_result: dict[str, Any]) -> None:
        line = json.dumps(line_result)
        print(line, flush=True)
        if output is not None:
            output.write(line + "\n")
            output.flush()

    for name in args.scenario or PEER_SCENARIOS:
        if name not in PEER_SCENARIOS:
            continue
        for server_name in servers:
            result = await quietest_peer_run(bench, server_name, name)
            results.append(result)
            emit(result)
    summary = {"scenario": "peers", "server": "all", "mode": "peers", **bench.meta,
               **peer_ratios(results), "skipped": skipped,
               "verified": all(r["verified"] for r in results)}
    emit(summary)
    return [*results, summary]


def print_peers_table(results: list[dict[str, Any]]) -> None:
    summary = results[-1]
    rows = []
    for r in results[:-1]:
        metric = PEER_METRIC[r["scenario"]]
        figure = f"{r.get(metric, '-')}"
        if r.get("lower_bound"):
            figure = f">= {figure} (lower bound)"
        rows.append((r["scenario"], r["server"], "yes" if r["verified"] else "NO",
                     f"{metric} {figure}",
                     f"{r.get('server_cpu_pct', '-')}% / {r.get('client_cpu_pct', '-')}% / "
                     f"{r.get('other_cpu_pct', '-')}%"))
    for key, ratio in summary["ratios"].items():
        marks = [side for side in ("chatd", "peer") if ratio[f"{side}_lower_bound"]]
        note = f" ({' and '.join(marks)} figure a lower bound)" if marks else ""
        per_cpu = ratio.get("ratio_per_server_cpu")
        per_cpu_note = "" if per_cpu is None else f", {per_cpu} per server CPU-second"
        rows.append((key, "chatd/peer", "yes" if ratio["verified"] else "NO",
                     f"{ratio['metric']} ratio {ratio['ratio']}{per_cpu_note}{note}", ""))
    for target in summary["targets"]:
        bound = target.get("min", target.get("max"))
        sign = ">=" if "min" in target else "<="
        rows.append((f"target {target['scenario']}", f"/{target['peer']}",
                     "met" if target["met"] else "not met",
                     f"{target['metric']} ratio {target['ratio']} {sign} {bound}"
                     + ("" if target.get("counted", True) else " (not counted)"), ""))
    header = ("scenario", "server", "verified", "result", "cpu server/bench/other")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)),
              file=sys.stderr)
    for name, why in summary["skipped"].items():
        print(f"bench: {name} skipped: {why}", file=sys.stderr)
    for r in results[:-1]:
        if not r["verified"]:
            print(f"{r['scenario']}/{r['server']} FAILED: {r['verification']['errors'][:5]}",
                  file=sys.stderr)


def _versus_sqlite(result: dict[str, Any]) -> str:
    return f" ({result['vs_sqlite']}x SQLite)" if "vs_sqlite" in result else ""


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark chatd; every scenario verifies what it measured.")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS + EXTRA_SCENARIOS,
                        help="run this scenario (repeatable; default: all but "
                             + ", ".join(EXTRA_SCENARIOS) + ")")
    parser.add_argument("--quick", action="store_true",
                        help="every count scaled down 20-100x: a smoke run of a few seconds")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override one size, e.g. --set dm_messages=5000")
    parser.add_argument("--window", type=int, default=64,
                        help="requests kept in flight per sending connection (default 64)")
    parser.add_argument("--pin", action="store_true",
                        help="server on core 0 (taskset), the benchmark on core 1")
    parser.add_argument("--baseline", action="store_true",
                        help="also run dm against a minimal frame relay, and compare")
    parser.add_argument("--db-synchronous", choices=("NORMAL", "FULL"), default="NORMAL",
                        help="passed to chatd (default NORMAL)")
    parser.add_argument("--target", metavar="HOST:PORT",
                        help="use this running chatd instead of starting one per scenario")
    parser.add_argument("--target-pid", type=int,
                        help="its process id, for its RSS (idle) and CPU figures")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds one scenario may take (default 900, 120 with --quick)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each scenario, wait up to this long for the machine to "
                             "be idle (a shared machine)")
    parser.add_argument("--retries-if-noisy", type=int, default=0, metavar="N",
                        help=f"run a scenario up to N more times while other processes used "
                             f"over {NOISY_PCT:.0f}%% of a core meanwhile; keep the quietest")
    parser.add_argument("--output", metavar="FILE", help="also write the JSON lines here")
    parser.add_argument("--json-only", action="store_true", help="no table on stderr")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (databases, server logs)")
    parser.add_argument("--peers", action="store_true",
                        help="run dm, fanout, latency and idle against chatd and the IRC "
                             "peers (miniircd, ngircd) with scripts/loadgen.py; print ratios")
    parser.add_argument("--peer", action="append", choices=PEER_SERVERS,
                        help="with --peers: run this server (repeatable; default: chatd, "
                             "miniircd, ngircd; chatd-irc is chatd over its IRC port, "
                             "chatd --irc-port)")
    parser.add_argument("--peer-window", type=int, default=256, metavar="N",
                        help="with --peers: messages a sender may be ahead of its receivers "
                             "(default 256)")
    parser.add_argument("--peer-refill", type=int, default=8, metavar="N",
                        help="with --peers: a sender writes once N more messages may go "
                             "(default 8; ngircd runs at most 3 commands of a client per "
                             "loop turn and turns on socket events, so it needs small, "
                             "frequent writes)")
    parser.add_argument("--miniircd", metavar="PATH", help="the miniircd to run")
    parser.add_argument("--ngircd", metavar="PATH", help="the ngircd to run")
    parser.add_argument("--db-url", metavar="URL",
                        help="serve from PostgreSQL: a fresh database on this server per "
                             "scenario, dropped after it (postgresql://user@host:port/dbname)")
    parser.add_argument("--compare", action="store_true",
                        help="with --db-url: dm, store and latency on SQLite and on "
                             "PostgreSQL in one run, each PostgreSQL figure over SQLite's")
    parser.add_argument("--cluster", action="store_true",
                        help="with --db-url: dm, fanout and latency on one SQLite node, one "
                             "PostgreSQL node, then two nodes on PostgreSQL and Redis "
                             "(senders on one, receivers on the other), in turns")
    parser.add_argument("--shared-port", action="store_true",
                        help="with --cluster: the two nodes share one port (--reuse-port) "
                             "and every client connects to it; the kernel picks the node")
    parser.add_argument("--bus", metavar="URL",
                        help="with --cluster: the Redis to use (redis://host:port/N; default: "
                             "a redis-server of the benchmark's own on a spare port)")
    parser.add_argument("--relay-server", type=int, metavar="PORT",
                        help=argparse.SUPPRESS)  # internal: run the baseline relay
    args = parser.parse_args(argv)
    if args.timeout is None:
        args.timeout = 120.0 if args.quick else 900.0
    if args.window < 1:
        parser.error("--window must be at least 1")
    if args.pin and (os.cpu_count() or 1) < 2:
        parser.error("--pin needs at least 2 cores")
    if args.pin and shutil.which("taskset") is None and not args.target:
        parser.error("--pin needs taskset (util-linux)")
    if args.target and not re.fullmatch(r"[^\s]+:\d+", args.target):
        parser.error("--target must be HOST:PORT")
    if args.compare and not args.db_url:
        parser.error("--compare needs --db-url")
    if args.cluster and not args.db_url:
        parser.error("--cluster needs --db-url (where to make the nodes' database)")
    if args.cluster and (args.compare or args.peers or args.baseline):
        parser.error("--cluster runs alone: not with --compare, --peers or --baseline")
    if args.cluster and set(args.scenario or ()) - set(CLUSTER_SCENARIOS):
        parser.error(f"--cluster runs {', '.join(CLUSTER_SCENARIOS)} only")
    if args.shared_port and not args.cluster:
        parser.error("--shared-port needs --cluster")
    if args.bus and not (args.cluster and args.bus.startswith(("redis://", "rediss://"))):
        parser.error("--bus takes a redis:// URL, with --cluster")
    if args.db_url and not args.db_url.startswith(("postgresql://", "postgres://")):
        parser.error("--db-url must be a postgresql:// URL")
    if args.db_url and args.target:
        parser.error("--db-url starts its own servers: not with --target")
    return args


def run_loop(coro: Awaitable[T]) -> T:
    """The load generator runs on uvloop when it is installed, like chatd."""

    async def main() -> T:
        # SIGTERM cancels the run, so that every finally (clients, servers) runs.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await coro

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.relay_server is not None:
        run_loop(relay_server(args.relay_server))
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    soft, hard = raise_nofile()
    sizes = apply_overrides(QUICK if args.quick else Sizes(), args.set)
    if "idle" in (args.scenario or SCENARIOS) and soft < sizes.idle_connections + 500:
        print(f"bench: RLIMIT_NOFILE hard limit is {hard}: too low for "
              f"{sizes.idle_connections} idle connections (raise it: ulimit -Hn, LimitNOFILE)",
              file=sys.stderr)
    if args.pin:
        os.sched_setaffinity(0, {1})
    meta = {
        "machine": machine_info(),
        "python": platform.python_version(),
        "commit": git_commit(),
        "uncommitted": chatd_modified(),  # chatd/ files that differ from that commit
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "pinned": bool(args.pin),
        "quick": bool(args.quick),
        "client_loop": client_loop(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="chatd-bench-"))
    output = open(args.output, "w") if args.output else None  # noqa: SIM115
    try:
        bench = Bench(args, sizes, workdir, meta)
        results = run_loop(peers_main(bench, output) if args.peers else bench_main(bench, output))
    except asyncio.CancelledError:
        print("bench: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        kill_children()
        if output is not None:
            output.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: kept {workdir}", file=sys.stderr)
    if not args.json_only:
        (print_peers_table if args.peers else print_table)(results)
    return 0 if results and all(r["verified"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
