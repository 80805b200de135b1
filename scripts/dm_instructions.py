#!/usr/bin/env python3
"""Instructions chatd executes per dm message, counted by callgrind (docs/benchmarks.md).

    python scripts/dm_instructions.py --source A=/tmp/base --source B=. --rounds 2
    python scripts/dm_instructions.py --scenario latency --source A=/tmp/base --source B=.

For each round and each source tree (alternated, the order flipped every round), chatd
runs from that tree (``PYTHONPATH``) under ``valgrind --tool=callgrind`` on a fresh
SQLite database, and scripts/loadgen.py's dm (the load of ``bench.py --peers --scenario
dm``: pairs, window 256, refill 8) drives it twice, with ``--small`` and ``--large``
messages per sender, on two fresh servers. Per message = (instructions with large -
instructions with small) / (pairs x (large - small)): start-up, set-up and shutdown
cancel. Every thread is counted (SQLite's too). Instruction counts barely move with
other processes on the machine, which wall-clock figures do; how requests batch still
depends on timing, so compare only trees measured in the same minutes.

``--scenario latency`` counts the paced path instead: scripts/loadgen.py's latency load
(one message at a time, round the pairs, at ``--rate`` messages a second: slow enough that
under valgrind each is read, committed, answered and pushed on its own, as nearly every
message is at 2,000 msg/s outside it), ``--small`` and ``--large`` messages in all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import loadgen

TOTALS = re.compile(r"^(?:totals|summary): (\d+)", re.MULTILINE)


MINIIRCD = "miniircd"  # the source name that runs the peer (--miniircd), not a chatd tree


async def run_once(name: str, source: Path, args: argparse.Namespace, messages: int,
                   workdir: Path, label: str) -> tuple[int, bool]:
    """chatd from the tree ``source`` (or, named MINIIRCD, the miniircd script ``source``)
    under callgrind, one load: (instructions, verified)."""
    out = workdir / f"{label}.callgrind"
    callgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                 "--dump-instr=no", "--collect-jumps=no", "--separate-threads=no"]
    check = bench.Check()
    wire: loadgen.Wire
    if name == MINIIRCD:
        server = await start_miniircd(callgrind, source, workdir, label)
        wire = loadgen.IrcWire(server.host, server.port, MINIIRCD)
    else:
        argv = [*callgrind, sys.executable, "-m", "chatd", "--port", "0",
                "--db", str(workdir / f"{label}.sqlite3"), "--log-level", "WARNING",
                "--ping-interval", "3600", *bench.UNLIMITED, *bench.CHEAP_ARGON2]
        os.environ["PYTHONPATH"] = str(source)
        server = await bench.ServerProcess.start(argv, workdir, label, pin=False)
        wire = loadgen.FrameWire(server.host, server.port)
    try:
        if args.scenario == "dm":
            sizes = loadgen.LoadSizes(pairs=args.pairs, messages=messages, window=256,
                                      refill=8, timeout=600.0, prefix=f"{label}x")
            await loadgen.scenario_dm(wire, sizes, bench.Probe(None), check)
        else:
            sizes = loadgen.LoadSizes(latency_pairs=args.pairs, latency_rate=args.rate,
                                      latency_seconds=messages / args.rate, timeout=600.0,
                                      prefix=f"{label}x")
            await loadgen.scenario_latency(wire, sizes, bench.Probe(None), check)
    finally:
        popen = server._popen  # stopped here: callgrind writes on exit
        assert popen is not None
        popen.send_signal(signal.SIGTERM)
        await asyncio.to_thread(popen.wait, 600)
        await server.stop()
    found = TOTALS.search(out.read_text(errors="replace"))
    if found is None:
        raise SystemExit(f"no totals in {out}")
    return int(found[1]), check.ok and not server.error_lines()


async def start_miniircd(callgrind: list[str], script: Path, workdir: Path, label: str
                         ) -> bench.ServerProcess:
    """miniircd (the script ``script``, run by the Python of its virtualenv) under
    callgrind on a spare port, once it accepts connections."""
    port = bench.spare_port()
    python = script.parent / "python"
    argv = [*callgrind, str(python if python.exists() else sys.executable), str(script),
            "--listen", "127.0.0.1", "--ports", str(port)]
    if os.geteuid() == 0:  # miniircd refuses root without --setuid; root again keeps
        argv += ["--setuid", "root"]  # callgrind's output file (made as root) writable
    log = workdir / f"{label}.log"
    popen = bench._spawn(argv, log, dict(os.environ), workdir)
    server = bench.ServerProcess("127.0.0.1", port, popen.pid, popen, log)
    await bench.accepting(MINIIRCD, server, popen)
    return server


def add_sources(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--source NAME=DIR (repeatable), read by sources_of."""
    parser.add_argument("--source", action="append", required=required, metavar="NAME=DIR",
                        help="a tree whose chatd/ the server runs (repeatable)")


def sources_of(args: argparse.Namespace) -> list[tuple[str, Path]]:
    sources = [(name, Path(path).resolve()) for name, _, path in
               (item.partition("=") for item in args.source or ())]
    if getattr(args, "miniircd", None):  # run_once knows it by its name
        sources.append((MINIIRCD, Path(args.miniircd).expanduser().resolve()))
    return sources


def in_turns(sources: list[tuple[str, Path]], rounds: int
             ) -> Iterator[tuple[int, str, Path]]:
    """(round, name, tree) for every round, the trees' order flipped every other round."""
    for round_ in range(rounds):
        for name, source in sources if round_ % 2 == 0 else sources[::-1]:
            yield round_, name, source


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sources(parser, required=False)
    parser.add_argument("--scenario", choices=("dm", "latency"), default="dm")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--rate", type=float, default=50.0,
                        help="latency: messages a second, in all (default 50)")
    parser.add_argument("--small", type=int, default=200,
                        help="dm: messages per sender; latency: messages in all")
    parser.add_argument("--large", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind files in DIR")
    parser.add_argument("--miniircd", metavar="SCRIPT",
                        help="also count miniircd (over IRC), e.g. "
                             "~/.cache/chatd-bench-peers/venv/bin/miniircd")
    args = parser.parse_args()
    if not args.source and not args.miniircd:
        parser.error("give --source NAME=DIR, --miniircd SCRIPT, or both")
    return args


async def main(args: argparse.Namespace) -> None:
    bench.START_TIMEOUT = 600.0  # Python's start-up under valgrind takes a while
    messages = (args.large - args.small) * (args.pairs if args.scenario == "dm" else 1)
    with tempfile.TemporaryDirectory(prefix="dm-instr-") as tmp:
        workdir = Path(args.keep or tmp)
        for round_, name, source in in_turns(sources_of(args), args.rounds):
            started = time.monotonic()
            small, ok1 = await run_once(name, source, args, args.small, workdir,
                                       f"r{round_}{name}s")
            large, ok2 = await run_once(name, source, args, args.large, workdir,
                                       f"r{round_}{name}l")
            result: dict[str, Any] = {
                "round": round_ + 1, "source": name, "scenario": args.scenario,
                "verified": ok1 and ok2,
                "small": small, "large": large,
                "per_message": round((large - small) / messages),
                "seconds": round(time.monotonic() - started)}
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
