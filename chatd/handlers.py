"""One small async function per op, and the table that maps op names to them.

A handler takes the request's context and parameters, and returns the reply's
``data`` (or None) or raises a :class:`~chatd.errors.ChatdError`.  Handlers
never see bytes, sockets or SQL (protocol.md, "Operations").
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from chatd import validation
from chatd.auth import Hasher, new_token, token_digest
from chatd.config import Config
from chatd.errors import (
    BadCredentials,
    BadRequest,
    Forbidden,
    NameTaken,
    NotAuthenticated,
    NotFound,
)
from chatd.hub import Hub, Session
from chatd.protocol import Data, Params, Request
from chatd.store import Store, User

DATETIME_FORMAT = "%Y.%m.%d:%H:%M:%S"  # the seed's "2020.03.05:12:12:00", always UTC


def format_datetime(timestamp: float) -> str:
    return time.strftime(DATETIME_FORMAT, time.gmtime(timestamp))


@dataclass
class Context:
    """What a handler may use: the server's parts and the calling connection."""

    config: Config
    store: Store
    hub: Hub
    hasher: Hasher
    session: Session
    clock: Callable[[], float] = field(default=time.time)

    @property
    def user_id(self) -> int:
        """The caller's user id; only ops that require auth use it."""
        assert self.session.user_id is not None, "auth gate let an unbound session through"
        return self.session.user_id


Handler = Callable[[Context, Params], Awaitable[Data | None]]


@dataclass(frozen=True)
class Op:
    handler: Handler
    requires_auth: bool = True


# Accounts and sessions.


async def register(ctx: Context, params: Params) -> None:
    name = validation.user_name(params)
    password = validation.new_password(params, "password")
    repeated = params.text("password_repete", validation.MAX_PASSWORD_LENGTH)
    if password != repeated:
        raise BadRequest("passwords differ")
    key = validation.name_key(name)
    # Checked before hashing so a taken name costs no argon2 work; the insert re-checks.
    if await ctx.store.find_user(key) is not None:
        raise NameTaken()
    password_hash = await ctx.hasher.hash(password)
    if not await ctx.store.create_user(name, key, password_hash, ctx.clock()):
        raise NameTaken()


async def login(ctx: Context, params: Params) -> Data:
    name = params.text("name", validation.MAX_NAME_LENGTH)
    password = params.text("password", validation.MAX_PASSWORD_LENGTH)
    user = await ctx.store.find_user(validation.name_key(name))
    # An unknown name is verified against a dummy hash: same answer, same time.
    verdict = await ctx.hasher.verify(user.password_hash if user else None, password)
    if user is None or not verdict.ok:
        raise BadCredentials()
    if verdict.new_hash is not None:
        await ctx.store.set_password_hash(user.id, verdict.new_hash)
    token = new_token()
    digest = token_digest(token)
    now = ctx.clock()
    expires_at = now + ctx.config.token_ttl
    await ctx.store.add_token(user.id, digest, now, expires_at)
    ctx.hub.bind(ctx.session, user.id, user.name, digest, expires_at)
    return {"token": token, "name": user.name}


async def logout(ctx: Context, params: Params) -> None:
    digest = ctx.session.token_digest
    assert digest is not None
    await ctx.store.revoke_token(digest)
    for session in ctx.hub.sessions_with_token(ctx.user_id, digest):
        ctx.hub.unbind(session)


async def ping(ctx: Context, params: Params) -> None:
    return None


async def authenticate(ctx: Context, token: str) -> None:
    """Bind the connection to the token's user, or fail with code 2."""
    digest = token_digest(token)
    session = ctx.session
    if session.token_digest == digest and session.token_expires_at > ctx.clock():
        return  # already bound with this token: no database round trip per request
    owner = await ctx.store.token_owner(digest, ctx.clock())
    if owner is None:
        ctx.hub.unbind(session)  # never leave a connection acting for someone it cannot prove
        raise NotAuthenticated("invalid or expired token")
    user, expires_at = owner
    ctx.hub.bind(session, user.id, user.name, digest, expires_at)


# Users and private messages.


async def _existing_user(ctx: Context, params: Params) -> User:
    user = await ctx.store.find_user(validation.name_key(validation.user_name(params)))
    if user is None:
        raise NotFound("no such user")
    return user


