"""Server-initiated frames (protocol.md, "Events"), encoded once however many receive them."""

from __future__ import annotations

from chatd.codec import encode_frame
from chatd.protocol import event, format_datetime
from chatd.store import ChannelMessage, PrivateMessage

PING = encode_frame(event("ping", {}))


def private_message(message: PrivateMessage, to: str | None = None) -> bytes:
    """A private message for its recipient, or (with ``to``) a copy for its sender's devices."""
    data = {
        "id": message.id,
        "name": message.sender,
        "msg": message.body,
        "datetime": format_datetime(message.created_at),
    }
    if to is not None:
        data["to"] = to
    return encode_frame(event("message", data))


def channel_message(channel: str, message: ChannelMessage) -> bytes:
    return encode_frame(
        event(
            "channel_message",
            {
                "id": message.id,
                "channel": channel,
                "name": message.sender,
                "msg": message.body,
                "datetime": format_datetime(message.created_at),
            },
        )
    )


def membership(kind: str, channel: str, user: str) -> bytes:
    """``join`` or ``leave``."""
    return encode_frame(event(kind, {"channel": channel, "name": user}))


def presence(user: str, online: bool) -> bytes:
    return encode_frame(event("presence", {"name": user, "online": online}))
