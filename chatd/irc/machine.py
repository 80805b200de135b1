"""The IRC protocol machine: bytes in, actions and lines out (protocol.md, section 12).

Sans-I/O: no sockets, no asyncio, no store.  It owns what IRC itself decides:
line limits, capability negotiation, the registration sequence (CAP holding
it, SASL PLAIN, PASS), PING/PONG, QUIT, and the shape of every reply.  What
needs chatd's accounts, channels or messages comes out as an action
(:class:`Login`, :class:`Register`, :class:`Command`) for the session core
(``chatd/irc/session.py``), which calls back with the outcome.
"""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass, field

from chatd.irc import numerics as n
from chatd.irc.lines import (
    MALFORMED,
    NOT_UTF8,
    LineDecoder,
    LineError,
    Message,
    format_line,
)

# Capabilities offered (CAP LS), with their values under CAP LS 302.
CAPABILITIES = {
    "account-tag": "",
    "batch": "",
    "draft/chathistory": "",
    "draft/read-marker": "",
    "echo-message": "",
    "labeled-response": "",
    "message-tags": "",
    "sasl": "PLAIN",
    "server-time": "",
}
SASL_CHUNK = 400  # bytes of base64 per AUTHENTICATE line (IRCv3 sasl-3.1)
MAX_SASL = 4096  # bytes of base64 in all: a name, a 1024-character password, some slack
USER_HOST = "chatd"  # the host part of every user's source: chatd shows no addresses


@dataclass(frozen=True, slots=True)
class Login:
    """Check a name and password (SASL PLAIN or PASS)."""

    name: str
    password: str
    via_sasl: bool


@dataclass(frozen=True, slots=True)
class Register:
    """NICK, USER and CAP END are in: the core finishes registration (or refuses it)."""

    nick: str


@dataclass(frozen=True, slots=True)
class Command:
    """A command of a registered client, for the core."""

    message: Message


@dataclass(frozen=True, slots=True)
class Quit:
    reason: str


Action = Login | Register | Command | Quit
# A line to send: command, parameters, source, tags.
OutLine = tuple[str, list[str], str | None, dict[str, str] | None]


