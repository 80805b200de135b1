"""The PostgreSQL store: the same contract as the SQLite one (chatd.store), on asyncpg.

Chosen with ``--db postgresql://user@host:port/dbname``; needs the optional driver
(``pip install 'chatd[postgresql]'``).  A pool of connections serves reads and
writes; as in SQLite, messages wait for a group commit (chatd.store.commit: one
flusher writes a batch per transaction, one batch at a time) and every other method
first waits for the messages enqueued before it (read your writes).  A batch is one
round trip: a call of a server-side function, chatd_store_few for a batch of a few
messages (migration 3: message by message) and chatd_store_batch for a larger one
(migration 2: set-based), which locks the streams, finds repeated client_ids, numbers,
inserts and moves the heads.

Per-stream sequence numbers: each channel and each user's inbox numbers its messages
1, 2, 3, ... (``seq``).  The number is taken under that stream's row lock
(``channels.last_seq``, ``users.inbox_seq``), held to COMMIT, and the message id is
drawn after it, so within a stream seq, id and commit order agree even with several
writers (nodes); the locks are taken in a fixed order, so writers cannot deadlock.

Message text and client_id are BYTEA (UTF-8): the protocol allows any text, and a
PostgreSQL TEXT value cannot hold a NUL character.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from chatd.store.commit import DedupKey, GroupCommit
from chatd.store.rows import (
    CHANNEL,
    GUEST_HASH,
    PROFILE_TTL,
    Batch,
    Bounds,
    Channel,
    ChannelMessage,
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
from chatd.urls import redact

log = logging.getLogger(__name__)

POOL_SIZE = 10  # connections for everything but the group commit, which has its own
CONNECT_TIMEOUT = 10.0  # seconds to reach the server at start-up
# Taken by every node while it migrates, so two nodes starting at once on an empty
# database run the migrations one after the other (the second finds nothing to do).
MIGRATION_LOCK = 0x63686174_64000001
# New user names, and new channel names, are checked for look-alikes and inserted one
# at a time (SQLite's single writer gives the same), so of two look-alikes registered at
# the same moment only one succeeds. Rare operations: one lock each is enough.
USER_NAMES_LOCK = 0x63686174_64000002
CHANNEL_NAMES_LOCK = 0x63686174_64000003

# A whole group-commit batch in one round trip to the database (one statement, its own
# transaction). Arrays, one element per message in enqueue order: channel (false: a
# private message to the inbox of target), sender, target, body, created_at, client_id.
# Returns a row per message stored (its position n from 1, id, seq, created_at, false)
# and per message whose client_id was stored before (the earlier send's, true); a message
# repeating a client_id earlier in the batch gets no row (see _results).
_STORE_BATCH = """
    -- Foreign keys on the message tables checked each row of a batch on its own (a
    -- trigger and a query per row and key): the batch function checks its streams and
    -- senders once per batch instead, and delete_user deletes a user's messages.
    ALTER TABLE private_messages
        DROP CONSTRAINT private_messages_sender_id_fkey,
        DROP CONSTRAINT private_messages_recipient_id_fkey;
    ALTER TABLE channel_messages
        DROP CONSTRAINT channel_messages_sender_id_fkey,
        DROP CONSTRAINT channel_messages_channel_id_fkey;
    CREATE FUNCTION chatd_store_batch(
        p_channel boolean[], p_sender bigint[], p_target bigint[], p_body bytea[],
        p_created double precision[], p_client bytea[]
    ) RETURNS TABLE (
        n bigint, id bigint, seq bigint, created_at double precision, duplicate boolean
    )
    LANGUAGE plpgsql AS $$
    BEGIN
        -- Lock the row of every stream written to, inboxes before channels and by id
        -- within each, so that two writers never wait for each other in a circle; a
        -- retry racing its original on another node waits for it here.
        PERFORM 1 FROM users u
            WHERE u.id IN (SELECT x.t FROM unnest(p_channel, p_target) AS x(c, t) WHERE NOT x.c)
            ORDER BY u.id FOR NO KEY UPDATE;
        PERFORM 1 FROM channels ch
            WHERE ch.id IN (SELECT x.t FROM unnest(p_channel, p_target) AS x(c, t) WHERE x.c)
            ORDER BY ch.id FOR NO KEY UPDATE;
        -- The senders must exist until COMMIT (what a foreign key checked row by row):
        -- a KEY SHARE lock makes delete_user wait, and a sender it deleted first is gone.
        PERFORM 1 FROM users u WHERE u.id IN (SELECT unnest(p_sender))
            ORDER BY u.id FOR KEY SHARE;
        IF EXISTS (SELECT 1 FROM unnest(p_sender) AS x(s)
                   WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = x.s)) THEN
            RAISE foreign_key_violation USING MESSAGE = 'the sender no longer exists';
        END IF;
        -- The rest in one statement, whose snapshot is taken after the locks: it sees
        -- what a racing writer committed while this one waited.
        RETURN QUERY
        WITH batch AS (  -- nth: 1 for the first message of each client_id in the batch
            SELECT b.*, row_number() OVER (PARTITION BY b.c, b.s, b.k ORDER BY b.n) AS nth
            FROM unnest(p_channel, p_sender, p_target, p_body, p_created, p_client)
                WITH ORDINALITY AS b(c, s, t, body, ts, k, n)
        ), earlier AS (  -- sends stored before under a client_id of the batch
            SELECT b.n, m.id, m.seq, m.created_at FROM batch b
                JOIN private_messages m ON m.sender_id = b.s AND m.client_id = b.k
                WHERE NOT b.c AND b.nth = 1
            UNION ALL
            SELECT b.n, m.id, m.seq, m.created_at FROM batch b
                JOIN channel_messages m ON m.sender_id = b.s AND m.client_id = b.k
                WHERE b.c AND b.nth = 1
        ), fresh AS (  -- what to insert, counted within each stream in batch order
            SELECT b.*, row_number() OVER (PARTITION BY b.c, b.t ORDER BY b.n) AS r
            FROM batch b
            WHERE (b.k IS NULL OR b.nth = 1) AND b.n NOT IN (SELECT e.n FROM earlier e)
        ), numbered AS MATERIALIZED (
            -- Numbered on from the heads as this statement's snapshot has them (their
            -- rows are locked above); a stream whose row is gone gets no seq, which NOT
            -- NULL refuses. Ids drawn after the sort: in batch order.
            SELECT f.c, f.s, f.t, f.body, f.ts, f.k, f.n,
                COALESCE(u.inbox_seq, ch.last_seq) + f.r AS q,
                CASE WHEN f.c THEN nextval('channel_messages_id_seq')
                    ELSE nextval('private_messages_id_seq') END AS id
            FROM fresh f
            LEFT JOIN users u ON NOT f.c AND u.id = f.t
            LEFT JOIN channels ch ON f.c AND ch.id = f.t
            ORDER BY f.n
        ), inbox_heads AS (
            UPDATE users u SET inbox_seq = u.inbox_seq + f.total
            FROM (SELECT fr.t, count(*) AS total FROM fresh fr WHERE NOT fr.c GROUP BY fr.t) f
            WHERE u.id = f.t
        ), channel_heads AS (
            UPDATE channels ch SET last_seq = ch.last_seq + f.total
            FROM (SELECT fr.t, count(*) AS total FROM fresh fr WHERE fr.c GROUP BY fr.t) f
            WHERE ch.id = f.t
        ), private_rows AS (
            INSERT INTO private_messages
                (id, sender_id, recipient_id, seq, body, created_at, client_id)
            SELECT nb.id, nb.s, nb.t, nb.q, nb.body, nb.ts, nb.k FROM numbered nb WHERE NOT nb.c
        ), channel_rows AS (
            INSERT INTO channel_messages
                (id, sender_id, channel_id, seq, body, created_at, client_id)
            SELECT nb.id, nb.s, nb.t, nb.q, nb.body, nb.ts, nb.k FROM numbered nb WHERE nb.c
        )
        SELECT nb.n, nb.id, nb.q, nb.ts, false FROM numbered nb
        UNION ALL
        SELECT e.n, e.id, e.seq, e.created_at, true FROM earlier e;
    END
    $$;
