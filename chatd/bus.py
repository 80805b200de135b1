"""The publish seam: where committed events leave the handler that made them.

Every event a commit produces (a stored message, a join, a leave) is published
here once, after COMMIT and never inside it, in commit order: the store calls a
send's ``committed`` callback in commit order, and that callback publishes.  The
bus hands each event to the hubs that have sessions to deliver it to.  With one
node that is :class:`LocalBus`, delivering straight to this process's hub; a bus
between nodes (Redis pub/sub, the next step) implements the same Protocol, and
every node's hub then runs the same delivery code single-node mode runs today.

Presence and ping are not published: each hub makes them from its own sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

from chatd.hub import DELIVER, Hub
from chatd.model import Published

__all__ = ["Bus", "LocalBus"]


class Bus(Protocol):
    def publish(self, event: Published) -> None:
        """Deliver a committed event to every hub, in the order published; never waits."""

    def copies_wanted(self, user_id: int, origin: int) -> bool:
        """Whether a session of ``user_id`` other than ``origin`` (the calling one) could
        receive a copy of their own message (a SentCopy): a sender with no other device
        gets none made, which is the common case and costs on every /send."""

    async def follow(self, user_id: int, channel_ids: Collection[int]) -> None:
        """A session of this node subscribes to these streams: once this returns, every
        message committed from now on reaches the hub (its catch-up reads the rest)."""

    async def online(self, user_ids: Collection[int]) -> set[int]:
        """Those of ``user_ids`` with a session on some node."""

    def revoke(self, user_id: int, digests: tuple[bytes, ...] = ()) -> None:
        """Tokens revoked here (all the user's if ``digests`` is empty): the other nodes
        end their sessions; this node has ended its own."""


class LocalBus:
    """One node: published events go to the local hub at once, in the caller's turn."""

    __slots__ = ("_hub", "copies_wanted")

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        # The hub's own method: asked once for the sends of a read, a call less than a
        # method passing it on.
        self.copies_wanted: Callable[[int, int], bool] = hub.has_other_session

    def publish(self, event: Published) -> None:
        DELIVER[type(event)](self._hub, event)  # Hub.deliver, a call less per message

    async def follow(self, user_id: int, channel_ids: Collection[int]) -> None:
        pass  # every commit of this one node reaches its hub

    async def online(self, user_ids: Collection[int]) -> set[int]:
        return {u for u in user_ids if self._hub.is_online(u)}

    def revoke(self, user_id: int, digests: tuple[bytes, ...] = ()) -> None:
        pass  # no other node
