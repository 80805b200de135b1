"""chatcat against a real server: pipe mode, one-shot mode, and interactive mode on a pty."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import pty
import re
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from chatd.chatcat import (
    UsageError,
    build_parser,
    parse_params,
    split_words,
    token_values_joined,
)
from chatd.client import Client
from chatd.codec import FrameDecoder
from chatd.commands import (
    Command,
    CommandError,
    Timeline,
    channel_line,
    describe,
    help_text,
    history_entry,
    network_reason,
    parse,
    parse_wire_time,
    printable,
    typed,
)
from chatd.errors import NotAuthenticated
from chatd.server import Server
from chatd.shell import Screen, backoff, run_session
from tests.conftest import PASSWORD, Harness, MakeHarness

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


def test_a_token_that_starts_with_a_dash_is_taken_as_the_tokens_value() -> None:
    # URL-safe base64: one token in 64 starts with "-" (the README's --token "$TOKEN").
    parser = build_parser()
    for argv, token in [
        (["--token", "-x4q", "/ping"], "-x4q"),
        (["/ping", "--token", "--x4q"], "--x4q"),
        (["--token=-x4q", "/ping"], "-x4q"),
        (["--token", "plain", "--json"], "plain"),
    ]:
        args = parser.parse_intermixed_args(token_values_joined(argv, parser))
        assert args.token == token, argv
    joined = token_values_joined(["--token", "--json"], parser)  # chatcat's own option
    assert joined == ["--token", "--json"]
    with pytest.raises(SystemExit):
        parser.parse_intermixed_args(joined)  # "expected one argument", as before


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
    status, out, err = await chatcat(
        "--token", alice.token, "127.0.0.1", str(harness.port), "/send", "name=bob", "msg=hi there"
    )
    assert status == 0 and out[0]["code"] == 0, err
    assert (await bob.request("/receive"))["messages"] == {"alice": ["hi there"]}
    status, out, err = await chatcat(
        "127.0.0.1", str(harness.port), "--token", alice.token, "/ack", "id:=999999"
    )
    assert status == 0 and out[0]["data"] == {"position": 0}, err
    status, out, err = await chatcat("127.0.0.1", str(harness.port), "/user/info", "name=bob")
    assert status == 1 and out[0]["code"] == 2, err
    # The server's reply as it is: interactive mode alone retells it in its own words.
    assert out[0]["msg"] == "not logged in: send /login first, or a token with the request"


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
        term.type(f"/login ann {PASSWORD}\r")  # the rest of the line: spaces, no quotes
        await term.expect("logged in as ann")
        term.type("/msg bob hello bob\r")
        await term.expect("ann -> bob: hello bob")
        assert (await bob.request("/receive"))["messages"] == {"ann": ["hello bob"]}

        term.type("half a sentence")
        await term.expect("half a sentence")
        await bob.request("/send", {"name": "ann", "msg": "ping from bob"})
        await term.expect("bob -> ann: ping from bob")
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


# The command language, without a socket.


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("hello there", Command("say", text="hello there")),
        ("//etc/hosts is a file", Command("say", text="/etc/hosts is a file")),
        ("/join #lobby", Command("/join", name="lobby", channel=True)),
        ("/JOIN lobby", Command("/join", name="lobby", channel=True)),
        ("/part #dev", Command("/leave", name="dev", channel=True)),
        ("/leave", Command("/leave")),
        ("/login bob battery staple", Command("/login", name="bob", text="battery staple")),
        ("/login bob  'q' x ", Command("/login", name="bob", text="'q' x ")),
        ("/login bob", Command("/login", name="bob")),
        ("/register bob", Command("/register", name="bob")),
        ("/msg bob  hi  there", Command("/msg", name="bob", text="hi  there")),
        ("/query bob", Command("/query", name="bob")),
        ("/query bob hi", Command("/query", name="bob", text="hi")),
        ("/query", Command("/query")),
        ("/me waves", Command("/me", text="waves")),
        ("/history", Command("/history")),
        ("/history 5", Command("/history", count=5)),
        ("/history #5", Command("/history", name="5", channel=True)),
        ("/history bob 3", Command("/history", name="bob", count=3)),
        ("/history #lobby 3", Command("/history", name="lobby", channel=True, count=3)),
        ("/names #lobby", Command("/names", name="lobby", channel=True)),
        ("/who", Command("/names")),
        ("/whois bob", Command("/whois", name="bob")),
        ("/list", Command("/list")),
        ("/channels", Command("/list")),
        ("/nick carol", Command("/nick")),
        ("/quit see you", Command("/quit")),
        ("/help login", Command("/help", text="login")),
    ],
)
def test_command_lines_parse(line: str, command: Command) -> None:
    assert parse(line) == command


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("/history lobby abc", "'abc' is not a number"),
        ("/history lobby 0", "'0' is not a number"),
        ("/history lobby 3 4", "unexpected '4'"),
        ("/history lobby \uff13", "not a number"),  # a fullwidth 3: a digit, not ASCII
        ("/join", "usage: /join CHANNEL"),
        ("/join #", "a name is missing after #"),
        ("/join a b", "unexpected 'b'"),
        ("/leave lobby bye", "unexpected 'bye'"),
        ("/msg bob", "usage: /msg NAME TEXT"),
        ("/whois", "usage: /whois NAME"),
        ("/list all", "unexpected 'all'"),
        ("/me", "usage: /me TEXT"),
        ("/login", "usage: /login NAME [PASSWORD]"),
        ("/register bob secret12 secret12", "takes the password once"),
        ("/frobnicate", "unknown command /frobnicate"),
        ("   ", "empty line"),
    ],
)
def test_malformed_command_lines_are_refused(line: str, error: str) -> None:
    with pytest.raises(CommandError, match=re.escape(error)):
        parse(line)


def test_passwords_never_reach_the_history() -> None:
    assert history_entry("/login bob battery staple") == "/login bob"
    assert history_entry("/LOGIN bob battery staple") == "/login bob"
    assert history_entry("/register bob hunter2hunter2") == "/register bob"
    assert history_entry("/login bob") == "/login bob"
    assert history_entry("/msg bob /login is how") == "/msg bob /login is how"


def test_a_notice_names_a_command_as_typed_shortened_and_without_its_password() -> None:
    assert typed(parse("hello there")) == 'your line "hello there"'
    assert typed(parse("x" * 31)) == 'your line "' + "x" * 29 + '…"'
    assert typed(parse("x" * 30)) == 'your line "' + "x" * 30 + '"'
    assert typed(parse("/login bob battery staple")) == "/login bob"
    assert typed(parse("/register bob hunter2hunter2")) == "/register bob"
    assert typed(parse("/msg bob see you")) == '/msg bob "see you"'
    assert typed(parse("/j #lobby")) == "/join #lobby"
    assert typed(parse("/me waves")) == '/me "waves"'
    assert typed(parse("/list")) == "/list"


def test_help_explains_every_command_and_quoting() -> None:
    text = help_text()
    for verb in ("/part", "/names", "/whois", "/list", "/query", "/me", "/nick", "/quit"):
        assert verb in text
    assert "No quoting" in text and "password:" in text
    assert help_text("part").startswith("/leave [CHANNEL]")
    with pytest.raises(CommandError):
        help_text("nope")


def test_lines_carry_local_time_and_the_date_when_it_changes() -> None:
    timeline = Timeline(timezone(timedelta(hours=2)))
    late = parse_wire_time("2026.11.27:21:47:51")  # 23:47 at UTC+2
    assert timeline.lines("[lobby] bob: hi", late) == [
        "-- Friday 27 November 2026 --",
        "23:47 [lobby] bob: hi",
    ]
    assert timeline.lines("again", late) == ["23:47 again"]
    next_day = parse_wire_time("2026.11.27:22:01:00")  # past midnight at UTC+2
    assert timeline.lines("x", next_day) == ["-- Saturday 28 November 2026 --", "00:01 x"]
    assert timeline.lines("two\nlines", next_day) == ["00:01 two", "      lines"]


def test_control_characters_cannot_drive_the_terminal() -> None:
    assert printable("a\x1b[2Jb\x07\tc\r\n") == "a^[[2Jb^G\tc\n"
    assert printable("\x9b2J\rx") == "^[2J^Mx"  # the one-byte CSI of C1, a bare return


def test_events_and_own_lines_read_alike() -> None:
    said = {"event": "channel_message",
            "data": {"id": 2, "channel": "dev", "name": "bob", "msg": "yo", "datetime": "x"}}
    assert describe(said) == channel_line("dev", "bob", "yo") == "[dev] bob: yo"
    assert channel_line("dev", "bob", "/me waves") == "[dev] * bob waves"
    private = {"event": "message", "data": {"id": 1, "name": "bob", "msg": "hi"}}
    assert describe(private, "ann") == "bob -> ann: hi"
    copy = {"event": "message", "data": {"id": 1, "name": "ann", "msg": "hi", "to": "bob"}}
    assert describe(copy, "ann") == "ann -> bob: hi"
    refused = {"code": 8, "msg": "too many connections"}
    assert describe(refused) == "server: too many connections (code 8)"


def test_reconnection_waits_double_up_to_a_ceiling() -> None:
    waits = list(itertools.islice(backoff(1.0, 30.0), 8))
    for wait, nominal in zip(waits, [1, 2, 4, 8, 16, 30, 30, 30], strict=True):
        assert 0.8 * nominal <= wait <= 1.2 * nominal


def test_host_and_port_options_and_their_positional_forms() -> None:
    assert split_words([], "h", 9000) == ("h", 9000, [])
    assert split_words(["/ping"], None, 9000) == ("127.0.0.1", 9000, ["/ping"])
    with pytest.raises(UsageError, match="--host given"):
        split_words(["h2"], "h", None)
    with pytest.raises(UsageError, match="--port given"):
        split_words(["h", "9001"], None, 9000)


@pytest.mark.parametrize(
    ("words", "port", "error"),
    [
        (["channel/list"], None, r"'channel/list' is not a host .* \(/channel/list\?\)"),
        (["send", "name=bob", "msg=hi"], None, r"'name=bob' is not a host .* \(/send\?\)"),
        (["send", "name=bob"], 7777, r"'name=bob' is not a host or a port: an op starts with /"),
        (["h", "user/info", "name=bob"], None, r"\(/user/info\?\)"),
        (["name=bob"], None, r"'name=bob' is not a host or a port: an op starts with /$"),
    ],
)
def test_an_op_without_its_slash_is_not_taken_for_a_host(
    words: list[str], port: int | None, error: str
) -> None:
    # Taken for a host, "channel/list" got "cannot resolve the host name", and with
    # --port, "send name=bob" got "--port given, and 'name=bob' as a port too".
    with pytest.raises(UsageError, match=error):
        split_words(words, None, port)
    assert split_words(["::1", "/ping", "a=b/c"]) == ("::1", 7777, ["/ping", "a=b/c"])


async def test_host_and_port_options_reach_the_server(harness: Harness) -> None:
    status, out, _ = await chatcat("--host", "127.0.0.1", "--port", str(harness.port), "/ping")
    assert status == 0 and out[0]["code"] == 0
    status, _, err = await chatcat("--port", "99999", "/ping")
    assert status == 2 and "not a port" in err


# The interactive session in memory: scripted typing, the screen as a list of lines.


class Transcript:
    """What chatcat printed; ``expect`` waits for the next line matching, in order."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._cursor = 0
        self._changed = asyncio.Condition()

    def write(self, line: str) -> None:
        self.lines.append(line)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def expect(self, pattern: str, timeout: float = 20) -> str:
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self._find(pattern) is not None)
        except TimeoutError:
            raise AssertionError(f"{pattern!r} not printed: {self.lines}") from None
        found = self._find(pattern)
        assert found is not None
        self._cursor = found + 1
        return self.lines[found]

    def _find(self, pattern: str) -> int | None:
        for index in range(self._cursor, len(self.lines)):
            if re.search(pattern, self.lines[index]):
                return index
        return None