async def user_info(ctx: Context, params: Params) -> Data:
    user = await _existing_user(ctx, params)
    return {
        "name": user.name,
        "registered": format_datetime(user.created_at),
        "online": ctx.hub.is_online(user.id),
    }


async def send(ctx: Context, params: Params) -> Data:
    recipient = await _existing_user(ctx, params)
    text = validation.message_text(params, "msg", ctx.config.max_message_length)
    client_id = params.optional_text("client_id", validation.MAX_CLIENT_ID_LENGTH)
    stored = await ctx.store.add_private(ctx.user_id, recipient.id, text, ctx.clock(), client_id)
    return {"id": stored.id, "datetime": format_datetime(stored.created_at)}


async def receive(ctx: Context, params: Params) -> Data:
    name = params.optional_text("name", validation.MAX_NAME_LENGTH)
    assert ctx.session.user_name is not None
    if name is not None and validation.name_key(name) != validation.name_key(
        ctx.session.user_name
    ):
        raise Forbidden("you can only receive your own messages")
    batch = await ctx.store.take_inbox(ctx.user_id, ctx.config.receive_batch)
    grouped: dict[str, list[str]] = {}
    for message in batch.messages:
        grouped.setdefault(message.sender, []).append(message.body)
    return {"messages": grouped, "more": batch.more}


# Channels.


async def channel_send(ctx: Context, params: Params) -> Data:
    name = validation.channel_name(params)
    text = validation.message_text(params, "message", ctx.config.max_message_length)
    client_id = params.optional_text("client_id", validation.MAX_CLIENT_ID_LENGTH)
    now = ctx.clock()
    channel = await ctx.store.join_channel(name, validation.name_key(name), ctx.user_id, now)
    stored = await ctx.store.add_channel_message(channel.id, ctx.user_id, text, now, client_id)
    return {"id": stored.id, "datetime": format_datetime(stored.created_at)}


async def channel_receive(ctx: Context, params: Params) -> Data:
    name = validation.channel_name(params)
    channel = await ctx.store.join_channel(
        name, validation.name_key(name), ctx.user_id, ctx.clock()
    )
    batch = await ctx.store.take_channel(
        channel.id, ctx.user_id, ctx.config.channel_backlog, ctx.config.receive_batch
    )
    messages = [
        {
            "id": message.id,
            "name": message.sender,
            "datetime": format_datetime(message.created_at),
            "msg": message.body,
        }
        for message in batch.messages
    ]
    return {"messages": messages, "more": batch.more}


async def channel_list_users(ctx: Context, params: Params) -> Data:
    name = validation.channel_name(params)
    channel = await ctx.store.find_channel(validation.name_key(name))
    if channel is None:
        raise NotFound("no such channel")
    members = await ctx.store.channel_members(channel.id)
    return {
        "users": [
            {"name": member_name, "online": ctx.hub.is_online(member_id)}
            for member_id, member_name in members
        ]
    }


OPS: dict[str, Op] = {
    "/register": Op(register, requires_auth=False),
    "/login": Op(login, requires_auth=False),
    "/logout": Op(logout),
    "/ping": Op(ping, requires_auth=False),
    "/user/info": Op(user_info),
    "/send": Op(send),
    "/receive": Op(receive),
    "/channel/send": Op(channel_send),
    "/channel/receive": Op(channel_receive),
    "/channel/list_users": Op(channel_list_users),
}

# These establish identity themselves, so a stale token must not stand in their way.
_IGNORE_TOKEN = frozenset({"/register", "/login"})


async def dispatch(ctx: Context, request: Request) -> Data | None:
    """Run one request through the auth gate and its handler."""
    op = OPS.get(request.op)
    if op is None:
        raise BadRequest(f"unknown op '{request.op}'")
    if request.token is not None and request.op not in _IGNORE_TOKEN:
        await authenticate(ctx, request.token)
    if op.requires_auth:
        _require_live_session(ctx)
    return await op.handler(ctx, request.params)


def _require_live_session(ctx: Context) -> None:
    session = ctx.session
    if session.user_id is None:
        raise NotAuthenticated()
    if session.token_expires_at <= ctx.clock():
        ctx.hub.unbind(session)
        raise NotAuthenticated("session expired")
