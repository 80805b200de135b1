"""Events as data: what happened, for the hub to route and each front-end to encode.

The hub, the bus and delivery carry these objects and never bytes; a front-end's
session turns one into its own wire form at its edge (chatd.events for msgpack
frames, protocol.md section 10).  A channel message reaches many sessions as one
object, so each front-end memoises its encoding on the event (:func:`memoised`;
msgpack's frame has a slot of its own): encoded once per front-end however many
receive it.

A stored message's event holds the store row's fields (id, sender, body, time, and
the stream sequence number ``seq``) and where it goes: the recipient's inbox or the
channel, with the channel's name.  The events a commit produces (:data:`Published`)
also say who caused them, as ``origin``: the
:attr:`chatd.hub.Session.serial` of the calling connection, which gets its reply
instead of the event (protocol.md section 9, "Who receives what"); 0 for none.
Serials are unique within one process; a bus between nodes pairs them with the node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

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
    """The base of every event: where front-ends keep their encodings of it, each
    under a key of its own (see :func:`memoised`)."""

    encodings: dict[object, Any] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    # The msgpack front-end's frame (chatd.events), in a slot of its own: it is read
    # once per recipient of every push, and a slot is the cheapest memo to read.
    msgpack_frame: bytes | None = field(default=None, init=False, repr=False, compare=False)


def memoised(event: E, encoding: object, encode: Callable[[E], T]) -> T:
    """``encode(event)``, computed once per event and ``encoding`` (a front-end's own key)."""
    memo = event.encodings
    if memo is None:
        memo = event.encodings = {}
    elif encoding in memo:
        result: T = memo[encoding]
        return result
    encoded = memo[encoding] = encode(event)
    return encoded


# Messages: committed, in a stream, caught up when missed.  Flat records (no row
# inside): a live push makes one object, and ``id`` is a plain attribute, read for
# every recipient.


@dataclass(slots=True)
class InboxMessage(Event):
    """A private message in its recipient's inbox (the ``message`` event)."""

    recipient_id: int
    id: int
    sender: str  # the sender's name
    body: str
    created_at: float
    # The message's number in the inbox stream (1, 2, 3, ... in commit order, the
    # store's per-stream sequence): delivery orders and drops repeats by it, never by
    # id (chatd.delivery).  0 only in events built by hand: a stored message has 1 up.
    seq: int = 0


@dataclass(slots=True)
class ChannelPost(Event):
    """A channel message (the ``channel_message`` event)."""

    channel_id: int
    channel: str  # the channel's name
    id: int
    sender: str
    body: str
    created_at: float
    origin: int = 0
    seq: int = 0  # its number in the channel's stream (as InboxMessage.seq)


# Events that belong to a stream (the recipient's inbox, the channel): offered to
# subscriptions, ordered and deduplicated by ``seq`` within their stream (never by the
# global ``id``), and caught up from the store when missed.
StreamEvent = InboxMessage | ChannelPost


# Live only: never caught up, never repeated.


@dataclass(slots=True)
class SentCopy(Event):
    """A private message for its sender's other sessions (``message`` with ``to``)."""

    sender_id: int
    to: str  # the recipient's name
    id: int
    sender: str
    body: str
    created_at: float
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
