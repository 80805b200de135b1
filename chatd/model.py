"""Events as data: what happened, for the hub to route and each front-end to encode.

The hub, the bus and delivery carry these objects and never bytes; a front-end's
session turns one into its own wire form at its edge (chatd.events for msgpack
frames, protocol.md section 10).  A channel message reaches many sessions as one
object, so each front-end memoises its encoding on the event (:func:`memoised`):
encoded once per front-end however many receive it.

Stored messages wrap the store's rows (``PrivateMessage``, ``ChannelMessage``):
the row says what was said, the event where it goes.  The events a commit
produces (:data:`Published`) also say who caused them, as ``origin``: the
:attr:`chatd.hub.Session.serial` of the calling connection, which gets its reply
instead of the event (protocol.md section 9, "Who receives what"); 0 for none.
Serials are unique within one process; a bus between nodes pairs them with the node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from chatd.store import ChannelMessage, PrivateMessage

__all__ = [
    "INBOX",
    "PING",
    "ChannelPost",
    "Event",
    "InboxMessage",
    "Join",
    "Leave",
    "Ping",
    "Presence",
    "Published",
    "SentCopy",
    "StreamEvent",
    "memoised",
]

# The stream key of a user's private inbox within their subscription; a channel's
# stream is keyed by the channel id (ids start at 1).
INBOX = 0

E = TypeVar("E", bound="Event")
T = TypeVar("T")


# Plain slotted dataclasses, treated as read-only (frozen ones cost several times
# more to create, and a few are made per message on the hot path).
@dataclass(slots=True)
class Event:
    """The base of every event: a memo where front-ends keep their encodings of it."""

    _memo: dict[object, Any] | None = field(
        default=None, init=False, repr=False, compare=False
    )


def memoised(event: E, encoding: object, encode: Callable[[E], T]) -> T:
    """``encode(event)``, computed once per event and ``encoding`` (a front-end's own key)."""
    memo = event._memo
    if memo is None:
        memo = event._memo = {}
    elif encoding in memo:
        result: T = memo[encoding]
        return result
    encoded = memo[encoding] = encode(event)
    return encoded


# Messages: committed, in a stream, caught up when missed.


@dataclass(slots=True)
class InboxMessage(Event):
    """A private message in its recipient's inbox (the ``message`` event)."""

    recipient_id: int
    message: PrivateMessage

    stream: ClassVar[int] = INBOX

    @property
    def id(self) -> int:
        return self.message.id

    @property
    def seq(self) -> int:
        """The message's number in its stream: 0 until the store numbers streams."""
        return 0


@dataclass(slots=True)
class ChannelPost(Event):
    """A channel message (the ``channel_message`` event)."""

    channel_id: int
    channel: str  # the channel's name
    message: ChannelMessage
    origin: int = 0

    @property
    def stream(self) -> int:
        return self.channel_id

    @property
    def id(self) -> int:
        return self.message.id

    @property
    def seq(self) -> int:
        """The message's number in its stream: 0 until the store numbers streams."""
        return 0


# Events that belong to a stream: offered to subscriptions, ordered and deduplicated
# by ``id`` within ``stream``, and caught up from the store when missed.
StreamEvent = InboxMessage | ChannelPost


# Live only: never caught up, never repeated.


@dataclass(slots=True)
class SentCopy(Event):
    """A private message for its sender's other sessions (``message`` with ``to``)."""

    sender_id: int
    to: str  # the recipient's name
    message: PrivateMessage
    origin: int = 0


@dataclass(slots=True)
class Join(Event):
    """A user became a member of a channel."""

    channel_id: int
    channel: str
    user_id: int
    name: str
    origin: int = 0

    kind: ClassVar[Literal["join"]] = "join"


@dataclass(slots=True)
class Leave(Event):
    """A user left a channel."""

    channel_id: int
    channel: str
    user_id: int
    name: str
    origin: int = 0

    kind: ClassVar[Literal["leave"]] = "leave"


@dataclass(slots=True)
class Presence(Event):
    """A user's first session was bound (online) or their last one unbound."""

    name: str
    online: bool


@dataclass(slots=True)
class Ping(Event):
    """Asks a silent subscribed client to show it is alive (protocol.md section 8)."""


PING = Ping()  # one for every connection: encoded once

# What a commit (or a membership change) publishes, for the bus to carry to the hub.
Published = InboxMessage | SentCopy | ChannelPost | Join | Leave
