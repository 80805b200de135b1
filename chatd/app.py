"""From a decoded frame body to the reply map: the one place errors become wire codes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from chatd.auth import Hasher
from chatd.bus import Bus, LocalBus
from chatd.codec import HEADER_SIZE, Malformed, Oversize, decode_body, encode_frame
from chatd.config import Config
from chatd.errors import BadRequest, ChatdError, ErrorCode, FrameTooLarge, ServerError
from chatd.events import sent_reply
from chatd.handlers import NOW_OPS, Context, Deferred, dispatch, gate_now, publish_message
from chatd.hub import Hub, PushBatch, Session
from chatd.limits import Guards
from chatd.metrics import Metrics
from chatd.protocol import Data, failure, parse_request, request_id, success
from chatd.store import CHANNEL, PRIVATE, MessageStore, NewMessage, Stored

log = logging.getLogger(__name__)

RATE_LIMITED = int(ErrorCode.RATE_LIMITED)
_SEND_OPS = {CHANNEL: "/channel/send", PRIVATE: "/send"}  # the op of a message, by kind


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
    # The newest ReplyGroup with sends enqueued, until it is settled: while it is not,
    # more settles are to come (in this group commit or the next), so the pushes of
    # one settle may wait to be written with theirs (ReplyGroup._settle).
    last_group: ReplyGroup | None = field(default=None, init=False)

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

        Sends that need nothing to be waited for (handlers.NOW_OPS, gate_now) are taken
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
                code = group.add(body, op)
                if code is not None:  # answered, or queued with the group's sends
                    if code == RATE_LIMITED:
                        refused += 1
                        if refused >= rate_limit_budget:
                            break
                    continue
            if group is not None:
                if group._frames:  # not the size property: a call less
                    await put(group.close())
                # A new group after this request, even if this one took nothing: its
                # time, auth gate and rate bucket hold only while nothing is awaited.
                group = None
            reply = await self.handle(session, body)
            await put(reply)
            if isinstance(reply, dict) and reply["code"] == RATE_LIMITED:
                refused += 1
                if refused >= rate_limit_budget:
                    break
        if group is not None and group._frames:
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

    def on_ready(self, callback: Callable[[Pending], None]) -> bool:
        """Have ``callback(self)`` called as soon as it is ready, from whatever makes it
        so, instead of a task waiting; False if ready already, or if this kind cannot
        (then wait)."""
        return False

    def replies(self) -> list[Data]:
        """The replies, in request order (call once ``ready``)."""
        raise NotImplementedError

    def frames(self) -> list[bytes]:
        """The replies as frames, in request order (call once ``ready``): what is written."""
        return [encode_frame(reply) for reply in self.replies()]


class ReplyGroup(Pending):
    """The replies to consecutive requests of one read, sends among them (App.handle_many).

    The sends go to the group commit as one entry (``close``); once it is committed
    they are published, in order, and the group is ready: its replies, the errors
    answered at once among them, go out together. Each reply is kept as its frame,
    made once it is known: a send's from pre-encoded pieces (chatd.events.sent_reply).
    """

    __slots__ = ("_app", "_committed", "_ctx", "_frames", "_gate_token", "_gated",
                 "_messages", "_notify", "_now", "_ready", "_rids", "_sender_name",
                 "_started", "_targets")

    def __init__(self, app: App, ctx: Context) -> None:
        self._app, self._ctx = app, ctx
        self._frames: list[bytes | None] = []  # None: a send's, known once committed
        # The sends, in order: the message, its recipient's or channel's name, its id.
        self._messages: list[NewMessage] = []
        self._targets: list[str] = []
        self._rids: list[int | None] = []
        self._started = time.perf_counter()
        # One time for the requests of one read: they are handled in one go, without
        # waiting, so it is their time to within microseconds (and a clock call less each).
        self._now = ctx.clock()
        # The auth gate passed for this token (None: the bound session's): the session
        # cannot change while the group takes requests, so the same token passes again.
        self._gated = False
        self._gate_token: str | None = None
        self._sender_name = ""
        self._committed: asyncio.Future[None] | None = None
        self._ready = False
        self._notify: Callable[[Pending], None] | None = None  # on_ready's callback

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def size(self) -> int:
        return len(self._frames)

    def add(self, body: dict[str, Any], op: str) -> int | None:
        """Take a request of a NOW_OPS ``op``: the code of its reply (0 for a send,
        answered once committed), or None if it must be handled whole (App.handle)."""
        params, rid, token = body.get("params"), body.get("id"), body.get("token")
        label = op  # the op the reply is counted and logged under
        try:
            if not (
                type(params) is dict
                and (rid is None or type(rid) is int)
                and (token is None or type(token) is str)
            ):
                label = "?"  # as App.handle, until the envelope is known to be good
                request = parse_request(body)  # and its words for what is wrong
                label = op
                params = body.get("params") or {}  # as parse_request took it
                rid, token = request.id, request.token
            ctx, now = self._ctx, self._now
            if not self._gated or token != self._gate_token:
                if not gate_now(ctx, token, now):
                    return None
                self._gated, self._gate_token = True, token
            sent = NOW_OPS[op](ctx, params, now)
            if sent is None:
                return None
        except Exception as error:
            app, session = self._app, self._ctx.session
            reply = app.failure_reply(session, request_id(body), label, error)
            self._frames.append(encode_frame(app.finish(session, label, reply, self._started)))
            code: int = reply["code"]
            return code
        self._messages.append(sent[0])
        self._targets.append(sent[1])
        self._rids.append(rid)
        self._frames.append(None)
        return 0

    def close(self) -> ReplyGroup:
        """No more requests: the sends go to the group commit."""
        if self._messages:
            # The sender's name as it is now, while the sends are made (as Outgoing keeps it).
            self._sender_name = self._ctx.session.user_name or ""
            self._committed = self._ctx.store.enqueue_many(self._messages, self._settle)
            self._app.last_group = self
        else:
            self._ready = True
        return self

    def on_ready(self, callback: Callable[[Pending], None]) -> bool:
        if self._ready or self._committed is None:
            return False  # ready already: nothing to wait for
        self._notify = callback
        return True

    async def wait(self) -> None:
        committed = self._committed
        if not self._ready and committed is not None:
            await committed  # only ever resolved (GroupCommit), never failed or cancelled

    def frames(self) -> list[bytes]:
        frames = self._frames
        if None not in frames:  # settled: the list as it is, not a copy of it
            return cast(list[bytes], frames)
        return [frame or self._lost() for frame in frames]

    def replies(self) -> list[Data]:
        return [decode_body(frame[HEADER_SIZE:]) for frame in self.frames()]

    def _lost(self) -> bytes:
        # Only if _settle failed (logged by the group commit): never a silent success.
        return encode_frame(failure(None, ServerError()))

    def _settle(self, results: list[Stored | Exception]) -> None:
        """Publish each committed message, then make its reply (the group commit calls
        this right after COMMIT, in commit order)."""
        app, ctx, frames = self._app, self._ctx, self._frames
        elapsed = time.perf_counter() - self._started
        debug = log.isEnabledFor(logging.DEBUG)
        session, sender_name = ctx.session, self._sender_name
        # Asked once for the group: whether the sender has another session to copy to.
        copies = ctx.bus.copies_wanted(self._messages[0].sender_id, session.serial)
        # Sends answered, and messages stored (not repeats of a client_id), by kind.
        answered, stored = dict.fromkeys(_SEND_OPS, 0), dict.fromkeys(_SEND_OPS, 0)
        position = 0
        pushes = app.hub.pushes
        opened = not pushes.open
        try:
            pushes.open = True  # the pushes of what this settles are written together
            for message, target, rid, result in zip(
                self._messages, self._targets, self._rids, results, strict=True
            ):
                while frames[position] is not None:
                    position += 1
                if type(result) is not Stored:
                    assert isinstance(result, Exception)
                    op = _SEND_OPS[message.kind]
                    reply = app.failure_reply(session, rid, op, result)
                    frames[position] = encode_frame(app.finish(session, op, reply, self._started))
                    continue
                kind = message.kind
                if not result.duplicate:
                    stored[kind] += 1
                    try:
                        publish_message(ctx, message, target, sender_name, result, copies)
                    except Exception:  # one failed push must not hold the rest back
                        log.exception("publishing message %d failed", result.id)
                frames[position] = sent_reply(rid, result.id, result.created_at)
                answered[kind] += 1
                if debug:
                    log.debug("%s %s -> 0", session, _SEND_OPS[message.kind])
        finally:
            self._ready = True
            self._write_out(pushes, opened)  # first: the batch must close whatever else fails
            self._count(answered, stored, elapsed)

    def _write_out(self, pushes: PushBatch, opened: bool) -> None:
        """Write the pushes of what was settled, then the replies (if a connection asked
        for them with on_ready), without a task or callback in between.

        The pushes go first: the recipient is who waits for a message (what the latency
        scenario of docs/benchmarks.md measures), and the sender is answered a system call
        later. protocol.md allows it (section 1: an event may come before the reply to
        the request that caused it); the replies keep their order among themselves.
        """
        app = self._app
        if app.last_group is self:
            # No other group's sends wait for a commit: no settle is coming whose pushes
            # could share these writes.
            app.last_group = None
            pushes.close()
        elif opened:
            # Other settles follow, of this group commit (now) or of a later one: the
            # batch closes when a last one is settled, at the loop's next turn at latest.
            asyncio.get_running_loop().call_soon(pushes.close)
        notify = self._notify
        if notify is not None:
            self._notify = None
            notify(self)

    def _count(self, answered: dict[str, int], stored: dict[str, int], elapsed: float) -> None:
        """The metrics of the group's sends, each kind counted in one call, not one a send."""
        metrics = self._app.metrics
        for kind, count in answered.items():
            if count:
                metrics.request_handled(_SEND_OPS[kind], 0, elapsed, count)
            if stored[kind]:
                metrics.message_stored(kind, stored[kind])


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
