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

from typing import Protocol

from chatd.hub import Hub
from chatd.model import Published

__all__ = ["Bus", "LocalBus"]


class Bus(Protocol):
    def publish(self, event: Published) -> None:
        """Deliver a committed event to every hub, in the order published; never waits."""


class LocalBus:
    """One node: published events go to the local hub at once, in the caller's turn."""

    __slots__ = ("_hub",)

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def publish(self, event: Published) -> None:
        self._hub.deliver(event)
