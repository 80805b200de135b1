"""Live state and fan-out: who is connected as whom, who follows which stream.

Synchronous and in-memory: no I/O and no awaits, so a handler's "store, then
publish" runs without interleaving.  Events arrive here as data (chatd.model),
through the bus (chatd.bus) once committed, and each session encodes them at its
edge: once per front-end, whatever the number of recipients.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from chatd.delivery import Subscription
from chatd.model import (
    INBOX,
    ChannelPost,
    Event,
    InboxMessage,
    Join,
    Leave,
    Presence,
    Published,
    SentCopy,
)

log = logging.getLogger(__name__)

# Session serials: events name the session that caused them by it (model.py).
_serials = itertools.count(1)


class PushBatch:
    """While open, sessions hold their pushes back and hand ``flushes`` a callback that
    writes them; closing it calls them: one write per session for all that was pushed
    meanwhile, without a callback scheduled per session (chatd.app.ReplyGroup opens
    it around publishing what a group commit stored, chatd.connection honours it).

    Closed, a session batches its pushes by itself, until its event loop's next turn.
    One per hub (``Hub.pushes``, handed to each session it binds): a server's, on its
    event loop; never one shared with another server (tests run many in a process).
    """

    __slots__ = ("flushes", "open")

    def __init__(self) -> None:
        self.open = False
        self.flushes: list[Callable[[], None]] = []

    def close(self) -> None:
        """Write what was held back. Harmless when closed already (a close scheduled as
        a fall-back finds the batch closed, or reopened: then it only writes earlier)."""
        self.open = False
        flushes, self.flushes = self.flushes, []
        for flush in flushes:
            try:
                flush()
            except Exception:  # one broken connection must not hold the others' pushes
                log.exception("writing pushes failed")


class Session:
    """One client connection as the hub and the handlers see it.

    The connection layer subclasses this and supplies ``write``, ``push_paced`` and
    ``abort``; they take events, which the session encodes for its front-end.
    """

    # Slots: one of these per connection, ten thousand idle ones must stay small.
    __slots__ = (
        "address",
        "port",
        "pushes",
        "serial",
        "subscription",
        "token_checked_at",
        "token_digest",
        "token_expires_at",
        "user_id",
        "user_name",
    )

    def __init__(self, address: str = "-", port: int | None = None) -> None:
        self.address = address  # the client's IP address, for per-address limits
        self.port = port
        self.serial = next(_serials)  # names this session as an event's origin
        self.user_id: int | None = None
        self.user_name: str | None = None
        # The digest of the token it is bound with, never the token itself: a request's
        # token is hashed and compared (well under a microsecond, once per read), so no
        # bearer token outlives its request in the server's memory (and a connection
        # holds 92 bytes less).
        self.token_digest: bytes | None = None
        self.token_expires_at = 0.0
        self.token_checked_at = 0.0
        self.subscription: Subscription | None = None
        # Its hub's push batch, once bound (only bound sessions are pushed to).
        self.pushes: PushBatch | None = None

    @property
    def peer(self) -> str:
        """The client as "address:port", for logs: made when asked for, not kept."""
        return self.address if self.port is None else f"{self.address}:{self.port}"

    def __str__(self) -> str:
        # Log calls pass the session itself, so the peer string is only made if logged.
        return self.peer

    def clear(self) -> None:
        self.user_id = None
        self.user_name = None
        self.token_digest = None
        self.token_expires_at = 0.0

    @property
    def queued_bytes(self) -> int:
        """Bytes written to this session that the client has not taken yet."""
        return 0

    def write(self, event: Event) -> None:
        """Queue an event without waiting; may drop a client that does not read."""
        raise NotImplementedError("this session has no transport")

    async def push_paced(self, event: Event) -> None:
        """Send an event at the client's pace (catch-up): waits while too much is queued."""
        raise NotImplementedError("this session has no transport")

    def abort(self, reason: str) -> None:
        raise NotImplementedError("this session has no transport")


