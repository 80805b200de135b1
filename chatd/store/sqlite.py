"""The SQLite store, chatd's embedded default: schema, migrations and every SQL statement.

One aiosqlite connection in WAL mode does all the reading and writing.  Each
public method is one transaction, taken under an asyncio lock so that coroutines
sharing the connection never interleave statements; a method that returns has
committed.  New messages are the exception that makes chatd fast: ``enqueue``
queues them for a group commit (many messages, one transaction), and every
other method first waits for the messages enqueued before it, so a caller
always reads its own writes.  A second connection only checkpoints the WAL.
Handlers see only the typed rows below, never SQL, so another store can replace
this one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sqlite3
import sys
import time
from collections import Counter, deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from functools import lru_cache, partial
from itertools import count
from typing import Any

import aiosqlite

from chatd import trace
from chatd.config import Config
from chatd.errors import OutOfDisk
from chatd.names import skeletons_of_key
from chatd.store.commit import BatchPlan, GroupCommit
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
    channel_start,
)

log = logging.getLogger(__name__)


async def _fill_skeletons(db: aiosqlite.Connection) -> None:
    """Compute the skeletons of every name stored before there were skeleton columns.

    Names that already look alike keep working (the index is not unique); only
    new names are refused for looking like an existing one.
    """
    for table in ("users", "channels"):
        rows = list(
            await db.execute_fetchall(f"SELECT id, name_key FROM {table} WHERE skeleton IS NULL")
        )
        # Off the event loop: a large database has many names to transform.
        values = await asyncio.to_thread(_skeletons, rows)
        await db.executemany(
            f"UPDATE {table} SET skeleton = ?, upper_skeleton = ? WHERE id = ?", values
        )


def _skeletons(rows: list[Any]) -> list[tuple[str, str, int]]:
    return [(*skeletons_of_key(key), row_id) for row_id, key in rows]


# A migration is an SQL script, or a Python step for what SQL cannot compute.
Migration = str | Callable[[aiosqlite.Connection], Awaitable[None]]

# Each entry moves the schema one version up; PRAGMA user_version records where we are.
MIGRATIONS: Sequence[Migration] = (
    """
    CREATE TABLE users (
        id            INTEGER PRIMARY KEY,
        name          TEXT NOT NULL,
        name_key      TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        created_at    REAL NOT NULL,
        inbox_cursor  INTEGER NOT NULL DEFAULT 0  -- newest private message id received
    );
    CREATE TABLE tokens (
        digest     BLOB PRIMARY KEY,  -- sha256 of the token, never the token itself
        user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX tokens_by_user ON tokens(user_id);
    -- AUTOINCREMENT: ids are never reused, so cursors stay valid after deletions.
    CREATE TABLE private_messages (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        sender_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        recipient_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        body         TEXT NOT NULL,
        created_at   REAL NOT NULL,
        client_id    TEXT
    );
    CREATE INDEX private_by_recipient ON private_messages(recipient_id, id);
    CREATE UNIQUE INDEX private_by_client_id
        ON private_messages(sender_id, client_id) WHERE client_id IS NOT NULL;
    CREATE TABLE channels (
        id         INTEGER PRIMARY KEY,
        name       TEXT NOT NULL,
        name_key   TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL
    );
    CREATE TABLE channel_members (
        channel_id  INTEGER NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
        user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        joined_at   REAL NOT NULL,
        read_cursor INTEGER,  -- newest id received, NULL before the first /channel/receive
        PRIMARY KEY (channel_id, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX members_by_user ON channel_members(user_id);
    CREATE TABLE channel_messages (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        channel_id INTEGER NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
        sender_id  INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        body       TEXT NOT NULL,
        created_at REAL NOT NULL,
        client_id  TEXT
    );
    CREATE INDEX channel_messages_by_channel ON channel_messages(channel_id, id);
    CREATE UNIQUE INDEX channel_messages_by_client_id
        ON channel_messages(sender_id, client_id) WHERE client_id IS NOT NULL;
    """,
    """
    -- Leaving keeps the row, so a member who left is told "forbidden" instead of being
    -- silently re-joined by /channel/receive, and /channel/join clears left_at.
    ALTER TABLE channel_members ADD COLUMN left_at REAL;
    CREATE INDEX private_by_pair ON private_messages(recipient_id, sender_id, id);
    """,
    """
    -- What a name looks like in small letters and in capitals (UTS #39 skeletons,
    -- chatd/names.py): a new user or channel whose name looks like an existing one is
    -- refused. Not unique: databases made before this may hold look-alikes, and they
    -- keep working.
    ALTER TABLE users ADD COLUMN skeleton TEXT;
    ALTER TABLE users ADD COLUMN upper_skeleton TEXT;
    ALTER TABLE channels ADD COLUMN skeleton TEXT;
    ALTER TABLE channels ADD COLUMN upper_skeleton TEXT;
    CREATE INDEX users_by_skeleton ON users(skeleton);
    CREATE INDEX users_by_upper_skeleton ON users(upper_skeleton);
    CREATE INDEX channels_by_skeleton ON channels(skeleton);
    CREATE INDEX channels_by_upper_skeleton ON channels(upper_skeleton);
    """,
    _fill_skeletons,
    """
    -- Per-stream sequence numbers: each channel, and each user's inbox, numbers its
    -- messages 1, 2, 3, ... (seq), the stream's newest number kept on its row (as
    -- PostgreSQL does) and moved in the transaction that inserts. Messages stored
    -- before are numbered here, by id within each stream. No unique index on (stream,
    -- seq) as PostgreSQL has: SQLite has one writer, which moves a head and inserts in
    -- one transaction, and the index cost 9% of the insert rate (docs/benchmarks.md).
    ALTER TABLE users ADD COLUMN inbox_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE channels ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE private_messages ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE channel_messages ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    UPDATE private_messages SET seq = n.seq FROM (
        SELECT id, ROW_NUMBER() OVER (PARTITION BY recipient_id ORDER BY id) AS seq
        FROM private_messages) AS n
    WHERE private_messages.id = n.id;
    UPDATE channel_messages SET seq = n.seq FROM (
        SELECT id, ROW_NUMBER() OVER (PARTITION BY channel_id ORDER BY id) AS seq
        FROM channel_messages) AS n
    WHERE channel_messages.id = n.id;
    UPDATE users SET inbox_seq = COALESCE(
        (SELECT MAX(seq) FROM private_messages WHERE recipient_id = users.id), 0);
    UPDATE channels SET last_seq = COALESCE(
        (SELECT MAX(seq) FROM channel_messages WHERE channel_id = channels.id), 0);
    """,
    """
    -- A sender's private messages through an index (CHATHISTORY TARGETS read every
    -- private message on the server without one): the conversation index turned
    -- round, (sender, recipient, id) for (recipient, sender, id). It serves the pages
    -- of a conversation as well, so each send writes no more index pages than before.
    DROP INDEX private_by_pair;
    CREATE INDEX private_by_sender ON private_messages(sender_id, recipient_id, id);
    """,
)


# The columns of PrivateMessage and ChannelMessage, the sender's name joined in.
_PRIVATE_ROWS = (
    "SELECT m.id, u.name, m.body, m.created_at, m.seq FROM private_messages m"
    " JOIN users u ON u.id = m.sender_id"
)
_CHANNEL_ROWS = (
    "SELECT m.id, u.name, m.body, m.created_at, m.seq FROM channel_messages m"
    " JOIN users u ON u.id = m.sender_id"
)
# A conversation of two users: its messages with both names joined in, and one direction
# of it, newest or oldest first. Each direction is cut to the page's size before the two
# are merged, so a page reads about ``limit`` rows of each (a plain UNION of the two
# directions collected every id of the conversation first: 14 ms a page at 50,000).
_PAIR_ROWS = (
    "SELECT m.id, s.name, r.name, m.body, m.created_at FROM private_messages m"
    " JOIN users s ON s.id = m.sender_id JOIN users r ON r.id = m.recipient_id"
)
_ONE_WAY = (
    "SELECT id FROM private_messages WHERE sender_id = ? AND recipient_id = ? AND {inside}"
    " ORDER BY id {order} LIMIT ?"
)
# CHATHISTORY TARGETS: the user's channels and conversations with a message in a time
# window, by their newest message there (found from the top of the window's ids down,
# Store._by_id), newest first. The people the user wrote to are listed by a loose scan
# of the sender's index (each next one in a single index seek), so the cost grows with
# how many they wrote to, not with how much; what they received is the window's part
# of their inbox.
_RECENT_TARGETS = """
WITH RECURSIVE wrote_to(id) AS (
    SELECT (SELECT MIN(recipient_id) FROM private_messages WHERE sender_id = :me)
    UNION ALL SELECT (SELECT MIN(recipient_id) FROM private_messages
                      WHERE sender_id = :me AND recipient_id > wrote_to.id)
    FROM wrote_to WHERE wrote_to.id IS NOT NULL
)
SELECT * FROM (
    SELECT c.name, 1, (SELECT m.created_at FROM channel_messages m
                       WHERE m.channel_id = cm.channel_id AND m.id > :post_lo
                       AND m.id < :post_hi AND m.created_at > :after
                       AND m.created_at < :before ORDER BY m.id DESC LIMIT 1) AS t
    FROM channel_members cm JOIN channels c ON c.id = cm.channel_id
    WHERE cm.user_id = :me AND cm.left_at IS NULL
    UNION ALL SELECT u.name, 0, MAX(p.t) FROM (
        SELECT w.id AS other, (SELECT created_at FROM private_messages
                               WHERE sender_id = :me AND recipient_id = w.id AND id > :lo
                               AND id < :hi AND created_at > :after AND created_at < :before
                               ORDER BY id DESC LIMIT 1) AS t
        FROM wrote_to w WHERE w.id IS NOT NULL
        UNION ALL SELECT sender_id, created_at FROM private_messages
        WHERE recipient_id = :me AND id > :lo AND id < :hi AND created_at > :after
        AND created_at < :before
    ) AS p JOIN users u ON u.id = p.other GROUP BY u.id
) WHERE t IS NOT NULL ORDER BY t DESC LIMIT :limit
"""
# A position is an id (acks and cursors hold ids) with its message's seq: the seq of
# the newest message of the stream at or below the id (0 if none), found through the
# (stream, id) index: an acknowledged message may have been deleted since (delete_user).
_INBOX_POSITION = (
    "SELECT u.inbox_cursor, COALESCE((SELECT m.seq FROM private_messages m"
    "  WHERE m.recipient_id = u.id AND m.id <= u.inbox_cursor ORDER BY m.id DESC LIMIT 1), 0)"
    " FROM users u WHERE u.id = ?"
)
# A member's read cursor (NULL: fresh) and its seq, and the channel's newest id and seq.
_CHANNEL_POSITION = (
    "SELECT m.read_cursor, COALESCE((SELECT c.seq FROM channel_messages c"
    "  WHERE c.channel_id = m.channel_id AND c.id <= m.read_cursor"
    "  ORDER BY c.id DESC LIMIT 1), 0),"
    " COALESCE(newest.id, 0), COALESCE(newest.seq, 0)"
    " FROM channel_members m LEFT JOIN (SELECT id, seq FROM channel_messages"
    "  WHERE channel_id = ? ORDER BY id DESC LIMIT 1) AS newest ON true"
    " WHERE m.channel_id = ? AND m.user_id = ?"
)
# Per kind of message: its table, its stream column, and the row keeping the stream's head.
_TABLES = {
    PRIVATE: ("private_messages", "recipient_id", "users", "inbox_seq"),
    CHANNEL: ("channel_messages", "channel_id", "channels", "last_seq"),
}
# Each stream's head as this store last left it, by kind (Store._heads).
Heads = dict[str, dict[int, int]]
_HEADS_KEPT = 100_000  # streams whose head is kept, per kind (a few MiB at most)
_INSERT_CHUNK = 512  # rows per INSERT: 6 variables each, far below SQLite's 32766
_ONE_AT_A_TIME = 8  # a batch this small, without client_ids, inserts message by message
_ROW = "(?, ?, ?, ?, ?, ?)"

SYNCHRONOUS_MODES = ("NORMAL", "FULL")

# The page size of a new database, 1 KiB rather than SQLite's 4 KiB. A commit writes
# every page it touched to the WAL whole, and one send touches five or six (the table's
# last leaf, a leaf of each index, the stream's head row, sqlite_sequence): with 1 KiB
# pages a one-message commit writes ~6 KiB instead of ~22 KiB, so the WAL grows a
# quarter as fast, checkpoints copy and sync a quarter as much, and the writes they hold
# back or slow down get rarer (the latency tail, docs/benchmarks.md). A row longer than
# about 1 KiB spills onto overflow pages, which costs reads of long messages a little.
# Measured against 2 and 4 KiB (docs/benchmarks.md, branch page-size): reading back
# (catch-up, /receive, /history, /channel/history) executes the same instructions per
# message with any of the three (within 2%); what 1 KiB adds is system calls: a read
# beyond SQLite's 2 MiB page cache takes 0.11 pread64 per message instead of 0.05 (2 KiB)
# or 0.03 (4 KiB), some 0.03-0.05 us of kernel time per message read. A paced send
# executes as many instructions as with 2 KiB, writes half its WAL (6.4 KiB against
# 12.3; 24.3 with 4 KiB) and, with the kernel's part, its commit takes 4-7 us less CPU;
# a pipelined one executes about 1% more instructions than with 2 KiB.
PAGE_SIZE = 1024

DEFAULT_WAL_LIMIT = 16 * 1024 * 1024  # config.db_wal_limit
WAL_LOOK_INTERVAL = 0.1  # seconds between looks at the WAL file's size
RESTART_WAIT = 0.5  # seconds a RESTART checkpoint waits for another process (writes wait too)
RESCUED_INFIX = ".rescued-"  # <db>.rescued-<UTC time>: the copy saved of a lost database


class Store:
    def __init__(
        self, db: aiosqlite.Connection, path: str, identity: tuple[int, int] | None
    ) -> None:
        self._db = db
        self._path = path
        self._identity = identity  # the file opened; None when it has none (":memory:")
        self._lost: str | None = None  # how the file was lost, once it was
        self._watch: tuple[int, str] | None = None  # _watch_file's descriptor and its link
        self._rescue: asyncio.Task[None] | None = None
        self._rescued = False
        self._companions: dict[str, tuple[int, int]] = {}  # "-wal", "-shm" -> identity
        self._loop = asyncio.get_running_loop()
        self._lock = _WriteLock()
        self._commit = GroupCommit(self._write_batch, sqlite3.IntegrityError)
        self._handoff = _Handoff(db, self._loop)  # the group commit's hop to the db thread
        # The group commit's write under way (one at a time): its future, the connection's
        # total_changes before it, and when it started (trace).
        self._written: asyncio.Future[list[Stored]] | None = None
        # Each stream's head as the last commit left it, by kind: a guess the next
        # one-message commit checks in its UPDATE (_insert_one). The database thread's only.
        self._heads: Heads = {PRIVATE: {}, CHANNEL: {}}
        self._cursor: sqlite3.Cursor | None = None  # _write_batch_now's
        self._changes_before = 0
        self._write_started = 0
        self._wal_fd: int | None = None  # the WAL, for _wal_end
        self._profiles: dict[str, tuple[float, User]] = {}  # name key -> (when read, user)
        self._channels: dict[str, Channel] = {}  # name key -> channel (never deleted)
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self._wal_limit = DEFAULT_WAL_LIMIT
        # Set by a write that failed for want of disk space, cleared by one that succeeds.
        self.disk_full = False
        # Set by any write or checkpoint that failed for want of space, cleared by the
        # next checkpoint that succeeds: meanwhile checkpoints wait for room (_checkpoint).
        self._short_of_space = False

    @classmethod
    async def open(
        cls, path: str, synchronous: str = "NORMAL", busy_timeout: float = 5.0
    ) -> Store:
        if synchronous not in SYNCHRONOUS_MODES:
            raise StoreError(f"synchronous must be one of {SYNCHRONOUS_MODES}")
        try:
            # Prepared with plain sqlite3 first: a failed aiosqlite.connect leaves its worker
            # thread posting to the event loop, which may be closed by then (aiosqlite 0.22).
            await asyncio.to_thread(_prepare, path, busy_timeout)
            db = await aiosqlite.connect(path, isolation_level=None)
            identity = await asyncio.to_thread(_identity, path)
        except Exception as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        store = cls(db, await asyncio.to_thread(os.path.abspath, path), identity)
        try:
            await store._configure(synchronous, busy_timeout)
            await store._migrate()
            store._companions = await asyncio.to_thread(_companions, store._path)
            if identity is not None:
                store._watch = await asyncio.to_thread(_watch_file, store._path, identity)
        except Exception as exc:
            await db.close()
            store._handoff.close()
            raise StoreError(f"cannot use database {path}: {exc}") from exc
        return store

    @classmethod
    async def open_configured(cls, path: str, config: Config) -> Store:
        """The store a server uses: opened with the config's db_* settings, refused if
        the file cannot be written, and checkpointed in the background as asked."""
        store = await cls.open(path, config.db_synchronous, config.db_busy_timeout)
        try:
            await store.require_writable()
            if config.db_checkpoint_interval:
                await store.checkpoint_in_background(
                    path, config.db_checkpoint_interval, config.db_wal_limit
                )
        except BaseException as exc:
            await store.close()
            if isinstance(exc, StoreError) or not isinstance(exc, Exception):
                raise
            raise StoreError(f"cannot use database {path}: {exc}") from exc
        return store

    async def require_writable(self) -> None:
        """Refuse a database chatd can read but not write (a read-only file or mount).

        SQLite opens such a file read-only without complaint, and every write would
        then fail with code 9 while the server reports that it is serving. A write
        is tried and rolled back: BEGIN IMMEDIATE alone succeeds even on a
        read-only file in WAL mode.
        """
        try:
            async with self._lock:
                version = int(await self._scalar("PRAGMA user_version"))
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    await self._db.execute(f"PRAGMA user_version={version}")
                finally:
                    await self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise StoreError(
                f"database {self._path} is read-only ({exc}): chatd must be able to write"
                " it and its directory; fix the file's permissions or the mount"
            ) from exc

    async def close(self) -> None:
        if self._rescue is not None:
            await asyncio.gather(self._rescue, return_exceptions=True)
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            await asyncio.gather(self._checkpoints, return_exceptions=True)
        if self._checkpointer is not None:
            await self._checkpointer.close()
        async with self._turn():
            await self._db.close()
        self._handoff.close()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
        if self._watch is not None:
            os.close(self._watch[0])
        if self._lost is not None:
            await asyncio.to_thread(self._drop_stale_companions)

    async def checkpoint_in_background(
        self, path: str, interval: float, wal_limit: int = DEFAULT_WAL_LIMIT
    ) -> None:
        """Move the WAL into the database every ``interval`` seconds, off the write path.

        SQLite's automatic checkpoint runs inside the commit that crosses 1000 pages, so
        that commit (and every send waiting on it) pays for copying pages and an fsync:
        the p99 of send latency was 5 ms with it, under 1 ms without (docs/benchmarks.md).
        A PASSIVE checkpoint from a second connection runs beside the writer instead.

        A PASSIVE checkpoint never catches a writer that keeps appending, and the WAL
        is only rewound once a checkpoint has reached its end: under a steady load it
        grew without bound (936 MiB in 30 s of /channel/join). So the WAL file's size is
        looked at every 0.1 s, and once past ``wal_limit`` it is rewound (_rewind): a
        PASSIVE checkpoint copies the bulk beside the writes, then writes wait while a
        RESTART checkpoint copies what they added meanwhile and syncs (1-2 ms), and the
        next commit starts the WAL over and truncates the file back to ``wal_limit``
        (journal_size_limit). Should the WAL pass 1.25 times the limit while a checkpoint
        runs (a busy disk or CPU), writes wait until a RESTART one is done; should this task
        be held up altogether, the commit that takes the WAL past 1.5 times the limit
        checkpoints it itself (wal_autocheckpoint). The WAL stays under twice the limit.
        """
        self._wal_limit = wal_limit
        self._checkpointer = await aiosqlite.connect(path, isolation_level=None)
        # Only the RESTART checkpoint waits (PASSIVE never does): for another process's
        # reader or writer, while this one's writes are held back.
        await self._checkpointer.execute(f"PRAGMA busy_timeout={int(RESTART_WAIT * 1000)}")
        page_size = await self._scalar("PRAGMA page_size")
        # The backstop, should this task fall behind (a loaded machine): SQLite's own
        # checkpoint, in the commit that takes the WAL past 1.5 times the limit.
        await self._db.execute(f"PRAGMA wal_autocheckpoint={wal_limit * 3 // 2 // page_size}")
        await self._db.execute(f"PRAGMA journal_size_limit={wal_limit}")
        self._checkpoints = asyncio.create_task(self._checkpoint_every(interval))

    async def _checkpoint_every(self, interval: float) -> None:
        # The WAL's size is looked at more often than the checkpoint runs, and also while
        # one runs: a checkpoint ends with an fsync that a busy disk may stretch to
        # seconds, and writes went on meanwhile (the WAL reached 87 MiB once).
        look = min(interval, WAL_LOOK_INTERVAL)
        due = self._loop.time() + interval
        running: asyncio.Task[None] | None = None  # the checkpoint under way, if any
        try:
            while True:
                await asyncio.sleep(look)
                # Also notices a deletion while no one writes; and by the path's own stat,
                # what the per-commit readlink cannot see: a file system mounted over the
                # database's directory (the file opened is intact beneath it).
                if self._file_lost(by_path=True):
                    continue
                size = self._wal_end()  # an lseek: no thread hop needed
                idle = running is None or running.done()
                if idle and (size > self._wal_limit or self._loop.time() >= due):
                    work = self._rewind() if size > self._wal_limit else self._checkpoint()
                    running = asyncio.create_task(work)
                    due = self._loop.time() + interval
                elif running is not None and size > self._wal_limit * 5 // 4:
                    # The checkpoint under way falls behind the writes: hold them back.
                    running.cancel()
                    await asyncio.gather(running, return_exceptions=True)
                    async with self._lock:
                        await self._checkpoint("RESTART")
        finally:
            if running is not None:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)

    async def _rewind(self) -> None:
        """Checkpoint the whole WAL, so that the next commit starts it over.

        The bulk is copied beside the writes; then writes wait while a RESTART
        checkpoint copies what they added meanwhile and syncs (a few milliseconds).
        """
        await self._checkpoint()
        async with self._lock:  # no writer: the checkpoint reaches the WAL's end
            held = trace.now() if trace.ON else 0
            await self._checkpoint("RESTART")
            if trace.ON:
                trace.span("writes_held", held, trace.now())

    async def _rewind_if_far_over(self) -> None:
        """The bound's backstop, on the write path itself (under the write lock): the
        checkpoint loop looks at the WAL every 0.1 s, but on a loaded machine it may run
        late while writes go on, so a write that finds the WAL past 1.5 times the limit
        first rewinds it (one lseek per transaction, _wal_end)."""
        if self._wal_far_over():
            await self._checkpoint("RESTART")

    def _wal_far_over(self) -> bool:
        return self._checkpointer is not None and self._wal_end() > self._wal_limit * 3 // 2

    def _wal_end(self) -> int:
        """The WAL's size, per commit: an lseek on a descriptor of it kept open, not a stat
        of its path (no path walk, no stat_result: 8k instructions a commit less). SQLite
        keeps that very file while any connection is open, truncating it in place. (Closing
        a descriptor drops the process's POSIX locks on that file: SQLite takes none on the
        WAL, only on the database and the -shm.)"""
        if self._wal_fd is None:
            try:
                self._wal_fd = os.open(self._path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return 0  # none yet (journal_size_limit truncates, never removes it)
        return os.lseek(self._wal_fd, 0, os.SEEK_END)

    async def _checkpoint(self, mode: str = "PASSIVE") -> None:
        """One checkpoint; failures are logged, and the next one is tried all the same.

        Each try on a full disk would grow the database file into whatever space was
        freed (the WAL's pages go there) and fail again, leaving none for the writes:
        once short of space, a checkpoint waits until the whole WAL would fit.
        """
        if self._short_of_space and not await asyncio.to_thread(self._room_to_checkpoint):
            return
        assert self._checkpointer is not None
        started = trace.now() if trace.ON else 0
        try:
            rows = list(await self._checkpointer.execute_fetchall(f"PRAGMA wal_checkpoint({mode})"))
            if trace.ON:
                trace.span(f"checkpoint_{mode}", started, trace.now(), rows[0][2])
        except sqlite3.Error as exc:
            self._checkpoint_failed(exc)
            return
        if rows[0][0]:  # busy
            log.debug("%s checkpoint gave way to another process's lock", mode)
        if self._short_of_space:
            self._short_of_space = False
            log.warning("background checkpoints resumed: there is room on disk again")

    def _checkpoint_failed(self, exc: sqlite3.Error) -> None:
        if not _is_disk_full(exc):
            log.warning("background checkpoint failed (will retry): %s", exc)
        elif not self._short_of_space:
            self._short_of_space = True
            log.warning("background checkpoint failed: disk full (retried once the WAL fits)")

    def _room_to_checkpoint(self) -> bool:
        """Whether the free space could take the whole WAL (the most a checkpoint adds)."""
        try:
            wal = os.path.getsize(self._path + "-wal")
            disk = os.statvfs(os.path.dirname(os.path.abspath(self._path)))
        except OSError:
            return True  # let the checkpoint itself report what is wrong
        return disk.f_bavail * disk.f_frsize > wal

    async def _configure(self, synchronous: str, busy_timeout: float) -> None:
        # WAL: readers never block the writer; with synchronous=NORMAL a commit
        # survives a crash of the process (FULL also survives power loss).
        # Another process holding the write lock (a backup, the admin command) is waited
        # for this long; then the request fails with code 9 and the server goes on. Set
        # first: migrating waits for a store opened at the same time. (_prepare has
        # switched the file to WAL, which is kept in the file.)
        await self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        await self._db.execute(f"PRAGMA synchronous={synchronous}")
        await self._db.execute("PRAGMA foreign_keys=ON")

    async def _migrate(self) -> None:
        """Run the migrations this file lacks, one transaction each.

        The version is read inside the write transaction (BEGIN IMMEDIATE), so that of
        two stores opened at once on a new file only one creates the tables.
        """
        created = False  # this start made the schema: its later steps are no upgrade to log
        while True:
            async with self._transaction():
                version = await self._scalar("PRAGMA user_version")
                if version > len(MIGRATIONS):
                    raise StoreError(
                        f"the schema is at version {version}, newer than this chatd knows"
                        f" ({len(MIGRATIONS)}): upgrade chatd"
                    )
                if version == len(MIGRATIONS):
                    return
                if version == 0:
                    created = True
                    log.info("creating the database schema (version %d)", len(MIGRATIONS))
                elif not created:
                    log.info("migrating database schema to version %d", version + 1)
                step = MIGRATIONS[version]
                if isinstance(step, str):
                    for statement in _statements(step):
                        await self._db.execute(statement)
                else:
                    await step(self._db)
                await self._db.execute(f"PRAGMA user_version={version + 1}")

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """Exclusive use of the connection, once every message enqueued before has committed.

        So a request sees the effects of the sends before it (read your writes), even
        though sends are answered by the group commit rather than in line.
        """
        last = self._commit.last
        if last is not None and not last.done():
            await asyncio.wait([last])
        async with self._lock:
            yield

    @asynccontextmanager
    async def _transaction(self, after_sends: bool = True) -> AsyncIterator[aiosqlite.Connection]:
        async with self._turn() if after_sends else self._lock:
            self._refuse_writes_if_lost()
            await self._rewind_if_far_over()
            with self._watching_disk_space():
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    await self._db.execute("COMMIT")
                except BaseException:
                    await self._roll_back()
                    raise
            # Before anyone is told "done": a commit into a deleted file is not done.
            self._check_file()

    async def _roll_back(self) -> None:
        # SQLite has already rolled back after some errors (a full disk, for one): a
        # ROLLBACK then fails, and its error would hide the real one.
        if self._db.in_transaction:
            try:
                await self._db.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback failed")

    @asynccontextmanager
    async def _write_turn(self) -> AsyncIterator[None]:
        """The turn for a write that is one statement (its own transaction)."""
        async with self._turn():
            await self._rewind_if_far_over()
            with self._watching_disk_space():
                yield

    @contextmanager
    def _watching_disk_space(self) -> Iterator[None]:
        """Turn a write failed for want of disk space into OutOfDisk, and track the episode.

        Logged once when writes start failing and once when one succeeds again.
        """
        changes = self._db.total_changes
        try:
            yield
        except sqlite3.Error as exc:
            self._write_failed(exc)
            raise
        self._wrote(changes)

    def _write_failed(self, exc: sqlite3.Error) -> None:
        """Raise OutOfDisk for a write failed for want of disk space (noting the episode)."""
        if not _is_disk_full(exc):
            return
        self._short_of_space = True
        if not self.disk_full:
            self.disk_full = True
            log.error("disk full: writes fail until space is freed (%s)", exc)
        raise OutOfDisk() from exc

    def _wrote(self, changes: int) -> None:
        """After a write that succeeded: the end of a disk-full episode, if one was on."""
        if self.disk_full and self._db.total_changes != changes:  # something was written
            self.disk_full = False
            log.warning("disk space available again: writes succeed")

    # The database file itself: deleted or replaced under a running server (by an
    # operator, a clean-up script, a restore done in the wrong order), SQLite goes on
    # writing into the unlinked inode, which vanishes when chatd exits.

    def _refuse_writes_if_lost(self) -> None:
        if self._lost is not None:
            raise DatabaseFileLost()

    def _check_file(self) -> None:
        """Raise DatabaseFileLost if the file is not (or no longer) the one opened."""
        if self._file_lost():
            raise DatabaseFileLost()

    def _file_lost(self, by_path: bool = False) -> bool:
        """Whether the path no longer names the file opened: first the name of the file
        opened as the kernel now gives it (_watch_file), and when that has changed (or
        cannot be read), or ``by_path``, one stat of the path compared with the file
        opened (about a microsecond: the entry of a file just written is cached, so
        neither waits on the disk)."""
        if self._lost is not None:
            return True
        if self._identity is None:
            return False
        watch = self._watch
        if watch is not None and not by_path:
            try:
                if os.readlink(watch[1]) == self._path:
                    return False
            except OSError:
                pass  # the stat below tells
        try:
            now = _identity(self._path)
        except OSError:  # cannot tell (a permission changed?): SQLite reports real faults
            return False
        if now == self._identity:
            return False
        self._lose("deleted" if now is None else "replaced by another file")
        return True

    def _lose(self, how: str) -> None:
        self._lost = how
        log.error(
            "DATABASE FILE LOST: %s was %s while chatd was using it. Every write is refused"
            " (code 9) from now on, until an operator restarts chatd. Copying what it held"
            " to a new file next to it...",
            self._path,
            how,
        )
        self._rescue = asyncio.create_task(self._save_lost_file())

    def _drop_stale_companions(self) -> None:
        """Remove the lost file's -wal and -shm, which SQLite leaves at the path.

        SQLite does not check that a WAL belongs to the database beside it: left
        there, the old pages would be mixed into whatever file is put at the path
        next (a restored backup). Their content is in the rescued copy; without one
        they are kept.
        """
        if not self._rescued:
            log.error("kept %s-wal and -shm: they hold what could not be copied", self._path)
            return
        for suffix, identity in self._companions.items():
            name = self._path + suffix
            try:
                if _identity(name) == identity:
                    os.unlink(name)
                    log.warning("removed %s: it belonged to the lost database file", name)
            except OSError as exc:
                log.error("could not remove %s, left by the lost database: %s", name, exc)

    async def _save_lost_file(self) -> None:
        """Copy the lost database (still readable through the open connection) beside
        its old path, so that what was acknowledged before the loss can be restored."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = f"{self._path}{RESCUED_INFIX}{stamp}"
        try:
            copy = await asyncio.to_thread(sqlite3.connect, target, check_same_thread=False)
            try:
                async with self._lock:
                    await self._db.backup(copy)
            finally:
                await asyncio.to_thread(copy.close)
        except Exception as exc:
            log.error(
                "could not copy the lost database to %s: %s. While chatd runs, the deleted"
                " file stays readable under /proc/%d/fd (copy it from there); stopping chatd"
                " frees it for good",
                target,
                exc,
                os.getpid(),
            )
            return
        self._rescued = True
        log.error(
            "saved everything chatd had committed to %s. To go on: stop chatd, check that"
            " file (or a newer backup), move it to %s, and start chatd again",
            target,
            self._path,
        )

    async def _rows(self, sql: str, args: Sequence[Any] | Mapping[str, Any] = ()) -> list[Any]:
        """Every row of one statement, in one hop to the database thread (through a
        cursor it takes three: execute, fetch, close)."""
        return list(await self._db.execute_fetchall(sql, args))

    async def _scalar(self, sql: str, args: Sequence[Any] = ()) -> Any:
        rows = await self._rows(sql, args)
        return rows[0][0] if rows else None

    # Group commit (chatd.store.commit): messages sent at about the same time share one
    # transaction, and each sender is answered once that transaction has committed.

    def enqueue(
        self, message: NewMessage, committed: Callable[[Stored], None] | None = None
    ) -> asyncio.Future[Stored]:
        """Queue a message for the next group commit (GroupCommit.enqueue)."""
        return self._commit.enqueue(message, committed)

    def enqueue_many(
        self, messages: list[NewMessage], settle: Callable[[list[Stored | Exception]], None]
    ) -> asyncio.Future[None]:
        """Queue messages as one entry of the next group commit (GroupCommit.enqueue_many)."""
        return self._commit.enqueue_many(messages, settle)

    def _write_batch(
        self, batch: list[NewMessage]
    ) -> asyncio.Future[list[Stored]] | Coroutine[Any, Any, list[Stored]]:
        """Insert a batch in one transaction; repeats of a client_id get the first result.

        The transaction runs as one call on the database thread (_write_batch_now), not
        a statement at a time: each hand-over to that thread and back is a wake-up of
        each side, and on a busy core every wake-up may wait for a time slice. Four of
        them per batch (BEGIN, UPDATE, INSERT, COMMIT) made the commits of the latency
        tail (docs/benchmarks.md, "Where the latency tail comes from").

        In the common case (the write lock free, the file kept, the WAL within bounds)
        without a coroutine: the lock is taken here, the call handed to the database
        thread, and _batch_written finishes when it returns; the group commit needs no
        task either (docs/benchmarks.md, "commit-lean"). Otherwise a coroutine that
        waits for the lock or a checkpoint does the same.
        """
        if self._lost is not None or self._wal_far_over() or not self._lock.take_if_free():
            return self._write_batch_in_turn(batch)
        try:
            self._written = self._loop.create_future()
            self._write_started = trace.now() if trace.ON else 0
            self._changes_before = self._db.total_changes
            self._handoff.call_then(self._batch_written, self._write_batch_now, batch)
        except BaseException:
            self._lock.release()
            raise
        return self._written

    def _batch_written(self, results: list[Stored] | None, exc: BaseException | None) -> None:
        """On the event loop, the batch's transaction done: its outcome to the group commit,
        then the write lock released (_write_batch's checks after the call, written out)."""
        written = self._written
        assert written is not None
        self._written = None
        try:
            if exc is not None:
                if isinstance(exc, sqlite3.Error):
                    self._write_failed(exc)  # raises OutOfDisk for a full disk
                raise exc
            self._committed(self._changes_before)
        except BaseException as failure:
            written.set_exception(failure)
        else:
            written.set_result(results)  # type: ignore[arg-type]
        finally:
            self._lock.release()
        if trace.ON:
            trace.span("commit", self._write_started, trace.now(), len(results or ()))

    async def _write_batch_in_turn(self, batch: list[NewMessage]) -> list[Stored]:
        """_write_batch when the lock is taken, the file lost, or the WAL far too long."""
        started = trace.now() if trace.ON else 0
        async with self._lock:
            self._refuse_writes_if_lost()
            if self._wal_far_over():
                await self._checkpoint("RESTART")
            # _watching_disk_space and _rewind_if_far_over written out: their generator and
            # coroutine cost 8k instructions a commit (docs/benchmarks.md).
            changes = self._db.total_changes
            try:
                results: list[Stored] = await self._handoff.call(self._write_batch_now, batch)
            except sqlite3.Error as exc:
                self._write_failed(exc)
                raise
            self._committed(changes)
        if trace.ON:
            trace.span("commit", started, trace.now(), len(batch))
        return results

    def _committed(self, changes_before: int) -> None:
        """After a batch's COMMIT, on the event loop: the write noted, then the file checked,
        before anyone is told "done" (a commit into a deleted file is not done)."""
        self._wrote(changes_before)
        self._check_file()

    def _write_batch_now(self, batch: list[NewMessage]) -> list[Stored]:
        """The batch's transaction, on the database thread (it blocks)."""
        conn = self._db._conn  # only ever used on its own thread, as here
        # One cursor for every commit: conn.execute makes one a statement (5k instructions
        # a one-message commit). Each statement's rows are read before the next.
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = conn.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            if len(batch) <= _ONE_AT_A_TIME and all(m.client_id is None for m in batch):
                # At low load a commit holds one message, or the few of one burst: no plan
                # to make (189k -> 141k instructions a lone message), and two statements
                # a message cost less than one multi-row INSERT up to about 8 messages
                # (CPU a commit of 2: 38-41 against 52 us; of 3: 51-54 against 65-67;
                # scripts/insert_cost.py).
                kept = self._heads
                results = [_insert_one(cursor, m, kept[m.kind]) for m in batch]
            else:
                results = _insert_planned(conn, batch, self._heads)
            cursor.execute("COMMIT")
        except BaseException:
            for heads in self._heads.values():  # they may hold what was rolled back
                heads.clear()
            # SQLite has already rolled back after some errors (a full disk, for one).
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("rollback failed")
            raise
        return results

    # Users and tokens.

    async def create_user(
        self, name: str, key: str, skeletons: Skeletons, password_hash: str, now: float
    ) -> bool:
        """Add a user; False if a user has this name key or looks alike (skeletons)."""
        return await self._add_user(name, key, skeletons, password_hash, now) is not None

    async def _add_user(
        self, name: str, key: str, skeletons: Skeletons, password_hash: str, now: float
    ) -> int | None:
        """A new user row's id; None if a user has this name key or looks alike.

        Checked and inserted in one write transaction, so of two registrations of
        look-alike names at the same moment only one succeeds.
        """
        async with self._transaction() as db:
            if await self._user_name_taken(key, skeletons):
                return None
            cursor = await db.execute(
                "INSERT INTO users"
                " (name, name_key, skeleton, upper_skeleton, password_hash, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name_key) DO NOTHING",
                (name, key, *skeletons, password_hash, now),
            )
            return cursor.lastrowid if cursor.rowcount == 1 else None

    async def user_name_taken(self, key: str, skeletons: Skeletons) -> bool:
        """Whether create_user would refuse this name now."""
        async with self._turn():
            return await self._user_name_taken(key, skeletons)

    async def _user_name_taken(self, key: str, skeletons: Skeletons) -> bool:
        found = await self._scalar(
            "SELECT 1 FROM users WHERE name_key = ? OR skeleton = ? OR upper_skeleton = ?"
            " LIMIT 1",
            (key, *skeletons),
        )
        return found is not None

    async def find_user(self, key: str) -> User | None:
        """The user with this name key, read fresh (logins need the current hash)."""
        async with self._turn():
            user = await self._user_where("name_key = ?", (key,))
        if user is not None:
            self._profiles[key] = (time.monotonic(), user)
        return user

    async def find_profile(self, key: str) -> User | None:
        """As find_user, but may answer from a cache at most PROFILE_TTL old.

        For the hot paths (/send, /user/info) that need a user's id and name, not a
        password hash that may have been reset since.
        """
        return self.cached_profile(key) or await self.find_user(key)

    def cached_profile(self, key: str) -> User | None:
        """What find_profile answers without waiting: the cached user, if fresh enough."""
        cached = self._profiles.get(key)
        if cached is not None and time.monotonic() - cached[0] < PROFILE_TTL:
            return cached[1]
        return None

    async def _user_where(self, condition: str, args: Sequence[Any]) -> User | None:
        sql = f"SELECT id, name, password_hash, created_at FROM users WHERE {condition}"
        rows = await self._rows(sql, args)
        return User(*rows[0]) if rows else None

    async def set_password_hash(self, user_id: int, password_hash: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user_id)
            )

    async def add_token(self, user_id: int, digest: bytes, now: float, expires_at: float) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO tokens (digest, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (digest, user_id, now, expires_at),
            )

    async def token_owner(self, digest: bytes, now: float) -> tuple[User, float] | None:
        """The user a live token belongs to, and when the token expires."""
        async with self._turn():
            rows = await self._rows(
                "SELECT user_id, expires_at FROM tokens WHERE digest = ? AND expires_at > ?",
                (digest, now),
            )
            if not rows:
                return None
            user = await self._user_where("id = ?", (rows[0][0],))
        return None if user is None else (user, rows[0][1])

    async def live_tokens(self, digests: Sequence[bytes], now: float) -> set[bytes]:
        """Which of these tokens are still valid (not expired, revoked or deleted)."""
        live: set[bytes] = set()
        for start in range(0, len(digests), _INSERT_CHUNK):
            chunk = list(digests[start : start + _INSERT_CHUNK])
            chunk += [b""] * (_padded(len(chunk)) - len(chunk))  # b"": no token's digest
            marks = ", ".join("?" for _ in chunk)
            async with self._turn():
                rows = await self._rows(
                    f"SELECT digest FROM tokens WHERE expires_at > ? AND digest IN ({marks})",
                    (now, *chunk),
                )
                live.update(row[0] for row in rows)
        return live

    async def revoke_token(self, digest: bytes) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM tokens WHERE digest = ?", (digest,))

    # Private messages.

    async def take_inbox(self, user_id: int, limit: int) -> Batch[PrivateMessage]:
        """Private messages not yet received, oldest first; they count as received after this."""
        async with self._transaction() as db:
            rows = await self._rows(
                f"{_PRIVATE_ROWS} WHERE m.recipient_id = ?"
                " AND m.id > (SELECT inbox_cursor FROM users WHERE id = ?)"
                " ORDER BY m.id LIMIT ?",
                (user_id, user_id, limit + 1),
            )
            messages = [PrivateMessage(*row) for row in rows[:limit]]
            if messages:
                await db.execute(
                    "UPDATE users SET inbox_cursor = ? WHERE id = ?", (messages[-1].id, user_id)
                )
        return Batch(messages, more=len(rows) > limit)

    # Channels.

    def cached_channel(self, key: str) -> Channel | None:
        """What find_channel answers without waiting: the channel, if cached."""
        return self._channels.get(key)

    async def find_channel(self, key: str) -> Channel | None:
        cached = self._channels.get(key)
        if cached is not None:
            return cached
        async with self._turn():
            rows = await self._rows(
                "SELECT id, name, created_at FROM channels WHERE name_key = ?", (key,)
            )
        if not rows:
            return None
        channel = self._channels[key] = Channel(*rows[0])
        return channel

    async def join_channel(
        self,
        name: str,
        key: str,
        skeletons: Skeletons,
        user_id: int,
        now: float,
        rejoin: bool = False,
        max_memberships: int | None = None,
    ) -> tuple[Channel, Joined]:
        """Create the channel if it is new, and make the user a member.

        A user who left is made a member again only with ``rejoin``.  A new name
        that looks like an existing channel's (skeletons) creates nothing: that one is
        returned with Joined.LOOKALIKE (checked and created in one transaction).  A user
        who is a member of ``max_memberships`` channels already gets TooManyChannels and
        nothing is created; counted in the write transaction, so the cap is exact.
        """
        async with self._transaction() as db:
            rows = await self._rows(
                "SELECT id, name, created_at FROM channels WHERE name_key = ?", (key,)
            )
            if rows:
                member = await self._rows(
                    "SELECT left_at IS NOT NULL FROM channel_members"
                    " WHERE channel_id = ? AND user_id = ?",
                    (rows[0][0], user_id),
                )
                if member and not member[0][0]:
                    return self._cache_channel(key, rows[0]), Joined.ALREADY
                if member and not rejoin:
                    return self._cache_channel(key, rows[0]), Joined.LEFT
            else:
                similar = await self._rows(
                    "SELECT id, name, created_at FROM channels"
                    " WHERE skeleton = ? OR upper_skeleton = ? LIMIT 1",
                    skeletons,
                )
                if similar:
                    return Channel(*similar[0]), Joined.LOOKALIKE
            # Checked before the channel is made, so a refused join creates nothing.
            if max_memberships is not None:
                count = await self._scalar(
                    "SELECT count(*) FROM channel_members WHERE user_id = ? AND left_at IS NULL",
                    (user_id,),
                )
                if count >= max_memberships:
                    raise TooManyChannels(max_memberships)
            if not rows:
                rows = await self._rows(
                    "INSERT INTO channels (name, name_key, skeleton, upper_skeleton, created_at)"
                    " VALUES (?, ?, ?, ?, ?) RETURNING id, name, created_at",
                    (name, key, *skeletons, now),
                )
            channel = self._cache_channel(key, rows[0])
            await db.execute(
                "INSERT INTO channel_members (channel_id, user_id, joined_at) VALUES (?, ?, ?)"
                " ON CONFLICT DO UPDATE SET joined_at = excluded.joined_at,"
                " read_cursor = NULL, left_at = NULL",
                (channel.id, user_id, now),
            )
        return channel, Joined.NOW

    def _cache_channel(self, key: str, row: Any) -> Channel:
        channel = self._channels[key] = Channel(*row)
        return channel

    async def leave_channel(self, channel_id: int, user_id: int, now: float) -> bool:
        """False if the user was not a member."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE channel_members SET left_at = ?"
                " WHERE channel_id = ? AND user_id = ? AND left_at IS NULL",
                (now, channel_id, user_id),
            )
            return cursor.rowcount == 1

    async def channel_ids(self, user_id: int) -> list[int]:
        async with self._turn():
            rows = await self._rows(
                "SELECT channel_id FROM channel_members WHERE user_id = ? AND left_at IS NULL",
                (user_id,),
            )
            return [row[0] for row in rows]

    async def channel_name(self, channel_id: int) -> str:
        async with self._turn():
            name: str = await self._scalar("SELECT name FROM channels WHERE id = ?", (channel_id,))
        return name

    async def is_member(self, channel_id: int, user_id: int) -> bool:
        async with self._turn():
            found = await self._scalar(
                "SELECT 1 FROM channel_members"
                " WHERE channel_id = ? AND user_id = ? AND left_at IS NULL",
                (channel_id, user_id),
            )
        return found is not None

    async def memberships(self, user_id: int, backlog: int) -> list[Membership]:
        """The user's channels by name, with what a /channel/receive would return now:
        other members' messages only (protocol.md, "Your own messages")."""
        async with self._turn():
            rows = await self._rows(
                "SELECT c.id, c.name, m.read_cursor,"
                " CASE WHEN m.read_cursor IS NULL"
                "  THEN MIN(?, (SELECT COUNT(*) FROM channel_messages"
                "               WHERE channel_id = c.id AND sender_id != m.user_id))"
                "  ELSE (SELECT COUNT(*) FROM channel_messages"
                "        WHERE channel_id = c.id AND id > m.read_cursor"
                "        AND sender_id != m.user_id) END"
                " FROM channel_members m JOIN channels c ON c.id = m.channel_id"
                " WHERE m.user_id = ? AND m.left_at IS NULL ORDER BY c.name_key",
                (backlog, user_id),
            )
            return [Membership(*row) for row in rows]

    async def take_channel(
        self, channel_id: int, user_id: int, backlog: int, limit: int
    ) -> Batch[ChannelMessage]:
        """What other members posted in a channel since the caller's previous call.

        A member's first call gets the newest ``backlog`` of them instead. The caller's
        own messages are never returned, but the position moves past them all the same.
        """
        select = f"{_CHANNEL_ROWS} WHERE m.channel_id = ? AND m.sender_id != ?"
        async with self._transaction() as db:
            cursor_value = await self._scalar(
                "SELECT read_cursor FROM channel_members WHERE channel_id = ? AND user_id = ?",
                (channel_id, user_id),
            )
            if cursor_value is None:
                rows = await self._rows(
                    f"{select} ORDER BY m.id DESC LIMIT ?",
                    (channel_id, user_id, min(backlog, limit)),
                )
                rows = rows[::-1]
                more = False
            else:
                rows = await self._rows(
                    f"{select} AND m.id > ? ORDER BY m.id LIMIT ?",
                    (channel_id, user_id, cursor_value, limit + 1),
                )
                more = len(rows) > limit
                rows = rows[:limit]
            if more:
                newest = rows[-1][0]
            else:
                # Everything up to the channel's newest message is taken now: older ones
                # than the backlog are history, not news, and the rest are the caller's
                # own. Read in this transaction, so no message below it is uncommitted.
                newest = await self._scalar(
                    "SELECT MAX(?, COALESCE(MAX(id), 0)) FROM channel_messages"
                    " WHERE channel_id = ?",
                    (cursor_value or 0, channel_id),
                )
            await db.execute(
                "UPDATE channel_members SET read_cursor = ? WHERE channel_id = ? AND user_id = ?",
                (newest, channel_id, user_id),
            )
        return Batch([ChannelMessage(*row) for row in rows], more)

    async def channel_members(self, channel_id: int) -> list[tuple[int, str]]:
        async with self._turn():
            rows = await self._rows(
                "SELECT u.id, u.name FROM channel_members c JOIN users u ON u.id = c.user_id"
                " WHERE c.channel_id = ? AND c.left_at IS NULL ORDER BY u.name_key",
                (channel_id,),
            )
            return [(row[0], row[1]) for row in rows]


    # Delivery positions and catch-up (live push, /ack).

    async def ack_private(self, user_id: int, message_id: int) -> int:
        """Mark the inbox received up to ``message_id``; returns the new position.

        Clamped to the newest message the user actually has, so acknowledging an id
        from the future cannot swallow messages not yet sent.
        """
        # One statement is its own transaction: no BEGIN and COMMIT round trips.
        async with self._write_turn():
            self._refuse_writes_if_lost()
            position: int = await self._scalar(
                "UPDATE users SET inbox_cursor = MAX(inbox_cursor, COALESCE("
                " (SELECT MAX(id) FROM private_messages WHERE recipient_id = ? AND id <= ?),"
                " 0)) WHERE id = ? RETURNING inbox_cursor",
                (user_id, message_id, user_id),
            )
            self._check_file()
        return position

    async def ack_channel(self, channel_id: int, user_id: int, message_id: int) -> int | None:
        """As ack_private for a channel; None if the user is not a member."""
        async with self._write_turn():
            self._refuse_writes_if_lost()
            position: int | None = await self._scalar(
                "UPDATE channel_members SET read_cursor = MAX(COALESCE(read_cursor, 0), COALESCE("
                " (SELECT MAX(id) FROM channel_messages WHERE channel_id = ? AND id <= ?), 0))"
                " WHERE channel_id = ? AND user_id = ? AND left_at IS NULL RETURNING read_cursor",
                (channel_id, message_id, channel_id, user_id),
            )
            self._check_file()
        return position

    async def inbox_position(self, user_id: int) -> StreamPosition:
        """Where a catch-up of the inbox starts: the acknowledged id and its seq (never
        fresh: every user has a position)."""
        async with self._turn():
            rows = await self._rows(_INBOX_POSITION, (user_id,))
        cursor, seq = rows[0] if rows else (0, 0)
        return StreamPosition(cursor, seq)

    async def channel_position(
        self, channel_id: int, user_id: int
    ) -> tuple[StreamPosition, int]:
        """Where a member's catch-up starts: their read position, or (fresh: before their
        first /channel/receive or /ack, which would show the backlog) the newest message;
        and the channel's newest message id now, read in the same statement."""
        async with self._turn():
            rows = await self._rows(_CHANNEL_POSITION, (channel_id, channel_id, user_id))
        return channel_start(rows[0] if rows else None)

    async def channel_newest(self, channel_ids: Sequence[int]) -> dict[int, StreamPosition]:
        """Each channel's newest message now, id and seq ((0, 0) before the first; a
        channel that does not exist is absent), in one statement however many."""
        async with self._turn():
            rows = await self._rows(
                "SELECT c.id, COALESCE(m.id, 0), COALESCE(m.seq, 0) FROM channels c"
                " LEFT JOIN channel_messages m ON m.id = (SELECT max(id)"
                "  FROM channel_messages WHERE channel_id = c.id)"
                " WHERE c.id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(channel_ids)),),
            )
        return {channel: StreamPosition(newest, seq) for channel, newest, seq in rows}

    async def stream_heads(
        self, user_ids: Sequence[int], channel_ids: Sequence[int]
    ) -> StreamHeads:
        """The newest seq of many streams in one statement (the heads are stored per
        stream, moved in the transaction that stores each message); the ids travel as
        JSON arrays, so any number of them is one statement."""
        async with self._turn():
            rows = await self._rows(
                "SELECT 0, id, inbox_seq FROM users"
                " WHERE id IN (SELECT value FROM json_each(?))"
                " UNION ALL"
                " SELECT 1, id, last_seq FROM channels"
                " WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(user_ids)), json.dumps(list(channel_ids))),
            )
        heads = StreamHeads({}, {})
        for is_channel, key, seq in rows:
            (heads.channels if is_channel else heads.inboxes)[key] = seq
        return heads

    async def inbox_after(self, user_id: int, after_id: int, limit: int) -> list[PrivateMessage]:
        """Private messages to the user newer than ``after_id``, oldest first (no side effect)."""
        async with self._turn():
            rows = await self._rows(
                f"{_PRIVATE_ROWS} WHERE m.recipient_id = ? AND m.id > ? ORDER BY m.id LIMIT ?",
                (user_id, after_id, limit),
            )
        return [PrivateMessage(*row) for row in rows]

    async def channel_after(
        self, channel_id: int, after_id: int, limit: int, reader_id: int, own_after: int
    ) -> list[ChannelMessage]:
        """What a catch-up pushes to ``reader_id``: channel messages newer than
        ``after_id``, oldest first, leaving out the reader's own unless newer than
        ``own_after`` (no side effect)."""
        async with self._turn():
            rows = await self._rows(
                f"{_CHANNEL_ROWS} WHERE m.channel_id = ? AND m.id > ?"
                " AND (m.sender_id != ? OR m.id > ?) ORDER BY m.id LIMIT ?",
                (channel_id, after_id, reader_id, own_after, limit),
            )
        return [ChannelMessage(*row) for row in rows]

    # History: reading back, with no effect on delivery positions.

    async def channel_history(
        self, channel_id: int, before: int | None, limit: int
    ) -> Batch[ChannelMessage]:
        """The ``limit`` newest messages older than ``before``, returned oldest first."""
        async with self._turn():
            rows = await self._rows(
                f"{_CHANNEL_ROWS} WHERE m.channel_id = ? AND m.id < ? ORDER BY m.id DESC LIMIT ?",
                (channel_id, _before(before), limit + 1),
            )
        page = [ChannelMessage(*row) for row in rows[:limit]]
        return Batch(page[::-1], more=len(rows) > limit)

    async def private_history(
        self, user_id: int, other_id: int, before: int | None, limit: int
    ) -> Batch[SentMessage]:
        """The conversation between two users, both directions, paged like channel_history."""
        async with self._turn():
            rows = await self._rows(
                f"{_PAIR_ROWS} WHERE m.id IN ("
                f"  SELECT id FROM ({_ONE_WAY.format(inside='id < ?', order='DESC')})"
                f"  UNION ALL SELECT id FROM ({_ONE_WAY.format(inside='id < ?', order='DESC')}))"
                " ORDER BY m.id DESC LIMIT ?",
                (user_id, other_id, _before(before), limit + 1,
                 other_id, user_id, _before(before), limit + 1, limit + 1),
            )
        page = [SentMessage(*row) for row in rows[:limit]]
        return Batch(page[::-1], more=len(rows) > limit)


    # Ranges for IRC CHATHISTORY: open intervals by id and time, newest or oldest first.

    async def channel_range(
        self, channel_id: int, bounds: Bounds, limit: int, newest: bool
    ) -> list[ChannelMessage]:
        """Up to ``limit`` messages inside ``bounds``, taken from the newest end or the
        oldest, returned oldest first."""
        order = "DESC" if newest else "ASC"
        async with self._turn():
            bounds = await self._by_id(bounds, "channel_messages")
            rows = await self._rows(
                f"{_CHANNEL_ROWS} WHERE m.channel_id = ? AND m.id > ? AND m.id < ?"
                f" AND m.created_at > ? AND m.created_at < ? ORDER BY m.id {order} LIMIT ?",
                (channel_id, *bounds.values(), limit),
            )
        page = [ChannelMessage(*row) for row in rows]
        return page[::-1] if newest else page

    async def private_range(
        self, user_id: int, other_id: int, bounds: Bounds, limit: int, newest: bool
    ) -> list[SentMessage]:
        """As channel_range for the conversation of two users, both directions."""
        order = "DESC" if newest else "ASC"
        inside = "id > ? AND id < ? AND created_at > ? AND created_at < ?"
        async with self._turn():
            bounds = await self._by_id(bounds, "private_messages")
            one_way = _ONE_WAY.format(inside=inside, order=order)
            rows = await self._rows(
                f"{_PAIR_ROWS} WHERE m.id IN (SELECT id FROM ({one_way})"
                f"  UNION ALL SELECT id FROM ({one_way}))"
                f" ORDER BY m.id {order} LIMIT ?",
                (user_id, other_id, *bounds.values(), limit,
                 other_id, user_id, *bounds.values(), limit, limit),
            )
        page = [SentMessage(*row) for row in rows]
        return page[::-1] if newest else page

    async def message_time(self, in_channel: bool, message_id: int) -> float | None:
        """When a channel or private message was stored (ids are per kind)."""
        table = "channel_messages" if in_channel else "private_messages"
        async with self._turn():
            sql = f"SELECT created_at FROM {table} WHERE id = ?"
            found = await self._scalar(sql, (message_id,))
        return None if found is None else float(found)

    async def recent_targets(
        self, user_id: int, after: float, before: float, limit: int
    ) -> list[tuple[str, bool, float]]:
        """The user's channels and conversations with a message in (after, before):
        (name, is_channel, newest time), newest first."""
        window = Bounds(after_time=after, before_time=before)
        async with self._turn():
            posts = (await self._by_id(window, "channel_messages")).values()
            sent = (await self._by_id(window, "private_messages")).values()
            rows = await self._rows(_RECENT_TARGETS, {
                "me": user_id, "limit": limit, "after": after, "before": before,
                "post_lo": posts[0], "post_hi": posts[1], "lo": sent[0], "hi": sent[1],
            })
        return [(row[0], bool(row[1]), float(row[2])) for row in rows]

    async def _by_id(self, bounds: Bounds, table: str) -> Bounds:
        """``bounds`` with its times also as ids, the narrower of each pair kept: there is
        no index by time, and the walks by id filter the time row by row (a bound few
        messages meet, such as BEFORE a time older than the channel, read the whole
        history). Ids follow commit order, and times follow it too but for clock steps,
        so the ids are looked up TIME_SLACK beyond each time: a message still counts by
        its own time, unless the clock stepped back by more than that."""
        after, before = bounds.after_time, bounds.before_time
        if after == float("-inf") and before == float("inf"):
            return bounds
        conn = self._db._conn  # used on its own thread only (_handoff)
        lowest, highest = await self._handoff.call(
            _ids_around, conn, table, after - TIME_SLACK, before + TIME_SLACK
        )
        return dataclasses.replace(
            bounds,
            after_id=max(bounds.after_id, lowest),
            before_id=min(bounds.before_id, highest),
        )

    # Operations (chatd admin).

    async def list_users(self, now: float) -> list[tuple[str, float, int]]:
        """Every user: name, registration time, live tokens."""
        async with self._turn():
            rows = await self._rows(
                "SELECT u.name, u.created_at,"
                " (SELECT COUNT(*) FROM tokens t WHERE t.user_id = u.id AND t.expires_at > ?)"
                " FROM users u ORDER BY u.name_key",
                (now,),
            )
            return [(row[0], row[1], row[2]) for row in rows]

    # IRC guests (protocol.md, "IRC", "Guests"): a user row that lives as long as the
    # connection holds its name, then keeps only what it sent, under its name.

    async def create_guest(
        self, name: str, key: str, skeletons: Skeletons, now: float
    ) -> int | None:
        """A guest user holding ``name`` while connected; None if the name is taken."""
        return await self._add_user(name, key, skeletons, GUEST_HASH, now)

    async def release_guests(self, user_id: int | None = None) -> None:
        """End a guest (every guest when None, as at start-up after a crash): its name is
        free again, what it received and joined is deleted; what it sent stays."""
        only = "" if user_id is None else " AND id = ?"
        args: tuple[Any, ...] = () if user_id is None else (user_id,)
        self._profiles = {}
        async with self._transaction() as db:
            guests = f"SELECT id FROM users WHERE password_hash = '{GUEST_HASH}'{only}"
            await db.execute(f"DELETE FROM tokens WHERE user_id IN ({guests})", args)
            await db.execute(f"DELETE FROM channel_members WHERE user_id IN ({guests})", args)
            await db.execute(
                f"DELETE FROM private_messages WHERE recipient_id IN ({guests})", args
            )
            # '#' is in no name, so the old guest matches no lookup and blocks no name.
            await db.execute(
                "UPDATE users SET name_key = '#guest' || id, skeleton = '',"
                f" upper_skeleton = '' WHERE password_hash = '{GUEST_HASH}'{only}"
                " AND name_key NOT LIKE '#guest%'",
                args,
            )

    async def revoke_tokens(self, user_id: int) -> int:
        """Revoke every token of a user; returns how many there were."""
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM tokens WHERE user_id = ?", (user_id,))
            return cursor.rowcount

    async def delete_user(self, user_id: int) -> None:
        """Delete a user with everything they sent, received, joined or held."""
        self._profiles = {k: v for k, v in self._profiles.items() if v[1].id != user_id}
        async with self._transaction() as db:
            # ON DELETE CASCADE removes tokens, messages and memberships with the row.
            await db.execute("DELETE FROM users WHERE id = ?", (user_id,))


def _insert_planned(
    conn: sqlite3.Connection, batch: list[NewMessage], heads: Heads
) -> list[Stored]:
    """Insert a batch, each kind in chunks; repeats of a client_id get the first result."""
    keyed = [m for m in batch if m.client_id is not None]
    plan = BatchPlan(batch, _earlier_sends(conn, keyed) if keyed else {})
    for kind, positions in plan.fresh.items():
        for start in range(0, len(positions), _INSERT_CHUNK):
            chunk = positions[start : start + _INSERT_CHUNK]
            stored = _insert(conn, kind, [batch[i] for i in chunk], heads[kind])
            for position, result in zip(chunk, stored, strict=True):
                plan.results[position] = result
    return plan.done()


# How far back a clock may step without hiding a message from a time-bounded read
# (Store._by_id): more than NTP's slewing and than nodes' skew, less than what bounds
# usually are apart (a client's last visit).
TIME_SLACK = 60.0


def _ids_around(conn: sqlite3.Connection, table: str, after: float, before: float
                ) -> tuple[int, int]:
    """(lowest, highest): the ids of ``table``'s messages stored after ``after`` and
    before ``before`` all lie strictly between them, if times rise with ids (0 and
    2^63 - 1 where a bound is infinite). Found by binary searches over the ids (seeks
    in the rowid B-tree: a few dozen)."""
    newest = conn.execute(f"SELECT MAX(id) FROM {table}").fetchone()[0]
    if newest is None:
        return 0, (1 << 63) - 1
    probe = f"SELECT id, created_at FROM {table} WHERE id >= ? ORDER BY id LIMIT 1"

    def first_at_or_after(moment: float) -> int | None:
        """The oldest id whose time is at or after ``moment`` (None: no such id)."""
        low, high, found = 1, newest, None
        while low <= high:
            row = conn.execute(probe, ((low + high) // 2,)).fetchone()
            if row is None:  # pragma: no cover - newest exists, so a row is found
                break
            if row[1] >= moment:
                found, high = row[0], (low + high) // 2 - 1
            else:
                low = row[0] + 1
        return found

    above_after = first_at_or_after(after) if after != float("-inf") else 1
    lowest = newest if above_after is None else above_after - 1
    at_before = first_at_or_after(before) if before != float("inf") else None
    return lowest, (1 << 63) - 1 if at_before is None else at_before


def _insert_one(conn: sqlite3.Cursor, message: NewMessage, heads: dict[int, int]) -> Stored:
    """_insert for a lone message without a client_id, in fewer steps.

    The head moves by a compare-and-set from the head this store last left (``heads``):
    "set it to n + 1 where it is n" changes the row only if it holds n, in this write
    transaction, so the number is the one "add 1, return it" would give, without
    RETURNING's temporary table and its read (28k instructions a commit, 110k -> 82k for
    the bare statements; docs/benchmarks.md, "commit-lean"). Where the guess is missing
    or wrong (a batch failed, another process moved it, the row is gone or its id was
    given to a new user), the plain UPDATE ... RETURNING numbers it.
    """
    target = message.target_id
    old = heads.get(target)
    if old is not None and conn.execute(_move_head_sql(message.kind), (target, old)).rowcount:
        seq = old + 1
    else:
        moved = conn.execute(_heads_sql(message.kind, 1), (target, 1)).fetchall()
        seq = moved[0][1] if moved else 1  # a stream whose row is gone: the insert fails
    message_id = _rowid(
        conn.execute(
            _insert_sql(message.kind, 1),
            (message.sender_id, target, seq, message.body, message.created_at, None),
        )
    )
    if len(heads) >= _HEADS_KEPT:
        heads.clear()  # a guess per stream written to: bounded, and refilled as it goes
    heads[target] = seq
    return Stored(message_id, message.created_at, False, seq)


def _insert(
    conn: sqlite3.Connection, kind: str, messages: list[NewMessage], heads: dict[int, int]
) -> list[Stored]:
    """One multi-row INSERT, each message numbered on from its stream's head.

    The heads move first, in this transaction (SQLite has one writer, so number
    order is commit order). Rowids are handed out in VALUES order, so sorted ids
    match. A stream whose row is gone numbers from 1: its insert then fails on the
    foreign key. On the database thread (Store._write_batch_now).
    """
    # Per message, this runs for every send: comprehensions and C-level iterators
    # rather than a Python loop over dict updates (docs/benchmarks.md, issue 13).
    targets = [m.target_id for m in messages]
    counts = Counter(targets) if len(targets) > 1 else {targets[0]: 1}
    streams = [item for pair in counts.items() for item in pair]
    if len(counts) > 1:  # (0, 0): no stream has id 0 (AUTOINCREMENT starts at 1)
        streams += [0, 0] * (_padded(len(counts)) - len(counts))
    moved = conn.execute(_heads_sql(kind, len(streams) // 2), streams).fetchall()
    before = {stream: newest - counts[stream] for stream, newest in moved}
    if len(heads) + len(moved) > _HEADS_KEPT:
        heads.clear()
    heads.update(moved)  # the guesses of the next one-message commits (_insert_one)
    counters = {stream: count(before.get(stream, 0) + 1) for stream in counts}
    seqs = [next(counters[target_id]) for target_id in targets]
    args: list[Any] = []
    for m, seq in zip(messages, seqs, strict=True):
        args += (m.sender_id, m.target_id, seq, m.body, m.created_at, m.client_id)
    ids: list[int] = []
    done = 0
    for rows in _pieces(len(messages)):  # in order: ids grow from one piece to the next
        cursor = conn.execute(_insert_sql(kind, rows), args[6 * done : 6 * (done + rows)])
        # One row: its rowid, without RETURNING's temporary table (27k instructions).
        ids += [_rowid(cursor)] if rows == 1 else sorted(row[0] for row in cursor)
        done += rows
    return [
        Stored(message_id, m.created_at, False, seq)
        for message_id, m, seq in zip(ids, messages, seqs, strict=True)
    ]


# Statements whose length follows a batch (VALUES lists, IN lists) come in few sizes: SQLite
# compiles, and the connection's statement cache keeps (128 of them), one program per
# distinct text, and a 500-row INSERT's is some hundreds of KiB. One text per batch size
# held tens of MiB once batches of every size had come by (a long run of
# tests/test_fuzz.py, docs/benchmarks.md); powers of two keep it to ten per statement.


def _rowid(cursor: sqlite3.Cursor) -> int:
    """The id of the row a one-row INSERT made."""
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _padded(count: int) -> int:
    """``count`` rounded up to a power of two: the length of a padded VALUES or IN list."""
    return 1 << (count - 1).bit_length()


def _pieces(rows: int) -> list[int]:
    """``rows`` as powers of two, the largest first (300: 256, 32, 8, 4): the sizes of
    the INSERTs that store them, rows being what cannot be padded."""
    return [1 << bit for bit in range(rows.bit_length() - 1, -1, -1) if rows >> bit & 1]


@lru_cache(maxsize=256)
def _heads_sql(kind: str, streams: int) -> str:
    """Move ``streams`` heads (arguments: stream id, count, ...), returning the new heads.

    One stream, the common case at low load, is a plain UPDATE: the join with a VALUES
    list cost 41k more instructions a commit than it (callgrind, docs/benchmarks.md).
    """
    _, _, head_table, head = _TABLES[kind]
    if streams == 1:
        return (
            f"UPDATE {head_table} SET {head} = {head} + ?2 WHERE id = ?1 RETURNING id, {head}"
        )
    return (
        f"UPDATE {head_table} SET {head} = {head} + n.column2"
        f" FROM (VALUES {', '.join(['(?, ?)'] * streams)}) AS n"
        f" WHERE {head_table}.id = n.column1 RETURNING id, {head}"
    )


@lru_cache(maxsize=2)
def _move_head_sql(kind: str) -> str:
    """Move one head from ?2 to ?2 + 1, if it is at ?2 (arguments: stream id, head)."""
    _, _, head_table, head = _TABLES[kind]
    return f"UPDATE {head_table} SET {head} = ?2 + 1 WHERE id = ?1 AND {head} = ?2"


@lru_cache(maxsize=256)
def _insert_sql(kind: str, rows: int) -> str:
    """Insert ``rows`` messages, returning their ids (one row: read as its lastrowid)."""
    table, target, _, _ = _TABLES[kind]
    returning = " RETURNING id" if rows > 1 else ""
    return (
        f"INSERT INTO {table} (sender_id, {target}, seq, body, created_at, client_id)"
        f" VALUES {', '.join([_ROW] * rows)}{returning}"
    )


def _earlier_sends(
    conn: sqlite3.Connection, keyed: list[NewMessage]
) -> dict[tuple[str, int, str], Stored]:
    """Messages already stored under the client_ids of ``keyed`` (on the database thread)."""
    found: dict[tuple[str, int, str], Stored] = {}
    for kind, (table, *_) in _TABLES.items():
        pairs = [(m.sender_id, m.client_id) for m in keyed if m.kind == kind]
        for start in range(0, len(pairs), _INSERT_CHUNK):
            chunk = pairs[start : start + _INSERT_CHUNK]
            chunk += [(0, "")] * (_padded(len(chunk)) - len(chunk))  # no sender has id 0
            values = ", ".join("(?, ?)" for _ in chunk)
            # One index look-up per pair: "(sender_id, client_id) IN (VALUES ...)" scanned
            # the whole table (the client_id index is partial, and the planner does not
            # use it for a row value), a full scan in every commit holding a client_id.
            # CROSS JOIN keeps the pairs as the outer loop.
            rows = conn.execute(
                f"SELECT m.sender_id, m.client_id, m.id, m.created_at, m.seq"
                f" FROM (VALUES {values}) AS pair CROSS JOIN {table} AS m"
                f" ON m.sender_id = pair.column1 AND m.client_id = pair.column2"
                f" AND m.client_id IS NOT NULL",
                [item for pair in chunk for item in pair],
            ).fetchall()
            for sender_id, client_id, message_id, created_at, seq in rows:
                found[(kind, sender_id, client_id)] = Stored(message_id, created_at, True, seq)
    return found


_WAKE = (1).to_bytes(8, sys.byteorder)  # what an eventfd takes (a pipe takes anything)


class _Handoff:
    """Runs a function on an aiosqlite connection's thread, in one hop, and hands its
    result back to the event loop with fewer wake-ups than aiosqlite's own way.

    aiosqlite answers through ``loop.call_soon_threadsafe``, which wakes the event loop
    while its thread still holds the GIL: on one core the loop runs, finds the GIL
    taken, sleeps again, and the database thread runs on to release it. Six context
    switches per commit, where two do (docs/benchmarks.md, "The commit path"). Here the
    database thread leaves the result in a deque and wakes the loop by writing an
    eventfd (a pipe where there is none) with ``os.write``, which releases the GIL first.
    The function still goes through aiosqlite's queue, so it runs in turn with the
    connection's other work, on its thread.
    """

    def __init__(self, connection: aiosqlite.Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._connection = connection
        self._loop = loop
        self._done: deque[tuple[Then, Any, BaseException | None]] = deque()
        if hasattr(os, "eventfd"):
            self._read_fd = self._write_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            self._read_fd, self._write_fd = os.pipe()
            for fd in (self._read_fd, self._write_fd):
                os.set_blocking(fd, False)
        loop.add_reader(self._read_fd, self._deliver)

    def call(self, function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Queue ``function(*args)`` for the connection's thread; the future has its result."""
        future = self._loop.create_future()
        self.call_then(partial(_resolve, future), function, *args)
        return future

    def call_then(self, then: Then, function: Callable[..., Any], *args: Any) -> None:
        """Queue ``function(*args)`` for the connection's thread; once it has returned,
        ``then(result, None)`` or ``then(None, exception)`` runs on the event loop (no
        future: the group commit's own, which it settles after its checks)."""
        if not self._connection._running or self._connection._connection is None:
            raise ValueError("Connection closed")  # as aiosqlite's own methods say it
        # aiosqlite's queue takes (future, function) in every version setup.cfg allows
        # (0.19 on); _NO_FUTURE takes the report its worker would send the loop.
        queue: Any = self._connection._tx
        queue.put_nowait((_NO_FUTURE, partial(self._run, then, function, args)))

    def _run(self, then: Then, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """On the database thread: run, leave the result, wake the loop (GIL released)."""
        try:
            self._done.append((then, function(*args), None))
        except BaseException as exc:  # the caller's to handle, as with aiosqlite's methods
            self._done.append((then, None, exc))
        # try, not contextlib.suppress: its three calls cost 1.5k instructions on each side.
        try:  # noqa: SIM105
            os.write(self._write_fd, _WAKE)
        # Not tested: a pipe fills only with 64 KiB of wake-ups the loop has not read.
        except BlockingIOError:  # pragma: no cover - a wake-up is pending already
            pass

    def _deliver(self) -> None:
        """On the event loop, when woken: hand on every result whose call has returned."""
        try:  # noqa: SIM105 (as in _run)
            os.read(self._read_fd, 4096)
        # Not tested: epoll reports the fd readable only with a wake-up in it; kept
        # against a spurious wake-up, which must not kill the loop's reader.
        except BlockingIOError:  # pragma: no cover - nothing to read after all
            pass
        done = self._done
        while done:
            then, result, exc = done.popleft()
            try:
                then(result, exc)
            except Exception:  # the results after it must still be handed on
                log.exception("handing on a result of the database thread failed")

    def close(self) -> None:
        """Once the connection's thread has stopped: nothing more will write the fd."""
        self._loop.remove_reader(self._read_fd)
        for fd in {self._read_fd, self._write_fd}:
            os.close(fd)


# Called on the event loop with a call's result, or with None and why it raised.
Then = Callable[[Any, BaseException | None], None]


def _resolve(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """_Handoff.call's ``then``: settle its future, unless it was cancelled meanwhile."""
    if future.done():
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)


class _WriteLock(asyncio.Lock):
    """The connection's lock, which the group commit may also take without a coroutine."""

    def take_if_free(self) -> bool:
        """Take the lock now if ``acquire`` would without waiting (False: await it).

        The test is acquire's own (CPython 3.11 to 3.13): unlocked, and no waiter that
        was woken but has not run yet (it takes the lock without looking again)."""
        waiters = self._waiters
        if self.__dict__.get("_locked") is not False:  # taken, or a Lock of another make
            return False
        if waiters and not all(waiter.cancelled() for waiter in waiters):
            return False
        self._locked = True
        return True


class _NoFuture:
    """Stands in for the future aiosqlite's worker reports to: _Handoff._run reports."""

    def __bool__(self) -> bool:
        # aiosqlite reports "if future" (0.22 does): then not at all, two calls less; a
        # version that reports regardless calls the methods below.
        return False

    # Called by aiosqlite 0.19-0.21 only (setup.cfg allows them; CI installs 0.22).
    def get_loop(self) -> _NoFuture:  # pragma: no cover
        return self

    def call_soon_threadsafe(self, *args: Any) -> None:  # pragma: no cover
        pass


_NO_FUTURE = _NoFuture()


def _is_disk_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0)
    return isinstance(exc, sqlite3.Error) and code & 0xFF == sqlite3.SQLITE_FULL


def _before(before: int | None) -> int:
    return (1 << 63) - 1 if before is None else before


def _companions(path: str) -> dict[str, tuple[int, int]]:
    """The identities of the database's -wal and -shm files, where they exist."""
    found = {suffix: _identity(path + suffix) for suffix in ("-wal", "-shm")}
    return {suffix: identity for suffix, identity in found.items() if identity is not None}


def _prepare(path: str, busy_timeout: float) -> None:
    """Open (or create) the file and switch it to WAL, waiting for stores opened at once.

    WAL is kept in the file, so every later connection is in WAL mode from its start.
    Leaving the rollback journal takes the exclusive lock from a shared one, and SQLite
    answers a second connection doing the same at once with SQLITE_BUSY at once, without
    its busy handler (waiting could deadlock): two stores opened together on a new file
    (a server and the admin command, several test stores) must retry here.
    """
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        # Takes effect on a new file only (before its first table); an existing file
        # keeps its page size (README, "Disk space", says how to change it).
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)
        if mode != "wal":
            raise sqlite3.OperationalError(f"cannot use the WAL journal (journal_mode is {mode})")
    finally:
        conn.close()


def _watch_file(path: str, identity: tuple[int, int]) -> tuple[int, str] | None:
    """A descriptor of the database file and its /proc/self/fd link, whose target is the
    file's name as the kernel knows it: the path until the file is deleted or replaced
    (then "<path> (deleted)"), or moved (its new path). A readlink of it per commit is
    2.7k instructions, a stat of the path 8.8k (a full stat_result). Only where it names
    the very file opened and reads as the path itself (no symbolic link in it: one
    switched to elsewhere would go unseen). Opened O_PATH: closing it drops no POSIX
    lock (SQLite locks this file; closing another descriptor of it would drop its locks).
    None where there is no /proc or no O_PATH: the stat alone then."""
    if not hasattr(os, "O_PATH"):
        return None
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    link = f"/proc/self/fd/{fd}"
    try:
        stat = os.fstat(fd)
        if os.readlink(link) == path and (stat.st_dev, stat.st_ino) == identity:
            return fd, link
    except OSError:
        pass
    os.close(fd)
    return None


def _identity(path: str) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode); None if there is none."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (they contain no string literals with ';')."""
    return [part.strip() for part in script.split(";") if part.strip()]


def backup(db_path: str, target_path: str) -> None:
    """Copy a database, consistently even while a server writes to it (SQLite backup API)."""
    source = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        target = sqlite3.connect(target_path)
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()
