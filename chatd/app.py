"""From a decoded frame body to the reply map: the one place errors become wire codes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from chatd.auth import Hasher
from chatd.bus import Bus, LocalBus
from chatd.codec import Malformed, Oversize
from chatd.config import Config
from chatd.errors import BadRequest, ChatdError, ErrorCode, FrameTooLarge, ServerError
from chatd.handlers import (
    NOW_OPS,
    Context,
    Deferred,
    Outgoing,
    dispatch,
    dispatch_now,
    publish,
)
from chatd.hub import Hub, Session
from chatd.limits import Guards
from chatd.metrics import Metrics
from chatd.protocol import (
    Data,
    Params,
    Request,
    failure,
    format_datetime,
    parse_request,
    request_id,
    success,
)
from chatd.store import CHANNEL, MessageStore, Stored

log = logging.getLogger(__name__)

RATE_LIMITED = int(ErrorCode.RATE_LIMITED)
_SEND_OPS = {CHANNEL: "/channel/send"}  # the op of an Outgoing, by kind; "/send" otherwise


@dataclass
class App:
    """The server's long-lived parts, shared by every connection."""

    config: Config
    store: MessageStore
    hub: Hub
    hasher: Hasher
    metrics: Metrics = field(default_factory=Metrics)
    clock: Callable[[], float] = field(default=time.time)
    guards: Guards = field(init=False)
    # Where handlers publish committed events: one node, so straight to the hub.
    bus: Bus = field(init=False)

    def __post_init__(self) -> None:
        self.guards = Guards(self.config)
        self.bus = LocalBus(self.hub)

    def context(self, session: Session) -> Context:
        """What a handler called for ``session`` may use."""
        return Context(
            self.config,
            self.store,
            self.hub,
            self.bus,
            self.hasher,
            self.metrics,
            self.guards,
            session,
            self.clock,
        )

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self.guards.reconfigure(config)

    async def handle(self, session: Session, body: object) -> Data | PendingReply:
        """Answer one frame body; never raises.

        The answer is the reply, or (for sends) a :class:`PendingReply` that has
        it once the message is committed.
        """
        if isinstance(body, Oversize):
            return failure(None, FrameTooLarge(body.reason))
        if isinstance(body, Malformed):
            return failure(None, BadRequest(body.reason))
        rid = request_id(body)
        op = "?"
        started = time.perf_counter()
        try:
            request = parse_request(body)
            op = request.op
            result = await dispatch(self.context(session), request)
            if isinstance(result, Deferred):
                return PendingReply(self, session, rid, op, result, started)
            reply = success(rid, result)
        except Exception as error:
            reply = self.failure_reply(session, rid, op, error)
        return self.finish(session, op, reply, started)

    async def handle_many(
        self,
        session: Session,
        bodies: list[Any],
        put: Callable[[Data | Pending], Awaitable[None]],
        rate_limit_budget: int,
    ) -> int:
        """Answer the frame bodies of one read, handing each reply to ``put`` in request
        order; returns how many were refused with code 8, and stops after the
        ``rate_limit_budget``-th (the caller closes the connection then).

        Sends that need nothing to be waited for (handlers.dispatch_now) are taken
        together: one context, one group-commit entry, one :class:`ReplyGroup` for their
        replies (and for the errors among them). Any other request is handled whole by
        :meth:`handle`, once the sends before it are queued: it sees them (read your
        writes), and its reply comes after theirs.
        """
        group: ReplyGroup | None = None
        refused = 0
        for body in bodies:
            if type(body) is dict and type(op := body.get("op")) is str and op in NOW_OPS:
                if group is None:
                    group = ReplyGroup(self, self.context(session))
                code = group.add(body)
                if code is not None:  # answered, or queued with the group's sends
                    if code == RATE_LIMITED:
                        refused += 1
                        if refused >= rate_limit_budget:
                            break
                    continue
            if group is not None and group.size:
                await put(group.close())
                group = None
            reply = await self.handle(session, body)
            await put(reply)
            if isinstance(reply, dict) and reply["code"] == RATE_LIMITED:
                refused += 1
                if refused >= rate_limit_budget:
                    break
        if group is not None and group.size:
            await put(group.close())
        return refused

    def failure_reply(self, session: Session, rid: int | None, op: str, error: Exception) -> Data:
        """The reply to a request that raised (also used by PendingReply)."""
        if isinstance(error, ChatdError):
            return failure(rid, error)
        # Details stay in the log: they may be security-sensitive.
        log.error("%s %s: unexpected error", session, op, exc_info=error)
        return failure(rid, ServerError())

    def finish(self, session: Session, op: str, reply: Data, started: float) -> Data:
        """Count and log a reply on its way out (also used by PendingReply)."""
        code = reply["code"]
        self.metrics.request_handled(op, code, time.perf_counter() - started)
        if code:
            log.info("%s %s -> error %d: %s", session, op, code, reply["msg"])
        else:
            log.debug("%s %s -> 0", session, op)
        return reply


class Pending:
    """Replies known once a group commit is done: ``ready``, then ``replies()``."""

    __slots__ = ()

    @property
    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def size(self) -> int:
        """How many replies."""
        return 1

    async def wait(self) -> None:
        """Until ``ready``."""
        raise NotImplementedError

    def replies(self) -> list[Data]:
        """The replies, in request order (call once ``ready``)."""
        raise NotImplementedError


