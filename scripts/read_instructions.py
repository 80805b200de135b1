#!/usr/bin/env python3
"""Instructions (callgrind) or syscalls (strace) chatd spends per message it reads back.

    python scripts/read_instructions.py --source A=/tmp/a --source B=. --rounds 2
    python scripts/read_instructions.py --source A=/tmp/a --strace

For each round and each source tree (alternated, the order flipped every round), chatd
runs from that tree (``PYTHONPATH``) on a fresh SQLite database, under ``valgrind
--tool=callgrind --instr-atstart=no``. One sender fills a reader's inbox and a channel
they share with ``--small`` (then, on a second fresh server, ``--large``) messages each,
uninstrumented; then, each phase counted alone (``callgrind_control --instr=on``, the
phase, ``--dump``, ``--instr=off``):

- ``subscribe``: the reader subscribes and takes the inbox's catch-up as pushes
  (inbox_after), acknowledging none (the inbox stays whole for the next phase);
- ``receive``: the reader drains the inbox with /receive, 1,000 a page (take_inbox; what
  ``bench.py --scenario catchup`` times);
- ``history``: the reader pages the conversation back with /history, 200 a page
  (private_history);
- ``channel_history``: the same with /channel/history (channel_history).

Per message = (phase at large - phase at small) / (large - small): what every phase
pays once cancels. Every thread is counted (SQLite's too), but only in user space: a
system call's work in the kernel is not. So ``--strace`` runs chatd without valgrind and
counts each phase's system calls instead (``strace -c -f`` attached to the server for
that phase), and ``--cpu`` the CPU time each phase takes (ns per message on a core, user
and system), both at ``--large`` only, per message read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
from dm_instructions import add_sources, in_turns, sources_of

from chatd.client import Client

TOTALS = re.compile(r"^totals: (\d+)", re.MULTILINE)
STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$",
                        re.MULTILINE)
PHASES = ("subscribe", "receive", "history", "channel_history")
CHANNEL = "pages"


class Counter:
    """Counts one phase of a running server: callgrind's instructions or strace's calls."""

    def __init__(self, pid: int, out: Path, strace: bool, cpu: bool) -> None:
        if pid <= 0:  # callgrind_control without a pid would command every callgrind
            raise SystemExit(f"bad server pid {pid}")
        self.pid, self.out, self.strace, self.cpu = pid, out, strace, cpu
        self.dumps = 0
        self._tracer: asyncio.subprocess.Process | None = None
        self._cpu_before: dict[str, int] = {}

    def cpu_now(self) -> dict[str, int]:
        """CPU used so far: every live thread's ns on a core (schedstat), and the
        process's user and system ticks (all threads, ended ones too)."""
        tasks = Path(f"/proc/{self.pid}/task")
        ns = sum(int((task / "schedstat").read_text().split()[0]) for task in tasks.iterdir())
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        return {"cpu_ns": ns, "user_ns": int(fields[11]) * tick_ns,
                "system_ns": int(fields[12]) * tick_ns}

    async def start(self, phase: str) -> None:
        if self.cpu:
            self._cpu_before = self.cpu_now()
        elif self.strace:
            log = self.out.with_suffix(f".{phase}.strace")
            self._tracer = await asyncio.create_subprocess_exec(
                "strace", "-c", "-f", "-o", str(log), "-p", str(self.pid),
                stderr=subprocess.DEVNULL)
            await asyncio.sleep(1.0)  # attached to every thread before the phase
        else:
            await self._control("--instr=on")

    async def stop(self, phase: str) -> dict[str, int]:
        if self.cpu:
            now = self.cpu_now()
            return {key: now[key] - self._cpu_before[key] for key in now}
        if self.strace:
            tracer, self._tracer = self._tracer, None
            assert tracer is not None
            tracer.send_signal(signal.SIGINT)
            await tracer.wait()
            text = await asyncio.to_thread(self.out.with_suffix(f".{phase}.strace").read_text)
            return {name: int(calls) for calls, name in STRACE_ROW.findall(text)
                    if name != "total"}
        await self._control(f"--dump={phase}")
        await self._control("--instr=off")
        self.dumps += 1
        dumped = Path(f"{self.out}.{self.dumps}")
        found = TOTALS.search(await asyncio.to_thread(dumped.read_text, errors="replace"))
        if found is None:
            raise SystemExit(f"no totals in {dumped}")
        return {"instructions": int(found[1])}

    async def _control(self, command: str) -> None:
        await asyncio.to_thread(subprocess.run, ["callgrind_control", command, str(self.pid)],
                                check=True, stdout=subprocess.DEVNULL)


async def fill(sender: Client, reader: str, count: int) -> None:
    """``count`` private messages to ``reader`` and as many to the channel, 64 in flight."""
    seqs = iter(range(count))

    async def worker() -> None:
        for seq in seqs:
            text = bench.make_text(seq, 64)
            await bench.call_ok(sender, "/send", {"name": reader, "msg": text})
            await bench.call_ok(sender, "/channel/send", {"name": CHANNEL, "message": text})

    await asyncio.gather(*(worker() for _ in range(64)))


