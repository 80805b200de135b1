"""chatcat against a real server: pipe mode, one-shot mode, and interactive mode on a pty."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatd.chatcat import UsageError, parse_params, split_words
from chatd.shell import describe
from tests.conftest import PASSWORD, Harness

ROOT = Path(__file__).resolve().parent.parent
CHATCAT = [sys.executable, str(ROOT / "scripts" / "chatcat")]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[a-zA-Z]|\x1b[=>]")


async def chatcat(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> tuple[int, list[Any], str]:
    proc = await asyncio.create_subprocess_exec(
        *CHATCAT,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate(stdin.encode())
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert proc.returncode is not None
    return proc.returncode, lines, err.decode()


def requests(*bodies: dict[str, Any]) -> str:
    return "".join(json.dumps(body) + "\n" for body in bodies)


REGISTER = {
    "op": "/register",
    "params": {"name": "ann", "password": PASSWORD, "password_repete": PASSWORD},
}
LOGIN = {"op": "/login", "params": {"name": "ann", "password": PASSWORD}}


async def test_pipe_mode_end_to_end(harness: Harness) -> None:
    bob = await harness.user("bob")
    status, out, err = await chatcat(
        "127.0.0.1",
        str(harness.port),
        stdin=requests(
            REGISTER,
            LOGIN,
            {"op": "/subscribe", "id": 50},
            {"op": "/send", "params": {"name": "bob", "msg": "hi bob"}},
            {"op": "/send", "params": {"name": "ann", "msg": "note to self"}},
            {"op": "/receive"},
        ),
    )
    assert status == 0, err
    replies = [line for line in out if "code" in line]
    pushes = [line for line in out if "event" in line]
    assert [r["code"] for r in replies] == [0] * 6
    assert [r["id"] for r in replies] == [1, 2, 50, 3, 4, 5]  # ids filled in, given ones kept
    # The note reaches this subscribed connection, at most once per path. The /receive
    # may run before the send commits (then only the push has it), or after its push
    # (then it returns it too: pushed but not acknowledged, protocol.md "/receive").
    pushed = [p["data"]["msg"] for p in pushes if p["event"] == "message"]
    polled = replies[-1]["data"]["messages"].get("ann", [])
    assert pushed in ([], ["note to self"]) and polled in ([], ["note to self"])
    assert pushed + polled, "the note was neither pushed nor polled"
    assert (await bob.request("/receive"))["messages"] == {"ann": ["hi bob"]}


async def test_pipe_mode_reports_error_codes_and_exits_1(harness: Harness) -> None:
    status, out, _ = await chatcat(
        "127.0.0.1",
        str(harness.port),
        stdin=requests(
            {"op": "/login", "params": {"name": "x", "password": "wrong pass"}},
            {"op": "/nope"},
            {"op": "/user/info", "params": {"name": "x"}},
        ),
    )
    assert status == 1
    assert [line["code"] for line in out] == [3, 1, 2]


async def test_pipe_mode_reuses_a_token_from_the_environment(harness: Harness) -> None:
    alice = await harness.user("alice")
    assert alice.token is not None
    status, out, _ = await chatcat(
        "127.0.0.1",
        str(harness.port),
        stdin=requests({"op": "/user/info", "params": {"name": "alice"}}),
        env={"CHATD_TOKEN": alice.token},
    )
    assert status == 0 and out[0]["data"]["name"] == "alice"


async def test_pipe_mode_rejects_lines_that_are_not_requests(harness: Harness) -> None:
    status, out, err = await chatcat(
        "127.0.0.1", str(harness.port), stdin="not json\n[1, 2]\n" + requests({"op": "/ping"})
    )
    assert status == 2
    assert "line 1" in err and "line 2" in err
    assert out == [{"id": 1, "code": 0, "msg": "success"}]


async def test_one_shot_sends_one_request(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    assert alice.token is not None
    status, out, _ = await chatcat(
        "--token", alice.token, "127.0.0.1", str(harness.port), "/send", "name=bob", "msg=hi there"
    )
    assert status == 0 and out[0]["code"] == 0
    assert (await bob.request("/receive"))["messages"] == {"alice": ["hi there"]}
    status, out, _ = await chatcat(
        "127.0.0.1", str(harness.port), "--token", alice.token, "/ack", "id:=999999"
    )
    assert status == 0 and out[0]["data"] == {"position": 0}
    status, out, _ = await chatcat("127.0.0.1", str(harness.port), "/user/info", "name=bob")
    assert status == 1 and out[0]["code"] == 2


async def test_cannot_connect_and_bad_usage_exit_2(harness: Harness) -> None:
    status, _, err = await chatcat("127.0.0.1", "1", "/ping")
    assert status == 2 and "cannot connect" in err
    status, _, err = await chatcat("127.0.0.1", str(harness.port), "/send", "novalue")
    assert status == 2 and "key=value" in err


def test_words_and_params_parse_like_the_documentation_says() -> None:
    assert split_words([]) == ("127.0.0.1", 7777, [])
    assert split_words(["example.org"]) == ("example.org", 7777, [])
    assert split_words(["h", "9000", "/ping"]) == ("h", 9000, ["/ping"])
    assert split_words(["/ping"]) == ("127.0.0.1", 7777, ["/ping"])
    with pytest.raises(UsageError):
        split_words(["h", "port"])
    assert parse_params(["a=1", "b:=1", "c:=[1, 2]", "d=x=y"]) == {
        "a": "1",
        "b": 1,
        "c": [1, 2],
        "d": "x=y",
    }


def test_events_are_described_for_humans() -> None:
    assert describe({"event": "message", "data": {"id": 1, "name": "bob", "msg": "hi"}}) == (
        "bob -> you: hi"
    )
    assert describe(
        {
            "event": "channel_message",
            "data": {"channel": "dev", "name": "bob", "msg": "yo", "id": 2},
        }
    ) == ("[dev] bob: yo")
    assert describe({"event": "presence", "data": {"name": "bob", "online": False}}) == (
        "* bob is offline"
    )
    assert describe({"event": "unknown-future-event", "data": {}}) is None


@contextlib.contextmanager
def _explained(term: Terminal, text: str) -> Iterator[None]:
    try:
        yield
    except TimeoutError:
        raise AssertionError(f"{text!r} not on screen: {ANSI.sub(b'', term.screen)!r}") from None


class Terminal:
    """chatcat on a pseudo-terminal, read with escape sequences stripped."""

    def __init__(self, master: int, proc: asyncio.subprocess.Process) -> None:
        self.master, self.proc = master, proc
        self.screen = b""

    async def expect(self, text: str, timeout: float = 10) -> None:
        with _explained(self, text):
            await self._read_until(text, timeout)

    async def _read_until(self, text: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while text.encode() not in ANSI.sub(b"", self.screen):
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(self.master, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_reader(self.master)
                self.screen += os.read(self.master, 65536)

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())


async def test_interactive_login_msg_push_while_typing_and_quit(harness: Harness) -> None:
    bob = await harness.user("bob")
    await (await harness.connect()).request(
        "/register", {"name": "ann", "password": PASSWORD, "password_repete": PASSWORD}
    )
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        *CHATCAT,
        "127.0.0.1",
        str(harness.port),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"},
    )
    os.close(slave)
    term = Terminal(master, proc)
    try:
        await term.expect("/help lists the commands")
        term.type(f"/login ann '{PASSWORD}'\r")
        await term.expect("logged in")
        term.type("/msg bob hello bob\r")
        await term.expect("-> bob: hello bob")
        assert (await bob.request("/receive"))["messages"] == {"ann": ["hello bob"]}

        term.type("half a sentence")
        await term.expect("half a sentence")
        await bob.request("/send", {"name": "ann", "msg": "ping from bob"})
        await term.expect("bob -> you: ping from bob")
        term.screen = term.screen[term.screen.rfind(b"ping from bob") :]
        await term.expect("> half a sentence")  # the typed line is redrawn below the message

        term.type("\x15/quit\r")  # ctrl-U clears the line
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)
