"""One small async function per op, and the table that maps op names to them.

A handler takes the request's context and parameters, and returns the reply's
``data`` (or None) or raises a :class:`~chatd.errors.ChatdError`.  The sends
return a :class:`Deferred` instead: their reply is known once the group commit
holding the message is done.  What others must hear of (a stored message, a join,
a leave) is published to the bus as an event (chatd.model) once committed; each
front-end encodes it for its clients.  Handlers never see bytes, sockets or SQL
(protocol.md, "Operations").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from chatd import validation
from chatd.auth import Hasher, Verdict, new_token, token_digest
from chatd.bus import Bus
from chatd.config import Config
from chatd.delivery import Fetch, Position, Subscription
from chatd.errors import (
    BadCredentials,
    BadRequest,
    ChatdError,
    Forbidden,
    NameTaken,
    NotAuthenticated,
    NotFound,
    RateLimited,
)
from chatd.hub import Hub, Session
from chatd.limits import Bucket, Guards, RateLimiter, address_key
from chatd.metrics import Metrics
from chatd.model import INBOX, ChannelPost, InboxMessage, Join, Leave, SentCopy, StreamEvent
from chatd.protocol import Data, Params, Request, format_datetime
from chatd.store import (
    CHANNEL,
    PRIVATE,
    Channel,
    ChannelMessage,
    Joined,
    MessageStore,
    NewMessage,
    Stored,
    StreamPosition,
    User,
)

log = logging.getLogger(__name__)

# A stream to catch up on /subscribe: its key, where it starts, how to read it.
CatchUp = tuple[int, Position, Fetch]

@dataclass
class Context:
    """What a handler may use: the server's parts and the calling connection."""

    config: Config
    store: MessageStore
    hub: Hub
    bus: Bus  # where committed events go (chatd.bus)
    hasher: Hasher
    metrics: Metrics
    guards: Guards
    session: Session
    clock: Callable[[], float] = field(default=time.time)
    # Recipients already looked up by this context, by the name as sent: the sends of one
    # read (App.handle_many share a context) mostly go to the same few users, and the
    # name's checks and its key (two NFKC passes) cost more than the rest of a send.
    recipients: dict[str, User] | None = None
    channels: dict[str, Channel] | None = None  # the same for channels
    # The caller's message bucket, refilled once for the sends of one read (they share
    # one time): each spends from it (RateLimiter.refilled).
    message_bucket: Bucket | None = None

    @property
    def user_id(self) -> int:
        """The caller's user id; only ops that require auth use it."""
        assert self.session.user_id is not None, "auth gate let an unbound session through"
        return self.session.user_id

    @property
    def user_name(self) -> str:
        assert self.session.user_name is not None, "auth gate let an unbound session through"
        return self.session.user_name


@dataclass(slots=True)
class Deferred:
    """A reply that waits for the group commit: ``reply(result)`` once ``future`` resolves."""

    future: asyncio.Future[Stored]
    reply: Callable[[Stored], Data]


Handler = Callable[[Context, Params], Awaitable[Data | Deferred | None]]


@dataclass(frozen=True)
class Op:
    handler: Handler
    requires_auth: bool = True


# Accounts and sessions.


async def register(ctx: Context, params: Params) -> None:
    name = validation.new_user_name(params)
    password = validation.new_password(params, "password", ctx.config.min_password_length)
    repeated = params.text("password_repete", validation.MAX_PASSWORD_LENGTH)
    if password != repeated:
        raise BadRequest("password and password_repete differ")
    _throttle_registration(ctx)
    key, skeletons = validation.name_key(name), validation.name_skeletons(name)
    # A name that looks like a user's is taken too, with the same answer (no more is told).
    # Checked before hashing so a taken name costs no argon2 work; the insert re-checks.
    if await ctx.store.user_name_taken(key, skeletons):
        raise NameTaken()
    password_hash = await ctx.hasher.hash(password)
    if not await ctx.store.create_user(name, key, skeletons, password_hash, ctx.clock()):
        raise NameTaken()