"""

# A batch of a few messages (the usual one below saturation: 1-2 messages), message by
# message: the set-based chatd_store_batch's one big statement cost the database more to
# start and plan than the rows themselves (a third of a batch of one), and two statements
# per message are cheap with their plans cached. Same arguments, rows and guarantees:
# streams locked in chatd_store_batch's order before anything else when there are several
# or a client_id to look up (a retry racing its original on another node waits for it,
# then finds it); one message with no client_id takes its one stream's lock with the
# UPDATE of the head. A repeat of a client_id earlier in the batch finds the earlier row,
# stored a statement before (the same row _results gives it).
_STORE_FEW = """
    CREATE FUNCTION chatd_store_few(
        p_channel boolean[], p_sender bigint[], p_target bigint[], p_body bytea[],
        p_created double precision[], p_client bytea[]
    ) RETURNS TABLE (
        n bigint, id bigint, seq bigint, created_at double precision, duplicate boolean
    )
    LANGUAGE plpgsql AS $$
    #variable_conflict use_column
    DECLARE
        i integer;
        head bigint;
        new_id bigint;
    BEGIN
        IF cardinality(p_channel) > 1 OR cardinality(array_remove(p_client, NULL)) > 0 THEN
            PERFORM 1 FROM users u
                WHERE u.id IN (SELECT x.t FROM unnest(p_channel, p_target) AS x(c, t)
                               WHERE NOT x.c)
                ORDER BY u.id FOR NO KEY UPDATE;
            PERFORM 1 FROM channels ch
                WHERE ch.id IN (SELECT x.t FROM unnest(p_channel, p_target) AS x(c, t)
                                WHERE x.c)
                ORDER BY ch.id FOR NO KEY UPDATE;
        END IF;
        FOR i IN 1 .. cardinality(p_channel) LOOP
            IF p_client[i] IS NOT NULL THEN
                IF p_channel[i] THEN
                    RETURN QUERY SELECT i::bigint, m.id, m.seq, m.created_at, true
                        FROM channel_messages m
                        WHERE m.sender_id = p_sender[i] AND m.client_id = p_client[i];
                ELSE
                    RETURN QUERY SELECT i::bigint, m.id, m.seq, m.created_at, true
                        FROM private_messages m
                        WHERE m.sender_id = p_sender[i] AND m.client_id = p_client[i];
                END IF;
                CONTINUE WHEN FOUND;
            END IF;
            -- The head moves under the stream's row lock, and the id is drawn after it.
            -- The sender's KEY SHARE lock holds it until COMMIT (as the foreign key did).
            IF p_channel[i] THEN
                UPDATE channels ch SET last_seq = ch.last_seq + 1 WHERE ch.id = p_target[i]
                    RETURNING ch.last_seq INTO head;
                IF head IS NULL THEN
                    RAISE foreign_key_violation USING MESSAGE = 'the channel no longer exists';
                END IF;
                INSERT INTO channel_messages AS m
                    (id, sender_id, channel_id, seq, body, created_at, client_id)
                    SELECT nextval('channel_messages_id_seq'), s.id, p_target[i], head,
                        p_body[i], p_created[i], p_client[i]
                    FROM users s WHERE s.id = p_sender[i] FOR KEY SHARE
                    RETURNING m.id INTO new_id;
            ELSE
                UPDATE users u SET inbox_seq = u.inbox_seq + 1 WHERE u.id = p_target[i]
                    RETURNING u.inbox_seq INTO head;
                IF head IS NULL THEN
                    RAISE foreign_key_violation USING MESSAGE = 'the recipient no longer exists';
                END IF;
                INSERT INTO private_messages AS m
                    (id, sender_id, recipient_id, seq, body, created_at, client_id)
                    SELECT nextval('private_messages_id_seq'), s.id, p_target[i], head,
                        p_body[i], p_created[i], p_client[i]
                    FROM users s WHERE s.id = p_sender[i] FOR KEY SHARE
                    RETURNING m.id INTO new_id;
            END IF;
            IF new_id IS NULL THEN
                RAISE foreign_key_violation USING MESSAGE = 'the sender no longer exists';
            END IF;
            n := i; id := new_id; seq := head; created_at := p_created[i]; duplicate := false;
            RETURN NEXT;
        END LOOP;
    END
    $$;