async def drain(reader: Client, sender: str) -> int:
    got = 0
    while True:
        data = (await bench.call_ok(reader, "/receive"))["data"]
        got += len(data["messages"].get(sender, []))
        if not data["more"]:
            return got


async def page_back(reader: Client, op: str, name: str) -> int:
    got, before = 0, None
    while True:
        params: dict[str, Any] = {"name": name, "limit": 200}
        if before is not None:
            params["before"] = before
        data = (await bench.call_ok(reader, op, params))["data"]
        got += len(data["messages"])
        if not data["more"]:
            return got
        before = data["messages"][0]["id"]


async def catch_up(reader: Client, count: int) -> int:
    await bench.call_ok(reader, "/subscribe")
    got = 0
    while got < count:
        event = await reader.next_event(timeout=600)
        got += event.get("event") == "message"
    return got


async def run_once(source: Path, args: argparse.Namespace, count: int, workdir: Path,
                   label: str) -> dict[str, Any]:
    """One server from ``source``, filled with ``count``: each phase's counts."""
    out = workdir / f"{label}.callgrind"
    argv = [sys.executable, "-m", "chatd", "--port", "0",
            "--db", str(workdir / f"{label}.sqlite3"), "--log-level", "WARNING",
            "--ping-interval", "3600", *bench.UNLIMITED, *bench.CHEAP_ARGON2]
    if not (args.strace or args.cpu):
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out}", "--dump-instr=no", "--collect-jumps=no",
                "--separate-threads=no", *argv]
    os.environ["PYTHONPATH"] = str(source)
    server = await bench.ServerProcess.start(argv, workdir, label, pin=False)
    counts: dict[str, Any] = {}
    clients: list[Client] = []
    try:
        assert server.pid is not None
        counter = Counter(server.pid, out, args.strace, args.cpu)
        names = (f"{label}s", f"{label}r")
        for name in names:
            client = await Client.connect(server.host, server.port, timeout=600)
            clients.append(client)
            params = {"name": name, "password": bench.PASSWORD,
                      "password_repete": bench.PASSWORD}
            await bench.call_ok(client, "/register", params)
            await bench.call_ok(client, "/login", {"name": name, "password": bench.PASSWORD})
            await bench.call_ok(client, "/channel/join", {"name": CHANNEL})
        sender, reader = clients
        await fill(sender, names[1], count)
        phases: dict[str, Callable[[], Awaitable[int]]] = {
            "receive": lambda: drain(reader, names[0]),
            "history": lambda: page_back(reader, "/history", names[0]),
            "channel_history": lambda: page_back(reader, "/channel/history", CHANNEL),
            "subscribe": lambda: catch_up(reader, count),
        }
        for phase in PHASES:
            await counter.start(phase)
            got = await phases[phase]()
            counts[phase] = await counter.stop(phase)
            if got != count:
                raise SystemExit(f"{label} {phase}: read {got} messages, expected {count}")
    finally:
        for client in clients:
            await client.close()
        popen = server._popen  # stopped here: callgrind writes on exit
        assert popen is not None
        popen.send_signal(signal.SIGTERM)
        await asyncio.to_thread(popen.wait, 600)
        await server.stop()
    if server.error_lines():
        raise SystemExit(f"{label}: errors in the server's log:\n{server.log_tail()}")
    return counts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sources(parser)
    parser.add_argument("--small", type=int, default=20_000,
                        help="messages in the inbox and the channel, first server")
    parser.add_argument("--large", type=int, default=50_000, help="second server")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--strace", action="store_true",
                        help="count system calls (strace -c), --large messages only")
    parser.add_argument("--cpu", action="store_true",
                        help="CPU time per message (schedstat, user and system), --large only")
    parser.add_argument("--keep", metavar="DIR", help="keep the counts' files in DIR")
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    bench.START_TIMEOUT = 600.0  # Python's start-up under valgrind takes a while
    with tempfile.TemporaryDirectory(prefix="read-instr-") as tmp:
        workdir = Path(args.keep or tmp)
        for round_, name, source in in_turns(sources_of(args), args.rounds):
            started = time.monotonic()
            result: dict[str, Any] = {"round": round_ + 1, "source": name}
            large = await run_once(source, args, args.large, workdir, f"r{round_}{name}l")
            if args.cpu:
                for phase, used in large.items():
                    result[phase] = {key: round(ns / args.large)
                                     for key, ns in used.items()}
            elif args.strace:
                for phase, calls in large.items():
                    result[phase] = {call: round(n / args.large, 3)
                                     for call, n in sorted(calls.items(),
                                                           key=lambda kv: -kv[1])
                                     if n / args.large >= 0.001}
            else:
                small = await run_once(source, args, args.small, workdir,
                                       f"r{round_}{name}s")
                for phase in PHASES:
                    big, little = (c[phase]["instructions"] for c in (large, small))
                    result[phase] = round((big - little) / (args.large - args.small))
            result["seconds"] = round(time.monotonic() - started)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
