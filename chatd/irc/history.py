"""IRCv3 draft/chathistory and draft/read-marker over chatd's store (protocol.md, section 12).

The ranges are read from the store with the membership rule of /channel/history
(members only) and /history (your own conversations); message references are
``msgid=`` (a chatd id) or ``timestamp=`` (RFC 3339, UTC).
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass

from chatd.store import Bounds, Channel, MessageStore, User
from chatd.validation import name_key

MILLISECOND = 0.001
MAX_ID = 2**63 - 1  # the largest signed 64-bit integer, SQLite's and PostgreSQL's bigint
_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d{1,6})?Z$")


class InvalidParams(ValueError):
    """FAIL CHATHISTORY INVALID_PARAMS."""


@dataclass(frozen=True, slots=True)
class Reference:
    """``msgid=ID`` or ``timestamp=TIME``; ``*`` is neither (no bound)."""

    message_id: int | None = None
    timestamp: float | None = None


def parse_reference(text: str) -> Reference:
    if text == "*":
        return Reference()
    kind, _, value = text.partition("=")
    # ASCII digits only ("²".isdigit() is true, and int() refuses it), and an id a
    # store column can hold: a larger one overflowed the database driver.
    if kind == "msgid" and value.isascii() and value.isdigit() and int(value) <= MAX_ID:
        return Reference(message_id=int(value))
    if kind == "timestamp":
        stamp = parse_timestamp(value)
        if stamp is not None:
            return Reference(timestamp=stamp)
    raise InvalidParams(f"bad message reference {text!r}")


def parse_timestamp(text: str) -> float | None:
    match = _TIMESTAMP.match(text)
    if match is None:
        return None
    try:
        whole = calendar.timegm(time.strptime(match[1], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None
    return whole + float(match[2] or 0)


def format_timestamp(timestamp: float) -> str:
    """IRCv3 server-time: UTC with milliseconds."""
    whole = int(timestamp)
    millis = min(int((timestamp - whole) * 1000), 999)  # floor: never later than stored
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def bounds_before(ref: Reference) -> Bounds:
    if ref.message_id is not None:
        return Bounds(before_id=ref.message_id)
    if ref.timestamp is not None:
        return Bounds(before_time=ref.timestamp)
    return Bounds()


def bounds_after(ref: Reference) -> Bounds:
    if ref.message_id is not None:
        return Bounds(after_id=ref.message_id)
    if ref.timestamp is not None:
        # Times are shown to the millisecond, floored: "after T" is after T's millisecond.
        return Bounds(after_time=ref.timestamp + MILLISECOND * 0.999)
    return Bounds()


def bounds_from(ref: Reference) -> Bounds:
    """At or after ``ref`` (AROUND): the message it names, or its whole millisecond."""
    if ref.message_id is not None:
        return Bounds(after_id=ref.message_id - 1)
    assert ref.timestamp is not None, "AROUND takes a reference"
    return Bounds(after_time=ref.timestamp - MILLISECOND / 1000)


def bounds_between(first: Reference, second: Reference) -> Bounds:
    low, high = bounds_after(first), bounds_before(second)
    return Bounds(low.after_id, high.before_id, low.after_time, high.before_time)


@dataclass(frozen=True, slots=True)
class Target:
    """A CHATHISTORY target the user may read: a channel they are in, or another user."""

    name: str  # as IRC shows it: "#channel" or the user's name
    channel: Channel | None = None
    user: User | None = None


async def find_target(store: MessageStore, user_id: int, target: str) -> Target | None:
    if target.startswith("#"):
        channel = await store.find_channel(name_key(target[1:]))
        if channel is None or not await store.is_member(channel.id, user_id):
            return None
        return Target("#" + channel.name, channel=channel)
    other = await store.find_profile(name_key(target))
    return None if other is None else Target(other.name, user=other)
