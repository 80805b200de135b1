"""``chatd``: parse settings, set up logging, serve until SIGTERM or SIGINT.

Precedence: defaults in ``Config`` < ``CHATD_<SETTING>`` environment variables
< command-line flags.  Every setting has both, derived from ``Config``'s fields.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, NoReturn

from chatd import __version__
from chatd.config import Config
from chatd.server import Server
from chatd.store import StoreError

log = logging.getLogger("chatd")

ENV_PREFIX = "CHATD_"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"chatd: {message} (see chatd --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="chatd", description="A small self-hosted chat server.")
    parser.add_argument("--version", action="version", version=f"chatd {__version__}")
    for f in dataclasses.fields(Config):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_parse_as(type(f.default)),
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} (default: {f.default}; env {ENV_PREFIX}{f.name.upper()})",
        )
    return parser


def _parse_as(kind: type) -> Any:
    return kind if kind in (int, float) else str


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Build the effective configuration; raises ValueError naming the bad setting."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            try:
                values[f.name] = _parse_as(type(f.default))(raw)
            except ValueError:
                raise ValueError(
                    f"{ENV_PREFIX}{f.name.upper()}: not a valid value: {raw!r}"
                ) from None
        if args[f.name] is not None:
            values[f.name] = args[f.name]
    return Config(**values)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(sys.argv[1:] if argv is None else argv, os.environ)
        run = choose_runner(config.event_loop)
    except ValueError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return run(serve(config))
    except StoreError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"chatd: cannot listen on {config.host}:{config.port}: {reason}", file=sys.stderr)
    return 1


Runner = Callable[[Coroutine[Any, Any, int]], int]


def choose_runner(event_loop: str) -> Runner:
    """uvloop when asked for or (with "auto") when installed; else the standard loop."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise ValueError("event_loop: uvloop is not installed (chatd[fast])") from None
        else:
            return uvloop.run
    return asyncio.run


async def serve(config: Config) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; returns the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = Server(config)
    await server.start()
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await server.close()
    return 0
