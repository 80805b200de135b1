"""IRC lines: bytes to messages and back (protocol.md, section 12.1).

Sans-I/O.  Tokenising is ``irctokens``'; this module adds what it leaves out:
blank lines (which raise inside it), the 512-byte limit on the line without
its tags, IRCv3's limits on tags (4094 bytes from a client, 8191 in all),
and strict UTF-8 (chatd advertises UTF8ONLY).  Every problem with a line is a
:class:`LineError`; nothing else escapes :func:`parse` or :class:`LineDecoder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from irctokens.line import build, tokenise

MAX_LINE = 512  # bytes, with CRLF, without the tags (RFC 1459 2.3, IRCv3 message-tags)
MAX_CLIENT_TAGS = 4094  # bytes of tag data a client may send, without '@' and the space
MAX_TAGS = 8191  # bytes of tag data in all, with the '@' and the space
# The most a decoder holds without finding a line end: the largest legal line.
MAX_BUFFERED = MAX_TAGS + MAX_LINE

TOO_LONG = "too long"
TAGS_TOO_LONG = "tags too long"
NOT_UTF8 = "not UTF-8"
MALFORMED = "malformed"


class LineError(Exception):
    """A line that cannot be used; ``command`` is its verb when one could be read."""

    def __init__(self, kind: str, command: str | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.command = command


@dataclass(slots=True)
class Message:
    command: str  # upper case
    params: list[str]
    tags: dict[str, str] = field(default_factory=dict)
    source: str | None = None  # clients may send one; servers ignore it

    def param(self, index: int, default: str = "") -> str:
        return self.params[index] if index < len(self.params) else default


def parse(raw: bytes) -> Message | None:
    """One line without its line end; None for a blank line (ignored, as servers do)."""
    if not raw.strip(b" \r"):
        return None
    tag_bytes = 0
    rest = raw
    if raw.startswith(b"@"):
        tags_part, _, rest = raw.partition(b" ")
        tag_bytes = len(tags_part) - 1
    rest = rest.lstrip(b" ").rstrip(b"\r")
    if tag_bytes > MAX_CLIENT_TAGS:
        raise LineError(TAGS_TOO_LONG, _guess_command(rest))
    if len(rest) + 2 > MAX_LINE:
        raise LineError(TOO_LONG, _guess_command(rest))
    try:
        text = raw.rstrip(b"\r").decode("utf-8")
    except UnicodeDecodeError:
        raise LineError(NOT_UTF8, _guess_command(rest)) from None
    try:
        line = tokenise(text)  # a line it returns has a command: it raises on none
    except (IndexError, ValueError):  # a line of tags or a source only
        raise LineError(MALFORMED) from None
    return Message(line.command, line.params, line.tags or {}, line.source)


def _guess_command(rest: bytes) -> str | None:
    """The verb of a line that cannot be parsed, to name it in the error reply."""
    words = rest.split()
    if words and words[0].startswith(b":"):
        words = words[1:]
    if not words:
        return None
    verb = words[0].decode("latin-1").upper()
    return verb if verb.isascii() and verb.isalnum() and len(verb) <= 32 else None


class LineDecoder:
    """Splits a byte stream into lines (LF or CRLF); holds at most MAX_BUFFERED bytes."""

    __slots__ = ("_buffer", "_skipping")

    def __init__(self) -> None:
        self._buffer = b""
        self._skipping = False  # inside a line already reported too long

    def feed(self, data: bytes) -> list[Message | LineError]:
        buffer = self._buffer + data
        out: list[Message | LineError] = []
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            raw = buffer[start:end]
            start = end + 1
            if self._skipping:
                self._skipping = False
                continue
            if len(raw) > MAX_BUFFERED:
                out.append(LineError(TOO_LONG, _guess_command(raw[:64])))
                continue
            try:
                message = parse(raw)
            except LineError as error:
                out.append(error)
                continue
            if message is not None:
                out.append(message)
        self._buffer = buffer[start:]
        if len(self._buffer) > MAX_BUFFERED:
            if not self._skipping:
                out.append(LineError(TOO_LONG, _guess_command(self._buffer[:64])))
            self._skipping = True
            self._buffer = b""
        return out


def format_line(
    command: str,
    params: list[str],
    source: str | None = None,
    tags: dict[str, str] | None = None,
) -> bytes:
    """One line with its CRLF.  Parameters must hold no CR, LF or NUL (callers split
    text first); only the last may contain spaces or start with ':'."""
    params = [*map(_middle, params[:-1]), *params[-1:]]
    if params and params[-1] and command in _TEXT_LAST and not params[-1].startswith(":"):
        # The last parameter is text: always written as a trailing one, so clients
        # that look for " :" find it even when the text is one word.
        line = build(command, params[:-1], source, tags).format() + " :" + params[-1]
    else:
        line = build(command, params, source, tags).format()
    return _fit(line.encode("utf-8")) + b"\r\n"


def _middle(param: str) -> str:
    """A parameter before the last, as it can be written: replies quote what a client
    sent (a nick, a JOIN or TOPIC target, given as a trailing parameter), which may be
    empty, hold a space or start with ':'; written as is, it made no valid line (an
    empty one) or raised (irctokens refuses the others).  Such a one is shown as '*'."""
    return "*" if not param or " " in param or param.startswith(":") else param


def _fit(line: bytes) -> bytes:
    """The line cut to MAX_LINE bytes with its CRLF, tags aside.  Replies that quote
    what a client sent (a 500-byte PING token, CAP subcommand, JOIN or WHOIS target)
    add a prefix and the nick to it and could overflow; a longer line is invalid
    IRC, so, as other servers do, the end goes (never mid-character)."""
    tags, space, rest = line.partition(b" ") if line.startswith(b"@") else (b"", b"", line)
    if len(rest) + 2 <= MAX_LINE:
        return line
    cut = rest[: MAX_LINE - 2].decode("utf-8", errors="ignore").encode("utf-8")
    return tags + space + cut.rstrip(b" ")


_TEXT_LAST = frozenset(
    {"PRIVMSG", "NOTICE", "PART", "QUIT", "ERROR", "FAIL", "CAP", "PONG"}
    | {f"{code:03d}" for code in range(1000)}
)


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def split_text(text: str, budget: int) -> list[str]:
    """Text as pieces that each fit ``budget`` UTF-8 bytes, never cut: line breaks
    start a new piece, long pieces break at a space when one is near the end, else
    between characters.  Empty lines are left out (IRC cannot carry them)."""
    budget = max(budget, 4)  # room for any one character
    pieces: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = line.replace("\x00", "")
        while utf8_len(line) > budget:
            cut = _cut_point(line, budget)
            pieces.append(line[:cut])
            line = line[cut:]
        if line:
            pieces.append(line)
    return pieces


def _cut_point(line: str, budget: int) -> int:
    encoded = line.encode("utf-8")[:budget]
    fits = len(encoded.decode("utf-8", errors="ignore"))  # whole characters only
    space = line.rfind(" ", 0, fits)
    # Break after a space if it keeps at least three quarters of the piece.
    return space + 1 if space >= fits * 3 // 4 else fits
