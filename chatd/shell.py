"""chatcat's interactive mode: IRC-like commands, messages printed as they arrive.

Three tasks share the terminal: the input loop reads and parses lines (and asks for
passwords), the worker runs the commands one at a time in the order typed, and the
follower prints pushed events and, when the connection drops, reconnects with back-off.
A request that meets a lost connection waits for the next one and is sent again (sends
with the same ``client_id``, so the server stores them once).  prompt_toolkit keeps the
line being typed intact while messages print above it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import getpass
import random
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any, Protocol

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import WordCompleter
from prompt_toolkit.history import DummyHistory, InMemoryHistory
from prompt_toolkit.layout.processors import PasswordProcessor
from prompt_toolkit.patch_stdout import patch_stdout

from chatd.chatcat import in_daemon_thread
from chatd.client import Client
from chatd.commands import (
    ALIASES,
    COMMANDS,
    HISTORY_DEFAULT,
    Command,
    CommandError,
    Timeline,
    channel_line,
    describe,
    event_time,
    help_text,
    history_entry,
    network_reason,
    parse,
    parse_wire_time,
    private_line,
    typed,
)
from chatd.errors import BadRequest, ChatdError, Forbidden, NotAuthenticated, NotFound

FIRST_RETRY, MAX_RETRY = 1.0, 30.0  # seconds between reconnection attempts
NOT_LOGGED_IN = "not logged in: /login NAME first, or /register NAME for a new account"
INBOX = ""  # the stream key of private messages; channels are "#" + casefolded name


class Screen:
    """Where every line goes: stamped with the local time, a date line when the day changes."""

    def __init__(self, write: Callable[[str], None] | None = None) -> None:
        self.timeline = Timeline()
        self._write = write or _print

    def say(self, text: str, when: datetime | None = None) -> None:
        for line in self.timeline.lines(text, when):
            self._write(line)

    def block(self, title: str, text: str) -> None:
        self.say(title)
        for line in text.splitlines():
            self._write("      " + line)


def _print(line: str) -> None:
    # Under prompt_toolkit's patch_stdout this prints above the line being typed.
    print(line, flush=True)


def backoff(first: float = FIRST_RETRY, most: float = MAX_RETRY) -> Iterator[float]:
    """Waits between reconnection attempts: doubling up to ``most``, each within ±20 %
    so that the clients of a restarted server do not all come back at once."""
    delay = first
    while True:
        yield delay * random.uniform(0.8, 1.2)
        delay = min(delay * 2, most)


class Shell:
    def __init__(self, client: Client, screen: Screen, address: str = "the server") -> None:
        self.client = client
        self.screen = screen
        self.address = address
        self.me: str | None = None
        self.channel: str | None = None  # where plain lines go, unless there is a query
        self.query: str | None = None
        self._shown: dict[str, int] = {}  # per stream, the highest id shown
        self._own: set[tuple[str, int]] = set()  # own messages, shown when sent
        self._generation = 0  # how many times the connection was re-established
        self._up = True
        self._changed = asyncio.Condition()
        self._wanted = asyncio.Event()  # a command waits for the connection
        self._doing = "your command"  # what the requests being sent are for, as typed
        self.verbs: dict[str, Callable[[Command], Awaitable[None]]] = {
            "say": self.say_line, "/register": self.register, "/login": self.login,
            "/logout": self.logout, "/join": self.join, "/leave": self.leave,
            "/msg": self.msg, "/query": self.start_query, "/me": self.action,
            "/names": self.names, "/whois": self.whois, "/list": self.list_channels,
            "/history": self.history, "/nick": self.nick, "/help": self.help,
        }

    @property
    def online(self) -> bool:
        return self._up

    def prompt(self) -> str:
        if self.query is not None:
            return f"@{self.query}> "
        return f"#{self.channel}> " if self.channel is not None else "> "

    async def execute(self, command: Command) -> None:
        self._doing = typed(command)
        try:
            await self.verbs[command.verb](command)
        except ChatdError as error:
            self.report(error)
        except CommandError as error:
            self.screen.say(str(error))

    def report(self, error: ChatdError) -> None:
        if isinstance(error, NotAuthenticated) and self.client.token is None:
            # Sent with no token: the server's reply speaks of requests and tokens, which
            # mean nothing to someone typing here (the client keeps a token it sent).
            self.screen.say(NOT_LOGGED_IN)
        else:
            self.screen.say(f"error {int(error.code)}: {error.message}")

    # Requests, across reconnections.

    async def call(self, op: str, params: dict[str, Any] | None = None) -> Any:
        """``Client.request``, waiting out a lost connection and sending again once back."""
        # Named as typed: the request's op (/channel/send...) means nothing to the user.
        waiting = f"not connected: {self._doing} will go out once reconnected"
        if not self._up:
            self._wanted.set()
            self.screen.say(waiting)
            waiting = ""
        generation = await self._connection()
        while True:
            try:
                return await self.client.request(op, params)
            except (ConnectionError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError) and self.client.connected:
                    await self.client.close()  # no reply in time: reconnect (the follower)
                self._wanted.set()
                if waiting:
                    self.screen.say(waiting)
                    waiting = ""
                generation = await self._connection(newer_than=generation)

    async def _connection(self, newer_than: int = -1) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self._up and self._generation > newer_than)
            return self._generation

    async def _set_up(self, up: bool) -> None:
        async with self._changed:
            self._up = up
            self._generation += up
            self._changed.notify_all()

    # The follower: events, and reconnection when the connection drops.

    async def follow(self) -> None:
        while True:
            async for event in self.client.events():
                await self.on_event(event)
            await self._set_up(False)
            if self.client.token is None:
                # Not logged in: the server closes such connections after a while
                # (protocol.md, auth_timeout and idle_timeout); reopen only when needed.
                self.screen.say(f"connection to {self.address} closed (not logged in): "
                                "it reopens for your next command")
                await self._wanted.wait()
            else:
                self.screen.say(f"connection to {self.address} lost: reconnecting")
            self._wanted.clear()
            await self._reconnect()
            await self._set_up(True)

    async def _reconnect(self) -> None:
        # backoff() is endless: this tries until connected, or the session is refused.
        for delay in backoff():  # pragma: no branch
            try:
                await self.client.reconnect()
            except NotAuthenticated:
                self.screen.say(f"reconnected to {self.address}, but the session has ended "
                                "(token expired or revoked): /login again")
                return
            except ChatdError as error:  # connected, but /subscribe was refused
                self.screen.say(f"reconnected to {self.address}; error {int(error.code)}: "
                                f"{error.message}")
                return
            except (OSError, TimeoutError) as exc:  # refused, unreachable, gone again
                reason = network_reason(exc)
                self.screen.say(f"cannot reconnect ({reason}): next try in {delay:.0f} s")
                await asyncio.sleep(delay)
                continue
            resumed = " (session and subscription resumed)" if self.client.subscribed else ""
            self.screen.say(f"reconnected to {self.address}{resumed}")
            return

    async def on_event(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        stream = _stream_of(event)
        if stream is None or self._is_new(stream, data["id"]):
            text = describe(event, self.me)
            if text is not None:
                self.screen.say(text, event_time(event))
        if stream is not None:
            await self._acknowledge(stream, data["id"])

    def _is_new(self, stream: str, message_id: int) -> bool:
        """Not shown yet: a new subscription repeats what was not acknowledged, and the
        server may push back this user's own messages, already shown when sent."""
        if message_id <= self._shown.get(stream, 0) or (stream, message_id) in self._own:
            return False
        self._shown[stream] = message_id
        return True

    async def _acknowledge(self, stream: str, message_id: int) -> None:
        params: dict[str, Any] = {"id": message_id}
        if stream != INBOX:
            params["channel"] = stream[1:]
        # Lost with the connection: the catch-up after reconnecting shows the message again,
        # or _is_new drops it.
        with contextlib.suppress(ConnectionError, TimeoutError):
            await self.client.call("/ack", params)

    # Sessions.

    async def register(self, command: Command) -> None:
        assert command.name is not None and command.text is not None
        password = command.text
        params = {"name": command.name, "password": password, "password_repete": password}
        await self.call("/register", params)
        self.screen.say(f"registered {command.name}: now /login {command.name}")

    async def login(self, command: Command) -> None:
        assert command.name is not None and command.text is not None
        data = await self.call("/login", {"name": command.name, "password": command.text})
        self.me = data["name"]
        await self.start_session()

    async def start_session(self) -> None:
        """List the user's channels, then subscribe (after /login, or at start with a token):
        in this order, what was missed meanwhile shows after "logged in", not above it."""
        joined = [c["name"] for c in (await self.call("/channel/list"))["channels"]]
        channels = ", ".join(joined) or "none yet"
        who = f" as {self.me}" if self.me else ""  # unknown: see whoami
        self.screen.say(f"logged in{who}; your channels: {channels}")
        if self.channel is not None:
            self._keep_channel(joined)
        await self.call("/subscribe")

    def _keep_channel(self, joined: list[str]) -> None:
        assert self.channel is not None
        same = [name for name in joined if name.casefold() == self.channel.casefold()]
        if same:
            self.channel = same[0]
            self.screen.say(f"talking in {self.channel}")
        else:
            self.screen.say(f"not a member of {self.channel}: /join it to talk there")
            self.channel = None

    async def logout(self, command: Command) -> None:
        await self.call("/logout")
        self.screen.say("logged out (/login to come back)")

    async def resume(self) -> None:
        """Start with the token given (--token, $CHATD_TOKEN)."""
        self._doing = "the login with the token given"
        try:
            self.me = await self.whoami()
            await self.start_session()
        except NotAuthenticated:
            # Forgotten: sent with every command, it would be refused every time, and the
            # follower would try it again on each reconnection.
            self.client.token = None
            self.screen.say("the token given was refused (invalid, expired or revoked): "
                            "/login NAME to log in")
        except ChatdError as error:  # the token was accepted; a refused /subscribe, say
            self.report(error)

    async def whoami(self) -> str | None:
        """The name of the account the token given is for (``/user/info`` without a name),
        or None from a server older than that question (it asks for the name: code 1)."""
        try:
            return str((await self.call("/user/info"))["name"])
        except BadRequest:
            return None

    # Channels.

    async def join(self, command: Command) -> None:
        joined = await self.call("/channel/join", {"name": command.name})
        self.channel, self.query = joined["name"], None
        self.screen.say(f"talking in {self.channel}")

    async def leave(self, command: Command) -> None:
        name = command.name or self.channel
        if name is None:
            raise CommandError("no current channel: /leave CHANNEL")
        await self.call("/channel/leave", {"name": name})
        if self.channel is not None and name.casefold() == self.channel.casefold():
            self.channel = None
            self.screen.say(f"left {name}; /join a channel to talk")
        else:
            self.screen.say(f"left {name}" + (f"; still in {self.channel}" if self.channel else ""))

    async def names(self, command: Command) -> None:
        name = command.name or self.channel
        if name is None:
            raise CommandError("no current channel: /names CHANNEL")
        users = (await self.call("/channel/list_users", {"name": name}))["users"]
        listed = ", ".join(u["name"] + (" (online)" if u["online"] else "") for u in users)
        self.screen.say(f"{name}: {listed}")

    async def list_channels(self, command: Command) -> None:
        found = (await self.call("/channel/list"))["channels"]
        for channel in found:
            self.screen.say(f"{channel['name']}: {channel['unread']} unread")
        if not found:
            self.screen.say("you are in no channel: /join one")

    # Talking.

    async def say_line(self, command: Command) -> None:
        assert command.text is not None
        if self.query is not None:
            await self._send_private(self.query, command.text)
        elif self.channel is not None:
            await self._send_channel(self.channel, command.text)
        else:
            raise CommandError("not in a channel: /join one, /query NAME or /msg NAME TEXT")

    async def action(self, command: Command) -> None:
        # The server has no action type: "/me waves" travels as that text (README).
        await self.say_line(dataclasses.replace(command, text="/me " + (command.text or "")))

    async def msg(self, command: Command) -> None:
        assert command.name is not None and command.text is not None
        await self._send_private(command.name, command.text)

    async def start_query(self, command: Command) -> None:
        if command.name is None:
            self.query = None
            where = f"talking in {self.channel}" if self.channel else "no current channel"
            self.screen.say(f"query closed; {where}")
            return
        info = await self.call("/user/info", {"name": command.name})
        self.query = info["name"]
        self.screen.say(f"talking privately with {self.query} (/query alone to stop)")
        if command.text:
            await self._send_private(self.query, command.text)

    async def _send_private(self, name: str, text: str) -> None:
        params = {"name": name, "msg": text, "client_id": uuid.uuid4().hex}
        sent = await self.call("/send", params)
        if self.me is not None and name.casefold() == self.me.casefold():
            return  # a note to self comes back as an event, shown then
        self._own.add((INBOX, sent["id"]))
        line = private_line(self.me or "you", name, text)
        self.screen.say(line, parse_wire_time(sent["datetime"]))

    async def _send_channel(self, channel: str, text: str) -> None:
        params = {"name": channel, "message": text, "client_id": uuid.uuid4().hex}
        sent = await self.call("/channel/send", params)
        self._own.add(("#" + channel.casefold(), sent["id"]))
        line = channel_line(channel, self.me or "you", text)
        self.screen.say(line, parse_wire_time(sent["datetime"]))

    # Looking things up.

    async def whois(self, command: Command) -> None:
        info = await self.call("/user/info", {"name": command.name})
        since = parse_wire_time(info["registered"]).astimezone(self.screen.timeline.tz)
        state = "online" if info["online"] else "offline"
        self.screen.say(f"{info['name']}: {state}, registered {since:%Y-%m-%d %H:%M}")

    async def history(self, command: Command) -> None:
        limit = command.count or HISTORY_DEFAULT
        if command.name is None:
            if self.query is not None:
                await self._private_history(self.query, limit)
            elif self.channel is not None:
                await self._channel_history(self.channel, limit)
            else:
                raise CommandError("no current channel: /history #CHANNEL or /history NAME")
        elif command.channel:
            await self._channel_history(command.name, limit)
        else:
            await self._history_of_either(command.name, limit)

    async def _history_of_either(self, name: str, limit: int) -> None:
        """A bare name: the channel of that name if the user is in it, else the user."""
        try:
            await self._channel_history(name, limit)
        except (NotFound, Forbidden) as channel_error:
            try:
                await self._private_history(name, limit)
            except NotFound:
                raise channel_error from None

    async def _channel_history(self, channel: str, limit: int) -> None:
        data = await self.call("/channel/history", {"name": channel, "limit": limit})
        for item in data["messages"]:
            line = channel_line(channel, item["name"], item["msg"])
            self.screen.say(line, parse_wire_time(item["datetime"]))
        if not data["messages"]:
            self.screen.say(f"no messages in {channel}")

    async def _private_history(self, name: str, limit: int) -> None:
        data = await self.call("/history", {"name": name, "limit": limit})
        for item in data["messages"]:
            line = private_line(item["name"], item["to"], item["msg"])
            self.screen.say(line, parse_wire_time(item["datetime"]))
        if not data["messages"]:
            self.screen.say(f"no messages with {name}")

    async def nick(self, command: Command) -> None:
        self.screen.say("names are accounts here, there are no nicknames: /login NAME as "
                        "another account, or /register NAME for a new one")

    async def help(self, command: Command) -> None:
        self.screen.block("commands:", help_text(command.text))


