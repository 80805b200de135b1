"""``chatd migrate --from PATH --to postgresql://...``: a single-node SQLite database,
copied whole into an empty PostgreSQL database.

Everything is kept as it is: users with their password hashes, session tokens (their
digests: old tokens stay valid), channels, memberships (with who left), messages with
their ids and client_ids, and every read and ack position, so clients' cursors and
retries mean the same on the new store.  The identity sequences are set past the
largest id SQLite ever handed out (deleted messages included), so no id is reused.
Each stream's messages carry their per-stream number (``seq``); a source without one
gets them numbered 1, 2, 3, ... in id order, which is the order they were committed.

The source is opened read-only, read in one transaction (a consistent snapshot) and
in chunks, off the event loop; its instance lock is held, so no server writes to it
meanwhile.  The target is written in one transaction: a failed migration leaves it
empty, ready for another try.  A target that already holds chatd rows is refused.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from chatd.dbfile import InstanceLock
from chatd.names import skeletons_of_key
from chatd.store import StoreError

CHUNK_ROWS = 5000  # rows read from SQLite and written to PostgreSQL at a time

# The tables in the order foreign keys need, each with the columns PostgreSQL gets.
USERS = ("id", "name", "name_key", "skeleton", "upper_skeleton", "password_hash",
         "created_at", "inbox_cursor", "inbox_seq")
TOKENS = ("digest", "user_id", "created_at", "expires_at")
CHANNELS = ("id", "name", "name_key", "skeleton", "upper_skeleton", "created_at", "last_seq")
MEMBERS = ("channel_id", "user_id", "joined_at", "read_cursor", "left_at")
PRIVATE = ("id", "sender_id", "recipient_id", "seq", "body", "created_at", "client_id")
CHANNEL_MESSAGES = ("id", "channel_id", "sender_id", "seq", "body", "created_at", "client_id")
# Holding a chatd row: the target is not empty.
CHATD_TABLES = ("users", "tokens", "channels", "channel_members", "private_messages",
                "channel_messages")


class MigrateError(Exception):
    """A refused or failed migration; the message is printed as is."""


@dataclass
class Report:
    copied: dict[str, int] = field(default_factory=dict)  # table -> rows

    def summary(self) -> str:
        return ", ".join(f"{rows} {table}" for table, rows in self.copied.items())


Progress = Callable[[str], None]


async def migrate(
    source: str, target: str, progress: Progress | None = None, chunk_rows: int = CHUNK_ROWS
) -> Report:
    """Copy the SQLite database at ``source`` into the empty PostgreSQL ``target``."""
    asyncpg = _driver(target)
    if not await asyncio.to_thread(os.path.isfile, source):
        raise MigrateError(f"no database at {source}")
    try:
        lock = await asyncio.to_thread(InstanceLock.acquire, source)
    except StoreError as exc:
        raise MigrateError(str(exc)) from exc
    try:
        reader = await asyncio.to_thread(Source.open, source)
        try:
            return await _copy(asyncpg, reader, target, progress or (lambda _: None),
                               chunk_rows)
        finally:
            await asyncio.to_thread(reader.close)
    finally:
        await asyncio.to_thread(lock.release)


def _driver(target: str) -> Any:
    from chatd.store import POSTGRES_EXTRA, is_postgres_url

    if not is_postgres_url(target):
        raise MigrateError(f"--to takes a postgresql://user@host:port/dbname URL, not {target!r}")
    try:
        import asyncpg
    except ImportError:
        raise MigrateError(
            f"migrating to PostgreSQL needs the asyncpg driver: {POSTGRES_EXTRA}"
        ) from None
    return asyncpg


async def _copy(asyncpg: Any, reader: Source, target: str, progress: Progress,
                chunk_rows: int) -> Report:
    from chatd.store.postgres import PostgresStore
    from chatd.urls import redact

    shown = redact(target)
    try:
        conn = await asyncpg.connect(target, timeout=10)
    except Exception as exc:
        raise MigrateError(f"cannot open database {shown}: {exc}") from exc
    try:
        await _require_empty(conn, shown)
        # The schema, made and versioned exactly as a server starting on it would.
        try:
            store = await PostgresStore.open(target, pool_size=1)
        except StoreError as exc:
            raise MigrateError(str(exc)) from exc
        await store.close()
        try:
            async with conn.transaction():
                # No server may write while we copy (one starting now waits for COMMIT).
                await conn.execute(f"LOCK TABLE {', '.join(CHATD_TABLES)} IN EXCLUSIVE MODE")
                await _require_empty(conn, shown)
                report = await Writer(conn, reader, progress, chunk_rows).copy_all()
        except (asyncpg.PostgresError, sqlite3.Error) as exc:  # e.g. rows a key refuses
            raise MigrateError(
                f"copying {reader.path} into {shown} failed, nothing was kept: {exc}"
            ) from exc
        await conn.execute("ANALYZE")  # the planner's statistics, before the first query
        return report
    finally:
        await conn.close()


async def _require_empty(conn: Any, shown: str) -> None:
    for table in CHATD_TABLES:
        if await conn.fetchval("SELECT to_regclass($1)", table) is None:
            continue
        if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
            raise MigrateError(
                f"{shown} is not empty (its {table} table has rows): chatd migrate only"
                " copies into an empty database; create a new one (createdb) or drop this one"
            )


class Source:
    """The SQLite database, read-only, in one read transaction; every call blocks."""

    def __init__(self, db: sqlite3.Connection, path: str) -> None:
        self.db = db
        self.path = path
        self.columns = {
            table: {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for table in CHATD_TABLES
        }

    @classmethod
    def open(cls, path: str) -> Source:
        try:
            db = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True,
                                 check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise MigrateError(f"cannot open {path}: {exc}") from exc
        try:
            db.execute("BEGIN")
            tables = {row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as exc:
            db.close()
            raise MigrateError(f"cannot read {path}: {exc}") from exc
        if missing := [t for t in CHATD_TABLES if t not in tables]:
            db.close()
            raise MigrateError(f"{path} is not a chatd database (no {', '.join(missing)} table)")
        return cls(db, path)

    def close(self) -> None:
        self.db.close()

    def has(self, table: str, column: str) -> bool:
        return column in self.columns[table]

    def column(self, table: str, column: str, default: str = "NULL") -> str:
        """The column's name if the source has it, else ``default`` (older schemas)."""
        return column if self.has(table, column) else default

    def rows(self, sql: str, size: int) -> Iterator[list[Any]]:
        """Lazily, ``size`` rows at a time: each fetch happens when the caller asks."""
        cursor = self.db.execute(sql)
        while True:
            yield cursor.fetchmany(size)

    def highest_ids(self) -> dict[str, int]:
        """AUTOINCREMENT's high-water mark per table: ids of deleted rows count too."""
        tables = {row[0] for row in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "sqlite_sequence" not in tables:
            return {}
        return {name: int(seq) for name, seq in
                self.db.execute("SELECT name, seq FROM sqlite_sequence")}


class Writer:
    def __init__(self, conn: Any, source: Source, progress: Progress, chunk_rows: int) -> None:
        self.conn = conn
        self.source = source
        self.progress = progress
        self.chunk_rows = chunk_rows
        self.report = Report()

    async def copy_all(self) -> Report:
        s = self.source
        await self.copy("users", USERS, (
            f"SELECT id, name, name_key, {s.column('users', 'skeleton')},"
            f" {s.column('users', 'upper_skeleton')}, password_hash, created_at,"
            f" inbox_cursor, {s.column('users', 'inbox_seq', '0')} FROM users ORDER BY id"
        ), _with_skeletons)
        await self.copy("tokens", TOKENS,
                        "SELECT digest, user_id, created_at, expires_at FROM tokens")
        await self.copy("channels", CHANNELS, (
            f"SELECT id, name, name_key, {s.column('channels', 'skeleton')},"
            f" {s.column('channels', 'upper_skeleton')}, created_at,"
            f" {s.column('channels', 'last_seq', '0')} FROM channels ORDER BY id"
        ), _with_skeletons)
        await self.copy("channel_members", MEMBERS, (
            "SELECT channel_id, user_id, joined_at, read_cursor,"
            f" {s.column('channel_members', 'left_at')} FROM channel_members"
        ))
        await self.copy_messages("private_messages", PRIVATE, "recipient_id")
        await self.copy_messages("channel_messages", CHANNEL_MESSAGES, "channel_id")
        await self.set_heads_and_sequences()
        return self.report

    async def copy(
        self, table: str, columns: Sequence[str], sql: str,
        convert: Callable[[list[Any]], list[Any]] | None = None,
    ) -> None:
        chunks = self.source.rows(sql, self.chunk_rows)
        copied = 0
        while rows := await asyncio.to_thread(_next_chunk, chunks, convert):
            await self.conn.copy_records_to_table(table, records=rows, columns=list(columns))
            copied += len(rows)
        self.report.copied[table] = copied
        self.progress(f"copied {copied} {table}")

    async def copy_messages(self, table: str, columns: Sequence[str], stream: str) -> None:
        numbered = self.source.has(table, "seq")
        seq = "seq" if numbered else "0"
        sql = (f"SELECT id, {columns[1]}, {columns[2]}, {seq}, body, created_at, client_id"
               f" FROM {table} ORDER BY id")
        stream_at = columns.index(stream)
        heads: dict[int, int] = {}

        def number(rows: list[Any]) -> list[Any]:
            out = []
            for row in rows:
                if not numbered:  # id order is commit order: number each stream by it
                    row[3] = heads[row[stream_at]] = heads.get(row[stream_at], 0) + 1
                row[4] = row[4].encode()
                row[6] = None if row[6] is None else row[6].encode()
                out.append(tuple(row))
            return out

        await self.copy(table, columns, sql, number)

    async def set_heads_and_sequences(self) -> None:
        # Each stream's head: its newest seq (or the source's head if that is higher).
        for table, stream_table, head, stream in (
            ("private_messages", "users", "inbox_seq", "recipient_id"),
            ("channel_messages", "channels", "last_seq", "channel_id"),
        ):
            await self.conn.execute(
                f"UPDATE {stream_table} t SET {head} = GREATEST(t.{head}, s.top)"
                f" FROM (SELECT {stream}, max(seq) AS top FROM {table} GROUP BY {stream}) s"
                f" WHERE t.id = s.{stream}"
            )
        handed_out = await asyncio.to_thread(self.source.highest_ids)
        for table in ("users", "channels", "private_messages", "channel_messages"):
            top = max(handed_out.get(table, 0),
                      await self.conn.fetchval(f"SELECT coalesce(max(id), 0) FROM {table}"))
            # setval(seq, n, true): the next id is n + 1; for n = 0 the next is 1.
            await self.conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), $1, $2)",
                max(top, 1), top > 0,
            )


def _next_chunk(
    chunks: Iterator[list[Any]], convert: Callable[[list[Any]], list[Any]] | None
) -> list[Any]:
    rows = [list(row) for row in next(chunks)]
    return convert(rows) if convert is not None else [tuple(row) for row in rows]


def _with_skeletons(rows: list[Any]) -> list[Any]:
    """Skeletons for names stored before chatd kept them (columns 3 and 4, from the key)."""
    for row in rows:
        if row[3] is None or row[4] is None:
            row[3], row[4] = skeletons_of_key(row[2])
    return [tuple(row) for row in rows]
