"""chatcat as a person uses it: typed into a real terminal (tmux), read off the screen.

Each test starts chatcat in a tmux pane of its own tmux server, sends keys, and polls
``capture-pane`` until the expected text is on the screen (bounded, never a fixed sleep).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatd.client import Client
from tests.conftest import PASSWORD, Harness, Spawn

ROOT = Path(__file__).resolve().parent.parent
CHATCAT = f"{sys.executable} {ROOT / 'scripts' / 'chatcat'}"
TIME = r"\d\d:\d\d"

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None,
    reason="tmux is not installed (.ci/run installs it): chatcat's terminal tests need it",
)


class Pane:
    """One chatcat in a tmux window: keys in, screen out."""

    def __init__(self, tmux: Tmux, name: str) -> None:
        self.tmux, self.name = tmux, name

    async def keys(self, *keys: str, literal: bool = True) -> None:
        for key in keys:
            await self.tmux.run("send-keys", "-t", self.name, *(["-l"] if literal else []), key)

    async def line(self, text: str) -> None:
        """Type a line and press Enter."""
        await self.keys(text)
        await self.keys("Enter", literal=False)

    async def screen(self) -> str:
        # -J joins wrapped lines but keeps trailing spaces: strip those.
        text = await self.tmux.run("capture-pane", "-p", "-J", "-t", self.name)
        return "\n".join(line.rstrip() for line in text.splitlines())

    async def expect(self, pattern: str, timeout: float = 30) -> str:
        """Wait until ``pattern`` (a regular expression) is on the screen; the screen."""
        screen = ""
        try:
            async with asyncio.timeout(timeout):
                # Polled: a terminal has no event for "this text is on the screen now".
                while not re.search(pattern, screen := await self.screen(), re.M):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"{pattern!r} not on the screen:\n{screen}") from None
        return screen

    async def exit_status(self) -> int:
        """chatcat's exit status, which the shell around it prints (tmux may be slow to reap
        a pane's process, so ``#{pane_dead}`` is not dependable)."""
        screen = await self.expect(r"^chatcat exited with status \d+$")
        return int(re.findall(r"^chatcat exited with status (\d+)$", screen, re.M)[-1])