class Keyboard:
    """Input for run_session: the lines a test types, and the prompts it was shown."""

    def __init__(self) -> None:
        self.typed: asyncio.Queue[str | None] = asyncio.Queue()
        self.prompts: list[str] = []
        self.shown: Callable[[], str] = lambda: ""  # the input line's prompt, as redrawn

    def type(self, *lines: str) -> None:
        for line in lines:
            self.typed.put_nowait(line)

    async def line(self, prompt: Callable[[], str]) -> str | None:
        self.prompts.append(prompt())
        self.shown = prompt
        return await self.typed.get()

    async def secret(self, prompt: str) -> str | None:
        self.prompts.append(prompt)
        return await self.typed.get()


class Session:
    def __init__(self, client: Client) -> None:
        self.keyboard, self.screen = Keyboard(), Transcript()
        self.task = asyncio.create_task(
            run_session(client, "test", self.keyboard, Screen(self.screen.write))
        )

    async def prompt(self, expected: str, timeout: float = 20) -> None:
        """Wait until the input line shows ``expected``."""
        async with asyncio.timeout(timeout):
            # Polled: the prompt is a function of the shell's state, with no event.
            while self.keyboard.typed.qsize() or self.keyboard.shown() != expected:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    async def quit(self) -> None:
        self.keyboard.type("/quit")
        async with asyncio.timeout(20):
            assert await self.task == 0


