"""Events across nodes, in memory: every published event survives the bus's wire form
(chatd.cluster.to_notice / from_notice, through chatd.bus_redis.encode / decode)."""

from __future__ import annotations

import pytest

from chatd.bus_redis import Notice, decode, encode
from chatd.cluster import from_notice, stream_of, to_notice
from chatd.model import ChannelPost, InboxMessage, Join, Leave, Published, SentCopy

EVENTS: list[Published] = [
    InboxMessage(7, 1207, "alice", "hi ✓", 1.5, seq=3),
    ChannelPost(4, "general", 1208, "bob", "all", 2.25, origin=9, seq=12),
    SentCopy(1, "bob", 1209, "alice", "copy", 3.0, origin=5),
    Join(4, "general", 2, "bob", origin=3),
    Leave(4, "general", 2, "bob"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_an_event_crosses_the_bus_unchanged_but_for_its_origin(event: Published) -> None:
    notice = decode(encode(to_notice(event)))
    assert isinstance(notice, Notice)
    again = from_notice(notice)
    assert type(again) is type(event)
    assert getattr(again, "origin", 0) == 0  # a serial of the sending node means nothing here
    for name in ("id", "seq", "body", "sender", "channel", "name", "user_id", "to"):
        assert getattr(again, name, None) == getattr(event, name, None)


def test_stream_names_and_numbers_travel_with_stored_messages() -> None:
    inbox, post = to_notice(EVENTS[0]), to_notice(EVENTS[1])
    assert (inbox.stream, inbox.seq, inbox.id) == ("u:7", 3, 1207)
    assert (post.stream, post.seq, post.id) == ("c:4", 12, 1208)
    assert stream_of(EVENTS[2]) is None  # a copy belongs to no stream


@pytest.mark.parametrize(
    "fields",
    [{}, {"type": "Presence", "name": "x", "online": True}, {"type": "Join", "channel_id": 1}],
)
def test_a_notice_that_holds_no_known_event_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        from_notice(Notice("c:1", 1, 1, fields))
