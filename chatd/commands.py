"""chatcat's interactive language, without I/O: command lines in, commands out; events and
messages in, screen lines out.  :mod:`chatd.shell` runs what this module describes.

No quoting anywhere: user and channel names cannot contain spaces (protocol.md, section 7),
so words are split on whitespace, and the last argument of a command that takes a text or
a password is the rest of the line, exactly as typed (spaces and quotes included).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from datetime import UTC, date, datetime, tzinfo
from typing import Any

WIRE_TIME = "%Y.%m.%d:%H:%M:%S"
HISTORY_DEFAULT = 20


class CommandError(Exception):
    """A line that is not a valid command; the message says why and how to write it."""


@dataclasses.dataclass(frozen=True)
class Command:
    """One parsed input line.

    ``verb`` is the canonical command (``/part`` becomes ``/leave``), or ``say`` for a
    plain line. ``name`` is the user or channel named (a channel's ``#`` removed; ``channel``
    tells whether it was there), ``text`` the message or password, ``count`` a number.
    """

    verb: str
    name: str | None = None
    text: str | None = None
    count: int | None = None
    channel: bool = False


@dataclasses.dataclass(frozen=True)
class Syntax:
    args: str  # what follows the verb, as /help shows it
    help: str
    kinds: tuple[str, ...] = ()  # how to read each argument, in order


# Argument kinds: "user", "channel", "target" (a user or a #channel), "count", "text" (the
# rest of the line), "password" (the rest of the line, secret); a trailing "?" makes one
# optional. "ignored" swallows the rest of the line.
COMMANDS: dict[str, Syntax] = {
    "/register": Syntax("NAME [PASSWORD]", "create an account (no PASSWORD: asked twice, unseen)",
                        ("user", "password?")),
    "/login": Syntax("NAME [PASSWORD]", "log in (no PASSWORD: asked for, unseen)",
                     ("user", "password?")),
    "/logout": Syntax("", "end the session"),
    "/join": Syntax("CHANNEL", "join a channel and talk in it", ("channel",)),
    "/leave": Syntax("[CHANNEL]", "leave a channel (default: the current one)", ("channel?",)),
    "/msg": Syntax("NAME TEXT", "send a private message", ("user", "text")),
    "/query": Syntax("[NAME [TEXT]]", "talk privately: plain lines go to NAME (no NAME: "
                     "back to the channel)", ("user?", "text?")),
    "/me": Syntax("TEXT", "an action: * alice waves", ("text",)),
    "/names": Syntax("[CHANNEL]", "members of a channel, and who is online", ("channel?",)),
    "/whois": Syntax("NAME", "is NAME registered, since when, online?", ("user",)),
    "/list": Syntax("", "your channels and their unread messages"),
    "/history": Syntax("[#CHANNEL|NAME] [N]", f"the last N messages (default {HISTORY_DEFAULT}"
                       ", at most 200) here, or of a channel or conversation",
                       ("target?", "count?")),
    "/nick": Syntax("", "names are accounts here: /login as another one", ("ignored",)),
    "/help": Syntax("[COMMAND]", "this text, or one command's", ("text?",)),
    "/quit": Syntax("", "leave chatcat (Ctrl-D too)", ("ignored",)),
}
ALIASES = {"/part": "/leave", "/who": "/names", "/channels": "/list", "/exit": "/quit",
           "/j": "/join", "/q": "/query"}

HELP_FOOTER = """\
A plain line goes to the current channel or /query; the prompt shows which (#lobby> or @bob>).
A line starting with // sends the text after the first / (//etc/hosts sends /etc/hosts).
Channels may be written with or without # (#lobby or lobby). /part, /who, /channels and
/exit are other names for /leave, /names, /list and /quit.
No quoting: a TEXT or PASSWORD is the rest of the line exactly as typed, spaces and quotes
included (/login bob battery staple logs in with "battery staple"). A password is never
kept in the Up-arrow history; leave it off the line to type it unseen at the password:
prompt (the only way to give one that begins with a space)."""


def help_text(topic: str | None = None) -> str:
    if topic:
        verb = canonical(topic if topic.startswith("/") else "/" + topic)
        syntax = COMMANDS.get(verb)
        if syntax is None:
            raise CommandError(f"no command {topic}: /help lists them")
        return _help_line(verb, syntax)
    lines = [_help_line(verb, syntax) for verb, syntax in COMMANDS.items()]
    return "\n".join([*lines, "", HELP_FOOTER])


def _help_line(verb: str, syntax: Syntax) -> str:
    return f"{(verb + ' ' + syntax.args).strip():<30} {syntax.help}"


def canonical(verb: str) -> str:
    verb = verb.lower()
    return ALIASES.get(verb, verb)


def usage(verb: str) -> str:
    return f"usage: {verb} {COMMANDS[verb].args}".rstrip()


def parse(line: str) -> Command:
    """Parse one input line (without its newline); raises CommandError."""
    if not line.strip():
        raise CommandError("empty line")
    if line.startswith("//"):
        return Command("say", text=line[1:])
    if not line.startswith("/"):
        return Command("say", text=line)
    verb_word, rest = _next_word(line)
    verb = canonical(verb_word)
    syntax = COMMANDS.get(verb)
    if syntax is None:
        raise CommandError(f"unknown command {verb_word}: /help lists them")
    return _read_arguments(verb, syntax, rest)


def _read_arguments(verb: str, syntax: Syntax, rest: str) -> Command:
    found: dict[str, Any] = {}
    for kind in syntax.kinds:
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if kind == "ignored":
            rest = ""
            break
        if not rest.strip():
            if optional:
                continue
            raise CommandError(usage(verb))
        rest = _read_one(verb, kind, rest, found)
    if rest.strip():
        raise CommandError(f"{verb}: unexpected {rest.strip()!r}; {usage(verb)}")
    if verb == "/register":
        _refuse_old_register(found.get("text"))
    return Command(verb, **found)


def _refuse_old_register(password: str | None) -> None:
    """``/register bob pw pw`` (the old form) would register the password "pw pw"."""
    words = (password or "").split(" ")
    if len(words) == 2 and words[0] == words[1]:
        raise CommandError(
            "/register takes the password once, as the rest of the line; to register a "
            "password made of one word typed twice, use the prompt: /register NAME"
        )


def _read_one(verb: str, kind: str, rest: str, found: dict[str, Any]) -> str:
    """Store one argument of ``kind`` in ``found``; return what is left of the line."""
    if kind in ("text", "password"):
        found["text"] = rest.lstrip()
        return ""
    word, left = _next_word(rest)
    if kind == "count" or (kind == "target" and word.isdigit() and not left.strip()):
        found["count"] = _count(verb, word)
    elif kind in ("channel", "target") and word.startswith("#"):
        found["name"], found["channel"] = _name(verb, word[1:]), True
    else:
        found["name"], found["channel"] = _name(verb, word), kind == "channel"
    return left


def _next_word(text: str) -> tuple[str, str]:
    # split() without a separator keeps the rest as typed, trailing spaces included.
    parts = text.split(maxsplit=1)
    return (parts[0], parts[1]) if len(parts) == 2 else (parts[0] if parts else "", "")


def _name(verb: str, word: str) -> str:
    if not word:
        raise CommandError(f"{verb}: a name is missing after #; {usage(verb)}")
    return word


def _count(verb: str, word: str) -> int:
    if not word.isdecimal() or not word.isascii() or int(word) < 1:
        raise CommandError(f"{verb}: {word!r} is not a number of messages (1 or more)")
    return int(word)


def history_entry(line: str) -> str:
    """What the Up-arrow history keeps of a line: never a password."""
    try:
        command = parse(line)
    except CommandError:
        return line
    if command.verb in ("/login", "/register") and command.text is not None:
        return f"{command.verb} {command.name}"
    return line


SHORT_TEXT = 30  # characters of a typed text that a notice repeats


def typed(command: Command) -> str:
    """The command as a notice names it to the one who typed it: a plain line as
    ``your line "text"``, a command by its verb and name, a text shortened, never a
    password."""
    if command.verb == "say":
        return f'your line "{_shortened(command.text or "")}"'
    words = [command.verb]
    if command.name is not None:
        words.append(("#" if command.channel else "") + command.name)
    if command.text and command.verb not in ("/login", "/register"):
        words.append(f'"{_shortened(command.text)}"')
    return " ".join(words)


def _shortened(text: str) -> str:
    return text if len(text) <= SHORT_TEXT else text[: SHORT_TEXT - 1] + "…"


# Display: every line starts with the local time; a date line when the day changes.


def parse_wire_time(text: str) -> datetime:
    """A protocol datetime (UTC, ``YYYY.MM.DD:HH:MM:SS``) as an aware datetime."""
    return datetime.strptime(text, WIRE_TIME).replace(tzinfo=UTC)


class Timeline:
    """Stamps lines with the local ``HH:MM`` and announces each new day once.

    A date line precedes any line whose local date differs from the line before it, so
    /history of older days and the live lines after it each say which day they are on.
    """

    def __init__(self, tz: tzinfo | None = None) -> None:
        self.tz = tz  # None: the system's local time zone (TZ)
        self.last_date: date | None = None

    def lines(self, text: str, when: datetime | None = None) -> list[str]:
        moment = (when or datetime.now(UTC)).astimezone(self.tz)
        out = []
        if moment.date() != self.last_date:
            self.last_date = moment.date()
            out.append(moment.strftime("-- %A %d %B %Y --"))
        first, *more = printable(text).split("\n")
        out.append(f"{moment:%H:%M} {first}")
        out.extend(f"      {line}" for line in more)  # continuation under the text
        return out


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Control characters as ^X, so a message cannot move the cursor or clear the screen."""
    text = text.replace("\r\n", "\n")
    return _CONTROL.sub(lambda m: "^" + chr((ord(m[0]) + 64) % 128), text)


def channel_line(channel: str, sender: str, text: str) -> str:
    if text.startswith("/me "):
        return f"[{channel}] * {sender} {text[4:]}"
    return f"[{channel}] {sender}: {text}"


def private_line(sender: str, recipient: str, text: str) -> str:
    if text.startswith("/me "):
        return f"{sender} -> {recipient}: * {sender} {text[4:]}"
    return f"{sender} -> {recipient}: {text}"


def describe(event: dict[str, Any], me: str | None = None) -> str | None:
    """One line for a pushed event, or None for events not worth showing."""
    kind, data = event.get("event"), event.get("data") or {}
    if kind == "message":
        return private_line(data["name"], data.get("to") or me or "you", data["msg"])
    if kind == "channel_message":
        return channel_line(data["channel"], data["name"], data["msg"])
    if kind in ("join", "leave"):
        return f"* {data['name']} {'joined' if kind == 'join' else 'left'} {data['channel']}"
    if kind == "presence":
        return f"* {data['name']} is {'online' if data['online'] else 'offline'}"
    if "event" not in event and event.get("code"):  # a reply to no request: a refusal
        return f"server: {event.get('msg')} (code {event.get('code')})"
    return None


def network_reason(exc: BaseException) -> str:
    """Why a connection failed, in words: "connection refused", not asyncio's
    "[Errno 111] Connect call failed ('127.0.0.1', 7777)"."""
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    if isinstance(exc, socket.gaierror) and exc.strerror:  # its errno is not an errno
        return f"cannot resolve the host name ({exc.strerror.lower()})"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def event_time(event: dict[str, Any]) -> datetime | None:
    stamp = (event.get("data") or {}).get("datetime")
    try:
        return parse_wire_time(stamp) if isinstance(stamp, str) else None
    except ValueError:
        return None


__all__ = [
    "Command",
    "CommandError",
    "Timeline",
    "describe",
    "help_text",
    "history_entry",
    "parse",
    "parse_wire_time",
]
