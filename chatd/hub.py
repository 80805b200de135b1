"""Live state: who is connected as whom, and (later) fan-out of pushes.

Synchronous and in-memory: no I/O and no awaits, so handlers can consult it
freely.  A cross-node bus would sit behind this same interface.
"""

from __future__ import annotations

from collections import defaultdict


class Session:
    """One client connection as the hub and the handlers see it: who it is bound to.

    The connection layer subclasses this; handler tests use it as it is.
    """

    def __init__(self, peer: str = "-") -> None:
        self.peer = peer
        self.user_id: int | None = None
        self.user_name: str | None = None
        self.token_digest: bytes | None = None
        self.token_expires_at = 0.0

    def clear(self) -> None:
        self.user_id = None
        self.user_name = None
        self.token_digest = None
        self.token_expires_at = 0.0


class Hub:
    def __init__(self) -> None:
        self._sessions: defaultdict[int, set[Session]] = defaultdict(set)

    def bind(
        self, session: Session, user_id: int, name: str, digest: bytes, expires_at: float
    ) -> None:
        self.unbind(session)
        session.user_id, session.user_name = user_id, name
        session.token_digest, session.token_expires_at = digest, expires_at
        self._sessions[user_id].add(session)

    def unbind(self, session: Session) -> None:
        user_id = session.user_id
        session.clear()
        if user_id is None:
            return
        sessions = self._sessions.get(user_id)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._sessions[user_id]

    def is_online(self, user_id: int) -> bool:
        return user_id in self._sessions

    def sessions_of(self, user_id: int) -> frozenset[Session]:
        return frozenset(self._sessions.get(user_id, ()))

    def sessions_with_token(self, user_id: int, digest: bytes) -> list[Session]:
        return [s for s in self._sessions.get(user_id, ()) if s.token_digest == digest]

    @property
    def online_users(self) -> int:
        return len(self._sessions)