class Tmux:
    """A private tmux server (its own socket), killed at the end of the test."""

    def __init__(self, socket: Path, config: Path) -> None:
        self.socket, self.config = socket, config

    async def run(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "tmux", "-S", str(self.socket), "-f", str(self.config), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {err.decode().strip()}")
        return out.decode()

    async def chatcat(self, name: str, port: int, *, positional: bool = False) -> Pane:
        # TZ: the screen shows local time; a fixed zone keeps the test independent of the host.
        where = f"127.0.0.1 {port}" if positional else f"--host 127.0.0.1 --port {port}"
        command = f"{CHATCAT} {where}; echo chatcat exited with status $?"
        await self.run(
            "new-session", "-d", "-s", name, "-x", "120", "-y", "40",
            "-e", "TZ=UTC", "-e", "PROMPT_TOOLKIT_NO_CPR=1", command,
        )
        pane = Pane(self, name)
        await pane.expect("/help lists the commands")
        return pane


@pytest.fixture
async def tmux(tmp_path: Path) -> AsyncIterator[Tmux]:
    config = tmp_path / "tmux.conf"
    # remain-on-exit: the pane stays after chatcat exits, to read its exit status off it.
    config.write_text("set -g remain-on-exit on\nset -g status off\n")
    server = Tmux(tmp_path / "tmux.socket", config)
    yield server
    await server.run("kill-server")


async def register(port: int, *names: str) -> None:
    client = await Client.connect("127.0.0.1", port, timeout=10)
    try:
        for name in names:
            params = {"name": name, "password": PASSWORD, "password_repete": PASSWORD}
            await client.request("/register", params)
    finally:
        await client.close()


async def test_two_users_talk_while_one_is_typing(harness: Harness, tmux: Tmux) -> None:
    alice = await tmux.chatcat("alice", harness.port)
    # Registration as a newcomer does it: the password asked for twice, never shown.
    await alice.line("/register alice")
    await alice.expect("^password:$")
    await alice.line(PASSWORD)
    await alice.expect("^again:$")
    await alice.line(PASSWORD)
    await alice.expect("registered alice")
    await alice.line(f"/login alice {PASSWORD}")  # the rest of the line, spaces included
    await alice.expect("logged in as alice")
    await alice.line("/join #lobby")
    await alice.expect("^#lobby>$")

    await register(harness.port, "bob")
    bob = await tmux.chatcat("bob", harness.port)
    await bob.line("/login bob")
    await bob.expect("^password:$")
    await bob.line(PASSWORD)
    await bob.line("/join lobby")
    await bob.expect("^#lobby>$")
    await bob.line("hello alice")
    await bob.expect(rf"^{TIME} \[lobby\] bob: hello alice$")  # own lines like any other

    await alice.expect(rf"^{TIME} \[lobby\] bob: hello alice$")
    await alice.keys("I am typing a long line that is not fini")
    await alice.expect("^#lobby> I am typing a long line that is not fini$")
    await bob.line("are you there?")
    screen = await alice.expect(rf"^{TIME} \[lobby\] bob: are you there\?$")
    # The half-typed line is intact, alone on the input line below the message.
    assert screen.rstrip().splitlines()[-1] == "#lobby> I am typing a long line that is not fini"
    await alice.line("shed")
    await bob.expect(rf"^{TIME} \[lobby\] alice: I am typing a long line that is not finished$")
    await alice.expect(rf"^{TIME} \[lobby\] alice: I am typing a long line that is not finished$")

    # No password anywhere on either screen, and none in the Up-arrow history.
    for pane in (alice, bob):
        assert PASSWORD not in (await pane.screen()).replace(f"/login alice {PASSWORD}", "")
    await alice.keys("C-u", "Up", "Up", "Up", literal=False)
    await alice.expect("^#lobby> /login alice$")
    await alice.keys("C-u", literal=False)
    await alice.line("/quit")
    assert await alice.exit_status() == 0


async def test_a_server_restart_mid_chat(spawn: Spawn, tmux: Tmux) -> None:
    server = await spawn()
    port = await server.wait_listening()
    await register(port, "alice", "bob")
    alice = await tmux.chatcat("alice", port, positional=True)
    await alice.line(f"/login alice {PASSWORD}")
    await alice.line("/join lobby")
    await alice.expect("^#lobby>$")
    await alice.line("before the restart")
    await alice.expect(r"\[lobby\] alice: before the restart$")

    assert await server.stop() == 0
    # Noticed when it happens, without a key pressed.
    await alice.expect("connection to 127.0.0.1:.* lost: reconnecting")
    await alice.line("typed while the server was down")
    await alice.expect('not connected: your line "typed while the server was do…" will go '
                       "out once reconnected$")
    server = await spawn("--port", str(port))
    await server.wait_listening()
    await alice.expect(r"reconnected to 127.0.0.1:\d+ \(session and subscription resumed\)", 90)
    await alice.expect(rf"^{TIME} \[lobby\] alice: typed while the server was down$")

    bob = await Client.connect("127.0.0.1", port, timeout=10)
    try:
        await bob.login("bob", PASSWORD)
        await bob.request("/channel/join", {"name": "lobby"})
        history = await bob.request("/channel/history", {"name": "lobby"})
        texts = [m["msg"] for m in history["messages"]]
        assert texts == ["before the restart", "typed while the server was down"]  # once
        await bob.request("/channel/send", {"name": "lobby", "message": "welcome back"})
        await alice.expect(rf"^{TIME} \[lobby\] bob: welcome back$")  # the subscription too
    finally:
        await bob.close()
    await alice.line("/quit")
    assert await alice.exit_status() == 0



async def test_ctrl_c_clears_the_line_and_ctrl_d_quits(harness: Harness, tmux: Tmux) -> None:
    await register(harness.port, "carol")
    carol = await tmux.chatcat("carol", harness.port)
    await carol.line("/login carol")
    await carol.expect("^password:$")
    await carol.keys("C-c", literal=False)  # gives up the password: nothing sent
    await carol.expect("no password: nothing sent$")
    await carol.keys("half a line")
    await carol.expect("^> half a line$")
    await carol.keys("C-c", literal=False)
    await carol.expect("^>$")  # the line is cleared, chatcat goes on
    await carol.keys("C-d", literal=False)
    assert await carol.exit_status() == 0


async def test_output_to_a_pipe_reads_plain_lines_from_the_terminal(
    harness: Harness, tmux: Tmux
) -> None:
    await register(harness.port, "dave")
    # stdout is a pipe, stdin the terminal: plain line input, getpass for the password.
    command = (f"{CHATCAT} 127.0.0.1 {harness.port} | cat; "
               "echo chatcat exited with status $?")
    await tmux.run("new-session", "-d", "-s", "dave", "-x", "120", "-y", "40",
                   "-e", "TZ=UTC", command)
    dave = Pane(tmux, "dave")
    await dave.expect("/help lists the commands")
    await dave.line("/login dave")
    await dave.expect("^password:$")
    await dave.keys("C-d", literal=False)  # the end of input at the password prompt
    await dave.expect("no password: nothing sent$")
    await dave.line("/login dave")
    await dave.line(PASSWORD)
    await dave.expect(f"^{TIME} logged in as dave")
    assert PASSWORD not in await dave.screen()  # getpass did not echo it
    await dave.keys("C-d", literal=False)  # the end of input ends the session
    assert await dave.exit_status() == 0