def _stream_of(event: dict[str, Any]) -> str | None:
    """The stream an event belongs to (protocol.md, section 9), None if none."""
    data = event.get("data") or {}
    if event.get("event") == "message" and "to" not in data:
        return INBOX
    if event.get("event") == "channel_message":
        return "#" + str(data["channel"]).casefold()
    return None


# Input.


class Input(Protocol):
    async def line(self, prompt: Callable[[], str]) -> str | None: ...

    async def secret(self, prompt: str) -> str | None: ...


class TerminalInput:
    """prompt_toolkit: an input line that output never garbles, history, completion."""

    def __init__(self) -> None:
        completer = WordCompleter([*COMMANDS, *ALIASES], sentence=True)
        self.session: PromptSession[str] = PromptSession(
            completer=completer, history=PasswordFreeHistory(), erase_when_done=True
        )

    async def line(self, prompt: Callable[[], str]) -> str | None:
        while True:
            try:
                return await self.session.prompt_async(prompt)
            except KeyboardInterrupt:
                continue  # Ctrl-C clears the line, as in a shell
            except EOFError:
                return None

    async def secret(self, prompt: str) -> str | None:
        # A session of its own, with no history; nothing of what is typed is drawn.
        asking: PromptSession[str] = PromptSession(
            history=DummyHistory(), input_processors=[PasswordProcessor(char="")],
            erase_when_done=True,
        )
        try:
            return await asking.prompt_async(prompt)
        except (KeyboardInterrupt, EOFError):
            return None