"""
FEW = 8  # batches of at most this many messages go to chatd_store_few (measured: docs)

# Each entry moves the schema one version up; chatd_schema.version records where we are.
MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE users (
        id            BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name          TEXT NOT NULL,
        name_key      TEXT NOT NULL UNIQUE,
        -- What the name looks like in small letters and in capitals (chatd/names.py):
        -- a new name that looks like an existing one is refused.
        skeleton       TEXT NOT NULL,
        upper_skeleton TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        created_at    DOUBLE PRECISION NOT NULL,
        inbox_cursor  BIGINT NOT NULL DEFAULT 0,  -- newest private message id received
        inbox_seq     BIGINT NOT NULL DEFAULT 0   -- the inbox stream's newest seq
    );
    CREATE TABLE tokens (
        digest     BYTEA PRIMARY KEY,  -- sha256 of the token, never the token itself
        user_id    BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX users_by_skeleton ON users(skeleton);
    CREATE INDEX users_by_upper_skeleton ON users(upper_skeleton);
    CREATE INDEX tokens_by_user ON tokens(user_id);
    -- Identities never hand out an id twice, so cursors stay valid after deletions.
    CREATE TABLE private_messages (
        id           BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        sender_id    BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        recipient_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        seq          BIGINT NOT NULL,
        body         BYTEA NOT NULL,
        created_at   DOUBLE PRECISION NOT NULL,
        client_id    BYTEA,
        UNIQUE (recipient_id, seq),
        UNIQUE (sender_id, client_id)  -- NULLs are distinct: only client_ids are unique
    );
    CREATE INDEX private_by_recipient ON private_messages(recipient_id, id);
    CREATE INDEX private_by_pair ON private_messages(recipient_id, sender_id, id);
    CREATE TABLE channels (
        id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name       TEXT NOT NULL,
        name_key   TEXT NOT NULL UNIQUE,
        skeleton       TEXT NOT NULL,
        upper_skeleton TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        last_seq   BIGINT NOT NULL DEFAULT 0  -- the channel stream's newest seq
    );
    CREATE INDEX channels_by_skeleton ON channels(skeleton);
    CREATE INDEX channels_by_upper_skeleton ON channels(upper_skeleton);
    CREATE TABLE channel_members (
        channel_id  BIGINT NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
        user_id     BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        joined_at   DOUBLE PRECISION NOT NULL,
        read_cursor BIGINT,  -- newest id received, NULL before the first /channel/receive
        left_at     DOUBLE PRECISION,  -- see chatd.store.sqlite's migration 2
        PRIMARY KEY (channel_id, user_id)
    );
    CREATE INDEX members_by_user ON channel_members(user_id);
    CREATE TABLE channel_messages (
        id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        channel_id BIGINT NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
        sender_id  BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        seq        BIGINT NOT NULL,
        body       BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        client_id  BYTEA,
        UNIQUE (channel_id, seq),
        UNIQUE (sender_id, client_id)
    );
    CREATE INDEX channel_messages_by_channel ON channel_messages(channel_id, id);
    """,
    _STORE_BATCH,
    _STORE_FEW,
)

# Names sort as SQLite sorts them (by code point), whatever the database's collation.
_BY_NAME = 'name_key COLLATE "C"'
_PRIVATE_ROWS = (
    "SELECT m.id, u.name, m.body, m.created_at, m.seq FROM private_messages m"
    " JOIN users u ON u.id = m.sender_id"
)
# A conversation of two users, both names joined in (private_history, private_range).
_PAIR_ROWS = (
    "SELECT m.id, s.name, r.name, m.body, m.created_at FROM private_messages m"
    " JOIN users s ON s.id = m.sender_id JOIN users r ON r.id = m.recipient_id"
)
_CHANNEL_ROWS = (
    "SELECT m.id, u.name, m.body, m.created_at, m.seq FROM channel_messages m"
    " JOIN users u ON u.id = m.sender_id"
)
# Positions: ids with their seqs, as in the SQLite store (chatd.store.sqlite).
_INBOX_POSITION = (
    "SELECT u.inbox_cursor, COALESCE((SELECT m.seq FROM private_messages m"
    "  WHERE m.recipient_id = u.id AND m.id <= u.inbox_cursor ORDER BY m.id DESC LIMIT 1), 0)"
    " FROM users u WHERE u.id = $1"
)
_CHANNEL_POSITION = (
    "SELECT m.read_cursor, COALESCE((SELECT c.seq FROM channel_messages c"
    "  WHERE c.channel_id = m.channel_id AND c.id <= m.read_cursor"
    "  ORDER BY c.id DESC LIMIT 1), 0),"
    " COALESCE(newest.id, 0), COALESCE(newest.seq, 0)"
    " FROM channel_members m LEFT JOIN (SELECT id, seq FROM channel_messages"
    "  WHERE channel_id = $1 ORDER BY id DESC LIMIT 1) AS newest ON true"
    " WHERE m.channel_id = $1 AND m.user_id = $2"
)
_NO_UPPER_BOUND = (1 << 63) - 1
_CHANNEL_BY_KEY = "SELECT id, name, created_at FROM channels WHERE name_key = $1"
_CALL_BATCH = "SELECT * FROM chatd_store_batch($1, $2, $3, $4, $5, $6)"
_CALL_FEW = "SELECT * FROM chatd_store_few($1, $2, $3, $4, $5, $6)"
# The flusher's connection plans the batch functions' statements once: with "auto"
# PostgreSQL re-planned chatd_store_batch's big statement on every call (array
# arguments make each custom plan look cheaper than the generic one), a sixth of its cost.
_WRITER_SETTINGS = {"plan_cache_mode": "force_generic_plan"}