def _throttle_registration(ctx: Context) -> None:
    address = ctx.session.address
    if address in ctx.guards.trusted:
        return
    wait = ctx.guards.registrations.take(address_key(address), ctx.clock())
    if wait:
        raise RateLimited("too many registrations from your address", wait)


async def login(ctx: Context, params: Params) -> Data:
    name = params.text("name", validation.MAX_NAME_LENGTH)
    password = params.text("password", validation.MAX_PASSWORD_LENGTH)
    user, verdict = await _guarded_check(ctx, name, password)
    if verdict.new_hash is not None:
        await ctx.store.set_password_hash(user.id, verdict.new_hash)
    token = new_token()
    digest = token_digest(token)
    now = ctx.clock()
    expires_at = now + ctx.config.token_ttl
    await ctx.store.add_token(user.id, digest, now, expires_at)
    await _bind(ctx, ctx.session, user, digest, expires_at)
    ctx.session.token_checked_at = now
    log.info("login %s from %s", user.name, ctx.session)
    return {"token": token, "name": user.name}


async def _guarded_check(ctx: Context, name: str, password: str) -> tuple[User, Verdict]:
    """The user, if the password is theirs; the guess is counted as it starts
    (protocol.md, "Flood control"), and unknown names are counted like known ones."""
    address = ctx.session.address
    attempt = ctx.guards.logins.start(
        validation.name_key(name),
        address_key(address),
        by_address=address not in ctx.guards.trusted,
        now=ctx.clock(),
    )
    try:
        user = await ctx.store.find_user(validation.name_key(name))
        # An unknown name is verified against a dummy hash: same answer, same time.
        verdict = await ctx.hasher.verify(user.password_hash if user else None, password)
    except Exception:
        ctx.guards.logins.released(attempt)  # the server's fault (busy, error): no guess
        raise
    except BaseException:
        # Cancelled mid-check: a failure, so dropped connections buy no unseen guesses.
        ctx.guards.logins.failed(attempt, ctx.clock())
        raise
    if user is None or not verdict.ok:
        ctx.guards.logins.failed(attempt, ctx.clock())
        log.info("failed login for %r from %s", name, ctx.session)
        raise BadCredentials()
    ctx.guards.logins.succeeded(attempt)
    return user, verdict


async def logout(ctx: Context, params: Params) -> None:
    digest = ctx.session.token_digest
    assert digest is not None
    await ctx.store.revoke_token(digest)
    user_id = ctx.user_id
    for session in ctx.hub.sessions_with_token(user_id, digest):
        ctx.hub.unbind(session)
    ctx.bus.revoke(user_id, (digest,))  # and on every other node


async def ping(ctx: Context, params: Params) -> None:
    return None


async def stats(ctx: Context, params: Params) -> Data:
    metrics = ctx.metrics
    return {
        "uptime": round(metrics.uptime, 3),
        "connections": metrics.connections,
        **ctx.hub.load(),
        "requests": metrics.requests,
        "messages_stored": metrics.messages_stored,
        "messages_per_second": round(metrics.messages_per_second(), 3),
        "pushes_sent": metrics.pushes_sent,
        "disk_full": ctx.store.disk_full,
    }


async def authenticate(ctx: Context, token: str) -> None:
    """Bind the connection to the token's user, or fail with code 2.

    Not called for the token the connection is already bound with (dispatch skips it:
    the gate re-checks that one every token_recheck seconds).
    """
    session = ctx.session
    digest = token_digest(token)
    owner = await ctx.store.token_owner(digest, ctx.clock())
    if owner is None:
        ctx.hub.unbind(session)  # never leave a connection acting for someone it cannot prove
        raise NotAuthenticated("invalid, expired or revoked token: log in again")
    user, expires_at = owner
    await _bind(ctx, session, user, digest, expires_at)
    session.token_checked_at = ctx.clock()


