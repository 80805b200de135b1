"""Every setting chatd has, in one typed, frozen dataclass, and where settings come from.

Defaults live here and nowhere else.  They are overridden, in this order, by a
TOML file (``--config``), by ``CHATD_<SETTING>`` environment variables and by
command-line flags; the flags and variables are derived from the field list
below, so a new setting is one new line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chatd.limits import Networks

ENV_PREFIX = "CHATD_"

KIB = 1024
MIB = 1024 * KIB
SECONDS = 1.0
DAYS = 86400 * SECONDS


def _setting(default: Any, help: str, minimum: float | None = None) -> Any:
    return field(default=default, metadata={"help": help, "minimum": minimum})


@dataclass(frozen=True)
class Config:
    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(7777, "TCP port to listen on (0 picks a free one)", 0)
    db: str = _setting("./chatd.sqlite3", "SQLite database file, or a postgresql:// URL")
    db_synchronous: str = _setting(
        "NORMAL", "NORMAL survives a crash of chatd; FULL also survives power loss"
    )
    db_busy_timeout: float = _setting(
        5 * SECONDS, "how long a write waits for another process's database lock", 0
    )
    db_checkpoint_interval: float = _setting(
        1 * SECONDS, "seconds between background WAL checkpoints (0: SQLite's own, in commits)", 0
    )
    db_wal_limit: int = _setting(
        16 * MIB,
        "bytes of WAL past which writes wait briefly while it is checkpointed and started"
        " over (the WAL file stays under twice this)",
        64 * KIB,
    )
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = _setting("text", "text (one line per event) or json (JSON lines)")
    metrics_host: str = _setting("127.0.0.1", "address of the Prometheus metrics endpoint")
    metrics_port: int = _setting(0, "port of the Prometheus metrics endpoint (0: off)", 0)
    event_loop: str = _setting("auto", "auto (uvloop when installed), asyncio or uvloop")

    # The IRC front-end (protocol.md, "IRC").
    irc_port: int = _setting(0, "TCP port of the IRC listener (0: off; 6667 is usual)", 0)
    irc_tls_port: int = _setting(
        0, "TLS port of the IRC listener, with tls_cert/tls_key (0: off; 6697 is usual)", 0
    )
    server_name: str = _setting(socket.gethostname(), "the server's name in IRC replies")
    irc_guests: bool = _setting(
        False, "let IRC clients that do not log in talk as guests under their nick"
    )
    min_password_length: int = _setting(8, "shortest password a new account may have", 1)

    # Several nodes (README, "Running several nodes").
    bus: str = _setting(
        "local", "local (one node, in-process) or redis://host:port/N (several nodes)"
    )
    node_id: str = _setting(
        "", "this node's name in logs, metrics and presence (default: host name-pid)"
    )
    reuse_port: bool = _setting(
        False,
        "share the listening ports (msgpack and IRC) with other nodes on this host"
        " (SO_REUSEPORT; needs a postgresql:// db and a redis:// bus)",
    )
    bus_position_check: float = _setting(
        2 * SECONDS, "seconds between checks of every followed stream's newest seq (bus only)", 0.05
    )
    presence_ttl: float = _setting(
        30 * SECONDS,
        "seconds a node's presence entries outlive it (refreshed every third of this)",
        0.3,
    )

    # Wire limits (protocol.md, "Names and limits").
    max_frame_size: int = _setting(64 * KIB, "largest frame body accepted, in bytes", 16)
    max_message_length: int = _setting(4096, "longest message text, in characters", 1)
    receive_batch: int = _setting(1000, "most messages one /receive or /channel/receive returns", 1)
    channel_backlog: int = _setting(50, "messages a first /channel/receive returns", 0)
    history_page: int = _setting(200, "most messages one /history or /channel/history returns", 1)
    # Each membership is a stream every /subscribe catches up and every IRC login replays.
    max_channels_per_user: int = _setting(100, "channels one user may be a member of at once", 1)

    # Accounts.
    token_ttl: float = _setting(30 * DAYS, "session token lifetime, in seconds", 1)
    token_recheck: float = _setting(
        60 * SECONDS, "how often a bound connection re-checks its token is not revoked", 0
    )
    # argon2id, RFC 9106 section 4 "second recommended option" (argon2-cffi's default).
    argon2_time_cost: int = _setting(3, "argon2id iterations", 1)
    argon2_memory_cost: int = _setting(64 * KIB, "argon2id memory, in KiB", 8)
    argon2_parallelism: int = _setting(4, "argon2id lanes", 1)
    hash_workers: int = _setting(2, "password hashes computed at once (threads)", 1)

    # Flood control (protocol.md, "Names and limits").
    message_rate: float = _setting(20.0, "messages a user may send per second, sustained", 0.001)
    message_burst: int = _setting(50, "messages a user may send at once before the rate", 1)
    abuse_limit: int = _setting(
        100, "rate-limited requests one connection may make before it is closed", 1
    )
    # Joins and leaves share a bucket; acks follow incoming traffic, so they get their own,
    # above the message rate (protocol.md, "Flood control").
    membership_rate: float = _setting(
        1.0, "channel joins and leaves a user may make per second, sustained", 0.001
    )
    membership_burst: int = _setting(50, "channel joins and leaves a user may make at once", 1)
    ack_rate: float = _setting(50.0, "/ack requests a user may make per second, sustained", 0.001)
    ack_burst: int = _setting(200, "/ack requests a user may make at once", 1)
    subscribe_rate: float = _setting(
        1.0, "/subscribe requests a user may make per second, sustained", 0.001
    )
    subscribe_burst: int = _setting(20, "/subscribe requests a user may make at once", 1)
    login_free_failures: int = _setting(
        3, "failed logins per name and address before each further guess waits 1 s, 2 s, 4 s...", 0
    )
    login_max_delay: float = _setting(300.0, "longest wait imposed after failed logins", 1)
    login_name_concurrency: int = _setting(
        2, "logins for one name whose password is being checked at once", 1
    )
    register_rate: float = _setting(0.2, "registrations per second from one address", 0.001)
    register_burst: int = _setting(10, "registrations at once from one address", 1)
    hash_queue: int = _setting(64, "password hashes waiting at most; beyond: code 8", 1)
    max_connections: int = _setting(10000, "open connections in all", 1)
    max_connections_per_address: int = _setting(
        32, "open connections from one IPv4 address or IPv6 /64", 1
    )
    trusted_networks: str = _setting(
        "127.0.0.0/8,::1/128", "comma-separated ranges exempt from per-address limits"
    )

    # TLS: both files, or neither.
    tls_cert: str = _setting("", "PEM certificate chain: serve TLS instead of plain TCP")
    tls_key: str = _setting("", "PEM private key of tls_cert")

    # Connections.
    frame_timeout: float = _setting(
        30 * SECONDS, "close a connection that leaves a frame unfinished this long", 0.01
    )
    auth_timeout: float = _setting(
        120 * SECONDS, "close a connection not logged in (or token-bound) after this long", 0.01
    )
    idle_timeout: float = _setting(300 * SECONDS, "close a connection silent this long", 0.01)
    write_timeout: float = _setting(
        30 * SECONDS, "close a client that reads no reply for this long", 0.01
    )
    graceful_timeout: float = _setting(10 * SECONDS, "time in-flight requests get at shutdown", 0)
    ping_interval: float = _setting(
        60 * SECONDS, "ping a subscribed connection silent this long", 0.01
    )
    ping_timeout: float = _setting(30 * SECONDS, "close it if the ping gets no answer", 0.01)
    # Ergo drops at 96 KiB queued, Centrifugo at 1 MiB (shared/design/peers.md).
    max_outbound_buffer: int = _setting(
        1024 * KIB, "bytes queued to a client that does not read before it is dropped", 1
    )
    catch_up_queue: int = _setting(
        1000, "live messages held per stream while a subscription catches up", 0
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            minimum = f.metadata.get("minimum")
            value = getattr(self, f.name)
            if minimum is not None and value < minimum:
                raise ValueError(f"{f.name} must be at least {minimum}, got {value}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.argon2_memory_cost < 8 * self.argon2_parallelism:
            raise ValueError("argon2_memory_cost must be at least 8 KiB per lane")
        _check_choice("log_level", self.log_level.upper(), ("DEBUG", "INFO", "WARNING", "ERROR"))
        _check_choice("db_synchronous", self.db_synchronous, ("NORMAL", "FULL"))
        _check_choice("log_format", self.log_format, ("text", "json"))
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        try:
            Networks(self.trusted_networks)
        except ValueError as exc:
            raise ValueError(f"trusted_networks: {exc}") from None
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0..65535, got {self.metrics_port}")
        _check_choice("event_loop", self.event_loop, ("auto", "asyncio", "uvloop"))
        for name in ("irc_port", "irc_tls_port"):
            if getattr(self, name) > 65535:
                raise ValueError(f"{name} must be 0..65535, got {getattr(self, name)}")
        if self.irc_tls_port and not self.tls_cert:
            raise ValueError("irc_tls_port needs tls_cert and tls_key")
        if not self.server_name or " " in self.server_name:
            raise ValueError(f"server_name must be one word, got {self.server_name!r}")
        if self.bus != "local" and not self.bus.startswith(REDIS_SCHEMES):
            raise ValueError(f"bus must be local or a redis:// URL, got {self.bus!r}")
        if self.reuse_port and not self.db.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                "reuse_port needs a postgresql:// db: on SQLite chatd is one process (the"
                " database's .lock file refuses a second server), so there is no other"
                " node to share the port with"
            )
        if self.reuse_port and self.bus == "local":
            raise ValueError(
                "reuse_port needs bus = redis://...: nodes sharing a port must tell each"
                " other what they commit"
            )
        if any(c.isspace() or c in "|/" for c in self.node_id):
            raise ValueError(f"node_id may not hold spaces, '|' or '/', got {self.node_id!r}")


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def node_name(config: Config) -> str:
    """The node's name: ``node_id`` if set, else host name and process id."""
    return config.node_id or f"{socket.gethostname()}-{os.getpid()}"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it and says why."""


FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# What SIGHUP may change in a running server; the rest needs a restart.
RELOADABLE = frozenset(
    {
        "log_level",
        "message_rate",
        "message_burst",
        "abuse_limit",
        "login_free_failures",
        "login_max_delay",
        "login_name_concurrency",
        "membership_rate",
        "membership_burst",
        "ack_rate",
        "ack_burst",
        "subscribe_rate",
        "subscribe_burst",
        "register_rate",
        "register_burst",
        "max_connections",
        "max_connections_per_address",
        "trusted_networks",
        "frame_timeout",
        "auth_timeout",
        "max_message_length",
        "receive_batch",
        "channel_backlog",
        "history_page",
        "max_channels_per_user",
        "token_ttl",
        "token_recheck",
        "idle_timeout",
        "write_timeout",
        "ping_interval",
        "ping_timeout",
        "max_outbound_buffer",
        "catch_up_queue",
    }
)


def load(
    overrides: Mapping[str, Any],
    environ: Mapping[str, str],
    path: str | None = None,
) -> Config:
    """Defaults < TOML file < environment < ``overrides`` (the flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_toml(path))
    values.update(read_environment(environ))
    values.update(overrides)
    try:
        return Config(**values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in FIELDS:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        values[key] = _checked(key, value, f"{path}: {key}")
    return values


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in FIELDS:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = parse_value(name, raw, ENV_PREFIX + name.upper())
    return values


def parse_value(name: str, raw: str, where: str) -> Any:
    """A setting's value from text (environment or flag)."""
    kind: type[Any] = type(FIELDS[name].default)
    if kind is bool:
        if raw.lower() in _TRUE or raw.lower() in _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"{where}: expected {_KIND_NAMES[kind]}, got {raw!r}")
    try:
        return kind(raw) if kind in (int, float) else raw
    except ValueError:
        raise ConfigError(f"{where}: expected {_KIND_NAMES[kind]}, got {raw!r}") from None


def _checked(name: str, value: Any, where: str) -> Any:
    kind = type(FIELDS[name].default)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise ConfigError(f"{where}: expected {_KIND_NAMES[kind]}, got {value!r}")
    return value


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def to_toml(config: Config) -> str:
    """The effective configuration as a TOML file that ``--config`` accepts."""
    lines = []
    for name, f in FIELDS.items():
        value = getattr(config, name)
        rendered = json.dumps(value) if isinstance(value, str | bool) else repr(value)
        lines.append(f"# {f.metadata['help']}")
        lines.append(f"{name} = {rendered}")
    return "\n".join(lines) + "\n"
