"""The ``chatd`` command as a process: start-up, signals, errors, and the README's commands."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from chatd import cli
from chatd.client import Client
from tests.conftest import PASSWORD, ROOT, Harness, Process, Spawn, fast_env


async def test_sigterm_finishes_in_flight_requests_and_exits_0(spawn: Spawn) -> None:
    server = await spawn()
    port = await server.wait_listening()
    alice = await Client.connect("127.0.0.1", port)
    for name in ("alice", "bob"):
        await alice.request(
            "/register", {"name": name, "password": PASSWORD, "password_repete": PASSWORD}
        )
    await alice.login("alice", PASSWORD)
    sends = [
        asyncio.create_task(alice.call("/send", {"name": "bob", "msg": f"m{i}"}))
        for i in range(200)
    ]
    await asyncio.sleep(0)  # the requests are written; stop while they are being handled
    assert await server.stop(signal.SIGTERM) == 0
    replies = await asyncio.gather(*sends, return_exceptions=True)
    acknowledged = [
        f"m{i}" for i, reply in enumerate(replies) if isinstance(reply, dict) and reply["code"] == 0
    ]
    assert acknowledged, "the request in flight at SIGTERM was not finished"
    await alice.close()
    assert b"stopped" in server.stderr

    # Every acknowledged message is on disk, and nothing else.
    again = await spawn()
    bob = await Client.connect("127.0.0.1", await again.wait_listening())
    await bob.login("bob", PASSWORD)
    received = (await bob.request("/receive"))["messages"].get("alice", [])
    assert received[: len(acknowledged)] == acknowledged
    assert len(received) <= 200
    await bob.close()
    assert await again.stop(signal.SIGINT) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], b"unrecognized arguments: --bogus"),
        (["--port", "seventy"], b"invalid int value"),
        (["--port", "70000"], b"port must be 0..65535"),
        (["--db", "/nonexistent/dir/chatd.sqlite3"], b"cannot open database"),
        (["--log-level", "LOUD"], b"log_level must be one of"),
        (["--reuse-port"], b"reuse_port needs a postgresql:// db: on SQLite chatd is one process"),
        (["--reuse-port", "--db", "postgresql://chatd@127.0.0.1:1/chatd"],
         b"reuse_port needs bus = redis://"),
    ],
)
async def test_bad_start_prints_one_line_and_exits_non_zero(
    spawn: Spawn, args: list[str], message: bytes
) -> None:
    server = await spawn(*args)
    async with asyncio.timeout(30):
        assert server.proc.stderr is not None
        stderr = await server.proc.stderr.read()
        status = await server.proc.wait()
    assert status != 0
    assert message in stderr
    assert stderr.count(b"\n") == 1, stderr


async def test_port_in_use_is_a_one_line_error(spawn: Spawn) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = await spawn("--port", str(taken.getsockname()[1]), "--log-level", "ERROR")
        async with asyncio.timeout(30):
            assert server.proc.stderr is not None
            stderr = await server.proc.stderr.read()
            assert await server.proc.wait() == 1
    assert b"cannot listen on 127.0.0.1:" in stderr and stderr.count(b"\n") == 1


async def test_environment_configures_and_flags_win(spawn: Spawn) -> None:
    env = fast_env(CHATD_MAX_MESSAGE_LENGTH="100")
    server = await spawn("--max-message-length", "5", env=env)
    port = await server.wait_listening()
    client = await Client.connect("127.0.0.1", port)
    await client.request(
        "/register", {"name": "a", "password": PASSWORD, "password_repete": PASSWORD}
    )
    await client.login("a", PASSWORD)
    assert (await client.call("/send", {"name": "a", "msg": "123456"}))["code"] == 7
    await client.close()
    assert await server.stop() == 0


def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    return [block.strip() for block in blocks[:2]]


def test_ci_runs_the_readmes_test_command() -> None:
    _, test_command = readme_commands()
    assert test_command in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
async def test_readmes_start_command_works_on_a_fresh_copy(tmp_path: Path) -> None:
    start_command, _ = readme_commands()
    clone = tmp_path / "clone"
    files = subprocess.run(  # noqa: ASYNC221 - a quick local git call before the real work
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    env = fast_env()
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 7777)) == 0:
            env["CHATD_PORT"] = "0"  # something else owns the default port on this machine
    proc = await asyncio.create_subprocess_shell(
        start_command, cwd=clone, env=env, stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL, start_new_session=True,
    )
    server = Process(proc)
    try:
        port = await server.wait_listening()
        assert port == 7777 or env.get("CHATD_PORT") == "0"
        client = await Client.connect("127.0.0.1", port)
        assert (await client.call("/ping"))["code"] == 0
        await client.close()
        assert (clone / "chatd.sqlite3").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        async with asyncio.timeout(30):
            await proc.wait()


def chatd_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatd", *args], capture_output=True, text=True, timeout=60,
        env=fast_env(), cwd=ROOT, check=False,
    )


def test_admin_help_lists_the_admin_commands_not_every_server_flag() -> None:
    shown = chatd_run("admin", "--help")
    assert shown.returncode == 0
    for command in ("users", "reset-password", "revoke-tokens", "delete-user"):
        assert re.search(rf"^\s+{command}\s+\w", shown.stdout, re.M), shown.stdout
    assert "--db DB" in shown.stdout
    for server_flag in ("--max-frame-size", "--ping-interval", "--tls-cert", "--port"):
        assert server_flag not in shown.stdout
    assert len(shown.stdout.splitlines()) < 40
    assert "--yes" in chatd_run("admin", "delete-user", "--help").stdout


def test_admin_without_a_command_names_them() -> None:
    done = chatd_run("admin")
    assert done.returncode == 2
    assert done.stderr == (
        "chatd admin: name a command: users, reset-password, revoke-tokens, delete-user"
        " (see chatd admin --help)\n"
    )


async def test_delete_user_without_yes_says_what_yes_is_for_and_deletes_nothing(
    harness: Harness,
) -> None:
    alice = await harness.user("alice")
    done = await asyncio.to_thread(
        chatd_run, "admin", "delete-user", "alice", "--db", harness.config.db
    )
    assert done.returncode == 2
    assert done.stderr == (
        "chatd admin delete-user: this deletes alice with every message they sent or"
        " received, their channel memberships and sessions, for good; add --yes to confirm\n"
    )
    assert (await alice.request("/user/info", {"name": "alice"}))["name"] == "alice"


async def test_the_metrics_address_is_logged_at_start_up(spawn: Spawn) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    server = await spawn("--metrics-port", str(metrics_port))
    await server.wait_listening()
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics".encode() in server.stderr
    assert await server.stop() == 0


async def test_metrics_without_the_extra_says_how_to_install_it(
    spawn: Spawn, tmp_path: Path
) -> None:
    # A prometheus_client that cannot be imported, as on an install without the extra.
    missing = tmp_path / "without-metrics" / "prometheus_client"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ImportError('not installed')\n")
    server = await spawn("--metrics-port", "9", env=fast_env(PYTHONPATH=str(missing.parent)))
    async with asyncio.timeout(30):
        assert server.proc.stderr is not None
        stderr = await server.proc.stderr.read()
        assert await server.proc.wait() == 1
    assert stderr.decode() == (
        "chatd: metrics_port needs prometheus-client: pip install 'chatd[metrics]'"
        " (in a clone: pip install -e '.[metrics]')\n"
    )


def first_steps() -> str:
    """The README's shell block that registers, logs in and uses the token."""
    section = (ROOT / "README.md").read_text().split("## First steps", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)\n```", section, re.S)
    (block,) = [b for b in blocks if "/register" in b]
    return str(block)


async def test_the_readmes_first_steps_register_then_log_in(harness: Harness) -> None:
    block = first_steps()
    requests = [json.loads(text) for text in re.findall(r"'(\{\"op\".*?\})'", block)]
    assert [r["op"] for r in requests] == ["/register", "/login"], "register before login"
    client = await harness.connect()
    replies = [await client.exchange(request) for request in requests]
    assert [reply["code"] for reply in replies] == [0, 0], replies
    # The pipeline that takes the token out of the login reply, run on a real one.
    (extract,) = re.findall(r"python3 -c '([^']*)'", block)
    taken = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", extract], input=json.dumps(replies[1]) + "\n",
        capture_output=True, text=True, timeout=30, check=True,
    )
    token = taken.stdout.strip()
    assert token == replies[1]["data"]["token"]
    assert "--token \"$TOKEN\"" in block
    bound = await harness.connect(token=token)
    assert (await bound.request("/channel/list")) == {"channels": []}


def test_the_mmap_threshold_is_fixed_on_glibc_unless_the_operator_set_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A moving threshold let the heap keep the high-water mark of hostile traffic
    # (chatd/cli.py, _tune_allocator); MALLOC_MMAP_THRESHOLD_ is glibc's own knob.
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert cli._tune_allocator() is (platform.libc_ver()[0] == "glibc")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert cli._tune_allocator() is False