async def _bind(
    ctx: Context, session: Session, user: User, digest: bytes, expires_at: float
) -> None:
    # The hub keeps the channels of online users, for presence and fan-out.
    channels = () if ctx.hub.is_online(user.id) else await ctx.store.channel_ids(user.id)
    ctx.hub.bind(session, user.id, user.name, digest, expires_at, channels)


# Users and private messages.


async def _existing_user(ctx: Context, params: Params, cached: bool = False) -> User:
    key = validation.name_key(validation.user_name(params))
    user = await (ctx.store.find_profile(key) if cached else ctx.store.find_user(key))
    if user is None:
        raise NotFound("no such user")
    return user


async def user_info(ctx: Context, params: Params) -> Data:
    if params.raw("name") is None:
        # Without a name, the caller's own account ("who am I"): a client that started
        # from a saved token learns whose it is.
        user = await _existing_user(ctx, Params({"name": ctx.user_name}))
    else:
        user = await _existing_user(ctx, params)
    return {
        "name": user.name,
        "registered": format_datetime(user.created_at),
        "online": bool(await ctx.bus.online([user.id])),
    }


SENDING_TOO_FAST = "sending too fast"  # the slow paths' and _message_now's refusal


def _throttle(ctx: Context, bucket: RateLimiter, too_fast: str) -> None:
    """Take one from the caller's bucket, or refuse the request with code 8."""
    wait = bucket.take(ctx.user_id, ctx.clock())
    if wait:
        raise RateLimited(too_fast, wait)


@dataclass(slots=True)
class Outgoing:
    """A message on its way to the group commit, and what its publication needs: the
    recipient's or the channel's name, and the sender's as it was when it was sent."""

    message: NewMessage
    target_name: str
    sender_name: str


async def send(ctx: Context, params: Params) -> Deferred:
    _throttle(ctx, ctx.guards.messages, SENDING_TOO_FAST)
    recipient = await _existing_user(ctx, params, cached=True)  # the hot path
    return _after_commit(ctx, _private_message(ctx, params, recipient))


def send_now(ctx: Context, values: dict[str, Any], now: float) -> Sent | None:
    """/send without waiting, as App.handle_many does it (``values``: the request's
    params): None when the recipient is not at hand (not cached, or the name is not
    valid), and send() must do it all."""
    name = values.get("name")
    memo = ctx.recipients
    if memo is None:
        memo = ctx.recipients = {}
    recipient = memo.get(name) if type(name) is str else None
    if recipient is None:
        recipient = _known(
            values, memo, _USER_KEYS, validation.user_name, ctx.store.cached_profile
        )
        if recipient is None:
            return None
    # send()'s checks in send()'s order (the look-up raised nothing), written out: the
    # hot path of the hot path.
    return _message_now(ctx, values, now, PRIVATE, "msg", recipient.id), recipient.name


# A message taken without waiting, and its recipient's or channel's name (for its events).
Sent = tuple[NewMessage, str]


def _message_now(
    ctx: Context, values: dict[str, Any], now: float, kind: str, text_key: str, target_id: int
) -> NewMessage:
    """The rest of a send's checks, in the handler's order, written out: the hot path.
    Values of the usual types are checked here; any other goes through Params, whose
    checks raise what the handler would."""
    sender_id = ctx.session.user_id
    assert sender_id is not None, "auth gate let an unbound session through"
    bucket = ctx.message_bucket  # RateLimiter.take(), refilled once per context and time
    if bucket is None or bucket.updated != now:
        bucket = ctx.message_bucket = ctx.guards.messages.refilled(sender_id, now)
    if bucket.tokens >= 1:
        bucket.tokens -= 1
    else:
        raise RateLimited(SENDING_TOO_FAST, ctx.guards.messages.wait(bucket))
    most = ctx.config.max_message_length
    text = values.get(text_key)
    if type(text) is not str or not text or len(text) > most:
        text = validation.message_text(Params(values), text_key, most)
    client_id = values.get("client_id")
    if client_id is not None and (
        type(client_id) is not str or len(client_id) > validation.MAX_CLIENT_ID_LENGTH
    ):
        client_id = Params(values).optional_text("client_id", validation.MAX_CLIENT_ID_LENGTH)
    return NewMessage(kind, sender_id, target_id, text, now, client_id)


