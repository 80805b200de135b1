"""From a decoded frame body to the reply map: the one place errors become wire codes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from chatd.auth import Hasher
from chatd.bus import Bus, LocalBus
from chatd.codec import Malformed, Oversize
from chatd.config import Config
from chatd.errors import BadRequest, ChatdError, FrameTooLarge, ServerError
from chatd.handlers import Context, Deferred, dispatch
from chatd.hub import Hub, Session
from chatd.limits import Guards
from chatd.metrics import Metrics
from chatd.protocol import Data, failure, parse_request, request_id, success
from chatd.store import MessageStore

log = logging.getLogger(__name__)


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


class PendingReply:
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