@contextlib.asynccontextmanager
async def session(harness: Harness, port: int | None = None) -> AsyncIterator[Session]:
    client = await Client.connect("127.0.0.1", port or harness.port, timeout=10)
    running = Session(client)
    try:
        yield running
        await running.quit()
    finally:
        running.task.cancel()
        await client.close()


TIME = r"^\d\d:\d\d "


async def test_what_was_missed_shows_after_logged_in(harness: Harness) -> None:
    bob = await harness.user("bob")
    await (await harness.user("ann")).close()  # registered, offline
    await bob.request("/send", {"name": "ann", "msg": "sent while you were away"})
    async with session(harness) as ann:
        ann.keyboard.type(f"/login ann {PASSWORD}")
        missed = await ann.screen.expect("bob -> ann: sent while you were away")
        # It was printed above "logged in as ann", which looked like it came from before.
        before = ann.screen.lines[: ann.screen.lines.index(missed)]
        assert any("logged in as ann" in line for line in before), ann.screen.lines


async def test_session_channels_queries_history_and_errors(harness: Harness) -> None:
    bob = await harness.user("bob")
    await (await harness.connect()).request(
        "/register", {"name": "ann", "password": PASSWORD, "password_repete": PASSWORD}
    )
    async with session(harness) as ann:
        ann.keyboard.type("/login ann", PASSWORD)  # asked for: the password prompt
        await ann.screen.expect(TIME + "logged in as ann; your channels: none yet")
        assert "password: " in ann.keyboard.prompts
        ann.keyboard.type("/join #lobby", "/join dev", "/join lobby", "/part #dev")
        await ann.screen.expect(TIME + "left dev; still in lobby")
        await ann.prompt("#lobby> ")  # leaving another channel keeps the current one

        await bob.request("/channel/send", {"name": "lobby", "message": "hi ann"})
        await ann.screen.expect(TIME + r"\[lobby\] bob: hi ann$")
        ann.keyboard.type("hello bob", "/me waves")
        await ann.screen.expect(TIME + r"\[lobby\] ann: hello bob$")  # own lines alike
        await ann.screen.expect(TIME + r"\[lobby\] \* ann waves$")
        ann.keyboard.type("/history lobby abc", "/history #lobby 2")
        await ann.screen.expect(TIME + "/history: 'abc' is not a number")
        await ann.screen.expect(TIME + r"\[lobby\] ann: hello bob$")  # same format as live
        await ann.screen.expect(TIME + r"\[lobby\] \* ann waves$")
        history = await bob.request("/channel/history", {"name": "lobby"})
        assert [m["msg"] for m in history["messages"]] == ["hi ann", "hello bob", "/me waves"]

        ann.keyboard.type("/query bob", "psst")
        await ann.screen.expect(TIME + "talking privately with bob")
        await ann.screen.expect(TIME + "ann -> bob: psst$")
        await ann.prompt("@bob> ")
        assert (await bob.request("/history", {"name": "ann"}))["messages"][-1]["msg"] == "psst"
        ann.keyboard.type("/query", "/whois bob", "/names", "/nick annie", "/list")
        await ann.screen.expect(TIME + "query closed; talking in lobby")
        await ann.screen.expect(TIME + "bob: online, registered 20")
        await ann.screen.expect(TIME + "lobby: ann \\(online\\), bob \\(online\\)")
        await ann.screen.expect(TIME + "names are accounts here")
        await ann.screen.expect(TIME + "lobby: \\d+ unread")

        ann.keyboard.type("/logout", f"/login ann {PASSWORD}")  # the channel is remembered
        await ann.screen.expect(TIME + "logged in as ann")
        await ann.screen.expect(TIME + "talking in lobby")
        await ann.prompt("#lobby> ")