_Known = TypeVar("_Known", User, Channel)
# Valid user and channel names as sent, and their keys (validation.name_key): a name's
# checks and key depend on nothing but the name, so they are kept for the process, not
# a context (one read) as the look-ups are; a paced send is one read, and the checks
# are four calls. Bounded: cleared when full.
_USER_KEYS: dict[str, str] = {}
_CHANNEL_KEYS: dict[str, str] = {}
_KEYS_KEPT = 16384


def _known(
    values: dict[str, Any],
    memo: dict[str, _Known],
    keys: dict[str, str],
    validate: Callable[[Params], str],
    cached: Callable[[str], _Known | None],
) -> _Known | None:
    """The user or channel named in ``values`` if the store has it cached (memoised by
    the name as sent); None when it is not at hand or the name is not valid: the
    awaiting handler then does it all, and reports errors in its order. ``keys``: the
    names ``validate`` let through before, and their keys."""
    name = values.get("name")
    key = None
    if type(name) is str:
        if (found := memo.get(name)) is not None:
            return found
        key = keys.get(name)
    if key is None:
        try:
            key = validation.name_key(validate(Params(values)))
        except ChatdError:
            return None
        if type(name) is str:
            if len(keys) >= _KEYS_KEPT:
                keys.clear()
            keys[name] = key
    found = cached(key)
    if found is not None and type(name) is str:
        memo[name] = found
    return found


def _private_message(ctx: Context, params: Params, recipient: User) -> Outgoing:
    text = validation.message_text(params, "msg", ctx.config.max_message_length)
    client_id = params.optional_text("client_id", validation.MAX_CLIENT_ID_LENGTH)
    new = NewMessage(PRIVATE, ctx.user_id, recipient.id, text, ctx.clock(), client_id)
    return Outgoing(new, recipient.name, ctx.user_name)


def publish(ctx: Context, outgoing: Outgoing, stored: Stored) -> None:
    """Count and tell who must hear of a committed message (called after COMMIT, in
    commit order; not for a repeated client_id)."""
    message = outgoing.message
    ctx.metrics.message_stored(message.kind)
    publish_message(ctx, message, outgoing.target_name, outgoing.sender_name, stored)


def publish_message(
    ctx: Context,
    message: NewMessage,
    target_name: str,
    sender_name: str,
    stored: Stored,
    copies: bool | None = None,
) -> None:
    """Tell who must hear of a committed message; the caller counts it. ``copies``:
    whether the sender may have another session to copy a private message to, if the
    caller asked the bus already (the sends of one read ask once)."""
    if message.kind == CHANNEL:
        ctx.bus.publish(
            ChannelPost(
                message.target_id,
                target_name,
                stored.id,
                sender_name,
                message.body,
                stored.created_at,
                ctx.session.serial,
                stored.seq,
            )
        )
        return
    sender_id, recipient_id, bus = message.sender_id, message.target_id, ctx.bus
    message_id, created_at = stored.id, stored.created_at
    bus.publish(
        InboxMessage(recipient_id, message_id, sender_name, message.body, created_at, stored.seq)
    )
    # A note to self reached every device already; a sender with no other device gets
    # no copy made at all (the copy cost a tenth of a send).
    if recipient_id == sender_id:
        return
    if copies is None:
        copies = bus.copies_wanted(sender_id, ctx.session.serial)
    if copies:
        bus.publish(
            SentCopy(
                sender_id,
                target_name,
                message_id,
                sender_name,
                message.body,
                created_at,
                ctx.session.serial,
            )
        )


