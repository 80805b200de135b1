"""Live state and fan-out: who is connected as whom, who follows which stream.

Synchronous and in-memory: no I/O and no awaits, so a handler's "store, then
publish" runs without interleaving.  Frames arrive here already encoded, once
per message whatever the number of recipients.  A cross-node bus would sit
behind this same interface.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from chatd import events
from chatd.delivery import INBOX, Subscription


class Session:
    """One client connection as the hub and the handlers see it.

    The connection layer subclasses this and supplies ``write``, ``push_paced`` and ``abort``.
    """

    # Slots: one of these per connection, ten thousand idle ones must stay small.
    __slots__ = (
        "address",
        "port",
        "subscription",
        "token",
        "token_checked_at",
        "token_digest",
        "token_expires_at",
        "user_id",
        "user_name",
    )

    def __init__(self, address: str = "-", port: int | None = None) -> None:
        self.address = address  # the client's IP address, for per-address limits
        self.port = port
        self.user_id: int | None = None
        self.user_name: str | None = None
        self.token_digest: bytes | None = None
        self.token: str | None = None  # as the client sends it, to skip hashing repeats
        self.token_expires_at = 0.0
        self.token_checked_at = 0.0
        self.subscription: Subscription | None = None

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
        self.token = None
        self.token_expires_at = 0.0

    @property
    def queued_bytes(self) -> int:
        """Bytes written to this session that the client has not taken yet."""
        return 0

    def write(self, frame: bytes) -> None:
        raise NotImplementedError("this session has no transport")

    async def push_paced(self, frame: bytes) -> None:
        raise NotImplementedError("this session has no transport")

    def abort(self, reason: str) -> None:
        raise NotImplementedError("this session has no transport")


class Hub:
    def __init__(self) -> None:
        self._sessions: defaultdict[int, set[Session]] = defaultdict(set)
        self._names: dict[int, str] = {}
        # Channel memberships of online users, and the subscribed sessions of each channel.
        self._channels_of: dict[int, set[int]] = {}
        self._followers: defaultdict[int, set[Session]] = defaultdict(set)

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
            session.token = None  # the caller records the raw token it checked, if any
            return
        self.unbind(session)
        first = user_id not in self._sessions
        if first:
            self._names[user_id] = name
        else:
            name = self._names[user_id]  # one string for all of a user's sessions
        session.user_id, session.user_name = user_id, name
        session.token_digest, session.token_expires_at = digest, expires_at
        self._sessions[user_id].add(session)
        if first:
            self._channels_of[user_id] = set(channels)
            self._announce_presence(user_id, online=True)

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
        own = self._sessions.get(user_id, set())
        audience: set[Session] = set()
        for channel_id in self._channels_of.get(user_id, ()):
            audience.update(self._followers.get(channel_id, ()))
        frame = events.presence(self._names[user_id], online)
        for session in audience - own:
            session.write(frame)

    # Subscriptions.

    def subscribe(self, session: Session, subscription: Subscription) -> list[int]:
        """Start live delivery; returns the channels whose streams must catch up."""
        assert session.user_id is not None
        self.unsubscribe(session)
        session.subscription = subscription
        channels = sorted(self._channels_of.get(session.user_id, ()))
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

    def left(self, user_id: int, channel_id: int) -> None:
        self._channels_of.get(user_id, set()).discard(channel_id)
        for session in self._sessions.get(user_id, ()):
            if session.subscription is not None:
                session.subscription.drop(channel_id)
                self._unfollow(channel_id, session)

    # Fan-out.

    def publish_private(
        self,
        recipient_id: int,
        message_id: int,
        frame: Callable[[], bytes],
        sender: Session,
        copy: Callable[[], bytes],
    ) -> None:
        """To the recipient's subscribed sessions; a copy to the sender's other ones.

        Frames are built only if someone is subscribed, and then once for all of them.
        """
        readers = [s.subscription for s in self._sessions.get(recipient_id, ()) if s.subscription]
        if readers:
            encoded = frame()
            for subscription in readers:
                subscription.offer(INBOX, message_id, encoded)
        if sender.user_id == recipient_id:
            return  # a note to self: the inbox frame already reached every device
        devices = [
            s
            for s in self._sessions.get(sender.user_id or 0, ())
            if s is not sender and s.subscription is not None
        ]
        if devices:
            encoded = copy()
            for session in devices:
                session.write(encoded)

    def publish_channel(
        self, channel_id: int, message_id: int, frame: bytes, sender: Session
    ) -> None:
        for session in self._followers.get(channel_id, ()):
            if session is not sender and session.subscription is not None:
                session.subscription.offer(channel_id, message_id, frame)

    def announce(self, channel_id: int, frame: bytes, exclude: Session) -> None:
        """A channel event that is not a message (join, leave): no ids, no catch-up."""
        for session in list(self._followers.get(channel_id, ())):
            if session is not exclude:
                session.write(frame)
