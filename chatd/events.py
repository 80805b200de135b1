"""The msgpack front-end's edge: events (chatd.model) as frames (protocol.md section 10).

:func:`frame` encodes an event once, however many msgpack connections receive it:
the frame is kept on the event (``Event.msgpack_frame``), so a channel message
costs one encoding for all its members.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatd.codec import encode_frame
from chatd.model import (
    ChannelPost,
    Event,
    InboxMessage,
    Join,
    Leave,
    Ping,
    Presence,
    SentCopy,
)
from chatd.protocol import Data, event, format_datetime

__all__ = ["frame"]


def frame(item: Event) -> bytes:
    """The event's frame, encoded on first use and shared from then on."""
    encoded = item.msgpack_frame
    if encoded is None:
        encode = _ENCODERS.get(type(item))
        if encode is None:
            raise TypeError(f"no msgpack encoding for {type(item).__name__}")
        encoded = item.msgpack_frame = encode_frame(encode(item))
    return encoded


# The keys in the order protocol.md shows them: the wire must not change.


# Each encoder builds its body itself: one is called for every message pushed.


def _inbox_message(item: InboxMessage) -> Data:
    # _private() and event() written out: one of these is encoded per private message.
    return {
        "event": "message",
        "data": {
            "id": item.id,
            "name": item.sender,
            "msg": item.body,
            "datetime": format_datetime(item.created_at),
        },
    }


def _sent_copy(item: SentCopy) -> Data:
    return event(
        "message",
        {
            "id": item.id,
            "name": item.sender,
            "msg": item.body,
            "datetime": format_datetime(item.created_at),
            "to": item.to,
        },
    )


def _channel_post(item: ChannelPost) -> Data:
    return event(
        "channel_message",
        {
            "id": item.id,
            "channel": item.channel,
            "name": item.sender,
            "msg": item.body,
            "datetime": format_datetime(item.created_at),
        },
    )


def _membership(item: Join | Leave) -> Data:
    return event(item.kind, {"channel": item.channel, "name": item.name})


def _presence(item: Presence) -> Data:
    return event("presence", {"name": item.name, "online": item.online})


def _ping(item: Ping) -> Data:
    return event("ping", {})


_ENCODERS: dict[type[Any], Callable[[Any], Data]] = {
    InboxMessage: _inbox_message,
    SentCopy: _sent_copy,
    ChannelPost: _channel_post,
    Join: _membership,
    Leave: _membership,
    Presence: _presence,
    Ping: _ping,
}
