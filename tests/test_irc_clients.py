"""Real IRC clients against a real server: WeeChat (weechat-headless) and irssi (under
tmux), each talking to a msgpack user; skipped where the Debian packages are missing.

The clients run scripts of their own (WeeChat's /wait, irssi's startup file plus keys
sent through tmux); the assertions wait for events or poll files with bounded timeouts.
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from chatd.client import Client
from tests.conftest import MakeHarness
from tests.test_irc_live import free_port
from tests.test_live import events_of

WAIT = 60.0  # seconds: a bound on every wait on a client
CLIENT_PASSWORD = "irc-password"  # no spaces: both clients take it in a command line


async def until(condition: Callable[[], bool | Awaitable[bool]]) -> None:
    """Poll a condition (a log file's content, a user's presence) with a bounded timeout."""
    async with asyncio.timeout(WAIT):
        while True:
            result = condition()
            if await result if inspect.isawaitable(result) else result:
                return
            await asyncio.sleep(0.2)  # log files have no events to wait on


def text_of(directory: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in directory.rglob("*") if p.is_file())


async def bob_and_port(make_harness: MakeHarness) -> tuple[Client, int]:
    port = free_port()
    harness = await make_harness(irc_port=port, server_name="irc.test")
    await (await harness.user("alice", CLIENT_PASSWORD)).close()  # registered, not online
    bob = await harness.user("bob")
    await bob.request("/channel/join", {"name": "test"})
    await bob.request("/subscribe")
    return bob, port


async def reply_to_alice(bob: Client) -> int:
    """Wait for alice's private message, answer it; returns its id."""
    (dm,) = await events_of_within(bob, "message")
    assert dm["data"]["name"] == "alice"
    await bob.request("/send", {"name": "alice", "msg": "hi alice, from msgpack"})
    return int(dm["data"]["id"])


async def events_of_within(bob: Client, kind: str) -> list[dict[str, Any]]:
    async with asyncio.timeout(WAIT):
        while True:
            try:
                return await events_of(bob, 1, kind)
            except TimeoutError:
                continue  # the client is still starting: keep waiting, within WAIT


@pytest.mark.skipif(shutil.which("weechat-headless") is None, reason="weechat-headless missing")
async def test_weechat(make_harness: MakeHarness, tmp_path: Path) -> None:
    bob, port = await bob_and_port(make_harness)
    logs = tmp_path / "logs"

    async def weechat(commands: str) -> asyncio.subprocess.Process:
        script = (
            f"/set logger.file.path {logs}; /set logger.file.mask $plugin.$name.weechatlog;"
            f" /server add t 127.0.0.1/{port} -notls -nicks=alice -sasl_username=alice"
            f" -sasl_password={CLIENT_PASSWORD} -autojoin=#test; /connect t; {commands}"
        )
        return await asyncio.create_subprocess_exec(
            "weechat-headless", "--stdout", "--dir", str(tmp_path / "weechat"), "-r", script,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )

    first = await weechat(
        "/wait 3 /command -buffer irc.server.t irc /msg bob hi bob, from weechat;"
        " /wait 4 /command -buffer irc.server.t irc /msg #test hello channel, from weechat;"
        " /wait 15 /quit"
    )
    await reply_to_alice(bob)
    (said,) = await events_of_within(bob, "channel_message")
    assert said["data"]["msg"] == "hello channel, from weechat"
    async with asyncio.timeout(WAIT):
        assert await first.wait() == 0
    # WeeChat shows a /msg sent from the server buffer there, and opens bob's for the reply.
    assert "hi alice, from msgpack" in (logs / "irc.t.bob.weechatlog").read_text()
    assert "MSG(bob): hi bob, from weechat" in (logs / "irc.server.t.weechatlog").read_text()

    # Alice is gone: what bob says meanwhile is replayed on her next connect.
    await bob.request("/channel/send", {"name": "test", "message": "said while you were away"})
    second = await weechat("/wait 8 /quit")
    async with asyncio.timeout(WAIT):
        assert await second.wait() == 0
    channel = (logs / "irc.t.#test.weechatlog").read_text()
    assert "said while you were away" in channel


@pytest.mark.skipif(
    shutil.which("irssi") is None or shutil.which("tmux") is None, reason="irssi or tmux missing"
)
async def test_irssi(make_harness: MakeHarness, tmp_path: Path) -> None:
    bob, port = await bob_and_port(make_harness)
    home, logs = tmp_path / "irssi", tmp_path / "logs"
    home.mkdir()
    (home / "startup").write_text(
        "/set autolog on\n"
        f"/set autolog_path {logs}/$$tag/$$0.log\n"
        "/network add -sasl_mechanism plain -sasl_username alice"
        f" -sasl_password {CLIENT_PASSWORD} t\n"
        f"/server add -network t 127.0.0.1 {port}\n"
        "/channel add -auto #test t\n"
        "/connect t\n"
    )
    session = f"chatd-irssi-{port}"

    async def tmux(*args: str) -> None:
        process = await asyncio.create_subprocess_exec("tmux", *args)
        async with asyncio.timeout(WAIT):
            assert await process.wait() == 0

    async def alice_online() -> bool:
        info = await bob.request("/user/info", {"name": "alice"})
        return bool(info["online"])

    async def alice_offline() -> bool:
        return not await alice_online()

    await tmux("new-session", "-d", "-s", session, "-x", "200", "-y", "50", f"irssi --home={home}")
    try:
        await until(lambda: "#test" in text_of(logs))
        await until(alice_online)
        await tmux("send-keys", "-t", session, "/msg bob hi bob, from irssi", "Enter")
        await reply_to_alice(bob)
        await until(lambda: "hi alice, from msgpack" in text_of(logs))
        await tmux("send-keys", "-t", session, "/quit", "Enter")
        await until(alice_offline)
    finally:
        await kill_session(session)

    await bob.request("/channel/send", {"name": "test", "message": "said while irssi was away"})
    await tmux("new-session", "-d", "-s", session, f"irssi --home={home}")
    try:
        await until(lambda: "said while irssi was away" in text_of(logs))
    finally:
        await kill_session(session)


async def kill_session(session: str) -> None:
    """End the tmux session if it still runs (irssi's /quit ends it by itself)."""
    process = await asyncio.create_subprocess_exec(
        "tmux", "kill-session", "-t", session, stderr=asyncio.subprocess.DEVNULL
    )
    async with asyncio.timeout(WAIT):
        await process.wait()
