"""chatcat's interactive mode: IRC-like commands, messages printed as they arrive.

prompt_toolkit (the ``cli`` extra) keeps the line being typed intact while
messages print above it, and gives history and tab completion; without it
chatcat falls back to plain line input.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from chatd.client import Client
from chatd.errors import ChatdError, NotFound

HELP = """\
/register NAME PASSWORD PASSWORD   create an account
/login NAME PASSWORD               log in (messages then arrive as they are sent)
/logout                            end the session
/msg NAME TEXT...                  private message
/join CHANNEL                      join a channel and make it current
/leave [CHANNEL]                   leave a channel (default: the current one)
TEXT                               say TEXT in the current channel
/who CHANNEL                       members of a channel, and who is online
/channels                          your channels with unread counts
/inbox                             private messages not yet seen
/history CHANNEL|NAME [N]          the last N messages of a channel or conversation
/help                              this text
/quit                              leave chatcat"""


class Shell:
    def __init__(self, client: Client, say: Callable[[str], None]) -> None:
        self.client = client
        self.say = say
        self.channel: str | None = None
        self.me: str | None = None
        self.commands: dict[str, Callable[[list[str]], Awaitable[None]]] = {
            "/register": self.register,
            "/login": self.login,
            "/logout": self.logout,
            "/msg": self.msg,
            "/join": self.join,
            "/leave": self.leave,
            "/who": self.who,
            "/channels": self.channels,
            "/inbox": self.inbox,
            "/history": self.history,
            "/help": self.help,
        }

    async def handle(self, line: str) -> bool:
        """Run one input line; False when the user wants to quit."""
        line = line.strip()
        if not line:
            return True
        if line in ("/quit", "/exit"):
            return False
        try:
            await self._dispatch(line)
        except ChatdError as error:
            self.say(f"error {int(error.code)}: {error.message}")
        except ValueError as error:  # shlex: unbalanced quotes
            self.say(f"cannot parse that line: {error}")
        return True

    async def _dispatch(self, line: str) -> None:
        if not line.startswith("/"):
            await self.say_in_channel(line)
            return
        command, _, rest = line.partition(" ")
        handler = self.commands.get(command)
        if handler is None:
            self.say(f"unknown command {command}: try /help")
            return
        await handler(shlex.split(rest) if command != "/msg" else rest.split(" ", 1))

    def _need(self, args: list[str], count: int, usage: str) -> bool:
        if len(args) < count or any(not arg for arg in args[:count]):
            self.say(f"usage: {usage}")
            return False
        return True

    async def register(self, args: list[str]) -> None:
        if self._need(args, 3, "/register NAME PASSWORD PASSWORD"):
            params = {"name": args[0], "password": args[1], "password_repete": args[2]}
            await self.client.request("/register", params)
            self.say(f"registered {args[0]}: now /login {args[0]} PASSWORD")

    async def login(self, args: list[str]) -> None:
        if self._need(args, 2, "/login NAME PASSWORD"):
            await self.client.request("/login", {"name": args[0], "password": args[1]})
            await self.start_session()

    async def start_session(self) -> None:
        """Subscribe and list the user's channels (after /login, or at start with a token)."""
        await self.client.request("/subscribe")
        joined = await self.client.request("/channel/list")
        names = ", ".join(c["name"] for c in joined["channels"]) or "none yet"
        self.say(f"logged in; your channels: {names}")

    async def logout(self, args: list[str]) -> None:
        await self.client.request("/logout")
        self.channel = None
        self.say("logged out")

    async def msg(self, args: list[str]) -> None:
        if self._need(args, 2, "/msg NAME TEXT"):
            await self.client.request("/send", {"name": args[0], "msg": args[1]})
            self.say(f"-> {args[0]}: {args[1]}")

    async def join(self, args: list[str]) -> None:
        if self._need(args, 1, "/join CHANNEL"):
            joined = await self.client.request("/channel/join", {"name": args[0]})
            self.channel = joined["name"]
            self.say(f"now talking in {self.channel}")

    async def leave(self, args: list[str]) -> None:
        name = args[0] if args else self.channel
        if name is None:
            self.say("usage: /leave CHANNEL")
            return
        await self.client.request("/channel/leave", {"name": name})
        if self.channel is not None and name.casefold() == self.channel.casefold():
            self.channel = None
        self.say(f"left {name}")

    async def say_in_channel(self, text: str) -> None:
        if self.channel is None:
            self.say("not in a channel: /join one first, or /msg NAME TEXT")
            return
        await self.client.request("/channel/send", {"name": self.channel, "message": text})

    async def who(self, args: list[str]) -> None:
        name = args[0] if args else self.channel
        if name is None:
            self.say("usage: /who CHANNEL")
            return
        users = (await self.client.request("/channel/list_users", {"name": name}))["users"]
        listed = ", ".join(u["name"] + (" (online)" if u["online"] else "") for u in users)
        self.say(f"{name}: {listed}")

    async def channels(self, args: list[str]) -> None:
        found = (await self.client.request("/channel/list"))["channels"]
        for channel in found:
            self.say(f"{channel['name']}: {channel['unread']} unread")
        if not found:
            self.say("no channels: /join one")

    async def inbox(self, args: list[str]) -> None:
        data = await self.client.request("/receive")
        for sender, texts in data["messages"].items():
            for text in texts:
                self.say(f"{sender}: {text}")
        if not data["messages"]:
            self.say("no new private messages")

    async def history(self, args: list[str]) -> None:
        if not self._need(args, 1, "/history CHANNEL|NAME [N]"):
            return
        limit = int(args[1]) if len(args) > 1 and args[1].isdigit() else 20
        params = {"name": args[0], "limit": max(limit, 1)}
        try:
            data = await self.client.request("/channel/history", params)
            lines = [f"[{m['datetime']}] {m['name']}: {m['msg']}" for m in data["messages"]]
        except NotFound:
            data = await self.client.request("/history", params)
            lines = [
                f"[{m['datetime']}] {m['name']} -> {m['to']}: {m['msg']}" for m in data["messages"]
            ]
        for line in lines or ["no messages"]:
            self.say(line)

    async def help(self, args: list[str]) -> None:
        self.say(HELP)

    async def show_events(self) -> None:
        """Print pushed events as they arrive, acknowledging messages once shown."""
        async for event in self.client.events():
            text = describe(event)
            if text is not None:
                self.say(text)
            await self._acknowledge(event)

    async def _acknowledge(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if event.get("event") == "message" and "to" not in data:
            await self.client.call("/ack", {"id": data["id"]})
        elif event.get("event") == "channel_message":
            await self.client.call("/ack", {"channel": data["channel"], "id": data["id"]})


def describe(event: dict[str, Any]) -> str | None:
    """One line for a pushed event, or None for events not worth showing."""
    kind, data = event.get("event"), event.get("data") or {}
    if kind == "message":
        if "to" in data:
            return f"(you -> {data['to']}): {data['msg']}"
        return f"{data['name']} -> you: {data['msg']}"
    if kind == "channel_message":
        return f"[{data['channel']}] {data['name']}: {data['msg']}"
    if kind in ("join", "leave"):
        return f"* {data['name']} {'joined' if kind == 'join' else 'left'} {data['channel']}"
    if kind == "presence":
        return f"* {data['name']} is {'online' if data['online'] else 'offline'}"
    return None


async def interactive(client: Client) -> int:
    try:
        import prompt_toolkit  # noqa: F401
    except ImportError:
        lines = _plain_lines()
    else:
        lines = _prompt_toolkit_lines()
    shell = Shell(client, _say)
    _say("chatcat: /help lists the commands")
    if client.token is not None:
        await _resume(shell)
    printer = asyncio.create_task(shell.show_events())
    try:
        async for line in lines:
            if not await shell.handle(line):
                break
    finally:
        printer.cancel()
    return 0


async def _resume(shell: Shell) -> None:
    try:
        await shell.start_session()
    except ChatdError as error:
        shell.say(f"error {int(error.code)}: {error.message} (the token was not accepted)")


async def _plain_lines() -> AsyncIterator[str]:
    while line := await asyncio.to_thread(sys.stdin.readline):
        yield line


def _say(text: str) -> None:
    # Under prompt_toolkit's patch_stdout this prints above the line being typed.
    print(text, flush=True)


async def _prompt_toolkit_lines() -> AsyncIterator[str]:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.patch_stdout import patch_stdout

    completer = WordCompleter([*_command_names(), "/quit"], sentence=True)
    session: PromptSession[str] = PromptSession(completer=completer, history=InMemoryHistory())
    with patch_stdout(raw=True):
        while True:
            try:
                yield await session.prompt_async("> ")
            except (EOFError, KeyboardInterrupt):
                return


def _command_names() -> Iterator[str]:
    for line in HELP.splitlines():
        word = line.split(" ", 1)[0]
        if word.startswith("/"):
            yield word


__all__ = ["Shell", "describe", "interactive"]