def _after_commit(ctx: Context, outgoing: Outgoing) -> Deferred:
    """Store with the next group commit, publish once committed (the store calls
    ``committed`` after COMMIT, in commit order), and answer with the stored id and time.

    The reply waits for the group commit, but the connection reads on meanwhile, so
    a client with many sends in flight fills whole batches (protocol.md, "Pipelining").
    """

    def committed(stored: Stored) -> None:
        publish(ctx, outgoing, stored)

    return Deferred(ctx.store.enqueue(outgoing.message, committed), sent)


def sent(stored: Stored) -> Data:
    """The reply's data to a stored send."""
    return {"id": stored.id, "datetime": format_datetime(stored.created_at)}


async def receive(ctx: Context, params: Params) -> Data:
    name = params.optional_text("name", validation.MAX_NAME_LENGTH)
    if name is not None and validation.name_key(name) != validation.name_key(ctx.user_name):
        raise Forbidden("you can only receive your own messages")
    batch = await ctx.store.take_inbox(ctx.user_id, ctx.config.receive_batch)
    grouped: dict[str, list[str]] = {}
    for message in batch.messages:
        grouped.setdefault(message.sender, []).append(message.body)
    return {"messages": grouped, "more": batch.more}


async def history(ctx: Context, params: Params) -> Data:
    other = await _existing_user(ctx, params)
    before, limit = _page(ctx, params)
    batch = await ctx.store.private_history(ctx.user_id, other.id, before, limit)
    messages = [
        {
            "id": m.id,
            "name": m.sender,
            "to": m.recipient,
            "datetime": format_datetime(m.created_at),
            "msg": m.body,
        }
        for m in batch.messages
    ]
    return {"messages": messages, "more": batch.more}


HISTORY_DEFAULT_LIMIT = 50


def _page(ctx: Context, params: Params) -> tuple[int | None, int]:
    before = params.optional_int("before", minimum=1)
    limit = params.optional_int("limit", minimum=1)
    return before, min(limit or HISTORY_DEFAULT_LIMIT, ctx.config.history_page)


# Live delivery.


async def subscribe(ctx: Context, params: Params) -> None:
    _throttle(ctx, ctx.guards.subscribes, "subscribing too often")
    if ctx.session.subscription is not None:
        return  # already live: a second catch-up would only repeat what was sent
    user_id, store = ctx.user_id, ctx.store
    # Where a channel never read starts: its newest message, read before the streams are
    # held, so that every message stored from the hold on is above it and goes out. Read
    # after the hold, the start could take in a message another node stored meanwhile
    # whose notice came late (then at or below the start: never pushed).
    # A channel joined while they are read is read too, until none was: without a start
    # read before the hold, a channel started "fresh" at its newest when its position
    # was read, and every message held by then went out, whatever its age: a lost notice
    # repaired meanwhile (chatd.bus_redis.StreamOrder) pushed messages stored before the
    # /subscribe and the join (tests/test_cluster_races.py). Each channel is read once,
    # and only a join that completes during a read adds one, so this ends.
    newest: dict[int, StreamPosition] = {}
    read: set[int] = set()
    while unread := [c for c in ctx.hub.channels_of(user_id) if c not in read]:
        read.update(unread)
        newest.update(await store.channel_newest(unread))
    if ctx.session.user_id != user_id:  # unbound meanwhile: a /logout elsewhere, say
        raise NotAuthenticated("the session ended while subscribing")
    subscription = Subscription(ctx.session, ctx.config.receive_batch, ctx.config.catch_up_queue)
    channels = ctx.hub.subscribe(ctx.session, subscription)
    try:
        await _start_subscription(ctx, subscription, channels, newest)
    except BaseException:
        # Failed (the store down, say): not subscribed.  Left subscribed, its streams
        # held and never caught up, the client's next /subscribe did nothing ("already
        # live") and the connection never got a push.
        if ctx.session.subscription is subscription:
            ctx.hub.unsubscribe(ctx.session)
        raise