async def _check_room(conn: Any, user_id: int, max_memberships: int) -> None:
    """Raise TooManyChannels if the user is a member of ``max_memberships`` channels.

    The user's row is locked first, so joins of one user on any node count one after
    another and the cap is exact.  NO KEY UPDATE, not UPDATE: it does not block the
    KEY SHARE locks that inserts referencing the user (their messages) take.
    """
    await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE", user_id)
    count = await conn.fetchval(
        "SELECT count(*) FROM channel_members WHERE user_id = $1 AND left_at IS NULL", user_id
    )
    if count >= max_memberships:
        raise TooManyChannels(max_memberships)


class PostgresStore:
    def __init__(self, pool: Any, url: str) -> None:
        self._pool = pool  # an asyncpg.Pool (asyncpg ships no type hints)
        self._url = url
        self._commit = GroupCommit(self._write_batch, asyncpg.IntegrityConstraintViolationError)
        self._writer: Any = None  # the flusher's own connection, opened when needed
        self._profiles: dict[str, tuple[float, User]] = {}  # name key -> (when read, user)
        self._channels: dict[str, Channel] = {}  # name key -> channel (never deleted)
        # The database server keeps its own disk: a write it refuses for want of space
        # reaches the client as a plain code 9, and /stats says false.
        self.disk_full = False

    @classmethod
    async def open(cls, url: str, pool_size: int = POOL_SIZE) -> PostgresStore:
        shown = redact(url)
        try:
            pool = await asyncpg.create_pool(
                url, min_size=1, max_size=pool_size, timeout=CONNECT_TIMEOUT
            )
        except Exception as exc:
            raise StoreError(f"cannot open database {shown}: {exc}") from exc
        store = cls(pool, url)
        try:
            await store._migrate()
        except Exception as exc:
            await pool.close()
            raise StoreError(f"cannot use database {shown}: {exc}") from exc
        return store

    async def close(self) -> None:
        await self._settled()
        await self._drop_writer()
        await self._pool.close()

    async def _migrate(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS chatd_schema (version INTEGER NOT NULL)"
            )
            version: int = await conn.fetchval("SELECT version FROM chatd_schema") or 0
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"the schema is at version {version}, newer than this chatd knows"
                    f" ({len(MIGRATIONS)}): upgrade chatd"
                )
            if version == 0:
                log.info("creating the database schema (version %d)", len(MIGRATIONS))
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                if version > 0:  # an upgrade, step by step
                    log.info("migrating database schema to version %d", number)
                await conn.execute(script)  # several statements: the simple query protocol
            if version < len(MIGRATIONS):
                await conn.execute("DELETE FROM chatd_schema")
                await conn.execute("INSERT INTO chatd_schema VALUES ($1)", len(MIGRATIONS))

    async def _settled(self) -> None:
        """Wait until every message enqueued before has committed (read your writes)."""
        await self._commit.settled()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        await self._settled()
        async with self._pool.acquire() as conn, conn.transaction():
            yield conn

    async def _rows(self, sql: str, *args: Any) -> list[Any]:
        await self._settled()
        rows: list[Any] = await self._pool.fetch(sql, *args)
        return rows

    async def _value(self, sql: str, *args: Any) -> Any:
        await self._settled()
        return await self._pool.fetchval(sql, *args)

    # Group commit (chatd.store.commit): one flusher writes a batch per transaction.

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

    async def _write_batch(self, batch: list[NewMessage]) -> list[Stored]:
        """The whole batch in one round trip: one call of chatd_store_few or
        chatd_store_batch (by its size: FEW), its own transaction, on a connection of the
        flusher's own (releasing a pooled one costs a second round trip, its reset; and a
        pool takes back a broken one)."""
        if self._writer is None:
            self._writer = await asyncpg.connect(
                self._url, timeout=CONNECT_TIMEOUT, server_settings=_WRITER_SETTINGS
            )
        try:
            rows = await self._writer.fetch(
                _CALL_FEW if len(batch) <= FEW else _CALL_BATCH,
                [m.kind == CHANNEL for m in batch],
                [m.sender_id for m in batch],
                [m.target_id for m in batch],
                [m.body.encode() for m in batch],
                [m.created_at for m in batch],
                [None if m.client_id is None else m.client_id.encode() for m in batch],
            )
        except Exception:
            if self._writer.is_closed():  # the server went away: the next batch reconnects
                await self._drop_writer()
            raise
        return _results(batch, rows)

    async def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.close()

    # Users and tokens.

    async def create_user(
        self, name: str, key: str, skeletons: Skeletons, password_hash: str, now: float
    ) -> bool:
        """Add a user; False if a user has this name key or looks alike (skeletons)."""
        return await self._add_user(name, key, skeletons, password_hash, now) is not None

    async def _add_user(
        self, name: str, key: str, skeletons: Skeletons, password_hash: str, now: float
    ) -> int | None:
        """A new user row's id; None if a user has this name key or looks alike (checked
        and inserted under one lock, so of two look-alike names only one succeeds)."""
        async with self._transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", USER_NAMES_LOCK)
            if await _user_name_taken(conn, key, skeletons):
                return None
            user_id: int | None = await conn.fetchval(
                "INSERT INTO users"
                " (name, name_key, skeleton, upper_skeleton, password_hash, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name_key) DO NOTHING RETURNING id",
                name, key, *skeletons, password_hash, now,
            )
        return user_id

    async def user_name_taken(self, key: str, skeletons: Skeletons) -> bool:
        """Whether create_user would refuse this name now."""
        await self._settled()
        return await _user_name_taken(self._pool, key, skeletons)

    async def find_user(self, key: str) -> User | None:
        """The user with this name key, read fresh (logins need the current hash)."""
        user = await self._user_where("name_key = $1", key)
        if user is not None:
            self._profiles[key] = (time.monotonic(), user)
        return user

    async def find_profile(self, key: str) -> User | None:
        """As find_user, but may answer from a cache at most PROFILE_TTL old."""
        return self.cached_profile(key) or await self.find_user(key)

    def cached_profile(self, key: str) -> User | None:
        """What find_profile answers without waiting: the cached user, if fresh enough."""
        cached = self._profiles.get(key)
        if cached is not None and time.monotonic() - cached[0] < PROFILE_TTL:
            return cached[1]
        return None

    async def _user_where(self, condition: str, *args: Any) -> User | None:
        sql = f"SELECT id, name, password_hash, created_at FROM users WHERE {condition}"
        rows = await self._rows(sql, *args)
        return User(*rows[0]) if rows else None

    async def set_password_hash(self, user_id: int, password_hash: str) -> None:
        await self._value(
            "UPDATE users SET password_hash = $1 WHERE id = $2", password_hash, user_id
        )

    async def add_token(self, user_id: int, digest: bytes, now: float, expires_at: float) -> None:
        await self._value(
            "INSERT INTO tokens (digest, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
            digest, user_id, now, expires_at,
        )

    async def token_owner(self, digest: bytes, now: float) -> tuple[User, float] | None:
        """The user a live token belongs to, and when the token expires."""
        rows = await self._rows(
            "SELECT u.id, u.name, u.password_hash, u.created_at, t.expires_at"
            " FROM tokens t JOIN users u ON u.id = t.user_id"
            " WHERE t.digest = $1 AND t.expires_at > $2",
            digest, now,
        )
        if not rows:
            return None
        user_id, name, password_hash, created_at, expires_at = rows[0]
        return User(user_id, name, password_hash, created_at), expires_at

    async def live_tokens(self, digests: Sequence[bytes], now: float) -> set[bytes]:
        """Which of these tokens are still valid (not expired, revoked or deleted)."""
        rows = await self._rows(
            "SELECT digest FROM tokens WHERE expires_at > $1 AND digest = ANY($2::bytea[])",
            now, list(digests),
        )
        return {row[0] for row in rows}

    async def revoke_token(self, digest: bytes) -> None:
        await self._value("DELETE FROM tokens WHERE digest = $1", digest)

    # Private messages.

    async def take_inbox(self, user_id: int, limit: int) -> Batch[PrivateMessage]:
        """Private messages not yet received, oldest first; they count as received after this."""
        async with self._transaction() as conn:
            # The row lock makes two takes of one inbox (two devices) take turns; NO KEY
            # so that the user's own sends (foreign keys take KEY SHARE) go on meanwhile.
            cursor = await conn.fetchval(
                "SELECT inbox_cursor FROM users WHERE id = $1 FOR NO KEY UPDATE", user_id
            )
            if cursor is None:
                return Batch([], more=False)
            rows = await conn.fetch(
                f"{_PRIVATE_ROWS} WHERE m.recipient_id = $1 AND m.id > $2 ORDER BY m.id LIMIT $3",
                user_id, cursor, limit + 1,
            )
            messages = [_private(row) for row in rows[:limit]]
            if messages:
                await conn.execute(
                    "UPDATE users SET inbox_cursor = $1 WHERE id = $2", messages[-1].id, user_id
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
        rows = await self._rows(
            "SELECT id, name, created_at FROM channels WHERE name_key = $1", key
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
        returned with Joined.LOOKALIKE.  A user who is a member of ``max_memberships``
        channels already gets TooManyChannels and nothing is created.
        """
        async with self._transaction() as conn:
            row = await conn.fetchrow(_CHANNEL_BY_KEY, key)
            if row is None:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", CHANNEL_NAMES_LOCK)
                row = await conn.fetchrow(_CHANNEL_BY_KEY, key)  # made while we waited?
            if row is not None:
                left = await conn.fetchrow(
                    "SELECT left_at IS NOT NULL FROM channel_members"
                    " WHERE channel_id = $1 AND user_id = $2 FOR UPDATE",
                    row[0], user_id,
                )
                if left is not None and not left[0]:
                    return self._cache_channel(key, row), Joined.ALREADY
                if left is not None and not rejoin:
                    return self._cache_channel(key, row), Joined.LEFT
            else:
                similar = await conn.fetchrow(
                    "SELECT id, name, created_at FROM channels"
                    " WHERE skeleton = $1 OR upper_skeleton = $2 LIMIT 1",
                    *skeletons,
                )
                if similar is not None:
                    return Channel(*similar), Joined.LOOKALIKE
            if max_memberships is not None:
                await _check_room(conn, user_id, max_memberships)
            if row is None:
                row = await conn.fetchrow(
                    "INSERT INTO channels (name, name_key, skeleton, upper_skeleton, created_at)"
                    " VALUES ($1, $2, $3, $4, $5) RETURNING id, name, created_at",
                    name, key, *skeletons, now,
                )
            channel = self._cache_channel(key, row)
            await conn.execute(
                "INSERT INTO channel_members (channel_id, user_id, joined_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (channel_id, user_id) DO UPDATE SET joined_at = excluded.joined_at,"
                " read_cursor = NULL, left_at = NULL",
                channel.id, user_id, now,
            )
        return channel, Joined.NOW

    def _cache_channel(self, key: str, row: Any) -> Channel:
        channel = self._channels[key] = Channel(*row)
        return channel

    async def leave_channel(self, channel_id: int, user_id: int, now: float) -> bool:
        """False if the user was not a member."""
        left = await self._value(
            "UPDATE channel_members SET left_at = $1"
            " WHERE channel_id = $2 AND user_id = $3 AND left_at IS NULL RETURNING 1",
            now, channel_id, user_id,
        )
        return left is not None

    async def channel_ids(self, user_id: int) -> list[int]:
        rows = await self._rows(
            "SELECT channel_id FROM channel_members WHERE user_id = $1 AND left_at IS NULL",
            user_id,
        )
        return [row[0] for row in rows]

    async def channel_name(self, channel_id: int) -> str:
        name: str = await self._value("SELECT name FROM channels WHERE id = $1", channel_id)
        return name

    async def is_member(self, channel_id: int, user_id: int) -> bool:
        found = await self._value(
            "SELECT 1 FROM channel_members"
            " WHERE channel_id = $1 AND user_id = $2 AND left_at IS NULL",
            channel_id, user_id,
        )
        return found is not None

    async def memberships(self, user_id: int, backlog: int) -> list[Membership]:
        """The user's channels by name, with what a /channel/receive would return now:
        other members' messages only (protocol.md, "Your own messages")."""
        rows = await self._rows(
            "SELECT c.id, c.name, m.read_cursor,"
            " CASE WHEN m.read_cursor IS NULL"
            "  THEN LEAST($1, (SELECT COUNT(*) FROM channel_messages"
            "                  WHERE channel_id = c.id AND sender_id != m.user_id))"
            "  ELSE (SELECT COUNT(*) FROM channel_messages"
            "        WHERE channel_id = c.id AND id > m.read_cursor"
            "        AND sender_id != m.user_id) END"
            " FROM channel_members m JOIN channels c ON c.id = m.channel_id"
            f" WHERE m.user_id = $2 AND m.left_at IS NULL ORDER BY c.{_BY_NAME}",
            backlog, user_id,
        )
        return [Membership(*row) for row in rows]

    async def take_channel(
        self, channel_id: int, user_id: int, backlog: int, limit: int
    ) -> Batch[ChannelMessage]:
        """What other members posted in a channel since the caller's previous call.

        A member's first call gets the newest ``backlog`` of them instead. The caller's
        own messages are never returned, but the position moves past them all the same.
        """
        select = f"{_CHANNEL_ROWS} WHERE m.channel_id = $1 AND m.sender_id != $2"
        async with self._transaction() as conn:
            member = await conn.fetchrow(
                "SELECT read_cursor FROM channel_members"
                " WHERE channel_id = $1 AND user_id = $2 FOR NO KEY UPDATE",
                channel_id, user_id,
            )
            cursor_value = None if member is None else member[0]
            if cursor_value is None:
                newest_first = await conn.fetch(
                    f"{select} ORDER BY m.id DESC LIMIT $3",
                    channel_id, user_id, min(backlog, limit),
                )
                rows = newest_first[::-1]
                more = False
            else:
                rows = await conn.fetch(
                    f"{select} AND m.id > $3 ORDER BY m.id LIMIT $4",
                    channel_id, user_id, cursor_value, limit + 1,
                )
                more = len(rows) > limit
                rows = rows[:limit]
            if more:
                newest = rows[-1][0]
            else:
                # Everything up to the channel's newest message is taken now: older ones
                # than the backlog are history, not news, and the rest are the caller's
                # own. No uncommitted message of this channel can have a smaller id: ids
                # are drawn under the channel's row lock (see the module's doc).
                newest = await conn.fetchval(
                    "SELECT GREATEST($1::bigint, COALESCE(MAX(id), 0)) FROM channel_messages"
                    " WHERE channel_id = $2",
                    cursor_value or 0, channel_id,
                )
            await conn.execute(
                "UPDATE channel_members SET read_cursor = $1"
                " WHERE channel_id = $2 AND user_id = $3",
                newest, channel_id, user_id,
            )
        return Batch([_channel(row) for row in rows], more)

    async def channel_members(self, channel_id: int) -> list[tuple[int, str]]:
        rows = await self._rows(
            "SELECT u.id, u.name FROM channel_members c JOIN users u ON u.id = c.user_id"
            f" WHERE c.channel_id = $1 AND c.left_at IS NULL ORDER BY u.{_BY_NAME}",
            channel_id,
        )
        return [(row[0], row[1]) for row in rows]

    # Delivery positions and catch-up (live push, /ack).

    async def ack_private(self, user_id: int, message_id: int) -> int:
        """Mark the inbox received up to ``message_id``; returns the new position.

        Clamped to the newest message the user actually has, so acknowledging an id
        from the future cannot swallow messages not yet sent.
        """
        position: int = await self._value(
            "UPDATE users SET inbox_cursor = GREATEST(inbox_cursor, COALESCE("
            " (SELECT MAX(id) FROM private_messages WHERE recipient_id = $1 AND id <= $2),"
            " 0)) WHERE id = $1 RETURNING inbox_cursor",
            user_id, message_id,
        )
        return position

    async def ack_channel(self, channel_id: int, user_id: int, message_id: int) -> int | None:
        """As ack_private for a channel; None if the user is not a member."""
        position: int | None = await self._value(
            "UPDATE channel_members SET read_cursor = GREATEST(COALESCE(read_cursor, 0),"
            " COALESCE((SELECT MAX(id) FROM channel_messages"
            "  WHERE channel_id = $1 AND id <= $2), 0))"
            " WHERE channel_id = $1 AND user_id = $3 AND left_at IS NULL RETURNING read_cursor",
            channel_id, message_id, user_id,
        )
        return position

    async def inbox_position(self, user_id: int) -> StreamPosition:
        """Where a catch-up of the inbox starts: the acknowledged id and its seq (never
        fresh: every user has a position)."""
        rows = await self._rows(_INBOX_POSITION, user_id)
        cursor, seq = rows[0] if rows else (0, 0)
        return StreamPosition(cursor, seq)

    async def channel_position(
        self, channel_id: int, user_id: int
    ) -> tuple[StreamPosition, int]:
        """Where a member's catch-up starts: their read position, or (fresh: before their
        first /channel/receive or /ack, which would show the backlog) the newest message;
        and the channel's newest message id now, read in the same statement."""
        rows = await self._rows(_CHANNEL_POSITION, channel_id, user_id)
        return channel_start(rows[0] if rows else None)

    async def channel_newest(self, channel_ids: Sequence[int]) -> dict[int, StreamPosition]:
        """Each channel's newest message now, id and seq ((0, 0) before the first; a
        channel that does not exist is absent), in one statement however many."""
        rows = await self._rows(
            "SELECT c.id, COALESCE(m.id, 0), COALESCE(m.seq, 0) FROM channels c"
            " LEFT JOIN LATERAL (SELECT id, seq FROM channel_messages"
            "  WHERE channel_id = c.id ORDER BY id DESC LIMIT 1) m ON true"
            " WHERE c.id = ANY($1::bigint[])",
            list(channel_ids),
        )
        return {channel: StreamPosition(newest, seq) for channel, newest, seq in rows}

    async def stream_heads(
        self, user_ids: Sequence[int], channel_ids: Sequence[int]
    ) -> StreamHeads:
        """The newest seq of many streams in one statement: the heads are stored per
        stream (users.inbox_seq, channels.last_seq), moved in the transaction that stores
        each message, so a head never runs ahead of what a read can see."""
        rows = await self._rows(
            "SELECT false, id, inbox_seq FROM users WHERE id = ANY($1::bigint[])"
            " UNION ALL"
            " SELECT true, id, last_seq FROM channels WHERE id = ANY($2::bigint[])",
            list(user_ids), list(channel_ids),
        )
        heads = StreamHeads({}, {})
        for is_channel, key, seq in rows:
            (heads.channels if is_channel else heads.inboxes)[key] = seq
        return heads

    async def inbox_after(self, user_id: int, after_id: int, limit: int) -> list[PrivateMessage]:
        """Private messages to the user newer than ``after_id``, oldest first (no side effect)."""
        rows = await self._rows(
            f"{_PRIVATE_ROWS} WHERE m.recipient_id = $1 AND m.id > $2 ORDER BY m.id LIMIT $3",
            user_id, after_id, limit,
        )
        return [_private(row) for row in rows]

    async def channel_after(
        self, channel_id: int, after_id: int, limit: int, reader_id: int, own_after: int
    ) -> list[ChannelMessage]:
        """What a catch-up pushes to ``reader_id``: channel messages newer than
        ``after_id``, oldest first, leaving out the reader's own unless newer than
        ``own_after`` (no side effect)."""
        rows = await self._rows(
            f"{_CHANNEL_ROWS} WHERE m.channel_id = $1 AND m.id > $2"
            " AND (m.sender_id != $3 OR m.id > $4) ORDER BY m.id LIMIT $5",
            channel_id, after_id, reader_id, own_after, limit,
        )
        return [_channel(row) for row in rows]

    # History: reading back, with no effect on delivery positions.

    async def channel_history(
        self, channel_id: int, before: int | None, limit: int
    ) -> Batch[ChannelMessage]:
        """The ``limit`` newest messages older than ``before``, returned oldest first."""
        rows = await self._rows(
            f"{_CHANNEL_ROWS} WHERE m.channel_id = $1 AND m.id < $2 ORDER BY m.id DESC LIMIT $3",
            channel_id, _before(before), limit + 1,
        )
        page = [_channel(row) for row in rows[:limit]]
        return Batch(page[::-1], more=len(rows) > limit)

    async def private_history(
        self, user_id: int, other_id: int, before: int | None, limit: int
    ) -> Batch[SentMessage]:
        """The conversation between two users, both directions, paged like channel_history."""
        inside = "id < $3"
        rows = await self._rows(
            f"{_PAIR_ROWS} WHERE m.id IN ({_one_way('$1', '$2', inside, 'DESC', '$4')}"
            f" UNION ALL {_one_way('$2', '$1', inside, 'DESC', '$4')})"
            " ORDER BY m.id DESC LIMIT $4",
            user_id, other_id, _before(before), limit + 1,
        )
        page = [
            SentMessage(row[0], row[1], row[2], row[3].decode(), row[4]) for row in rows[:limit]
        ]
        return Batch(page[::-1], more=len(rows) > limit)

    # IRC guests (protocol.md 12.6), as in chatd.store.

    async def create_guest(
        self, name: str, key: str, skeletons: Skeletons, now: float
    ) -> int | None:
        """A guest user holding ``name`` while connected; None if the name is taken."""
        return await self._add_user(name, key, skeletons, GUEST_HASH, now)

    async def release_guests(self, user_id: int | None = None) -> None:
        """End a guest (every guest when None): its name is free again, what it received
        and joined is deleted; what it sent stays."""
        self._profiles = {}
        only = "" if user_id is None else " AND id = $2"
        args: tuple[Any, ...] = (GUEST_HASH,) if user_id is None else (GUEST_HASH, user_id)
        guests = f"SELECT id FROM users WHERE password_hash = $1{only}"
        async with self._transaction() as conn:
            await conn.execute(f"DELETE FROM tokens WHERE user_id IN ({guests})", *args)
            await conn.execute(f"DELETE FROM channel_members WHERE user_id IN ({guests})", *args)
            await conn.execute(
                f"DELETE FROM private_messages WHERE recipient_id IN ({guests})", *args
            )
            await conn.execute(
                "UPDATE users SET name_key = '#guest' || id, skeleton = '', upper_skeleton = ''"
                f" WHERE password_hash = $1{only} AND name_key NOT LIKE '#guest%'",
                *args,
            )

    # Ranges for IRC CHATHISTORY (protocol.md 12.5), as in chatd.store.

    async def channel_range(
        self, channel_id: int, bounds: Bounds, limit: int, newest: bool
    ) -> list[ChannelMessage]:
        order = "DESC" if newest else "ASC"
        rows = await self._rows(
            f"{_CHANNEL_ROWS} WHERE m.channel_id = $1 AND m.id > $2 AND m.id < $3"
            f" AND m.created_at > $4 AND m.created_at < $5 ORDER BY m.id {order} LIMIT $6",
            channel_id, *bounds.values(), limit,
        )
        page = [_channel(row) for row in rows]
        return page[::-1] if newest else page

    async def private_range(
        self, user_id: int, other_id: int, bounds: Bounds, limit: int, newest: bool
    ) -> list[SentMessage]:
        order = "DESC" if newest else "ASC"
        inside = "id > $3 AND id < $4 AND created_at > $5 AND created_at < $6"
        rows = await self._rows(
            f"{_PAIR_ROWS} WHERE m.id IN ({_one_way('$1', '$2', inside, order, '$7')}"
            f" UNION ALL {_one_way('$2', '$1', inside, order, '$7')})"
            f" ORDER BY m.id {order} LIMIT $7",
            user_id, other_id, *bounds.values(), limit,
        )
        page = [SentMessage(row[0], row[1], row[2], row[3].decode(), row[4]) for row in rows]
        return page[::-1] if newest else page

    async def message_time(self, in_channel: bool, message_id: int) -> float | None:
        table = "channel_messages" if in_channel else "private_messages"
        found = await self._value(f"SELECT created_at FROM {table} WHERE id = $1", message_id)
        return None if found is None else float(found)

    async def recent_targets(
        self, user_id: int, after: float, before: float, limit: int
    ) -> list[tuple[str, bool, float]]:
        rows = await self._rows(
            "SELECT * FROM ("
            " SELECT c.name, TRUE, MAX(m.created_at) AS t FROM channel_messages m"
            " JOIN channels c ON c.id = m.channel_id"
            " JOIN channel_members cm ON cm.channel_id = c.id AND cm.user_id = $1"
            "  AND cm.left_at IS NULL"
            " WHERE m.created_at > $2 AND m.created_at < $3 GROUP BY c.id, c.name"
            " UNION ALL SELECT u.name, FALSE, MAX(m.created_at) FROM private_messages m"
            " JOIN users u ON u.id = CASE WHEN m.sender_id = $1 THEN m.recipient_id"
            "  ELSE m.sender_id END"
            " WHERE (m.sender_id = $1 OR m.recipient_id = $1)"
            "  AND m.created_at > $2 AND m.created_at < $3 GROUP BY u.id, u.name"
            ") AS targets ORDER BY t DESC LIMIT $4",
            user_id, after, before, limit,
        )
        return [(row[0], bool(row[1]), float(row[2])) for row in rows]

    # Operations (chatd admin).

    async def list_users(self, now: float) -> list[tuple[str, float, int]]:
        """Every user: name, registration time, live tokens."""
        rows = await self._rows(
            "SELECT u.name, u.created_at,"
            " (SELECT COUNT(*) FROM tokens t WHERE t.user_id = u.id AND t.expires_at > $1)"
            f" FROM users u ORDER BY u.{_BY_NAME}",
            now,
        )
        return [(row[0], row[1], row[2]) for row in rows]

    async def revoke_tokens(self, user_id: int) -> int:
        """Revoke every token of a user; returns how many there were."""
        revoked: int = await self._value(
            "WITH gone AS (DELETE FROM tokens WHERE user_id = $1 RETURNING 1)"
            " SELECT COUNT(*) FROM gone",
            user_id,
        )
        return revoked

    async def delete_user(self, user_id: int) -> None:
        """Delete a user with everything they sent, received, joined or held."""
        self._profiles = {k: v for k, v in self._profiles.items() if v[1].id != user_id}
        async with self._transaction() as conn:
            # The row first: its lock waits for a batch writing to or from this user, and
            # a later batch finds the user gone (chatd_store_batch). ON DELETE CASCADE
            # removes tokens and memberships; messages have no foreign key (migration 2).
            await conn.execute("DELETE FROM users WHERE id = $1", user_id)
            await conn.execute(
                "DELETE FROM private_messages WHERE sender_id = $1 OR recipient_id = $1",
                user_id,
            )
            await conn.execute("DELETE FROM channel_messages WHERE sender_id = $1", user_id)


def _results(batch: list[NewMessage], rows: list[Any]) -> list[Stored]:
    """One Stored per message of the batch, from chatd_store_batch's rows by position;
    a repeat of a client_id earlier in the batch gets the first one's, as a duplicate."""
    by_position = {n: Stored(id_, created_at, duplicate, seq) for n, id_, seq, created_at,
                   duplicate in rows}
    first: dict[DedupKey, int] = {}
    results: list[Stored] = []
    for position, message in enumerate(batch, start=1):
        key = message.dedup_key
        if key is not None:
            first.setdefault(key, position)
        stored = by_position.get(position)
        if stored is None:
            assert key is not None
            original = by_position[first[key]]
            stored = Stored(original.id, original.created_at, True, original.seq)
        results.append(stored)
    return results


async def _user_name_taken(conn: Any, key: str, skeletons: Skeletons) -> bool:
    found = await conn.fetchval(
        "SELECT 1 FROM users WHERE name_key = $1 OR skeleton = $2 OR upper_skeleton = $3"
        " LIMIT 1",
        key, *skeletons,
    )
    return found is not None


def _private(row: Any) -> PrivateMessage:
    return PrivateMessage(row[0], row[1], row[2].decode(), row[3], row[4])


def _channel(row: Any) -> ChannelMessage:
    return ChannelMessage(row[0], row[1], row[2].decode(), row[3], row[4])


def _one_way(recipient: str, sender: str, inside: str, order: str, limit: str) -> str:
    """One direction of a conversation, cut to the page's size before the two are
    merged: a page then reads about ``limit`` rows of each through private_by_pair, where
    an OR of the two directions collected the whole conversation first (114-157 ms a
    page at 25,000 messages)."""
    return (
        f"(SELECT id FROM private_messages WHERE recipient_id = {recipient}"
        f" AND sender_id = {sender} AND {inside} ORDER BY id {order} LIMIT {limit})"
    )


def _before(before: int | None) -> int:
    return _NO_UPPER_BOUND if before is None else before