class PasswordFreeHistory(InMemoryHistory):
    """Up-arrow history that keeps ``/login NAME`` but never the password after it."""

    def append_string(self, string: str) -> None:
        super().append_string(history_entry(string))


class PlainInput:
    """Line input without prompt_toolkit, when stdout is not a terminal (nothing to garble)."""

    async def line(self, prompt: Callable[[], str]) -> str | None:
        line = await in_daemon_thread(sys.stdin.readline)
        return line.rstrip("\n") if line else None

    async def secret(self, prompt: str) -> str | None:
        try:
            return await in_daemon_thread(functools.partial(getpass.getpass, prompt))
        except EOFError:
            return None


async def read_commands(shell: Shell, source: Input, queue: asyncio.Queue[Command]) -> None:
    """Read, parse and queue lines until /quit or end of input; ask for missing passwords."""
    while (line := await source.line(shell.prompt)) is not None:
        if not line.strip():
            continue
        try:
            command = parse(line)
        except CommandError as error:
            shell.screen.say(str(error))
            continue
        if command.verb == "/quit":
            return
        if command.verb in ("/login", "/register") and command.text is None:
            password = await _ask_password(shell.screen, source, twice=command.verb == "/register")
            if password is None:
                continue
            command = dataclasses.replace(command, text=password)
        queue.put_nowait(command)