class Hub:
    def __init__(self) -> None:
        self._sessions: defaultdict[int, set[Session]] = defaultdict(set)
        self.pushes = PushBatch()  # what the sends of a commit push, written together
        self._names: dict[int, str] = {}
        # Channel memberships of online users, and the subscribed sessions of each channel.
        self._channels_of: dict[int, set[int]] = {}
        self._followers: defaultdict[int, set[Session]] = defaultdict(set)
        # Told of a user's first session here (True) and their last one's end (False),
        # with the user's name and channels, instead of announcing it: with several
        # nodes, presence is shared and announced by the bus (chatd.cluster), which
        # calls announce_presence on every node.
        self.on_presence: Callable[[int, str, list[int], bool], None] | None = None
        # Told when a subscribed session starts following a channel it joined, so that
        # a bus between nodes follows it too (chatd.cluster); /subscribe tells the bus.
        self.on_follow: Callable[[int, list[int]], None] | None = None

    # Sessions and presence.

    def bind(
        self,
        session: Session,
        user_id: int,
        name: str,
        digest: bytes,
        expires_at: float,
        channels: Iterable[int] = (),
    ) -> None:
        """Bind a session to a user; ``channels`` (their memberships) matter for the first."""
        if session.user_id == user_id:
            # Same user, new token (a second /login): keep subscription and presence as they are.
            session.token_digest, session.token_expires_at = digest, expires_at
            return
        self.unbind(session)
        first = user_id not in self._sessions
        if first:
            self._names[user_id] = name
        else:
            name = self._names[user_id]  # one string for all of a user's sessions
            digest = self._same_digest(user_id, digest)
        session.user_id, session.user_name = user_id, name
        session.token_digest, session.token_expires_at = digest, expires_at
        session.pushes = self.pushes
        self._sessions[user_id].add(session)
        if first:
            self._channels_of[user_id] = set(channels)
            self._announce_presence(user_id, online=True)

    def _same_digest(self, user_id: int, digest: bytes) -> bytes:
        """The digest of another of the user's sessions if it is this one: connections
        opened with one token share one bytes object (65 B each) instead of a copy
        apiece. One session is looked at, not all: this is a saving, not an index."""
        other = next(iter(self._sessions[user_id]), None)
        if other is not None and other.token_digest == digest:
            return other.token_digest
        return digest

    def unbind(self, session: Session) -> None:
        user_id = session.user_id
        if user_id is None:
            return
        self.unsubscribe(session)
        session.clear()
        sessions = self._sessions.get(user_id)
        if sessions is None:
            return
        sessions.discard(session)
        if not sessions:
            self._announce_presence(user_id, online=False)
            del self._sessions[user_id]
            del self._channels_of[user_id]
            del self._names[user_id]

    def is_online(self, user_id: int) -> bool:
        return user_id in self._sessions

    def has_other_session(self, user_id: int, serial: int) -> bool:
        """Whether ``user_id`` has a session here besides the one numbered ``serial``."""
        sessions = self._sessions.get(user_id)
        if not sessions:
            return False
        if len(sessions) > 1:
            return True
        (only,) = sessions  # no generator: this is asked for every /send
        return only.serial != serial

    def has_followers(self, channel_id: int) -> bool:
        """Whether a subscribed session here follows the channel."""
        return bool(self._followers.get(channel_id))

    def channels_of(self, user_id: int) -> list[int]:
        """The channels of an online user, in id order (the hub keeps their memberships)."""
        return sorted(self._channels_of.get(user_id, ()))

    def is_member(self, user_id: int, channel_id: int) -> bool:
        """For online users only (the hub keeps their memberships)."""
        return channel_id in self._channels_of.get(user_id, ())

    def bound_sessions(self) -> list[Session]:
        return [session for group in self._sessions.values() for session in group]

    def sessions_with_token(self, user_id: int, digest: bytes) -> list[Session]:
        return [s for s in self._sessions.get(user_id, ()) if s.token_digest == digest]

    def load(self) -> dict[str, int]:
        """Counts for /stats."""
        sessions = [s for group in self._sessions.values() for s in group]
        subscribed = [s.subscription for s in sessions if s.subscription is not None]
        return {
            "users_online": len(self._sessions),
            "sessions": len(sessions),
            "subscribed": len(subscribed),
            "catching_up": sum(1 for sub in subscribed if sub.catching_up),
            "queued_bytes": sum(s.queued_bytes for s in sessions),
        }

    def _announce_presence(self, user_id: int, online: bool) -> None:
        channels = self._channels_of.get(user_id, set())
        if self.on_presence is not None:
            self.on_presence(user_id, self._names[user_id], sorted(channels), online)
        else:
            self.announce_presence(user_id, self._names[user_id], online, channels)

    def announce_presence(
        self, user_id: int, name: str, online: bool, channels: Iterable[int]
    ) -> None:
        """Tell the subscribed sessions of the user's channels, but the user's own."""
        audience: set[Session] = set()
        for channel_id in channels:
            audience.update(self._followers.get(channel_id, ()))
        event = Presence(name, online)
        for session in audience:
            if session.user_id != user_id:
                session.write(event)

    # Subscriptions.

    def subscribe(self, session: Session, subscription: Subscription) -> list[int]:
        """Start live delivery; returns the channels whose streams must catch up."""
        assert session.user_id is not None
        self.unsubscribe(session)
        session.subscription = subscription
        channels = self.channels_of(session.user_id)
        subscription.hold(INBOX)
        for channel_id in channels:
            subscription.hold(channel_id)
            self._followers[channel_id].add(session)
        return channels

    def unsubscribe(self, session: Session) -> None:
        if session.subscription is None:
            return
        session.subscription.cancel()
        session.subscription = None
        for channel_id in self._channels_of.get(session.user_id or 0, ()):
            self._unfollow(channel_id, session)

    def _unfollow(self, channel_id: int, session: Session) -> None:
        followers = self._followers.get(channel_id)
        if followers is not None:
            followers.discard(session)
            if not followers:
                del self._followers[channel_id]

    # Channel membership.

    def joined(self, user_id: int, channel_id: int) -> None:
        channels = self._channels_of.get(user_id)
        if channels is None:
            return
        channels.add(channel_id)
        for session in self._sessions.get(user_id, ()):
            if session.subscription is not None:
                session.subscription.follow(channel_id)
                self._followers[channel_id].add(session)
        if self.on_follow is not None and self._followers.get(channel_id):
            self.on_follow(user_id, [channel_id])

    def left(self, user_id: int, channel_id: int) -> None:
        self._channels_of.get(user_id, set()).discard(channel_id)
        for session in self._sessions.get(user_id, ()):
            if session.subscription is not None:
                session.subscription.drop(channel_id)
                self._unfollow(channel_id, session)

    # Fan-out: what the bus delivers (protocol.md section 9, "Who receives what").

    def deliver(self, event: Published) -> None:
        """Hand a committed event to the sessions it is for."""
        # By type, one dict look-up: every message goes through here (twice for a
        # private one), and a chain of isinstance checks cost more (docs/benchmarks.md).
        DELIVER[type(event)](self, event)

    def _deliver_join(self, event: Join) -> None:
        self.joined(event.user_id, event.channel_id)
        self._announce(event)

    def _deliver_leave(self, event: Leave) -> None:
        # Announced before the membership is forgotten, so the leaver's other devices hear it.
        self._announce(event)
        self.left(event.user_id, event.channel_id)

    def _deliver_inbox_message(self, event: InboxMessage) -> None:
        """To every subscribed session of the recipient; for a note to self, the
        calling one included."""
        for session in self._sessions.get(event.recipient_id, ()):
            if session.subscription is not None:
                session.subscription.offer(INBOX, event)

    def _deliver_sent_copy(self, event: SentCopy) -> None:
        """To the sender's other subscribed sessions."""
        for session in self._sessions.get(event.sender_id, ()):
            if session.serial != event.origin and session.subscription is not None:
                session.write(event)

    def _deliver_channel_post(self, event: ChannelPost) -> None:
        channel_id, origin = event.channel_id, event.origin
        for session in self._followers.get(channel_id, ()):
            subscription = session.subscription
            if subscription is None:
                continue
            if session.serial != origin:
                subscription.offer(channel_id, event)
            else:
                subscription.sent(channel_id, event.seq)

    def _announce(self, event: Join | Leave) -> None:
        """A channel event that is not a message: no ids, no catch-up."""
        for session in list(self._followers.get(event.channel_id, ())):
            if session.serial != event.origin:
                session.write(event)


# What Hub.deliver does with each kind of event (Published: every kind is here).
DELIVER: dict[type[Any], Callable[[Hub, Any], None]] = {
    InboxMessage: Hub._deliver_inbox_message,
    SentCopy: Hub._deliver_sent_copy,
    ChannelPost: Hub._deliver_channel_post,
    Join: Hub._deliver_join,
    Leave: Hub._deliver_leave,
}
