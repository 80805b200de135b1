"""From a decoded frame body to the reply map: the one place errors become wire codes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from chatd.auth import Hasher
from chatd.codec import Malformed, Oversize
from chatd.config import Config
from chatd.errors import BadRequest, ChatdError, FrameTooLarge, ServerError
from chatd.handlers import Context, dispatch
from chatd.hub import Hub, Session
from chatd.limits import Guards
from chatd.metrics import Metrics
from chatd.protocol import Data, failure, parse_request, request_id, success
from chatd.store import Store

log = logging.getLogger(__name__)


@dataclass
class App:
    """The server's long-lived parts, shared by every connection."""

    config: Config
    store: Store
    hub: Hub
    hasher: Hasher
    metrics: Metrics = field(default_factory=Metrics)
    clock: Callable[[], float] = field(default=time.time)
    guards: Guards = field(init=False)

    def __post_init__(self) -> None:
        self.guards = Guards(self.config)

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self.guards.reconfigure(config)

    async def handle(self, session: Session, body: object) -> Data:
        """Answer one frame body; never raises."""
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
            ctx = Context(
                self.config,
                self.store,
                self.hub,
                self.hasher,
                self.metrics,
                self.guards,
                session,
                self.clock,
            )
            reply = success(rid, await dispatch(ctx, request))
        except ChatdError as error:
            reply = failure(rid, error)
        except Exception:
            # Details stay in the log: they may be security-sensitive.
            log.exception("%s %s: unexpected error", session.peer, op)
            reply = failure(rid, ServerError())
        code = reply["code"]
        self.metrics.request_handled(op, code, time.perf_counter() - started)
        if code:
            log.info("%s %s -> error %d: %s", session.peer, op, code, reply["msg"])
        else:
            log.debug("%s %s -> 0", session.peer, op)
        return reply
