"""Running chatd as a service: settings, logs, /stats, metrics, reload, backup, admin."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import socket
import sqlite3
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

from chatd import config as settings
from chatd.client import Client
from chatd.config import Config, ConfigError
from chatd.errors import NotAuthenticated
from tests.conftest import PASSWORD, Harness, MakeHarness, Spawn, fast_env


def test_layers_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "chatd.toml"
    path.write_text('port = 1000\nhost = "0.0.0.0"\nidle_timeout = 5\nlog_level = "DEBUG"\n')
    config = settings.load({"port": 3000}, {"CHATD_PORT": "2000", "CHATD_IDLE_TIMEOUT": "7.5"},
                           str(path))
    assert (config.port, config.host, config.idle_timeout, config.log_level) == (
        3000, "0.0.0.0", 7.5, "DEBUG"
    )
    assert settings.load({}, {}, str(path)).port == 1000
    assert settings.load({}, {"CHATD_PORT": "2000"}, str(path)).port == 2000


@pytest.mark.parametrize(
    ("toml", "environ", "message"),
    [
        ("port = \"x\"\n", {}, "port: expected an integer"),
        ("prot = 1\n", {}, "unknown setting 'prot'"),
        ("port = 70000\n", {}, "port must be 0..65535"),
        ("idle_timeout = -1\n", {}, "idle_timeout must be at least"),
        ("log_format = \"xml\"\n", {}, "log_format must be one of"),
        ("port = true\n", {}, "port: expected an integer"),
        ("[section]\n", {}, "unknown setting 'section'"),
        ("port = \n", {}, "not valid TOML"),
        ("", {"CHATD_RECEIVE_BATCH": "lots"}, "CHATD_RECEIVE_BATCH: expected an integer"),
        ("", {"CHATD_DB_SYNCHRONOUS": "OFF"}, "db_synchronous must be one of"),
    ],
)
def test_invalid_settings_name_the_setting_and_why(
    tmp_path: Path, toml: str, environ: dict[str, str], message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        settings.load({}, environ, str(path))


def test_print_config_round_trips_through_config_file(tmp_path: Path) -> None:
    changed = Config(port=1234, db="/var/lib/chatd/x.sqlite3", token_ttl=60.0, log_format="json")
    path = tmp_path / "printed.toml"
    path.write_text(settings.to_toml(changed))
    assert tomllib.loads(path.read_text())["port"] == 1234
    assert settings.load({}, {}, str(path)) == changed


async def test_print_config_and_a_bad_config_file_from_the_command_line(
    spawn: Spawn, tmp_path: Path
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("max_message_length = 77\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatd", "--config", str(path), "--print-config",
        stdout=asyncio.subprocess.PIPE, env=fast_env(CHATD_PORT="4321"),
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    printed = tomllib.loads(out.decode())
    assert (printed["max_message_length"], printed["port"], printed["argon2_time_cost"]) == (
        77, 4321, 1
    )
    path.write_text("max_message_length = 0\n")
    server = await spawn("--config", str(path))
    assert server.proc.stderr is not None
    async with asyncio.timeout(30):
        err = await server.proc.stderr.read()
        assert await server.proc.wait() == 2
    assert err.decode().strip() == "chatd: max_message_length must be at least 1, got 0"


async def test_json_logs_never_contain_passwords_or_tokens(spawn: Spawn) -> None:
    server = await spawn("--log-format", "json", "--log-level", "DEBUG")
    port = await server.wait_listening()
    client = await Client.connect("127.0.0.1", port)
    await client.request("/register", {"name": "ann", "password": PASSWORD,
                                       "password_repete": PASSWORD})
    token = await client.login("ann", PASSWORD)
    await client.call("/login", {"name": "ann", "password": "wrong password"})
    await client.call("/nope")
    await client.close()
    assert await server.stop() == 0
    entries = [json.loads(line) for line in server.stderr.decode().splitlines()]
    messages = [e["message"] for e in entries]
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any(m.startswith("login ann from 127.0.0.1") for m in messages)
    assert any("failed login for 'ann'" in m for m in messages)
    assert any("/nope -> error 1" in m for m in messages)
    assert any("/register -> 0" in m for m in messages)  # the debug request log
    assert any(m.startswith("connection closed") for m in messages)
    text = server.stderr.decode()
    assert PASSWORD not in text and token not in text and "wrong password" not in text


async def test_stats_reports_the_server_load(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    await bob.request("/subscribe")
    for i in range(3):
        await alice.request("/send", {"name": "bob", "msg": f"m{i}"})
    for _ in range(3):
        await bob.next_event(timeout=5)
    stats = await alice.request("/stats")
    assert stats["connections"] == 2 and stats["users_online"] == 2
    assert stats["subscribed"] == 1 and stats["messages_stored"] == 3
    assert stats["pushes_sent"] >= 3 and stats["messages_per_second"] > 0
    assert stats["uptime"] >= 0 and stats["requests"] >= 8
    assert {"queued_bytes", "catching_up", "sessions"} <= stats.keys()
    anonymous = await harness.connect()
    assert (await anonymous.call("/stats"))["code"] == 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_prometheus_metrics(make_harness: MakeHarness) -> None:
    port = free_port()
    harness = await make_harness(metrics_port=port)
    alice = await harness.user("alice")
    await alice.request("/send", {"name": "alice", "msg": "hi"})
    await alice.call("/no/such/op")
    await alice.close()

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    text = await asyncio.to_thread(scrape)
    assert 'chatd_requests_total{code="0",op="/login"} 1.0' in text
    assert 'chatd_requests_total{code="1",op="unknown"} 1.0' in text  # no label per junk op
    assert 'chatd_messages_stored_total{kind="private"} 1.0' in text
    assert "chatd_request_seconds_bucket" in text and "chatd_connections" in text
    assert "chatd_pushes_sent_total" in text and "chatd_disconnects_total" in text


async def test_sighup_reloads_limits_and_log_level(spawn: Spawn, tmp_path: Path) -> None:
    path = tmp_path / "live.toml"
    path.write_text('max_message_length = 5\nlog_level = "INFO"\nmax_channels_per_user = 1\n')
    server = await spawn("--config", str(path))
    port = await server.wait_listening()
    client = await Client.connect("127.0.0.1", port)
    await client.request("/register", {"name": "ann", "password": PASSWORD,
                                       "password_repete": PASSWORD})
    await client.login("ann", PASSWORD)
    assert (await client.call("/send", {"name": "ann", "msg": "123456"}))["code"] == 7
    await client.request("/channel/join", {"name": "a"})
    assert (await client.call("/channel/join", {"name": "b"}))["code"] == 6
    path.write_text('max_message_length = 50\nlog_level = "DEBUG"\nmax_frame_size = 999\n')
    server.proc.send_signal(signal.SIGHUP)
    assert server.proc.stderr is not None
    async with asyncio.timeout(10):
        while b"reloaded configuration" not in server.stderr:
            server.stderr += await server.proc.stderr.readline()
    assert b"max_frame_size changed but needs a restart" in server.stderr
    assert (await client.call("/send", {"name": "ann", "msg": "123456"}))["code"] == 0
    await client.request("/channel/join", {"name": "b"})  # back to the default cap
    await client.close()
    assert await server.stop() == 0
    assert b"/send -> 0" in server.stderr  # DEBUG took effect too


async def test_sighup_in_a_terminal_stops_the_server(spawn: Spawn) -> None:
    # Run from a terminal, SIGHUP means the terminal went away (its window closed): the
    # server stops gracefully, rather than reloading and running on orphaned.
    terminal, side = pty.openpty()
    try:
        server = await spawn(stdin=side)
        await server.wait_listening()
        assert await server.stop(signal.SIGHUP) == 0
    finally:
        os.close(terminal)
        os.close(side)
    assert b"shutting down" in server.stderr
    assert b"reloaded configuration" not in server.stderr


async def chatd_command(*args: str, stdin: str = "") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatd", *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=fast_env(),
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate(stdin.encode())
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_online_backup_is_a_consistent_copy(harness: Harness, tmp_path: Path) -> None:
    alice = await harness.user("alice")
    await harness.user("bob")
    for i in range(20):
        await alice.request("/send", {"name": "bob", "msg": f"m{i}"})
    target = tmp_path / "backup.sqlite3"
    status, _, err = await chatd_command("backup", str(target), "--db", harness.config.db)
    assert status == 0, err
    with sqlite3.connect(target) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("SELECT COUNT(*) FROM private_messages").fetchone() == (20,)
    status, _, err = await chatd_command("backup", str(target), "--db", harness.config.db)
    assert status == 1 and "exists" in err
    # The copy is a working database: a server on it has the users and messages.
    await harness.restart(db=str(target))
    bob = await harness.connect()
    await bob.login("bob", PASSWORD)
    assert len((await bob.request("/receive"))["messages"]["alice"]) == 20


async def test_admin_lists_users_and_revokes_tokens_of_live_sessions(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(token_recheck=0)
    alice = await harness.user("alice")
    await harness.user("bob")
    db = harness.config.db
    status, out, _ = await chatd_command("admin", "users", "--db", db)
    assert status == 0
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["alice", "bob"]
    status, out, _ = await chatd_command("--db", db, "admin", "revoke-tokens", "ALICE")
    assert status == 0 and "1 session token(s) of alice revoked" in out
    with pytest.raises(NotAuthenticated):
        await alice.request("/user/info", {"name": "bob"})
    status, _, err = await chatd_command("admin", "revoke-tokens", "nobody", "--db", db)
    assert status == 1 and "no user named 'nobody'" in err


async def test_revoked_sessions_that_only_listen_stop_receiving(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(token_recheck=0)  # the sweep then runs every second
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    await bob.request("/subscribe")
    status, _, _ = await chatd_command("admin", "revoke-tokens", "bob", "--db", harness.config.db)
    assert status == 0
    async with asyncio.timeout(10):  # polling the server: there is no event to wait for
        while (await alice.request("/user/info", {"name": "bob"}))["online"]:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    await alice.request("/send", {"name": "bob", "msg": "you should not see this pushed"})
    with pytest.raises(TimeoutError):
        await bob.next_event(timeout=0.3)


async def test_admin_resets_a_password(make_harness: MakeHarness) -> None:
    harness = await make_harness(token_recheck=0)
    alice = await harness.user("alice")
    db = harness.config.db
    status, out, _ = await chatd_command(
        "admin", "reset-password", "alice", "--db", db, stdin="a brand new password\n"
    )
    assert status == 0 and "1 session token(s) revoked" in out
    with pytest.raises(NotAuthenticated):
        await alice.request("/channel/list")
    fresh = await harness.connect()
    assert (await fresh.call("/login", {"name": "alice", "password": PASSWORD}))["code"] == 3
    await fresh.login("alice", "a brand new password")
    status, _, err = await chatd_command(
        "admin", "reset-password", "alice", "--db", db, stdin="short\n"
    )
    assert status == 1 and "8 to 1024 characters" in err


async def test_admin_deletes_a_user_and_their_data(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    await alice.request("/send", {"name": "bob", "msg": "from alice"})
    await alice.request("/channel/send", {"name": "dev", "message": "alice was here"})
    await bob.request("/channel/send", {"name": "dev", "message": "bob too"})
    db = harness.config.db
    status, _, err = await chatd_command("admin", "delete-user", "alice", "--db", db)
    assert status == 2 and "--yes" in err
    status, out, _ = await chatd_command("admin", "delete-user", "alice", "--yes", "--db", db)
    assert status == 0 and "deleted alice" in out
    assert (await bob.request("/receive"))["messages"] == {}
    history = await bob.request("/channel/history", {"name": "dev"})
    assert [m["msg"] for m in history["messages"]] == ["bob too"]
    assert (await bob.call("/user/info", {"name": "alice"}))["code"] == 5
    assert (await bob.request("/channel/list_users", {"name": "dev"}))["users"] == [
        {"name": "bob", "online": True}
    ]
    # The name is free again.
    newcomer = await harness.connect()
    await newcomer.request("/register", {"name": "alice", "password": PASSWORD,
                                         "password_repete": PASSWORD})


async def test_admin_refuses_a_missing_database(tmp_path: Path) -> None:
    missing = str(tmp_path / "typo.sqlite3")
    status, _, err = await chatd_command("admin", "users", "--db", missing)
    assert status == 1 and "no database" in err
    # A typo must not create an empty database.
    assert not await asyncio.to_thread(Path(missing).exists)