async def _start_subscription(
    ctx: Context, subscription: Subscription, channels: list[int],
    newest: dict[int, StreamPosition],
) -> None:
    user_id, store = ctx.user_id, ctx.store
    # With several nodes: the bus follows the streams before the catch-up reads the
    # store, so nothing committed in between slips past both.
    await ctx.bus.follow(user_id, channels)

    async def inbox_after(after: int, limit: int) -> list[StreamEvent]:
        messages = await store.inbox_after(user_id, after, limit)
        return [
            InboxMessage(user_id, m.id, m.sender, m.body, m.created_at, m.seq) for m in messages
        ]

    catch_ups: list[CatchUp] = [(INBOX, lambda: store.inbox_position(user_id), inbox_after)]
    for channel_id in channels:
        catch_ups.append(_channel_catch_up(store, user_id, channel_id, newest.get(channel_id)))
    await subscription.start(catch_ups)  # the start positions read before the reply


def _channel_catch_up(
    store: MessageStore, user_id: int, channel_id: int, floor: StreamPosition | None
) -> CatchUp:
    """``floor``: the channel's newest message before its stream was held, where it
    starts if never read (None: joined since, so it starts at its newest when read)."""
    # The user's own messages are never news to them, so the catch-up skips those stored
    # before it started; later ones are live, and reach this device like any live push
    # (protocol.md, section 9, "Your own messages").
    live_from = 0

    async def position() -> StreamPosition:
        nonlocal live_from
        start, live_from = await store.channel_position(channel_id, user_id)
        if start.fresh and floor is not None:
            # Not fresh: a message held at or below it was stored before /subscribe (a
            # late notice), and the catch-up reads on from it like from any position.
            return floor
        return start

    async def channel_after(after: int, limit: int) -> list[StreamEvent]:
        name = await store.channel_name(channel_id)
        messages = await store.channel_after(channel_id, after, limit, user_id, live_from)
        return [
            ChannelPost(channel_id, name, m.id, m.sender, m.body, m.created_at, seq=m.seq)
            for m in messages
        ]

    return channel_id, position, channel_after


async def unsubscribe(ctx: Context, params: Params) -> None:
    ctx.hub.unsubscribe(ctx.session)


async def ack(ctx: Context, params: Params) -> Data:
    _throttle(ctx, ctx.guards.acks, "acknowledging too often: acknowledge the latest id only")
    message_id = params.optional_int("id", minimum=0)
    if message_id is None:
        raise BadRequest("missing parameter 'id'")
    if params.optional_text("channel", validation.MAX_NAME_LENGTH) is None:
        return {"position": await ctx.store.ack_private(ctx.user_id, message_id)}
    channel = await _existing_channel(ctx, params, "channel")
    position = await ctx.store.ack_channel(channel.id, ctx.user_id, message_id)
    if position is None:
        raise Forbidden("not a member of this channel")
    return {"position": position}


# Channels.


async def _existing_channel(ctx: Context, params: Params, key: str = "name") -> Channel:
    name = validation.channel_name(params, key)
    channel = await ctx.store.find_channel(validation.name_key(name))
    if channel is None:
        raise NotFound("no such channel")
    return channel


async def _member_channel(ctx: Context, params: Params) -> Channel:
    channel = await _existing_channel(ctx, params)
    if not await ctx.store.is_member(channel.id, ctx.user_id):
        raise Forbidden("not a member of this channel")
    return channel


async def _use_channel(ctx: Context, name: str, rejoin: bool = False) -> Channel:
    """The channel, created and joined on first use (the seed's rule)."""
    key = validation.name_key(name)
    known = await ctx.store.find_channel(key)
    if known is not None and ctx.hub.is_online(ctx.user_id) and ctx.hub.is_member(
        ctx.user_id, known.id
    ):
        return known  # the hub knows the memberships of online users: no transaction
    if known is None:
        validation.check_new_name(name, "channel name")  # it would be created
    if not rejoin:  # a first use joins (or creates): /channel/join has paid already
        _throttle_memberships(ctx)
    channel, joined = await ctx.store.join_channel(
        name,
        key,
        validation.name_skeletons(name),
        ctx.user_id,
        ctx.clock(),
        rejoin,
        max_memberships=ctx.config.max_channels_per_user,
    )  # TooManyChannels (code 6) at the cap, before anything is created
    if joined is Joined.LOOKALIKE:
        raise NameTaken(f"channel name looks like the existing channel {channel.name!r}")
    if joined is Joined.LEFT:
        raise Forbidden("you left this channel: /channel/join it again")
    if joined is Joined.NOW:  # committed: the hub follows the channel, members hear it
        ctx.bus.publish(
            Join(channel.id, channel.name, ctx.user_id, ctx.user_name, ctx.session.serial)
        )
    return channel


