"""The ``chatd`` command as a process: start-up, signals, errors, and the README's commands."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from chatd.client import Client
from tests.conftest import PASSWORD, ROOT, Process, Spawn, fast_env


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