class ReplyGroup(Pending):
    """The replies to consecutive requests of one read, sends among them (App.handle_many).

    The sends go to the group commit as one entry (``close``); once it is committed
    they are published, in order, and the group is ready: its replies, the errors
    answered at once among them, go out together.
    """

    __slots__ = ("_app", "_committed", "_ctx", "_outgoing", "_ready", "_replies", "_rids",
                 "_started")

    def __init__(self, app: App, ctx: Context) -> None:
        self._app, self._ctx = app, ctx
        self._replies: list[Data | None] = []  # None: a send's, known once committed
        self._outgoing: list[Outgoing] = []
        self._rids: list[int | None] = []
        self._started = time.perf_counter()
        self._committed: asyncio.Future[None] | None = None
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def size(self) -> int:
        return len(self._replies)

    def add(self, body: dict[str, Any]) -> int | None:
        """Take a request: the code of its reply (0 for a send, answered once
        committed), or None if it must be handled whole (App.handle) instead."""
        op = "?"
        try:
            request = _request(body)
            op = request.op
            outgoing = dispatch_now(self._ctx, request)
            if outgoing is None:
                return None
        except Exception as error:
            app, session = self._app, self._ctx.session
            reply = app.failure_reply(session, request_id(body), op, error)
            self._replies.append(app.finish(session, op, reply, self._started))
            code: int = reply["code"]
            return code
        self._outgoing.append(outgoing)
        self._rids.append(request.id)
        self._replies.append(None)
        return 0

    def close(self) -> ReplyGroup:
        """No more requests: the sends go to the group commit."""
        if self._outgoing:
            messages = [outgoing.message for outgoing in self._outgoing]
            self._committed = self._ctx.store.enqueue_many(messages, self._settle)
        else:
            self._ready = True
        return self

    async def wait(self) -> None:
        committed = self._committed
        if not self._ready and committed is not None:
            await committed  # only ever resolved (GroupCommit), never failed or cancelled

    def replies(self) -> list[Data]:
        return [reply or self._lost() for reply in self._replies]

    def _lost(self) -> Data:
        # Only if _settle failed (logged by the group commit): never a silent success.
        return failure(None, ServerError())

    def _settle(self, results: list[Stored | Exception]) -> None:
        """Publish each committed message, then make its reply (the group commit calls
        this right after COMMIT, in commit order)."""
        app, ctx = self._app, self._ctx
        session, replies = ctx.session, self._replies
        request_handled, elapsed = app.metrics.request_handled, time.perf_counter() - self._started
        debug = log.isEnabledFor(logging.DEBUG)
        position = 0
        try:
            for outgoing, rid, result in zip(self._outgoing, self._rids, results, strict=True):
                while replies[position] is not None:
                    position += 1
                op = _SEND_OPS.get(outgoing.message.kind, "/send")
                if isinstance(result, Exception):
                    reply = app.failure_reply(session, rid, op, result)
                    replies[position] = app.finish(session, op, reply, self._started)
                    continue
                if not result.duplicate:
                    try:
                        publish(ctx, outgoing, result)
                    except Exception:  # one failed push must not hold the rest back
                        log.exception("publishing message %d failed", result.id)
                data = {"id": result.id, "datetime": format_datetime(result.created_at)}
                # success(rid, sent(result)), written out for the hot path
                replies[position] = (
                    {"code": 0, "msg": "success", "data": data}
                    if rid is None
                    else {"id": rid, "code": 0, "msg": "success", "data": data}
                )
                request_handled(op, 0, elapsed)  # App.finish, written out for the hot path
                if debug:
                    log.debug("%s %s -> 0", session, op)
        finally:
            self._ready = True


def _request(body: dict[str, Any]) -> Request:
    """parse_request(body), with a shortcut for the envelope nearly every request has."""
    params, rid, token = body.get("params"), body.get("id"), body.get("token")
    if (
        type(params) is dict
        and (rid is None or type(rid) is int)
        and (token is None or type(token) is str)
        and type(op := body.get("op")) is str
    ):
        return Request(op, rid, Params(params), token)
    return parse_request(body)  # and its words for what is wrong


class PendingReply(Pending):
    """The reply to a send, known once the group commit holding the message is done."""

    __slots__ = ("_app", "_deferred", "_op", "_rid", "_session", "_started")

    def __init__(
        self,
        app: App,
        session: Session,
        rid: int | None,
        op: str,
        deferred: Deferred,
        started: float,
    ) -> None:
        self._app, self._session, self._rid, self._op = app, session, rid, op
        self._deferred, self._started = deferred, started

    @property
    def ready(self) -> bool:
        return self._deferred.future.done()

    async def wait(self) -> None:
        await asyncio.wait([self._deferred.future])

    def replies(self) -> list[Data]:
        return [self.result()]

    def result(self) -> Data:
        """The reply (call once ``ready``)."""
        future = self._deferred.future
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            failed = error if isinstance(error, Exception) else ServerError()
            reply = self._app.failure_reply(self._session, self._rid, self._op, failed)
        else:
            reply = success(self._rid, self._deferred.reply(future.result()))
        return self._app.finish(self._session, self._op, reply, self._started)