@dataclass
class IrcMachine:
    server_name: str
    nick: str = "*"
    user: str | None = None
    caps: set[str] = field(default_factory=set)
    account: str | None = None  # the logged-in account, or a guest's name
    registered: bool = False
    alive: bool = False  # a line arrived since take_alive() (the delivery rule)
    closed: bool = False
    _negotiating: bool = False  # CAP LS/REQ seen, no CAP END yet: registration waits
    _registering: bool = False  # Register was emitted; the core has not answered yet
    _sasl: str | None = None  # base64 collected so far while AUTHENTICATE is in progress
    _password: str | None = None  # from PASS
    _out: list[OutLine] = field(default_factory=list)
    # The label of the command running, and where its replies start in _out.
    _label: tuple[str, int] | None = None
    _batches: int = 0
    _decoder: LineDecoder = field(default_factory=LineDecoder)
    _queue: deque[Message | LineError] = field(default_factory=deque)

    # Input.

    def receive(self, data: bytes) -> None:
        """Take bytes; their lines wait in order for next_actions()."""
        items = self._decoder.feed(data)
        if items:
            self.alive = True
            self._queue.extend(items)

    def next_actions(self) -> list[Action]:
        """Handle waiting lines up to the first that needs the core, and return its
        actions; [] when no line is left.  One line at a time, so that a client that
        sends registration and commands in one go (bots do) has its commands run after
        the login they depend on, and every reply comes in the order of the lines."""
        while self._queue and not self.closed:
            item = self._queue.popleft()
            if isinstance(item, LineError):
                self._line_error(item)
                continue
            actions = self._handle(item)
            if actions:
                return actions
        return []

    def take_alive(self) -> bool:
        alive, self.alive = self.alive, False
        return alive

    def _line_error(self, error: LineError) -> None:
        if error.kind == MALFORMED:
            return  # RFC 1459 2.3.1: lines that cannot be parsed are ignored
        if error.kind == NOT_UTF8:
            failure = [error.command or "*", "INVALID_UTF8", "Line is not UTF-8"]
            self.send("FAIL", failure, self.server_name)
            return
        # Too long, or too many tags: the line is dropped whole, never cut.
        self.numeric(n.ERR_INPUTTOOLONG, "Input line was too long")

    def _handle(self, message: Message) -> list[Action]:
        command = message.command
        if command == "CAP":
            self._cap(message)
        elif command == "PING":
            self.send("PONG", [self.server_name, message.param(0)], self.server_name)
        elif command == "PONG":
            pass  # alive already noted
        elif command == "QUIT":
            self.close(f"Quit: {message.param(0)}" if message.params else "Quit")
            return [Quit(message.param(0))]
        elif command == "NICK":
            self._nick(message)
        elif command == "USER":
            self._user(message)
        elif command == "PASS":
            self._pass(message)
        elif command == "AUTHENTICATE":
            return self._authenticate(message)
        elif not self.registered:
            self.numeric(n.ERR_NOTREGISTERED, "You have not registered")
        else:
            return [Command(message)]
        if command in ("CAP", "NICK", "USER", "PASS"):  # what registration waits for
            return self._maybe_register()
        return []

    # Capabilities (IRCv3 capability negotiation, 302).

    def _cap(self, message: Message) -> None:
        sub = message.param(0).upper()
        if sub == "LS":
            self._negotiating = not self.registered
            version_302 = message.param(1).isdigit() and int(message.param(1)) >= 302
            offered = [k + (f"={v}" if v and version_302 else "") for k, v in CAPABILITIES.items()]
            self.send("CAP", [self.nick, "LS", " ".join(sorted(offered))], self.server_name)
        elif sub == "LIST":
            self.send("CAP", [self.nick, "LIST", " ".join(sorted(self.caps))], self.server_name)
        elif sub == "REQ":
            self._negotiating = not self.registered
            self._cap_req(message.param(1))
        elif sub == "END":
            self._negotiating = False
        else:
            self.numeric("410", sub or "*", "Invalid CAP command")

    def _cap_req(self, requested: str) -> None:
        wanted = requested.split()
        names = [w.removeprefix("-") for w in wanted]
        if not wanted or any(name not in CAPABILITIES for name in names):
            self.send("CAP", [self.nick, "NAK", requested], self.server_name)
            return
        for want in wanted:  # all or nothing, as the spec says
            if want.startswith("-"):
                self.caps.discard(want[1:])
            else:
                self.caps.add(want)
        self.send("CAP", [self.nick, "ACK", requested], self.server_name)

    # Registration.

    def _nick(self, message: Message) -> None:
        wanted = message.param(0)
        if not wanted:
            self.numeric(n.ERR_NONICKNAMEGIVEN, "No nickname given")
        elif self.registered:
            if wanted != self.nick:
                self.numeric(
                    n.ERR_UNKNOWNERROR,
                    "NICK",
                    "Your nick is your account name here: log in as another account instead",
                )
        else:
            self.nick = wanted

    def _user(self, message: Message) -> None:
        if self.registered:
            self.numeric(n.ERR_ALREADYREGISTERED, "You may not reregister")
        elif len(message.params) < 4:
            self.numeric(n.ERR_NEEDMOREPARAMS, "USER", "Not enough parameters")
        else:
            self.user = message.param(0)

    def _pass(self, message: Message) -> None:
        if self.registered:
            self.numeric(n.ERR_ALREADYREGISTERED, "You may not reregister")
        elif not message.params:
            self.numeric(n.ERR_NEEDMOREPARAMS, "PASS", "Not enough parameters")
        else:
            self._password = message.param(0)

    def _maybe_register(self) -> list[Action]:
        if (
            self.registered
            or self._registering
            or self._negotiating
            or self._sasl is not None
            or self.user is None
            or self.nick == "*"
        ):
            return []
        password, self._password = self._password, None
        if password is not None and self.account is None:
            name, password = _pass_credentials(password, self.nick)
            self._registering = True
            return [Login(name, password, via_sasl=False)]
        self._registering = True
        return [Register(self.nick)]

    def registration_refused(self) -> None:
        """The core did not register the client: it stays unregistered and may try again."""
        self._registering = False

    # SASL PLAIN (IRCv3 sasl-3.1).

    def _authenticate(self, message: Message) -> list[Action]:
        data = message.param(0)
        if self.account is not None:
            self.numeric(n.ERR_SASLALREADY, "You have already authenticated using SASL")
            return []
        if "sasl" not in self.caps:
            self.numeric(n.ERR_SASLFAIL, "SASL authentication failed: CAP REQ sasl first")
            return []
        if data == "*":
            self._sasl = None
            self.numeric(n.ERR_SASLABORTED, "SASL authentication aborted")
            return self._maybe_register()
        if self._sasl is None:
            if data.upper() != "PLAIN":
                self.numeric(n.RPL_SASLMECHS, "PLAIN", "are available SASL mechanisms")
                self.numeric(n.ERR_SASLFAIL, "SASL authentication failed")
                return []
            self._sasl = ""
            self.send("AUTHENTICATE", ["+"])
            return []
        return self._sasl_data(data)

    def _sasl_data(self, data: str) -> list[Action]:
        assert self._sasl is not None
        if data != "+":
            self._sasl += data
        if len(self._sasl) > MAX_SASL:
            self._sasl = None
            self.numeric(n.ERR_SASLTOOLONG, "SASL message too long")
            return []
        if len(data) == SASL_CHUNK:
            return []  # more to come
        collected, self._sasl = self._sasl, None
        credentials = _sasl_plain(collected)
        if credentials is None:
            self.numeric(n.ERR_SASLFAIL, "SASL authentication failed")
            return []
        self._sasl = ""  # still in progress (holds registration) until the core answers
        return [Login(credentials[0], credentials[1], via_sasl=True)]

    def logged_in(self, account: str, via_sasl: bool) -> list[Action]:
        """The core verified the credentials of a Login."""
        self.account = account
        if via_sasl:
            self._sasl = None
            text = f"You are now logged in as {account}"
            self.numeric(n.RPL_LOGGEDIN, user_source(account), account, text)
            self.numeric(n.RPL_SASLSUCCESS, "SASL authentication successful")
            return self._maybe_register()
        self._registering = False
        return self._maybe_register()

    def login_failed(self, via_sasl: bool, reason: str | None = None) -> None:
        text = "SASL authentication failed" + ("" if reason is None else f": {reason}")
        if via_sasl:
            self._sasl = None
            self.numeric(n.ERR_SASLFAIL, text)
        else:
            self._registering = False
            self.numeric("464", "Password incorrect" if reason is None else reason)

    def welcome(self, name: str, network: str, version: str, isupport: list[str]) -> None:
        """Registration is done: 001 to 005 under the client's name (its account's)."""
        self.nick, self.registered, self._registering = name, True, False
        self.numeric(n.RPL_WELCOME, f"Welcome to the {network} IRC network, {self.source}")
        self.numeric(n.RPL_YOURHOST, f"Your host is {self.server_name}, running chatd {version}")
        self.numeric(n.RPL_CREATED, "This server speaks chatd's protocols over IRC")
        self.numeric(n.RPL_MYINFO, self.server_name, f"chatd-{version}", "i", "")
        for start in range(0, len(isupport), 12):  # at most 13 tokens per line, by custom
            tokens = isupport[start : start + 12]
            self.numeric(n.RPL_ISUPPORT, *tokens, "are supported by this server")

    # Output.

    @property
    def source(self) -> str:
        return user_source(self.nick)

    def send(
        self,
        command: str,
        params: list[str],
        source: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        if not self.closed:  # nothing follows the ERROR line
            self._out.append((command, params, source, tags))

    def numeric(self, code: str, *params: str) -> None:
        self.send(code, [self.nick, *params], self.server_name)

    def take_output(self) -> bytes:
        if self._label is not None:
            return b""  # a labelled command's replies go out together, once it is done
        out, self._out = self._out, []
        return b"".join(format_line(*line) for line in out)

    def new_batch_reference(self) -> str:
        self._batches += 1
        return f"B{self._batches}"

    def begin_label(self, tags: dict[str, str]) -> None:
        """Mark the start of a command's replies, to label them (IRCv3 labeled-response)."""
        label = tags.get("label")
        if label and "labeled-response" in self.caps and self._label is None:
            self._label = (label, len(self._out))

    def end_label(self) -> None:
        """One reply gets the label tag; several go in a labeled-response batch; none, ACK."""
        if self._label is None:
            return
        label, start = self._label
        self._label = None
        replies = self._out[start:]
        del self._out[start:]
        if not replies:
            self.send("ACK", [], self.server_name, {"label": label})
        elif len(replies) == 1:
            command, params, source, tags = replies[0]
            self.send(command, params, source, {**(tags or {}), "label": label})
        else:
            reference = self.new_batch_reference()
            tags = {"label": label}
            self.send("BATCH", [f"+{reference}", "labeled-response"], self.server_name, tags)
            for command, params, source, line_tags in replies:
                self.send(command, params, source, {**(line_tags or {}), "batch": reference})
            self.send("BATCH", [f"-{reference}"], self.server_name)

    def close(self, reason: str) -> None:
        if not self.closed:
            self.send("ERROR", [f"Closing link: {reason}"])
            self.closed = True


def user_source(name: str) -> str:
    return f"{name}!{name}@{USER_HOST}"


def _pass_credentials(password: str, nick: str) -> tuple[str, str]:
    """PASS name:password, or PASS password for the account named as the nick."""
    name, colon, rest = password.partition(":")
    if colon and name and all(ch.isalnum() or ch in "_-." for ch in name):
        return name, rest
    return nick, password


def _sasl_plain(collected: str) -> tuple[str, str] | None:
    """authzid NUL authcid NUL password; the authzid must be empty or the authcid."""
    try:
        decoded = base64.b64decode(collected, validate=True).decode("utf-8")
    # ValueError, not only binascii.Error: b64decode() raises a plain ValueError for a
    # str with non-ASCII characters (AUTHENTICATE ß...), which crashed the connection.
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors too
        return None
    parts = decoded.split("\x00")
    if len(parts) != 3 or not parts[1] or parts[0] not in ("", parts[1]):
        return None
    return parts[1], parts[2]