async def _ask_password(screen: Screen, source: Input, *, twice: bool) -> str | None:
    password = await source.secret("password: ")
    if password and twice and await source.secret("again: ") != password:
        screen.say("the passwords differ: nothing sent")
        return None
    if not password:
        screen.say("no password: nothing sent")
        return None
    return password


async def run_commands(shell: Shell, queue: asyncio.Queue[Command]) -> None:
    while True:
        command = await queue.get()
        try:
            await shell.execute(command)
        finally:
            queue.task_done()


async def interactive(client: Client, address: str = "the server") -> int:
    use_terminal = sys.stdin.isatty() and sys.stdout.isatty()
    source: Input = TerminalInput() if use_terminal else PlainInput()
    if not use_terminal:
        return await run_session(client, address, source)
    with patch_stdout(raw=True):
        return await run_session(client, address, source)


async def run_session(
    client: Client, address: str, source: Input, screen: Screen | None = None
) -> int:
    """The interactive session: until /quit or the end of input."""
    shell = Shell(client, screen or Screen(), address)
    shell.screen.say(f"chatcat: connected to {address}; /help lists the commands")
    queue: asyncio.Queue[Command] = asyncio.Queue()
    # The follower first: a connection lost during the login with a token is reconnected
    # by it, and the login, waiting for that, goes on (it hung when started after).
    follower = asyncio.create_task(shell.follow())
    tasks = [follower]
    try:
        if client.token is not None:
            await shell.resume()
        worker = asyncio.create_task(run_commands(shell, queue))
        tasks += [worker, asyncio.create_task(read_commands(shell, source, queue))]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in (follower, worker):
            if task.done():
                task.result()  # a bug in the follower or the worker: show it
        await _finish(shell, queue)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return 0


async def _finish(shell: Shell, queue: asyncio.Queue[Command]) -> None:
    """On /quit, let the commands already typed go out, within the client's timeout; while
    disconnected, quit at once and say what is lost."""
    try:
        async with asyncio.timeout(shell.client.timeout if shell.online else 0):
            await queue.join()
    except TimeoutError:
        left = queue.qsize() + 1  # the one being run, and those waiting
        shell.screen.say(f"quitting with {left} command(s) not sent (not connected)")


__all__ = ["Input", "Screen", "Shell", "backoff", "describe", "interactive", "run_session"]
