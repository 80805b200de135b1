"""The IRC session core: the machine's actions carried out with chatd's handlers.

Every account, channel and message operation goes through ``handlers.dispatch``
with a :class:`~chatd.handlers.Context`, as ``App.handle`` does for msgpack
requests: same auth gate, same flood control, same store, same hub.  Handlers
return data or raise :class:`~chatd.errors.ChatdError`; this module turns both
into IRC lines (protocol.md, section 12).  No sockets here: output goes to a
:class:`Transport`, which tests replace with a list.
"""

from __future__ import annotations

import asyncio
import calendar
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from chatd import __version__, validation
from chatd.app import App
from chatd.auth import new_token, token_digest
from chatd.errors import (
    BadRequest,
    ChatdError,
    Forbidden,
    NotAuthenticated,
    NotFound,
    RateLimited,
    ServerError,
)
from chatd.handlers import Deferred, dispatch
from chatd.hub import Session
from chatd.irc import history
from chatd.irc import numerics as n
from chatd.irc.lines import MAX_LINE, Message, format_line, split_text, utf8_len
from chatd.irc.machine import (
    Action,
    Command,
    IrcMachine,
    Login,
    Quit,
    Register,
    user_source,
)
from chatd.model import ChannelPost, Event, InboxMessage, Join, Leave, SentCopy, memoised
from chatd.protocol import DATETIME_FORMAT, Data, Params, Request
from chatd.store import Bounds, TooManyChannels
from chatd.validation import MAX_NAME_LENGTH, name_key

log = logging.getLogger(__name__)

INBOX = "@inbox"  # the delivery-position key of private messages (channels use "#name")
MAX_TARGETS = 4  # targets of one PRIVMSG
RATE_LIMIT_HOLD = 10.0  # the longest a rate-limited line is held before it is refused
ACTION_PREFIX, ACTION_END = "\x01ACTION ", "\x01"


class Transport(Protocol):
    def write(self, data: bytes) -> None:
        """Queue bytes without waiting; may drop a client that does not read."""

    async def drain(self) -> None:
        """Wait while too much is queued (with the write timeout)."""

    def abort(self, reason: str) -> None:
        """Drop the connection."""

    def probe_soon(self) -> None:
        """Send a PING soon, so that a silent client shows it is alive (the delivery rule)."""


class IrcSession(Session):
    """The connection as the hub and the handlers see it."""

    __slots__ = ("core",)

    def __init__(self, core: IrcCore, address: str, port: int | None) -> None:
        super().__init__(address, port)
        self.core = core

    def write(self, event: Event) -> None:
        self.core.pushed(event)

    async def push_paced(self, event: Event) -> None:
        self.core.pushed(event)
        await self.core.transport.drain()

    def abort(self, reason: str) -> None:
        self.core.transport.abort(reason)