def _throttle_memberships(ctx: Context) -> None:
    _throttle(ctx, ctx.guards.memberships, "joining and leaving channels too fast")


async def channel_join(ctx: Context, params: Params) -> Data:
    _throttle_memberships(ctx)
    channel = await _use_channel(ctx, validation.channel_name(params), rejoin=True)
    return {"name": channel.name}


async def channel_leave(ctx: Context, params: Params) -> None:
    _throttle_memberships(ctx)
    channel = await _existing_channel(ctx, params)
    if not await ctx.store.leave_channel(channel.id, ctx.user_id, ctx.clock()):
        raise Forbidden("not a member of this channel")
    ctx.bus.publish(
        Leave(channel.id, channel.name, ctx.user_id, ctx.user_name, ctx.session.serial)
    )


async def channel_list(ctx: Context, params: Params) -> Data:
    memberships = await ctx.store.memberships(ctx.user_id, ctx.config.channel_backlog)
    return {"channels": [{"name": m.channel, "unread": m.unread} for m in memberships]}


async def channel_send(ctx: Context, params: Params) -> Deferred:
    _throttle(ctx, ctx.guards.messages, SENDING_TOO_FAST)
    name = validation.channel_name(params)
    text = validation.message_text(params, "message", ctx.config.max_message_length)
    client_id = params.optional_text("client_id", validation.MAX_CLIENT_ID_LENGTH)
    channel = await _use_channel(ctx, name)
    new = NewMessage(CHANNEL, ctx.user_id, channel.id, text, ctx.clock(), client_id)
    return _after_commit(ctx, Outgoing(new, channel.name, ctx.user_name))


def channel_send_now(ctx: Context, values: dict[str, Any], now: float) -> Sent | None:
    """/channel/send without waiting: None unless the channel is cached and the hub knows
    the sender is a member (as _use_channel asks), and channel_send() must do it all."""
    if ctx.channels is None:
        ctx.channels = {}
    channel = _known(
        values, ctx.channels, _CHANNEL_KEYS, validation.channel_name, ctx.store.cached_channel
    )
    if channel is None or not ctx.hub.is_member(ctx.user_id, channel.id):
        return None
    return _message_now(ctx, values, now, CHANNEL, "message", channel.id), channel.name


async def channel_receive(ctx: Context, params: Params) -> Data:
    channel = await _use_channel(ctx, validation.channel_name(params))
    batch = await ctx.store.take_channel(
        channel.id, ctx.user_id, ctx.config.channel_backlog, ctx.config.receive_batch
    )
    return {"messages": [_channel_item(m) for m in batch.messages], "more": batch.more}


async def channel_history(ctx: Context, params: Params) -> Data:
    channel = await _member_channel(ctx, params)
    before, limit = _page(ctx, params)
    batch = await ctx.store.channel_history(channel.id, before, limit)
    return {"messages": [_channel_item(m) for m in batch.messages], "more": batch.more}


def _channel_item(message: ChannelMessage) -> Data:
    return {
        "id": message.id,
        "name": message.sender,
        "datetime": format_datetime(message.created_at),
        "msg": message.body,
    }


async def channel_list_users(ctx: Context, params: Params) -> Data:
    channel = await _existing_channel(ctx, params)
    members = await ctx.store.channel_members(channel.id)
    online = await ctx.bus.online([member_id for member_id, _ in members])
    return {
        "users": [
            {"name": member_name, "online": member_id in online}
            for member_id, member_name in members
        ]
    }


