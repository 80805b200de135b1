"""The store as the rest of chatd sees it: one Protocol, and ``open_store`` to pick one.

``--db`` is either a path (the embedded SQLite store, chatd.store.sqlite) or a URL
``postgresql://user@host:port/dbname`` (chatd.store.postgres, which needs the optional
driver: ``pip install 'chatd[postgresql]'``).  Both implement MessageStore with the
same contract, which tests/test_store_contract.py runs against each:

- Every method is one transaction; a method that returns has committed.
- ``enqueue`` stores a message with the next group commit (many messages, one
  transaction) and calls its ``committed`` callback after COMMIT, in commit order,
  before the future resolves; a repeated (sender, client_id) is not stored again and
  resolves to the first result with ``duplicate=True`` (a unique constraint decides).
- Read your writes: every other method first waits for the messages enqueued before
  it, so a caller sees its own sends.
- Same rows, same order and same paging on either store.

The row types (chatd.store.rows) and the SQLite store are re-exported here, so the
rest of chatd imports everything store-related from ``chatd.store``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from chatd.config import Config
from chatd.store.rows import (
    CHANNEL,
    GUEST_HASH,
    PRIVATE,
    PROFILE_TTL,
    Batch,
    Bounds,
    Channel,
    ChannelMessage,
    DatabaseFileLost,
    Joined,
    Membership,
    NewMessage,
    PrivateMessage,
    SentMessage,
    Skeletons,
    Stored,
    StoreError,
    StreamHeads,
    StreamPosition,
    TooManyChannels,
    User,
)
from chatd.store.sqlite import (
    DEFAULT_WAL_LIMIT,
    MIGRATIONS,
    RESCUED_INFIX,
    SYNCHRONOUS_MODES,
    Store,
    backup,
)

__all__ = [
    "CHANNEL",
    "DEFAULT_WAL_LIMIT",
    "GUEST_HASH",
    "MIGRATIONS",
    "POSTGRES_SCHEMES",
    "PRIVATE",
    "PROFILE_TTL",
    "RESCUED_INFIX",
    "SYNCHRONOUS_MODES",
    "Batch",
    "Bounds",
    "Channel",
    "ChannelMessage",
    "DatabaseFileLost",
    "Joined",
    "Membership",
    "MessageStore",
    "NewMessage",
    "PrivateMessage",
    "SentMessage",
    "Skeletons",
    "Store",
    "StoreError",
    "Stored",
    "StreamHeads",
    "StreamPosition",
    "TooManyChannels",
    "User",
    "backup",
    "is_postgres_url",
    "open_store",
]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
POSTGRES_EXTRA = "pip install 'chatd[postgresql]'"


class MessageStore(Protocol):
    """What handlers, delivery, server and admin ask of a store (see the module doc)."""

    async def close(self) -> None: ...

    # True while writes fail for want of disk space (/stats, the metrics).
    @property
    def disk_full(self) -> bool: ...

    # Messages: the group commit.
    def enqueue(
        self, message: NewMessage, committed: Callable[[Stored], None] | None = None
    ) -> asyncio.Future[Stored]: ...
    def enqueue_many(
        self, messages: list[NewMessage], settle: Callable[[list[Stored | Exception]], None]
    ) -> asyncio.Future[None]: ...

    # Users and tokens.
    async def create_user(
        self, name: str, key: str, skeletons: Skeletons, password_hash: str, now: float
    ) -> bool: ...
    async def user_name_taken(self, key: str, skeletons: Skeletons) -> bool: ...
    async def find_user(self, key: str) -> User | None: ...
    async def find_profile(self, key: str) -> User | None: ...
    def cached_profile(self, key: str) -> User | None: ...
    async def set_password_hash(self, user_id: int, password_hash: str) -> None: ...
    async def add_token(
        self, user_id: int, digest: bytes, now: float, expires_at: float
    ) -> None: ...
    async def token_owner(self, digest: bytes, now: float) -> tuple[User, float] | None: ...
    async def live_tokens(self, digests: Sequence[bytes], now: float) -> set[bytes]: ...
    async def revoke_token(self, digest: bytes) -> None: ...

    # Private messages.
    async def take_inbox(self, user_id: int, limit: int) -> Batch[PrivateMessage]: ...

    # Channels.
    async def find_channel(self, key: str) -> Channel | None: ...
    def cached_channel(self, key: str) -> Channel | None: ...
    async def join_channel(
        self,
        name: str,
        key: str,
        skeletons: Skeletons,
        user_id: int,
        now: float,
        rejoin: bool = False,
        max_memberships: int | None = None,
    ) -> tuple[Channel, Joined]: ...
    async def leave_channel(self, channel_id: int, user_id: int, now: float) -> bool: ...
    async def channel_ids(self, user_id: int) -> list[int]: ...
    async def channel_name(self, channel_id: int) -> str: ...
    async def is_member(self, channel_id: int, user_id: int) -> bool: ...
    async def memberships(self, user_id: int, backlog: int) -> list[Membership]: ...
    async def take_channel(
        self, channel_id: int, user_id: int, backlog: int, limit: int
    ) -> Batch[ChannelMessage]: ...
    async def channel_members(self, channel_id: int) -> list[tuple[int, str]]: ...

    # Delivery positions and catch-up.
    async def ack_private(self, user_id: int, message_id: int) -> int: ...
    async def ack_channel(self, channel_id: int, user_id: int, message_id: int) -> int | None: ...
    # Positions are ids with their seqs: the wire speaks ids, delivery orders by seq.
    async def inbox_position(self, user_id: int) -> StreamPosition: ...
    async def stream_heads(
        self, user_ids: Sequence[int], channel_ids: Sequence[int]
    ) -> StreamHeads: ...
    async def channel_position(
        self, channel_id: int, user_id: int
    ) -> tuple[StreamPosition, int]: ...
    async def channel_newest(self, channel_ids: Sequence[int]) -> dict[int, StreamPosition]: ...
    async def inbox_after(
        self, user_id: int, after_id: int, limit: int
    ) -> list[PrivateMessage]: ...
    async def channel_after(
        self, channel_id: int, after_id: int, limit: int, reader_id: int, own_after: int
    ) -> list[ChannelMessage]: ...

    # History.
    async def channel_history(
        self, channel_id: int, before: int | None, limit: int
    ) -> Batch[ChannelMessage]: ...
    async def private_history(
        self, user_id: int, other_id: int, before: int | None, limit: int
    ) -> Batch[SentMessage]: ...

    # IRC: guests (protocol.md 12.6) and CHATHISTORY ranges (12.5).
    async def create_guest(
        self, name: str, key: str, skeletons: Skeletons, now: float
    ) -> int | None: ...
    async def release_guests(self, user_id: int | None = None) -> None: ...
    async def channel_range(
        self, channel_id: int, bounds: Bounds, limit: int, newest: bool
    ) -> list[ChannelMessage]: ...
    async def private_range(
        self, user_id: int, other_id: int, bounds: Bounds, limit: int, newest: bool
    ) -> list[SentMessage]: ...
    async def message_time(self, in_channel: bool, message_id: int) -> float | None: ...
    async def recent_targets(
        self, user_id: int, after: float, before: float, limit: int
    ) -> list[tuple[str, bool, float]]: ...

    # Operations (chatd admin).
    async def list_users(self, now: float) -> list[tuple[str, float, int]]: ...
    async def revoke_tokens(self, user_id: int) -> int: ...
    async def delete_user(self, user_id: int) -> None: ...


def is_postgres_url(db: str) -> bool:
    return db.startswith(POSTGRES_SCHEMES)


async def open_store(db: str, config: Config) -> MessageStore:
    """The store ``db`` names, schema created or migrated, ready to serve.

    For SQLite this also refuses a file it cannot write and starts the background WAL
    checkpointer the config asks for (Store.open_configured: SQLite's own business).
    Raises StoreError.
    """
    if is_postgres_url(db):
        try:
            from chatd.store.postgres import PostgresStore
        except ImportError as exc:
            if exc.name != "asyncpg":  # a fault of chatd's own, not the optional driver
                raise
            raise StoreError(
                f"{db.split(':', 1)[0]} URLs need the asyncpg driver: {POSTGRES_EXTRA}"
            ) from exc
        return await PostgresStore.open(db)
    return await Store.open_configured(db, config)


if TYPE_CHECKING:
    # Static checks: mypy fails here if a store drifts from the Protocol.
    from chatd.store.postgres import PostgresStore

    def _sqlite_is_a_message_store(store: Store) -> MessageStore:
        return store

    def _postgres_is_a_message_store(store: PostgresStore) -> MessageStore:
        return store