class LinkProxy:
    """Between a client and the server on ``upstream_port``: each client connection gets
    a connection of its own to the server (a link); a subclass's ``_link`` relays both
    ways. ``drop_all`` cuts every link at once, as a network failure would."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _upstream(
        self, client_side: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The server side of a new link, which drop_all will cut with its client side."""
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._links.append((client_side, up_writer))
        return up_reader, up_writer

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def drop_all(self) -> None:
        for client_side, server_side in self._links:
            client_side.transport.abort()
            server_side.transport.abort()
        self._links.clear()

    async def close(self) -> None:
        self.drop_all()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class CuttingProxy(LinkProxy):
    """Between chatcat and the server; cut() drops the connection that next sends a
    channel message once the server has it, before its reply can reach the client."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.cut_next_send = False
        self.forwarded_send = asyncio.Event()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self._upstream(writer)
        holding = asyncio.Event()
        await asyncio.gather(
            self._requests(reader, up_writer, holding),
            self._replies(up_reader, writer, holding),
            return_exceptions=True,
        )

    async def _requests(
        self, reader: asyncio.StreamReader, out: asyncio.StreamWriter, holding: asyncio.Event
    ) -> None:
        decoder = FrameDecoder()
        while data := await reader.read(65536):
            out.write(data)
            bodies = decoder.feed(data)
            if self.cut_next_send and any(b.get("op") == "/channel/send" for b in bodies):
                self.cut_next_send = False
                holding.set()  # the reply must not get through
                self.forwarded_send.set()
        out.close()

    async def _replies(
        self, reader: asyncio.StreamReader, out: asyncio.StreamWriter, holding: asyncio.Event
    ) -> None:
        while (data := await reader.read(65536)) and not holding.is_set():
            out.write(data)


async def test_a_send_cut_off_before_its_reply_is_stored_once(harness: Harness) -> None:
    bob = await harness.user("bob")
    await bob.request("/channel/join", {"name": "lobby"})
    await bob.request("/register", {"name": "ann", "password": PASSWORD,
                                    "password_repete": PASSWORD})
    proxy = CuttingProxy(harness.port)
    try:
        async with session(harness, await proxy.start()) as ann:
            ann.keyboard.type(f"/login ann {PASSWORD}", "/join lobby")
            await ann.prompt("#lobby> ")
            proxy.cut_next_send = True
            ann.keyboard.type("only once")
            await proxy.forwarded_send.wait()
            await _stored(bob, "only once")  # committed; its reply is held back
            proxy.drop_all()
            await ann.screen.expect(TIME + "connection to test lost: reconnecting")
            await ann.screen.expect(TIME + "reconnected to test")
            await ann.screen.expect(TIME + r"\[lobby\] ann: only once$")
            history = await bob.request("/channel/history", {"name": "lobby"})
            assert [m["msg"] for m in history["messages"]] == ["only once"]
            await bob.request("/channel/send", {"name": "lobby", "message": "got it"})
            await ann.screen.expect(TIME + r"\[lobby\] bob: got it$")
            shown = [line for line in ann.screen.lines if line.endswith("] ann: only once")]
            assert len(shown) == 1  # (the "not connected" notice quotes the line too)
    finally:
        await proxy.close()


async def _stored(client: Client, text: str) -> None:
    async with asyncio.timeout(20):
        while text not in await _lobby_texts(client):  # noqa: ASYNC110 - the server's state
            await asyncio.sleep(0.01)


async def _lobby_texts(client: Client) -> list[str]:
    history = await client.request("/channel/history", {"name": "lobby"})
    return [m["msg"] for m in history["messages"]]


def test_network_errors_read_as_words() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('::1', 7777)")
    assert network_reason(refused) == "connection refused"
    unknown = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert network_reason(unknown) == "cannot resolve the host name (name or service not known)"
    assert network_reason(TimeoutError()) == "no answer (timed out)"
    assert network_reason(ConnectionError("connection closed")) == "connection closed"


async def test_client_reconnect_with_a_revoked_token_forgets_it(harness: Harness) -> None:
    bob = await harness.user("bob")
    await bob.request("/subscribe")
    other = await harness.connect(token=bob.token)
    await other.request("/logout")  # revokes the token both connections use
    await harness.restart()
    assert not bob.connected
    with pytest.raises(NotAuthenticated):
        await bob.reconnect()
    assert bob.connected and bob.token is None and not bob.subscribed
    try:
        await bob.login("bob", PASSWORD)  # the connection stays usable for a new login
        await bob.request("/subscribe")
        assert (await bob.request("/user/info", {"name": "bob"}))["online"] is True
    finally:
        await bob.close()  # the restart took it off the harness's list


async def test_quitting_while_disconnected_says_what_is_not_sent(harness: Harness) -> None:
    async with session(harness) as ann:
        ann.keyboard.type("/register ann", PASSWORD, PASSWORD, "/login ann", PASSWORD,
                          "/join lobby")
        await ann.prompt("#lobby> ")
        await harness.server.close()
        await ann.screen.expect(TIME + "connection to test lost: reconnecting")
        ann.keyboard.type("lost words, and a few more of them")
        await ann.screen.expect(TIME + 'not connected: your line "lost words, and a few more of'
                                '…" will go out once reconnected$')
    await ann.screen.expect(TIME + r"quitting with 1 command\(s\) not sent")
    harness.server = Server(harness.config)  # a server again, for the fixture to stop
    await harness.server.start()


async def test_a_connection_closed_before_login_reopens_for_the_next_command(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(auth_timeout=0.5)  # the server closes unbound connections
    async with session(harness) as ann:
        await ann.screen.expect(TIME + "connection to test closed \\(not logged in\\): it reopens")
        ann.keyboard.type("/register ann", PASSWORD, PASSWORD)
        await ann.screen.expect(TIME + "reconnected to test")
        await ann.screen.expect(TIME + "registered ann")
        assert not [line for line in ann.screen.lines if "cannot reconnect" in line]