OPS: dict[str, Op] = {
    "/register": Op(register, requires_auth=False),
    "/login": Op(login, requires_auth=False),
    "/logout": Op(logout),
    "/ping": Op(ping, requires_auth=False),
    "/stats": Op(stats),
    "/user/info": Op(user_info),
    "/send": Op(send),
    "/receive": Op(receive),
    "/channel/send": Op(channel_send),
    "/channel/receive": Op(channel_receive),
    "/channel/list_users": Op(channel_list_users),
    "/history": Op(history),
    "/subscribe": Op(subscribe),
    "/unsubscribe": Op(unsubscribe),
    "/ack": Op(ack),
    "/channel/join": Op(channel_join),
    "/channel/leave": Op(channel_leave),
    "/channel/list": Op(channel_list),
    "/channel/history": Op(channel_history),
}

# These establish identity themselves, so a stale token must not stand in their way.
_IGNORE_TOKEN = frozenset({"/register", "/login"})


async def dispatch(ctx: Context, request: Request) -> Data | Deferred | None:
    """Run one request through the auth gate and its handler."""
    op = OPS.get(request.op)
    if op is None:
        raise BadRequest(f"unknown op '{request.op}'")
    token = request.token
    # Checked without awaiting: nearly every request comes on a connection already
    # bound with its token, and a coroutine per check costs on the hot path.
    if (
        token is not None
        and request.op not in _IGNORE_TOKEN
        and not _bound_with(ctx.session, token, ctx.clock())
    ):
        await authenticate(ctx, token)
    if op.requires_auth:
        now = ctx.clock()
        if _live_session_due_for_recheck(ctx, now):
            await _recheck_token(ctx, now)
    return await op.handler(ctx, request.params)


# Ops that may be done without waiting, when what they need is at hand (the hot path of
# App.handle_many): each takes the context, the request's params and the time, and
# returns the message to store, or None to leave it to its handler.
NOW_OPS: dict[str, Callable[[Context, dict[str, Any], float], Sent | None]] = {
    "/send": send_now,
    "/channel/send": channel_send_now,
}


def gate_now(ctx: Context, token: str | None, now: float) -> bool:
    """dispatch()'s auth gate without waiting: True if the request may go on, False when
    it needs the store (a token to check, or a recheck due) and dispatch() must do it.
    Raises as dispatch() would."""
    session = ctx.session
    if token is not None and not _bound_with(session, token, now):
        return False  # authenticate() reads the store
    if session.user_id is not None and session.token_expires_at > now:
        # Bound and unexpired (every paced send): _live_session_due_for_recheck's answer,
        # without the call.
        return now - session.token_checked_at < ctx.config.token_recheck
    return not _live_session_due_for_recheck(ctx, now)  # raises code 2


def _bound_with(session: Session, token: str, now: float) -> bool:
    return session.token_expires_at > now and token_digest(token) == session.token_digest


def _live_session_due_for_recheck(ctx: Context, now: float) -> bool:
    """The auth gate: code 2 unless bound and unexpired; True when the token is due to
    be checked against the store again (every token_recheck seconds)."""
    session = ctx.session
    if session.user_id is None:
        raise NotAuthenticated("not logged in: send /login first, or a token with the request")
    if session.token_expires_at <= now:
        ctx.hub.unbind(session)
        raise NotAuthenticated("token expired: log in again")
    return now - session.token_checked_at >= ctx.config.token_recheck


async def _recheck_token(ctx: Context, now: float) -> None:
    # Tokens revoked elsewhere (/logout on another connection, `chatd admin`) end
    # this session within token_recheck seconds.
    session = ctx.session
    assert session.token_digest is not None
    if await ctx.store.token_owner(session.token_digest, now) is None:
        ctx.hub.unbind(session)
        raise NotAuthenticated("token revoked: log in again")
    session.token_checked_at = now
