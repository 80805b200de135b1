"""chatcat: the netcat of chatd.

    chatcat [--host HOST] [--port PORT]       interactive when stdin is a terminal
    chatcat [HOST] [PORT]                     the same, positionally
    printf '%s\\n' '{"op": "/ping"}' | chatcat  pipe mode: JSON lines in, JSON lines out
    chatcat --token T /send name=bob msg=hi   one-shot: one request, one reply, exit

Exit status: 0 success, 1 the server answered with an error, 2 cannot connect or bad usage.
Everything goes through :class:`chatd.client.Client`: there is one framing implementation.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO, TypeVar

from chatd.client import Client, Reply, RequestIdInUse
from chatd.commands import network_reason

EXIT_OK, EXIT_SERVER_ERROR, EXIT_USAGE = 0, 1, 2
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7777
T = TypeVar("T")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"chatcat: {message} (see chatcat --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="chatcat",
        description="Talk to a chatd server: interactively, as JSON lines, or one request.",
        epilog="One-shot parameters: key=value passes a string, key:=JSON any JSON value "
        "(chatcat /ack id:=42).",
    )
    parser.add_argument("words", nargs="*", metavar="[HOST] [PORT] [OP PARAM...]")
    parser.add_argument("--host", help=f"server address (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=_port, help=f"server port (default {DEFAULT_PORT})")
    parser.add_argument("--token", default=os.environ.get("CHATD_TOKEN"),
                        help="session token to reuse (default: $CHATD_TOKEN)")
    parser.add_argument("--json", action="store_true",
                        help="pipe mode even when stdin is a terminal")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for the server (default 30)")
    return parser


def token_values_joined(argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> list[str]:
    """The arguments, each ``--token VALUE`` made ``--token=VALUE``: a token is URL-safe
    base64, so one login in 64 starts with "-", which argparse takes for an option
    ("expected one argument"); joined, ``chatcat --token "$TOKEN"`` works with every one.
    A VALUE that is one of chatcat's own options is left alone (argparse then says the
    token is missing, as before)."""
    words = list(sys.argv[1:] if argv is None else argv)
    options = parser._option_string_actions  # every option string chatcat takes
    joined: list[str] = []
    while words:
        word = words.pop(0)
        if word == "--token" and words and words[0] not in options:
            word = f"--token={words.pop(0)}"
        joined.append(word)
    return joined


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a port: {text}")
    return int(text)


def split_words(
    words: Sequence[str], host: str | None = None, port: int | None = None
) -> tuple[str, int, list[str]]:
    """[HOST] [PORT] then an optional request: ``/op key=value ...``; ``host`` and
    ``port`` are the --host and --port options, which the positional forms must not repeat."""
    rest = list(words)
    _refuse_an_op_without_its_slash(rest)
    if rest and not rest[0].startswith("/"):
        if host is not None:
            raise UsageError(f"--host given, and {rest[0]!r} as a host too")
        host = rest.pop(0)
    if rest and not rest[0].startswith("/"):
        if port is not None:
            raise UsageError(f"--port given, and {rest[0]!r} as a port too")
        try:
            port = _port(rest.pop(0))
        except argparse.ArgumentTypeError as exc:
            raise UsageError(str(exc)) from None
    if rest and not rest[0].startswith("/"):
        raise UsageError(f"expected an op such as /ping, got {rest[0]!r}")
    return host or DEFAULT_HOST, port or DEFAULT_PORT, rest


def _refuse_an_op_without_its_slash(words: Sequence[str]) -> None:
    """``chatcat channel/list`` or ``chatcat send name=bob``: the op's "/" forgotten, the
    op would be taken for the host (and a parameter for the port), and the error would
    be about resolving a host name. No host or port has a "/" or a "=" in it."""
    for index, word in enumerate(words[:2]):
        if word.startswith("/"):
            return
        if "=" in word:  # a parameter: the op is the word before it, if any
            op = words[index - 1] if index else None
        elif "/" in word:
            op = word
        else:
            continue
        hint = f" (/{op}?)" if op else ""
        raise UsageError(f"{word!r} is not a host or a port: an op starts with /{hint}")


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, raw_json, value = _split_pair(pair)
        if raw_json:
            try:
                params[key] = json.loads(value)
            except json.JSONDecodeError:
                raise UsageError(f"not valid JSON after {key}:= : {value}") from None
        else:
            params[key] = value
    return params


def _split_pair(pair: str) -> tuple[str, bool, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise UsageError(f"parameters are key=value or key:=JSON, got {pair!r}")
    if key.endswith(":"):
        return key[:-1], True, value
    return key, False, value


def to_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=_json_default)


def _json_default(obj: object) -> object:
    return obj.hex() if isinstance(obj, bytes | bytearray) else repr(obj)


# One-shot mode.


async def one_shot(client: Client, request: list[str], out: TextIO) -> int:
    op, params = request[0], parse_params(request[1:])
    reply = await client.call(op, params or None)
    print(to_json(reply), file=out, flush=True)
    return EXIT_OK if reply.get("code") == 0 else EXIT_SERVER_ERROR


# Pipe mode.


async def pipe_mode(client: Client, stdin: TextIO, out: TextIO) -> int:
    """Each stdin line a JSON request; each reply and event one JSON line on ``out``."""
    status = EXIT_OK
    printer = asyncio.create_task(_print_events(client, out))
    replies: list[asyncio.Task[Reply | None]] = []
    line_number = 0
    while line := await in_daemon_thread(stdin.readline):
        line_number += 1
        if not line.strip():
            continue
        try:
            body = _request_from_json(line)
        except UsageError as exc:
            print(f"chatcat: line {line_number}: {exc}", file=sys.stderr)
            status = EXIT_USAGE
            continue
        exchange = _exchange_and_print(client, body, out, line_number)
        replies.append(asyncio.create_task(exchange))
    for reply in await asyncio.gather(*replies):
        if reply is None:
            status = EXIT_USAGE
        elif reply.get("code") != 0:
            status = max(status, EXIT_SERVER_ERROR)
    printer.cancel()
    _print_waiting_events(client, out)
    return status


def _request_from_json(line: str) -> dict[str, Any]:
    try:
        body = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"not JSON ({exc.msg})") from None
    if not isinstance(body, dict) or not isinstance(body.get("op"), str):
        raise UsageError('a request is a JSON object with a string "op"')
    return body


async def _exchange_and_print(
    client: Client, body: dict[str, Any], out: TextIO, line_number: int
) -> Reply | None:
    """The reply, printed; None, said on stderr, for a line not sent: its ``id`` is
    still waiting for the reply to an earlier line (the replies could not be told apart)."""
    try:
        reply = await client.exchange(body)
    except RequestIdInUse as exc:
        print(f"chatcat: line {line_number}: {exc}", file=sys.stderr)
        return None
    print(to_json(reply), file=out, flush=True)
    return reply


async def _print_events(client: Client, out: TextIO) -> None:
    async for event in client.events():
        print(to_json(event), file=out, flush=True)


def _print_waiting_events(client: Client, out: TextIO) -> None:
    # Only events that arrive in the few loop turns between the last reply and the end,
    # before the printer's turn: which of the two prints one is up to the scheduler.
    for event in client.waiting_events():
        print(to_json(event), file=out, flush=True)  # pragma: no cover


async def in_daemon_thread(read: Callable[[], T]) -> T:
    """``read()`` (a line of stdin, a password) in a daemon thread, not asyncio's executor:
    on Ctrl-C asyncio.run waits for the executor's threads, and one blocked reading a
    terminal or an idle pipe would hold chatcat until Enter or the end of input."""
    outcome: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            outcome.set_result(read())
        except BaseException as exc:  # EOFError from getpass, or any other: the caller's
            outcome.set_exception(exc)

    threading.Thread(target=run, name="chatcat-input", daemon=True).start()
    return await asyncio.wrap_future(outcome)


# Entry point.


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(token_values_joined(argv, parser))
    try:
        host, port, request = split_words(args.words, args.host, args.port)
        if request:
            parse_params(request[1:])  # usage errors before connecting
    except UsageError as exc:
        print(f"chatcat: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run(args, host, port, request))
    except KeyboardInterrupt:
        return EXIT_OK


async def _run(args: argparse.Namespace, host: str, port: int, request: list[str]) -> int:
    try:
        client = await Client.connect(host, port, token=args.token, timeout=args.timeout)
    except (OSError, TimeoutError) as exc:
        print(f"chatcat: cannot connect to {host}:{port}: {network_reason(exc)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if request:
            return await one_shot(client, request, sys.stdout)
        if args.json or not sys.stdin.isatty():
            return await pipe_mode(client, sys.stdin, sys.stdout)
        from chatd.shell import interactive

        return await interactive(client, f"{host}:{port}")
    except (ConnectionError, TimeoutError) as exc:
        print(f"chatcat: connection to {host}:{port} lost: {network_reason(exc)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        await client.close()


if __name__ == "__main__":
    raise SystemExit(main())
