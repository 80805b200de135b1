"""``chatd``: serve (the default), ``chatd backup PATH``, ``chatd admin ...``, ``chatd init``,
``chatd migrate --from PATH --to postgresql://...``.

Settings come from defaults < ``--config`` TOML file < ``CHATD_*`` environment
< flags (``config.py``).  The server runs until SIGTERM or SIGINT; SIGHUP
reloads what can change while serving, or, run from a terminal, stops it too.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import logging
import os
import platform
import signal
import sys
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any, NoReturn

from chatd import __version__, admin, logs, migrate, systemd, trace
from chatd import config as settings
from chatd.config import ENV_PREFIX, FIELDS, Config, ConfigError
from chatd.server import Server
from chatd.store import StoreError
from chatd.validation import name_key

log = logging.getLogger("chatd")

Runner = Callable[[Coroutine[Any, Any, int]], int]


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"chatd: {message} (see chatd --help)\n")


def _settings_parser(listed: Collection[str] | None = None) -> _OneLineParser:
    """Flags for every setting; SUPPRESS keeps unset flags out, so lower layers show through.

    Only the settings in ``listed`` (all when None) appear in --help; the rest are
    accepted all the same.
    """
    parser = _OneLineParser(add_help=False)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help=f"TOML file of settings (env {ENV_PREFIX}CONFIG)")
    for name, f in FIELDS.items():
        kind: type[Any] = type(f.default)
        shown = listed is None or name in listed
        # A yes/no setting is a flag: --irc-guests, --no-irc-guests.
        typed: dict[str, Any] = (
            {"action": argparse.BooleanOptionalAction}
            if kind is bool
            else {"type": kind if kind in (int, float) else str, "metavar": name.upper()}
        )
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            **typed,
            help=f"{f.metadata['help']} (default: {f.default}; env {ENV_PREFIX}{name.upper()})"
            if shown else argparse.SUPPRESS,
        )
    return parser


# `chatd admin COMMAND`: what each does, for --help.
ADMIN_COMMANDS = {
    "users": "list every user: name, registration time (UTC), live session tokens",
    "reset-password": "set a user's new password (read from stdin) and end their sessions",
    "revoke-tokens": "log a user out everywhere",
    "delete-user": "delete a user and everything they sent, received or joined (needs --yes)",
}
# The settings an operation uses, listed in its --help (the others are accepted too).
_OPERATION_SETTINGS = ("db", "db_busy_timeout")
_OPERATION_EPILOG = "Every setting of `chatd --help` is accepted too. Works while the server runs."
_ADMIN_EPILOG = (
    "Every setting of `chatd --help` is accepted too (the argon2 costs matter to "
    "reset-password). Works while the server runs; see README.md, \"Operating it\"."
)


def build_parser() -> argparse.ArgumentParser:
    common = _settings_parser()
    # No abbreviated flags: `migrate --to` must not be read as --token-ttl.
    parser = _OneLineParser(
        prog="chatd", parents=[common], description="A small self-hosted chat server.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"chatd {__version__}")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration as TOML and exit")
    commands = parser.add_subparsers(dest="command", metavar="[backup|admin|init|migrate]")
    operation = _settings_parser(listed=_OPERATION_SETTINGS)
    backup = commands.add_parser(
        "backup", parents=[operation], epilog=_OPERATION_EPILOG,
        help="copy the database online (on PostgreSQL: with pg_dump)",
    )
    backup.add_argument("path", help="the new file to write")
    _add_admin(commands, operation)
    commands.add_parser(
        "init", parents=[operation],
        help="create a new, empty database where there is none (also where one went missing)",
        epilog="Every setting of `chatd --help` is accepted too. On SQLite refused while a"
        " server runs (see README.md, \"The database file\"); on PostgreSQL it creates"
        " chatd's tables in the existing database.",
    )
    _add_migrate(commands)
    return parser


def _add_migrate(commands: Any) -> None:
    move = commands.add_parser(
        "migrate", help="copy a SQLite database into an empty PostgreSQL database",
        description="Copy a single-node SQLite database (users, tokens, channels, messages,"
        " read and ack positions, with their ids) into an empty PostgreSQL database.",
        epilog="Stop the server first (the SQLite file's lock is taken). The target must"
        " exist and hold no chatd data; see README.md, \"On PostgreSQL\".",
    )
    move.add_argument("--from", dest="source", required=True, metavar="PATH",
                      help="the SQLite database file (read only)")
    move.add_argument("--to", dest="target", required=True, metavar="URL",
                      help="postgresql://user@host:port/dbname, an empty database")


def _add_admin(commands: Any, operation: argparse.ArgumentParser) -> None:
    manage = commands.add_parser(
        "admin", parents=[operation], help="manage users: " + ", ".join(ADMIN_COMMANDS),
        description="Manage the users of a chatd database.", epilog=_ADMIN_EPILOG,
    )
    actions = manage.add_subparsers(dest="action", metavar="COMMAND", title="commands")
    for action, what in ADMIN_COMMANDS.items():
        sub = actions.add_parser(action, parents=[operation], help=what, description=what,
                                 epilog=_ADMIN_EPILOG)
        if action != "users":
            sub.add_argument("name", help="the user's name (any case)")
        if action == "delete-user":
            sub.add_argument("--yes", action="store_true",
                             help="confirm the deletion: it cannot be undone")


def _admin_usage_error(args: argparse.Namespace) -> str | None:
    """What is missing from a `chatd admin` command line, said so that it can be fixed."""
    if args.action is None:
        return (f"chatd admin: name a command: {', '.join(ADMIN_COMMANDS)}"
                " (see chatd admin --help)")
    if args.action == "delete-user" and not args.yes:
        return (f"chatd admin delete-user: this deletes {args.name} with every message they"
                " sent or received, their channel memberships and sessions, for good;"
                " add --yes to confirm")
    return None


def load_config(args: argparse.Namespace) -> Config:
    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    path = getattr(args, "config", None) or os.environ.get(ENV_PREFIX + "CONFIG")
    return settings.load(overrides, os.environ, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args)
        run = choose_runner(config.event_loop)
    except ConfigError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(settings.to_toml(config), end="")
        return 0
    logs.configure(config.log_level, config.log_format)
    if args.command is not None:
        return _operate(args, config)
    try:
        return run(serve(config, lambda: load_config(args)))
    except StoreError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"chatd: cannot listen on {config.host}:{config.port}: {reason}", file=sys.stderr)
    except RuntimeError as exc:  # TLS files unusable, prometheus-client missing
        print(f"chatd: {exc}", file=sys.stderr)
    return 1


def _operate(args: argparse.Namespace, config: Config) -> int:
    if args.command == "admin" and (usage := _admin_usage_error(args)) is not None:
        print(usage, file=sys.stderr)
        return 2
    try:
        if args.command == "backup":
            print(admin.backup(config, args.path))
        elif args.command == "init":
            print(asyncio.run(admin.init_database(config)))
        elif args.command == "migrate":
            print(asyncio.run(_migrate(args.source, args.target)))
        else:
            admin.require_database(config)
            asyncio.run(_administer(args, config))
    except (admin.AdminError, migrate.MigrateError) as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 1
    return 0


async def _migrate(source: str, target: str) -> str:
    def progress(line: str) -> None:
        print(f"chatd migrate: {line}", file=sys.stderr)

    report = await migrate.migrate(source, target, progress)
    return (f"migrated {source} to {admin.without_password(target)}: {report.summary()};"
            f" serve it with --db {admin.without_password(target)}")


async def _administer(args: argparse.Namespace, config: Config) -> None:
    store = await admin.open_store(config)
    try:
        if args.action == "users":
            await admin.list_users(store, sys.stdout)
            return
        user = await store.find_user(name_key(args.name))  # read before a deletion
        if args.action == "reset-password":
            print(await admin.reset_password(store, config, args.name, admin.read_new_password))
        elif args.action == "revoke-tokens":
            print(await admin.revoke_tokens(store, args.name))
        elif args.action == "delete-user":
            print(await admin.delete_user(store, args.name))
        if user is not None:
            await _end_sessions_on_every_node(config, user.id)
    finally:
        await store.close()


async def _end_sessions_on_every_node(config: Config, user_id: int) -> None:
    """With several nodes, their sessions of the user end at once (README, "Running
    several nodes"); without the bus, within token_recheck."""
    if config.bus == "local":
        return
    from chatd.bus_redis import Revoke, publish_once

    try:
        await publish_once(config.bus, Revoke(user_id, node="admin"))
    except (ConnectionError, ImportError) as exc:
        print(f"chatd: {exc}; sessions on the nodes end within token_recheck"
              f" ({config.token_recheck:g} s)", file=sys.stderr)


def choose_runner(event_loop: str) -> Runner:
    """uvloop when asked for or (with "auto") when installed; else the standard loop."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise ConfigError("event_loop: uvloop is not installed (chatd[fast])") from None
        else:
            return uvloop.run
    return asyncio.run


async def serve(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; returns the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # In a terminal, SIGHUP is the terminal going away (its window closed): stop, as any
    # program in the foreground does. A reload would leave the server running orphaned,
    # holding its port and its database until someone finds its pid. A service (systemd,
    # nohup, setsid) has no terminal: there SIGHUP is "reload", once serving.
    hangup_stops = _on_a_terminal()
    stopping = [signal.SIGTERM, signal.SIGINT]
    if hangup_stops:
        stopping.append(signal.SIGHUP)
    for signum in stopping:
        loop.add_signal_handler(signum, stop.set)
    server = Server(config)
    await server.start()
    _tune_garbage_collection()
    _tune_allocator()
    if reload_config is not None and not hangup_stops:
        loop.add_signal_handler(signal.SIGHUP, _reload, server, reload_config)
    systemd.notify(f"READY=1\nSTATUS=serving on {config.host}:{server.port}")
    try:
        await stop.wait()
        systemd.notify("STOPPING=1")
        log.info("shutting down")
    finally:
        await server.close()
        trace.dump()
    return 0


def _on_a_terminal() -> bool:
    """Whether chatd runs in a terminal: standard input, output or error is one."""
    return any(os.isatty(fd) for fd in (0, 1, 2))


def _tune_garbage_collection() -> None:
    # The objects made at start-up live as long as the process: freezing them keeps the
    # collector from walking them again and again; and a server allocating short-lived
    # requests by the thousand needs young collections less often (+14% on `dm`).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's default, kept from moving


def _tune_allocator() -> bool:
    """Fix glibc's mmap threshold at its default (unless MALLOC_MMAP_THRESHOLD_ sets
    one); whether it was set.

    glibc raises the threshold to the size of each large block freed, up to 32 MiB;
    from then on blocks of that size come from the heap, which shrinks only from its top.
    Under hostile traffic (frames up to max_frame_size, replies, buffers) the heap kept
    the high-water mark: RSS +91 MiB after a 60 s run of tests/test_fuzz.py, most of it
    free memory (malloc_trim gave it back); +72 MiB with the threshold fixed here, +51
    with MALLOC_MMAP_THRESHOLD_ from the start (one run each). dm and fanout measured
    the same with it (docs/benchmarks.md)."""
    if platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def _reload(server: Server, reload_config: Callable[[], Config]) -> None:
    systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={systemd.monotonic_usec()}")
    try:
        loaded = reload_config()
    except ConfigError as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
    else:
        changed = server.reload(loaded)
        logs.set_level(server.config.log_level)
        log.info("reloaded configuration; changed: %s", ", ".join(changed) or "nothing")
    systemd.notify("READY=1")
