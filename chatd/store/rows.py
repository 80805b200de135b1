"""Rows and results as every store hands them out, and the errors stores raise.

Plain data, no SQL: handlers, delivery and both stores (chatd.store.sqlite,
chatd.store.postgres) share these types.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, NamedTuple, TypeVar

from chatd.errors import Forbidden, ServerError

T = TypeVar("T")

# What a name looks like in small letters and in capitals (chatd/names.py).
Skeletons = tuple[str, str]

class StoreError(Exception):
    """The database cannot be opened or migrated."""


class TooManyChannels(Forbidden):
    """A join refused because the user is a member of ``limit`` channels already (code 6).

    Nothing was written: not the membership, nor the channel if it was new.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"member of too many channels (at most {limit}): leave one first")
        self.limit = limit


class DatabaseFileLost(ServerError):
    """The database file was deleted or replaced while chatd had it open (code 9).

    Whatever is written after that goes into a file no one will find again, so
    nothing more is written, and nothing written after the loss is acknowledged.
    """

    default_message = (
        "database file was deleted or replaced; writes refused until chatd is restarted"
        " by an operator"
    )


# Rows as plain slotted dataclasses, treated as read-only: frozen ones cost several
# times more to create, and several are made per message on the hot path.
@dataclass(slots=True)
class User:
    id: int
    name: str
    password_hash: str
    created_at: float


@dataclass(slots=True)
class Channel:
    id: int
    name: str
    created_at: float


@dataclass(slots=True)
class Stored:
    """The result of storing a message: what the sender is told."""

    id: int
    created_at: float
    duplicate: bool = False  # True when client_id matched an earlier send
    seq: int = 0  # its number in its stream (the channel, or the recipient's inbox)


class StreamPosition(NamedTuple):
    """Where a stream's catch-up starts (protocol.md section 9).

    ``id`` is a message id, what acknowledgements and read cursors hold on the wire;
    ``seq`` is that message's number in its stream (0 before the first), by which
    delivery orders and drops repeats (chatd.delivery).  ``fresh``: the user has no
    position in the stream yet, so it starts at the stream's newest message.
    """

    id: int
    seq: int
    fresh: bool = False


def channel_start(row: Sequence[Any] | None) -> tuple[StreamPosition, int]:
    """A member's position in a channel and the channel's newest id, from a row of
    (read cursor or None, its seq, newest id, newest seq); None: not a member."""
    if row is None:
        return StreamPosition(0, 0, True), 0
    cursor, cursor_seq, newest, newest_seq = row
    if cursor is None:  # never read: fresh, from the newest message
        return StreamPosition(newest, newest_seq, True), newest
    return StreamPosition(cursor, cursor_seq), newest


@dataclass(slots=True)
class PrivateMessage:
    id: int
    sender: str
    body: str
    created_at: float
    seq: int = 0  # its number in its stream (the channel, or the recipient's inbox)


@dataclass(slots=True)
class ChannelMessage:
    id: int
    sender: str
    body: str
    created_at: float
    seq: int = 0  # its number in its stream (the channel, or the recipient's inbox)


@dataclass(slots=True)
class SentMessage:
    """A private message seen from either side of a conversation."""

    id: int
    sender: str
    recipient: str
    body: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Bounds:
    """An open interval of messages, by id and by time (IRC CHATHISTORY)."""

    after_id: int = 0
    before_id: int = (1 << 63) - 1
    after_time: float = float("-inf")
    before_time: float = float("inf")

    def values(self) -> tuple[int, int, float, float]:
        return self.after_id, self.before_id, self.after_time, self.before_time


@dataclass(slots=True)
class Membership:
    channel_id: int
    channel: str
    read_cursor: int | None
    unread: int


class Joined(Enum):
    NOW = "now"  # the caller was not a member and now is
    ALREADY = "already"  # the caller was a member already
    LEFT = "left"  # the caller left this channel and has not re-joined
    LOOKALIKE = "lookalike"  # a new name that looks like this existing channel's: nothing done


@dataclass(slots=True)
class Batch(Generic[T]):
    """Messages handed to a reader, and whether more were left waiting."""

    messages: list[T]
    more: bool


PRIVATE, CHANNEL = "private", "channel"


@dataclass(slots=True)
class NewMessage:
    kind: str
    sender_id: int
    target_id: int  # recipient or channel
    body: str
    created_at: float
    client_id: str | None

    @property
    def dedup_key(self) -> tuple[str, int, str] | None:
        return None if self.client_id is None else (self.kind, self.sender_id, self.client_id)


# How stale a cached user may be: a user deleted by `chatd admin` in another process can
# still be addressed this long (the send then fails alone, with code 9).
PROFILE_TTL = 10.0

# The password hash of an IRC guest: no argon2 hash, so no password ever matches it.
GUEST_HASH = "guest"


@dataclass(slots=True)
class StreamHeads:
    """The newest seq of streams (MessageStore.stream_heads): by user id for inboxes, by
    channel id for channels; 0 for a stream without messages, absent for a user or
    channel that does not exist (any more)."""

    inboxes: dict[int, int]
    channels: dict[int, int]