class IrcCore:
    def __init__(
        self, app: App, transport: Transport, address: str = "-", port: int | None = None
    ) -> None:
        self.app = app
        self.transport = transport
        self.session = IrcSession(self, address, port)
        config = app.config
        self.machine = IrcMachine(config.server_name)
        # Newest message id written per stream and not yet acknowledged (the delivery rule).
        self._unacked: dict[str, int] = {}
        self._guest_id: int | None = None
        self._erroneous_nick_told = False

    @property
    def closed(self) -> bool:
        return self.machine.closed

    # Input.

    async def receive(self, data: bytes) -> None:
        """Handle the lines in ``data``; output goes to the transport as it is made."""
        machine = self.machine
        machine.receive(data)
        if machine.take_alive() and self._unacked:
            await self._acknowledge()
        while actions := machine.next_actions():
            self._flush()  # the replies of the lines before, in order
            for action in actions:
                await self._act(action)
                self._flush()
        self._flush()

    async def _act(self, action: Action) -> None:
        if isinstance(action, Login):
            await self._login(action)
        elif isinstance(action, Register):
            try:
                await self._register(action)
            except ChatdError as error:
                # Welcomed, but the joins or the subscription failed: a session without
                # live delivery would silently miss messages, so it ends, and says why.
                self.machine.close(error.message)
        elif isinstance(action, Command):
            self.machine.begin_label(action.message.tags)
            try:
                await self._command(action.message)
            except ChatdError as error:
                self._command_failed(action.message.command, error)
            finally:
                self.machine.end_label()
        else:
            assert isinstance(action, Quit)  # the machine has written ERROR; the transport closes

    def _command_failed(self, command: str, error: ChatdError) -> None:
        """A refusal the command's handler does not answer itself (an acknowledgement's
        flood control, a server error; protocol.md, section 12.3) fails that command
        only.  When the login ended, the machine has written its ERROR line instead."""
        failure = [command, error.code.name, error.message]
        self.machine.send("FAIL", failure, self.app.config.server_name)

    def _flush(self) -> None:
        out = self.machine.take_output()
        if out:
            self.transport.write(out)

    async def close(self) -> None:
        """The connection is gone: end the login (its token) and leave the hub."""
        if self.session.user_id is not None and self.session.token_digest is not None:
            try:
                await self._call("/logout")
            except Exception:  # the store may be closing with the server
                log.debug("IRC logout at close failed", exc_info=True)
        self.app.hub.unbind(self.session)
        if self._guest_id is not None:
            await self.app.store.release_guests(self._guest_id)

    # Calling chatd.

    async def _call(self, op: str, **params: Any) -> Data:
        """One handler call through the auth gate, as App.handle makes it; a send waits
        for its commit.  Raises ChatdError (anything else is logged, then ServerError)."""
        app = self.app
        ctx = app.context(self.session)
        started = time.perf_counter()
        code = 0
        try:
            result = await dispatch(ctx, Request(op, None, Params(params), None))
            if isinstance(result, Deferred):
                result = result.reply(await result.future)
            return result or {}
        except ChatdError as error:
            code = int(error.code)
            if isinstance(error, NotAuthenticated) and self.machine.registered:
                # The login ended elsewhere (token revoked, expired): so does this session.
                self.machine.close(f"Session ended: {error.message}")
            raise
        except Exception as error:
            code = int(ServerError.code)
            log.error("%s IRC %s: unexpected error", self.session, op, exc_info=error)
            raise ServerError() from None
        finally:
            app.metrics.request_handled(op, code, time.perf_counter() - started)

    async def _held(self, op: str, **params: Any) -> Data:
        """Flood control on IRC holds the line (reads nothing more) until the rate
        allows it, up to RATE_LIMIT_HOLD seconds; beyond, RateLimited is raised."""
        while True:
            try:
                return await self._call(op, **params)
            except RateLimited as error:
                if error.retry_after > RATE_LIMIT_HOLD:
                    raise
                await asyncio.sleep(error.retry_after)

    # Registration.

    async def _login(self, action: Login) -> None:
        try:
            data = await self._call("/login", name=action.name, password=action.password)
        except RateLimited as error:
            # Rounded up: "wait 0 s" for a wait of 0.4 s told the client to retry at once.
            wait = f"too many attempts, wait {math.ceil(error.retry_after)} s"
            self.machine.login_failed(action.via_sasl, wait)
            return
        except ChatdError:
            self.machine.login_failed(action.via_sasl)
            return
        for follow_up in self.machine.logged_in(data["name"], action.via_sasl):
            await self._act(follow_up)

    async def _register(self, action: Register) -> None:
        machine = self.machine
        if machine.account is None and self.app.config.irc_guests:
            await self._become_guest(action.nick)
        if machine.account is None:
            await self._refuse_unauthenticated(action.nick)
            return
        config = self.app.config
        machine.welcome(machine.account, config.server_name, __version__, self._isupport())
        machine.numeric(n.ERR_NOMOTD, "MOTD File is missing")
        self._flush()
        channels = await self._call("/channel/list")
        for channel in channels["channels"]:
            target = "#" + channel["name"]
            await self._start_position(channel["name"])
            machine.send("JOIN", [target], machine.source)
            await self._names(target, read_marker=True)
            self._flush()
        # Live delivery, after catching up on what was missed (the delivery rule); a
        # client reconnecting in a loop waits for the subscription's flood control.
        await self._held("/subscribe")

    async def _become_guest(self, nick: str) -> None:
        """A guest identity under the nick, for as long as the connection lasts
        (protocol.md, section 12.6); refusals are left to the caller."""
        try:
            validation.user_name(Params({"name": nick}))
            validation.check_new_name(nick, "nick")
        except ChatdError as error:
            self.machine.numeric(n.ERR_ERRONEUSNICKNAME, nick, f"Erroneous nickname: {error}")
            self._erroneous_nick_told = True
            return
        store, now = self.app.store, self.app.clock()
        key = name_key(nick)
        guest_id = await store.create_guest(nick, key, validation.name_skeletons(nick), now)
        if guest_id is None:
            return  # an account or a connected guest has the name: 433
        token = new_token()
        expires_at = now + self.app.config.token_ttl
        await store.add_token(guest_id, token_digest(token), now, expires_at)
        self.app.hub.bind(self.session, guest_id, nick, token_digest(token), expires_at)
        self.session.token_checked_at = now
        self._guest_id = guest_id
        self.machine.account = nick

    async def _start_position(self, channel_name: str) -> None:
        """A channel joined on IRC is shown from now on: one with no position (never
        read) gets its newest message as position, so that what is said later is
        replayed if this client misses it (protocol.md, section 12.4)."""
        channel = await self.app.store.find_channel(name_key(channel_name))
        assert channel is not None, "channels are never deleted: this one was just joined"
        start, newest = await self.app.store.channel_position(channel.id, self._user_id)
        if start.fresh:
            await self._call("/ack", id=newest, channel=channel.name)

    async def _refuse_unauthenticated(self, nick: str) -> None:
        machine = self.machine
        machine.registration_refused()
        if self._erroneous_nick_told:
            self._erroneous_nick_told = False
            return
        if await self._is_account(nick):
            text = "Nickname is registered to an account: authenticate"
            if self.app.config.irc_guests:
                text = "Nickname is in use: pick another, or authenticate"
            text += " (SASL PLAIN, or PASS name:password)"
            machine.numeric(n.ERR_NICKNAMEINUSE, nick, text)
            return
        machine.send(
            "FAIL",
            ["*", "ACCOUNT_REQUIRED", "Log in first: SASL PLAIN, or PASS name:password"],
            self.app.config.server_name,
        )

    async def _is_account(self, nick: str) -> bool:
        return await self.app.store.find_user(name_key(nick)) is not None

    def _isupport(self) -> list[str]:
        config = self.app.config
        return [
            "CASEMAPPING=ascii",
            "CHANTYPES=#",
            f"CHANLIMIT=#:{config.max_channels_per_user}",
            f"NICKLEN={MAX_NAME_LENGTH}",
            f"CHANNELLEN={MAX_NAME_LENGTH + 1}",
            "PREFIX=",
            "CHANMODES=,,,",
            f"NETWORK={config.server_name}",
            "UTF8ONLY",
            f"CHATHISTORY={config.history_page}",
            "MSGREFTYPES=msgid,timestamp",
            f"TARGMAX=PRIVMSG:{MAX_TARGETS},NOTICE:{MAX_TARGETS}",
            "SAFELIST",
        ]

    # Commands of a registered client.

    async def _command(self, message: Message) -> None:
        handler = _COMMANDS.get(message.command)
        if handler is None:
            self.machine.numeric(n.ERR_UNKNOWNCOMMAND, message.command, "Unknown command")
            return
        await handler(self, message)

    async def _privmsg(self, message: Message) -> None:
        notice = message.command == "NOTICE"
        if len(message.params) < 2 or not message.params[1]:
            if notice:
                return
            if not message.params:
                self.machine.numeric(n.ERR_NORECIPIENT, f"No recipient given ({message.command})")
            else:
                self.machine.numeric(n.ERR_NOTEXTTOSEND, "No text to send")
            return
        text = message.params[1]
        if text.startswith(ACTION_PREFIX):  # CTCP ACTION is chatd's "/me" (protocol.md)
            text = "/me " + text[len(ACTION_PREFIX) :].removesuffix(ACTION_END)
        elif text.startswith("\x01"):
            return  # other CTCP (VERSION, PING...): client chatter, not messages to store
        for target in message.params[0].split(",")[:MAX_TARGETS]:
            await self._send_to(target, text, message.command, notice)

    async def _send_to(self, target: str, text: str, command: str, notice: bool) -> None:
        machine = self.machine
        try:
            if target.startswith("#"):
                await self._require_member(target)
                sent = await self._held("/channel/send", name=target[1:], message=text)
            else:
                sent = await self._held("/send", name=target, msg=text)
        except (NotFound, BadRequest):
            if not notice:
                machine.numeric(n.ERR_NOSUCHNICK, target, "No such nick/channel")
            return
        except Forbidden:
            if not notice:
                machine.numeric(
                    n.ERR_CANNOTSENDTOCHAN, target, "Cannot send to channel: JOIN it first"
                )
            return
        except ChatdError as error:
            failure = [command, "MESSAGE_NOT_SENT", error.message]
            machine.send("FAIL", failure, self.app.config.server_name)
            return
        if "echo-message" in machine.caps:
            stamp = _parse_datetime(sent["datetime"])
            self._message_lines(
                sent["id"], machine.nick, target, text, stamp, self.machine.send, command
            )

    async def _require_member(self, target: str) -> None:
        """PRIVMSG to a channel not joined is refused (chatd's first-use join is not IRC's)."""
        channel = await self.app.store.find_channel(name_key(target[1:]))
        user_id = self.session.user_id
        if channel is None:
            raise NotFound("no such channel")
        if user_id is None or not self.app.hub.is_member(user_id, channel.id):
            raise Forbidden("not a member")

    async def _join(self, message: Message) -> None:
        machine = self.machine
        if not message.params:
            machine.numeric(n.ERR_NEEDMOREPARAMS, "JOIN", "Not enough parameters")
            return
        for target in message.param(0).split(","):
            if not target.startswith("#") or len(target) < 2:
                machine.numeric(n.ERR_NOSUCHCHANNEL, target, "No such channel (they start with #)")
                continue
            if await self._is_member(target):
                continue  # nothing sent, as ergo, ngircd and solanum do
            try:
                joined = await self._held("/channel/join", name=target[1:])
            except TooManyChannels:
                machine.numeric(n.ERR_TOOMANYCHANNELS, target, "You have joined too many channels")
                continue
            except ChatdError as error:
                machine.numeric("479", target, f"Cannot join channel: {error.message}")
                continue
            canonical = "#" + joined["name"]
            await self._start_position(joined["name"])
            machine.send("JOIN", [canonical], machine.source)
            await self._names(canonical, read_marker=True)

    async def _is_member(self, target: str) -> bool:
        """Already in the channel: chatd's memberships are the account's, so a channel
        joined on another connection counts (its JOIN line reached this one, or is on its
        way). The store, not the hub, is asked: the hub hears of a join only once the bus
        delivers it."""
        channel = await self.app.store.find_channel(name_key(target[1:]))
        return channel is not None and await self.app.store.is_member(channel.id, self._user_id)

    async def _part(self, message: Message) -> None:
        machine = self.machine
        if not message.params:
            machine.numeric(n.ERR_NEEDMOREPARAMS, "PART", "Not enough parameters")
            return
        for target in message.param(0).split(","):
            try:
                await self._held("/channel/leave", name=target.removeprefix("#"))
            except Forbidden:
                machine.numeric(n.ERR_NOTONCHANNEL, target, "You're not on that channel")
                continue
            except ChatdError:
                machine.numeric(n.ERR_NOSUCHCHANNEL, target, "No such channel")
                continue
            params = [target] + ([message.param(1)] if len(message.params) > 1 else [])
            machine.send("PART", params, machine.source)

    async def _names_command(self, message: Message) -> None:
        if not message.params:
            self.machine.numeric(n.RPL_ENDOFNAMES, "*", "End of /NAMES list")
            return
        for target in message.param(0).split(","):
            await self._names(target)

    async def _names(self, target: str, read_marker: bool = False) -> None:
        """353 lines (members, online or not: chatd channels are memberships), then 366;
        on a JOIN, the read marker comes before the 366 (draft/read-marker)."""
        machine = self.machine
        members = await self._members(target)
        prefix = f":{machine.server_name} 353 {machine.nick} = {target} :"
        budget = MAX_LINE - 2 - utf8_len(prefix)
        line: list[str] = []
        for name in members:
            if line and utf8_len(" ".join([*line, name])) > budget:
                machine.numeric(n.RPL_NAMREPLY, "=", target, " ".join(line))
                line = []
            line.append(name)
        if line:
            machine.numeric(n.RPL_NAMREPLY, "=", target, " ".join(line))
        if read_marker and "draft/read-marker" in machine.caps:
            found = await history.find_target(self.app.store, self._user_id, target)
            # None only if the channel was left on another connection since the join
            # above, a window of one store read: not provoked in tests.
            if found is not None:  # pragma: no branch
                marker = await self._read_marker(found)
                machine.send("MARKREAD", [found.name, marker], machine.server_name)
        machine.numeric(n.RPL_ENDOFNAMES, target, "End of /NAMES list")

    async def _members(self, target: str) -> list[str]:
        members = await self._member_list(target)
        return [name for name, _ in members]

    async def _member_list(self, target: str) -> list[tuple[str, bool]]:
        if not target.startswith("#"):
            return []
        try:
            data = await self._call("/channel/list_users", name=target[1:])
        except ChatdError:
            return []
        return [(user["name"], user["online"]) for user in data["users"]]

    async def _list(self, message: Message) -> None:
        machine = self.machine
        machine.numeric(n.RPL_LISTSTART, "Channel", "Users  Name")
        channels = await self._call("/channel/list")
        for channel in channels["channels"]:
            target = "#" + channel["name"]
            members = await self._member_list(target)
            machine.numeric(n.RPL_LIST, target, str(len(members)), "")
        machine.numeric(n.RPL_LISTEND, "End of /LIST")

    async def _who(self, message: Message) -> None:
        machine = self.machine
        mask = message.param(0, "*")
        server = machine.server_name
        if mask.startswith("#"):
            for name, online in await self._member_list(mask):
                self._who_reply(mask, name, online, server)
        else:
            try:
                info = await self._call("/user/info", name=mask)
                self._who_reply("*", info["name"], info["online"], server)
            except ChatdError:
                pass
        machine.numeric(n.RPL_ENDOFWHO, mask, "End of WHO list")

    def _who_reply(self, channel: str, name: str, online: bool, server: str) -> None:
        here = "H" if online else "G"  # G (gone): a member not connected now
        self.machine.numeric(
            n.RPL_WHOREPLY, channel, name, "chatd", server, name, here, f"0 {name}"
        )

    async def _whois(self, message: Message) -> None:
        machine = self.machine
        if not message.params:
            machine.numeric(n.ERR_NONICKNAMEGIVEN, "No nickname given")
            return
        target = message.params[-1]
        try:
            info = await self._call("/user/info", name=target)
        except ChatdError:
            machine.numeric(n.ERR_NOSUCHNICK, target, "No such nick/channel")
            machine.numeric(n.RPL_ENDOFWHOIS, target, "End of /WHOIS list")
            return
        name = info["name"]
        machine.numeric(n.RPL_WHOISUSER, name, name, "chatd", "*", name)
        machine.numeric(n.RPL_WHOISSERVER, name, machine.server_name, "chatd")
        machine.numeric(n.RPL_WHOISACCOUNT, name, name, "is logged in as")
        if not info["online"]:
            machine.numeric(n.RPL_AWAY, name, "Not connected (messages wait for them)")
        machine.numeric(n.RPL_ENDOFWHOIS, name, "End of /WHOIS list")

    async def _topic(self, message: Message) -> None:
        machine = self.machine
        target = message.param(0)
        if not target:
            machine.numeric(n.ERR_NEEDMOREPARAMS, "TOPIC", "Not enough parameters")
        elif len(message.params) == 1:
            machine.numeric(n.RPL_NOTOPIC, target, "No topic is set")
        else:
            machine.numeric(n.ERR_CHANOPRIVSNEEDED, target, "chatd channels have no topics")

    async def _mode(self, message: Message) -> None:
        machine = self.machine
        target, modes = message.param(0), message.param(1)
        if not target:
            machine.numeric(n.ERR_NEEDMOREPARAMS, "MODE", "Not enough parameters")
        elif target.startswith("#"):
            if not modes:
                machine.numeric(n.RPL_CHANNELMODEIS, target, "+")
            elif modes.lstrip("+") == "b":
                machine.numeric(n.RPL_ENDOFBANLIST, target, "End of channel ban list")
            else:
                machine.numeric(n.ERR_CHANOPRIVSNEEDED, target, "chatd channels have no modes")
        elif target.lower() != machine.nick.lower():
            machine.numeric(n.ERR_USERSDONTMATCH, "Cannot change mode for other users")
        elif not modes:
            machine.numeric(n.RPL_UMODEIS, "+")
        # A user mode change (+i from irssi) is accepted silently: chatd has no user modes.

    # IRCv3 draft/chathistory and draft/read-marker.

    async def _chathistory(self, message: Message) -> None:
        machine = self.machine
        sub = message.param(0).upper()
        try:
            if sub not in _HISTORY_SUBCOMMANDS or len(message.params) < 2:
                raise history.InvalidParams(sub)  # and an empty target makes no FAIL line
            if sub == "TARGETS":
                await self._history_targets(message)
                return
            target = await history.find_target(
                self.app.store, self._user_id, message.param(1)
            )
            if target is None:
                failure = ["CHATHISTORY", "INVALID_TARGET", sub, message.param(1)]
                machine.send("FAIL", [*failure, "No such target, or not yours to read"],
                             machine.server_name)
                return
            rows = await self._history_rows(sub, target, message.params[2:])
        except (history.InvalidParams, ValueError, IndexError):
            failure = ["CHATHISTORY", "INVALID_PARAMS", sub or "*", "Invalid parameters"]
            machine.send("FAIL", failure, machine.server_name)
            return
        self._history_batch(target.name, rows)

    @property
    def _user_id(self) -> int:
        assert self.session.user_id is not None
        return self.session.user_id

    def _history_limit(self, text: str) -> int:
        limit = int(text)
        if limit < 0:
            raise history.InvalidParams("negative limit")
        return min(limit, self.app.config.history_page)

    async def _history_rows(
        self, sub: str, target: history.Target, args: list[str]
    ) -> list[tuple[int, str, str, str, float]]:
        """(id, sender, target shown, text, time) rows, oldest first."""
        if sub == "BETWEEN":
            first, second = history.parse_reference(args[0]), history.parse_reference(args[1])
            limit = self._history_limit(args[2])
            if _later(first, second):  # newest first when the references are reversed
                return await self._range(target, history.bounds_between(second, first), limit, True)
            return await self._range(target, history.bounds_between(first, second), limit, False)
        ref, limit = history.parse_reference(args[0]), self._history_limit(args[1])
        if sub == "LATEST":
            return await self._range(target, history.bounds_after(ref), limit, True)
        if sub == "BEFORE" and (ref.message_id or ref.timestamp):
            return await self._range(target, history.bounds_before(ref), limit, True)
        if sub == "AFTER" and (ref.message_id or ref.timestamp):
            return await self._range(target, history.bounds_after(ref), limit, False)
        if sub == "AROUND" and (ref.message_id or ref.timestamp):
            before = await self._range(target, history.bounds_before(ref), limit // 2, True)
            after = await self._range(
                target, history.bounds_from(ref), limit - len(before), False
            )
            return before + after
        raise history.InvalidParams(sub)

    async def _range(
        self, target: history.Target, bounds: Bounds, limit: int, newest: bool
    ) -> list[tuple[int, str, str, str, float]]:
        store = self.app.store
        if limit <= 0:
            return []
        if target.channel is not None:
            found = await store.channel_range(target.channel.id, bounds, limit, newest)
            return [(m.id, m.sender, target.name, m.body, m.created_at) for m in found]
        assert target.user is not None
        pairs = await store.private_range(self._user_id, target.user.id, bounds, limit, newest)
        return [(m.id, m.sender, m.recipient, m.body, m.created_at) for m in pairs]

    def _history_batch(self, name: str, rows: list[tuple[int, str, str, str, float]]) -> None:
        machine = self.machine
        batched = "batch" in machine.caps
        reference = machine.new_batch_reference()
        if batched:
            machine.send("BATCH", [f"+{reference}", "chathistory", name], machine.server_name)

        def send(
            command: str, params: list[str], source: str | None, tags: dict[str, str] | None
        ) -> None:
            extra = {"batch": reference} if batched else {}
            machine.send(command, params, source, {**(tags or {}), **extra} or None)

        for message_id, sender, shown, text, created_at in rows:
            self._message_lines(message_id, sender, shown, text, created_at, send)
        if batched:
            machine.send("BATCH", [f"-{reference}"], machine.server_name)

    async def _history_targets(self, message: Message) -> None:
        machine = self.machine
        first = history.parse_reference(message.param(1))
        second = history.parse_reference(message.param(2))
        limit = self._history_limit(message.param(3))
        if first.timestamp is None or second.timestamp is None:
            raise history.InvalidParams("TARGETS takes timestamps")
        low, high = sorted((first.timestamp, second.timestamp))
        found = await self.app.store.recent_targets(self._user_id, low, high, limit)
        batched = "batch" in machine.caps
        reference = machine.new_batch_reference()
        if batched:
            batch = [f"+{reference}", "draft/chathistory-targets"]
            machine.send("BATCH", batch, machine.server_name)
        for name, is_channel, newest in found:
            shown = "#" + name if is_channel else name
            tags = {"batch": reference} if batched else None
            stamp = "timestamp=" + history.format_timestamp(newest)
            machine.send("CHATHISTORY", ["TARGETS", shown, stamp], machine.server_name, tags)
        if batched:
            machine.send("BATCH", [f"-{reference}"], machine.server_name)

    async def _markread(self, message: Message) -> None:
        """MARKREAD target [timestamp=T]: the read position, moved forward only; the
        account's other IRC sessions are told (protocol.md, section 12.5)."""
        machine = self.machine
        if not message.params:  # an empty target would make no valid FAIL line
            failure = ["MARKREAD", "NEED_MORE_PARAMS", "Missing parameters"]
            machine.send("FAIL", failure, machine.server_name)
            return
        target = await history.find_target(self.app.store, self._user_id, message.param(0))
        if target is None:
            machine.send("FAIL", ["MARKREAD", "INVALID_PARAMS", message.param(0), "No such target"],
                         machine.server_name)
            return
        if len(message.params) > 1:
            try:
                ref: history.Reference | None = history.parse_reference(message.param(1))
            except history.InvalidParams:  # "timestamp=junk", "=": a FAIL, not a crash
                ref = None
            if ref is None or ref.timestamp is None:
                machine.send("FAIL", ["MARKREAD", "INVALID_PARAMS", message.param(1),
                                      "Expected timestamp=..."], machine.server_name)
                return
            await self._mark_read(target, ref.timestamp)
        marker = await self._read_marker(target)
        machine.send("MARKREAD", [target.name, marker], machine.server_name)
        if len(message.params) > 1:
            for other in self.app.hub.bound_sessions():
                if (other is not self.session and other.user_id == self.session.user_id
                        and isinstance(other, IrcSession)):
                    other.core.machine.send("MARKREAD", [target.name, marker],
                                            machine.server_name)
                    other.core._flush()

    async def _mark_read(self, target: history.Target, timestamp: float) -> None:
        newest = await self._range(
            target, Bounds(before_time=timestamp + 0.0005), 1, True
        )
        if not newest:
            return
        if target.channel is not None:
            await self._call("/ack", id=newest[0][0], channel=target.channel.name)
        else:
            await self._call("/ack", id=newest[0][0])

    async def _read_marker(self, target: history.Target) -> str:
        store = self.app.store
        if target.channel is not None:
            position, _ = await store.channel_position(target.channel.id, self._user_id)
            if position.fresh:
                return "*"
            stamp = await store.message_time(True, position.id)
        else:
            position = await store.inbox_position(self._user_id)
            stamp = await store.message_time(False, position.id)
        return "*" if stamp is None else "timestamp=" + history.format_timestamp(stamp)

    # Delivery: from the hub's pushed events to lines.

    def pushed(self, event: Event) -> None:
        """An event the hub or a catch-up gives this connection, as IRC lines (IRC has
        no line for presence, and pings are the transport's own)."""
        if isinstance(event, ChannelPost):
            self.deliver_message(
                event.id, event.channel, event.sender, None, event.body, event.created_at, event
            )
        elif isinstance(event, InboxMessage):
            self.deliver_message(event.id, None, event.sender, None, event.body, event.created_at)
        elif isinstance(event, SentCopy):
            self.deliver_message(
                event.id, None, event.sender, event.to, event.body, event.created_at
            )
        elif isinstance(event, Join | Leave):
            self.deliver_membership(event.kind, event.channel, event.name)

    def deliver_message(
        self,
        message_id: int,
        channel: str | None,
        sender: str,
        recipient: str | None,
        text: str,
        created_at: float,
        post: ChannelPost | None = None,
    ) -> None:
        """The one place a stored message becomes IRC lines on this connection; ``post``
        is the event of a live channel message, where its lines are memoised."""
        nick = self.machine.nick
        if channel is not None:
            target = "#" + channel
            stream = target
        elif recipient is not None:  # a copy of the user's own message, from another session
            target, stream = recipient, ""
        else:
            target, stream = nick, INBOX
        # Written straight to the transport, not through the machine: a push is no reply,
        # and must not be held in (or labelled as) the replies of a command in progress.
        self._flush()
        if channel is None:
            lines: list[bytes] = []
            self._message_lines(message_id, sender, target, text, created_at, _collect(lines))
            self.transport.write(b"".join(lines))
        else:
            assert post is not None, "a channel message is delivered from its event"
            self.transport.write(
                self._channel_lines(message_id, sender, target, text, created_at, post)
            )
        if stream and message_id > self._unacked.get(stream, 0):
            self._unacked[stream] = message_id
            self.transport.probe_soon()

    def _channel_lines(
        self,
        message_id: int,
        sender: str,
        target: str,
        text: str,
        created_at: float,
        post: ChannelPost,
    ) -> bytes:
        """A channel message's lines are the same for every member with the same tag
        capabilities: memoised on the event per kind of client (as the msgpack frame
        is, chatd.events), so made once per message and kind, not once per member."""

        def make(_: object) -> bytes:
            lines: list[bytes] = []
            self._message_lines(message_id, sender, target, text, created_at, _collect(lines))
            return b"".join(lines)

        caps = self.machine.caps
        return memoised(post, (_IRC_LINES, *(cap in caps for cap in _TAG_CAPS)), make)

    def _message_lines(
        self,
        message_id: int,
        sender: str,
        target: str,
        text: str,
        created_at: float,
        send: Callable[[str, list[str], str | None, dict[str, str] | None], None],
        command: str = "PRIVMSG",
    ) -> None:
        """PRIVMSG lines for one message (NOTICE for the echo of one), split to fit 512
        bytes (never cut); the msgid tag goes on the first line only, as ids must not
        repeat."""
        caps = self.machine.caps
        tags: dict[str, str] = {}
        if "server-time" in caps:
            tags["time"] = history.format_timestamp(created_at)
        if "message-tags" in caps:
            tags["msgid"] = str(message_id)
        if "account-tag" in caps:
            tags["account"] = sender
        action = text.startswith("/me ")
        if action:
            text = text[4:]
        source = user_source(sender)
        overhead = utf8_len(f":{source} {command} {target} :") + 2
        if action:
            overhead += len(ACTION_PREFIX) + len(ACTION_END)
        for index, piece in enumerate(split_text(text, MAX_LINE - overhead) or [" "]):
            body = f"{ACTION_PREFIX}{piece}{ACTION_END}" if action else piece
            line_tags = tags if index == 0 else {k: v for k, v in tags.items() if k != "msgid"}
            send(command, [target, body], source, line_tags or None)

    def deliver_membership(self, kind: str, channel: str, name: str) -> None:
        command = "JOIN" if kind == "join" else "PART"
        self._flush()
        self.transport.write(format_line(command, ["#" + channel], user_source(name)))

    async def _acknowledge(self) -> None:
        """The client is alive after the lines written so far: they count as received."""
        unacked, self._unacked = self._unacked, {}
        for stream, message_id in unacked.items():
            try:
                if stream == INBOX:
                    await self._call("/ack", id=message_id)
                else:
                    await self._call("/ack", id=message_id, channel=stream[1:])
            except RateLimited:
                self._unacked.setdefault(stream, message_id)  # next time
            except ChatdError:
                pass  # left the channel meanwhile: nothing to acknowledge


Handler = Callable[[IrcCore, Message], Awaitable[None]]
LineSink = Callable[[str, list[str], str | None, dict[str, str] | None], None]


def _collect(lines: list[bytes]) -> LineSink:
    """A line sink that formats into ``lines``."""

    def send(
        command: str, params: list[str], source: str | None, tags: dict[str, str] | None
    ) -> None:
        lines.append(format_line(command, params, source, tags))

    return send


# A channel message's lines are memoised on its event under ("irc", flags), one flag per
# tag capability that changes them.
_IRC_LINES = "irc"
_TAG_CAPS = ("server-time", "message-tags", "account-tag")


_HISTORY_SUBCOMMANDS = frozenset({"LATEST", "BEFORE", "AFTER", "AROUND", "BETWEEN", "TARGETS"})

_COMMANDS: dict[str, Handler] = {
    "PRIVMSG": IrcCore._privmsg,
    "NOTICE": IrcCore._privmsg,
    "JOIN": IrcCore._join,
    "PART": IrcCore._part,
    "NAMES": IrcCore._names_command,
    "LIST": IrcCore._list,
    "WHO": IrcCore._who,
    "WHOIS": IrcCore._whois,
    "TOPIC": IrcCore._topic,
    "MODE": IrcCore._mode,
    "CHATHISTORY": IrcCore._chathistory,
    "MARKREAD": IrcCore._markread,
}


@functools.lru_cache(maxsize=1024)
def _parse_datetime(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, DATETIME_FORMAT)))


def _later(first: history.Reference, second: history.Reference) -> bool:
    if first.message_id is not None and second.message_id is not None:
        return first.message_id > second.message_id
    if first.timestamp is not None and second.timestamp is not None:
        return first.timestamp > second.timestamp
    return False
