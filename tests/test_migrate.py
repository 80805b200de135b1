"""``chatd migrate``: a SQLite database made by a real server, copied into PostgreSQL, and
a real server on each answering the same requests the same way.

Skipped where PostgreSQL is absent, failed instead with CHATD_REQUIRE_POSTGRES=1
(tests/pg_helpers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from chatd import admin
from chatd.client import Client
from chatd.config import Config
from chatd.migrate import MigrateError, migrate
from tests.conftest import PASSWORD, TEST_SETTINGS, Harness
from tests.test_operations import chatd_command

NEW_PASSWORD = "a password set by admin"


async def build_history(harness: Harness) -> dict[str, str]:
    """A database with a bit of everything, made through the server; returns users' tokens."""
    ann, bob, carol = [await harness.user(n) for n in ("ann", "Bob", "carol")]
    gone = await harness.user("gone")
    for i in range(5):
        await ann.request("/send", {"name": "bob", "msg": f"dm {i}", "client_id": f"a{i}"})
        await bob.request("/send", {"name": "ann", "msg": f"re {i}"})
    await carol.request("/send", {"name": "ann", "msg": "nul\x00 and \U0001f600"})
    await gone.request("/send", {"name": "bob", "msg": "from someone who leaves"})
    await bob.request("/receive")  # bob's inbox cursor moves past everything so far
    await ann.request("/ack", {"id": 4})
    for client, channel in ((ann, "Lobby"), (bob, "lobby"), (carol, "lobby"), (ann, "dev"),
                            (gone, "dev"), (carol, "dev"), (carol, "quiet")):
        await client.request("/channel/join", {"name": channel})
    for i in range(7):
        await ann.request("/channel/send", {"name": "lobby", "message": f"m{i}",
                                            "client_id": f"c{i}"})
        await carol.request("/channel/send", {"name": "dev" if i % 2 else "lobby",
                                              "message": f"c{i}"})
    await gone.request("/channel/send", {"name": "dev", "message": "last words"})
    await bob.request("/channel/receive", {"name": "lobby", "limit": 4})
    await carol.request("/ack", {"channel": "lobby", "id": 3})
    await carol.request("/channel/leave", {"name": "quiet"})
    await bob.request("/channel/leave", {"name": "lobby"})
    tokens = {"ann": ann.token, "bob": bob.token, "carol": carol.token}
    # Deleted: its ids are gone but were handed out, and must not be handed out again.
    store = await admin.open_store(harness.config)
    try:
        await admin.delete_user(store, "gone")
        await admin.revoke_tokens(store, "carol")  # carol's old token no longer logs in
        await admin.reset_password(store, harness.config, "ann", lambda: NEW_PASSWORD)
    finally:
        await store.close()
    assert all(tokens.values())
    return {name: token for name, token in tokens.items() if token is not None}


class Probe:
    """Replies to the same requests, recorded; new session tokens masked."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.lines: list[Any] = []

    async def call(self, client: Client, op: str, params: dict[str, Any] | None = None) -> Any:
        reply = await client.call(op, params)
        reply.pop("id", None)
        if op == "/login" and reply["code"] == 0:
            reply["data"]["token"] = "*"
        if params and "new" in (params.get("msg"), params.get("message")):
            reply["data"]["datetime"] = "*"  # sent now: the only time that differs
        self.lines.append((op, params, reply))
        return reply.get("data")

    async def push(self, client: Client) -> None:
        event = await client.next_event(timeout=10)
        self.lines.append(("push", {**event, "data": {**event["data"], "datetime": "*"}}))

    async def login(self, name: str, password: str) -> Client:
        client = await self.harness.connect()
        await self.call(client, "/login", {"name": name, "password": password})
        return client


async def same_requests(harness: Harness, tokens: dict[str, str]) -> list[Any]:
    p = Probe(harness)
    old_ann = await p.harness.connect(token=tokens["ann"])  # revoked by reset-password
    await p.call(old_ann, "/receive")
    bob = await p.harness.connect(token=tokens["bob"])  # still valid
    carol = await p.harness.connect(token=tokens["carol"])  # revoked
    await p.call(carol, "/channel/list")
    await p.login("ann", PASSWORD)  # the old password: refused
    ann = await p.login("ann", NEW_PASSWORD)
    carol = await p.login("carol", PASSWORD)
    for name in ("ann", "BOB", "carol", "gone"):
        await p.call(bob, "/user/info", {"name": name})
    for client in (ann, bob, carol):
        await p.call(client, "/channel/list")
    await p.call(bob, "/history", {"name": "ann", "limit": 3})
    await p.call(bob, "/history", {"name": "ann", "before": 6, "limit": 3})
    await p.call(ann, "/history", {"name": "carol"})
    await p.call(carol, "/channel/history", {"name": "lobby", "limit": 4})
    await p.call(carol, "/channel/history", {"name": "dev", "before": 12})
    await p.call(ann, "/receive", {"limit": 2})
    await p.call(ann, "/receive")
    await p.call(bob, "/receive")
    await p.call(ann, "/channel/receive", {"name": "lobby", "limit": 5})
    await p.call(carol, "/channel/receive", {"name": "lobby"})
    await p.call(carol, "/channel/receive", {"name": "quiet"})  # left: forbidden
    await p.call(bob, "/channel/receive", {"name": "lobby"})  # left: forbidden
    await p.call(carol, "/channel/list_users", {"name": "dev"})
    # Retried sends are recognised; new ones get the ids SQLite would have given.
    await p.call(ann, "/send", {"name": "bob", "msg": "dm 2", "client_id": "a2"})
    await p.call(ann, "/channel/send", {"name": "lobby", "message": "m0", "client_id": "c0"})
    await p.call(bob, "/subscribe")
    await p.call(ann, "/send", {"name": "bob", "msg": "new", "client_id": "a9"})
    await p.push(bob)
    await p.call(bob, "/channel/join", {"name": "lobby"})
    await p.call(ann, "/channel/send", {"name": "lobby", "message": "new"})
    await p.push(bob)
    await p.call(carol, "/channel/join", {"name": "fresh"})
    await p.call(carol, "/register", {"name": "dave", "password": PASSWORD,
                                      "password_repete": PASSWORD})
    await p.call(carol, "/register", {"name": "B0B", "password": PASSWORD,
                                      "password_repete": PASSWORD})  # a look-alike
    await p.login("dave", PASSWORD)
    return p.lines


async def test_a_migrated_database_answers_as_the_sqlite_one(
    harness: Harness, pg_url: str
) -> None:
    tokens = await build_history(harness)
    await harness.stop()  # migrate takes the file's lock: the server must be stopped
    report = await migrate(harness.config.db, pg_url, chunk_rows=4)  # many chunks
    assert report.copied == {
        "users": 3, "tokens": 1, "channels": 3, "channel_members": 6,
        "private_messages": 11, "channel_messages": 14,
    }
    on_postgres = Harness(dataclasses.replace(harness.config, db=pg_url, port=0))
    await on_postgres.start()
    try:
        await harness.restart()
        sqlite_lines = await same_requests(harness, tokens)
        postgres_lines = await same_requests(on_postgres, tokens)
    finally:
        await on_postgres.stop()
    codes = [line[2]["code"] for line in sqlite_lines if line[0] != "push"]
    assert codes.count(0) > 25 and {3, 5} <= set(codes)
    for sqlite_line, postgres_line in zip(sqlite_lines, postgres_lines, strict=True):
        assert postgres_line == sqlite_line


async def test_streams_keep_the_sources_numbers(harness: Harness, pg_url: str) -> None:
    """A source with per-stream seqs keeps them and its heads (a head can be past the last
    message left: a deleted user's); one made before them gets each stream numbered 1, 2,
    3, ... in id order, its head at the last."""
    await build_history(harness)
    await harness.stop()
    await migrate(harness.config.db, pg_url)
    import asyncpg

    conn = await asyncpg.connect(pg_url)
    source = sqlite3.connect(harness.config.db)
    try:
        for table, stream, heads, head in (
            ("private_messages", "recipient_id", "users", "inbox_seq"),
            ("channel_messages", "channel_id", "channels", "last_seq"),
        ):
            rows = [tuple(row) for row in
                    await conn.fetch(f"SELECT id, {stream}, seq FROM {table} ORDER BY id")]
            tops = dict(await conn.fetch(f"SELECT id, {head} FROM {heads}"))
            if "seq" in {column[1] for column in source.execute(f"PRAGMA table_info({table})")}:
                assert rows == source.execute(
                    f"SELECT id, {stream}, seq FROM {table} ORDER BY id").fetchall()
                assert tops == dict(source.execute(f"SELECT id, {head} FROM {heads}"))
                continue
            by_stream: dict[int, list[int]] = {}
            for _, stream_id, seq in rows:
                by_stream.setdefault(stream_id, []).append(seq)
            for seqs in by_stream.values():
                assert seqs == list(range(1, len(seqs) + 1))
            assert tops == {stream_id: len(by_stream.get(stream_id, [])) for stream_id in tops}
    finally:
        source.close()
        await conn.close()


async def test_a_non_empty_target_is_refused_and_left_alone(
    harness: Harness, pg_url: str
) -> None:
    await build_history(harness)
    await harness.stop()
    await migrate(harness.config.db, pg_url)
    with pytest.raises(MigrateError, match=r"is not empty .* users table has rows"):
        await migrate(harness.config.db, pg_url)
    # And through the command: one line, exit status 1.
    status, _, err = await chatd_command("migrate", "--from", harness.config.db, "--to", pg_url)
    assert status == 1 and "not empty" in err and err.count("\n") == 1


async def test_the_command_copies_and_says_what(harness: Harness, pg_url: str) -> None:
    await harness.user("ann")
    await harness.stop()
    status, out, err = await chatd_command("migrate", "--from", harness.config.db, "--to", pg_url)
    assert status == 0, err
    assert "1 users" in out and f"--db {pg_url}" in out
    assert "copied 1 users" in err


async def test_a_running_server_blocks_migration(harness: Harness, pg_url: str) -> None:
    with pytest.raises(MigrateError, match="another chatd is serving"):
        await migrate(harness.config.db, pg_url)


async def test_bad_sources_and_targets_are_refused(
    harness: Harness, tmp_path: Path, pg_url: str
) -> None:
    await harness.stop()
    chatd_db = harness.config.db
    missing = str(tmp_path / "typo.sqlite3")
    with pytest.raises(MigrateError, match="no database at"):
        await migrate(missing, pg_url)
    assert not await asyncio.to_thread(Path(missing).exists)
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (id INTEGER)")
    with pytest.raises(MigrateError, match="not a chatd database"):
        await migrate(str(other), pg_url)
    with pytest.raises(MigrateError, match="postgresql://user@host:port/dbname URL"):
        await migrate(chatd_db, str(tmp_path / "copy.sqlite3"))
    with pytest.raises(MigrateError, match="cannot open database"):
        await migrate(chatd_db, "postgresql://nobody@127.0.0.1:1/nothing")
    status, _, err = await chatd_command("migrate", "--from", missing)
    assert status == 2 and "--to" in err


def first_schema_database(directory: Path, messages: list[tuple[int, int, str]]) -> Path:
    """Users ann (1) and Bob (2) and ``messages`` (sender, recipient, text), in schema 1."""
    from argon2 import PasswordHasher

    from chatd.store import MIGRATIONS

    first_schema = MIGRATIONS[0]
    assert isinstance(first_schema, str)
    password_hash = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)
    path = directory / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(first_schema)
        db.execute("PRAGMA user_version = 1")
        db.executemany(
            "INSERT INTO users (id, name, name_key, password_hash, created_at) VALUES (?,?,?,?,0)",
            [(1, "ann", "ann", password_hash), (2, "Bob", "bob", password_hash)],
        )
        db.executemany(
            "INSERT INTO private_messages (sender_id, recipient_id, body, created_at)"
            " VALUES (?, ?, ?, 0)",
            messages,
        )
    return path


async def test_a_first_schema_database_migrates_with_what_later_schemas_added(
    tmp_path: Path, pg_url: str
) -> None:
    """Schema 1 had no left_at, no skeletons, no per-stream seq: all are made on the way."""
    old = first_schema_database(tmp_path, [(1, 2, "one"), (2, 1, "two"), (1, 2, "three")])
    await migrate(str(old), pg_url)
    import asyncpg

    conn = await asyncpg.connect(pg_url)
    try:  # numbered per inbox in id order, each inbox's head at its last
        assert [tuple(row) for row in await conn.fetch(
            "SELECT id, recipient_id, seq FROM private_messages ORDER BY id")] == [
            (1, 2, 1), (2, 1, 1), (3, 2, 2)]
        assert dict(await conn.fetch("SELECT id, inbox_seq FROM users")) == {1: 1, 2: 2}
    finally:
        await conn.close()
    harness = Harness(Config(host="127.0.0.1", port=0, db=pg_url, **TEST_SETTINGS))
    await harness.start()
    try:
        bob = await harness.connect()
        await bob.login("bob", PASSWORD)
        await bob.request("/subscribe")
        pushed = [(await bob.next_event(timeout=10))["data"] for _ in range(2)]
        assert [(m["id"], m["msg"]) for m in pushed] == [(1, "one"), (3, "three")]
        ann = await harness.connect()
        await ann.login("ann", PASSWORD)
        sent = await ann.request("/send", {"name": "bob", "msg": "four"})
        assert sent["id"] == 4
        assert (await bob.next_event(timeout=10))["data"]["msg"] == "four"
        # The skeletons were computed: a look-alike of bob is refused.
        look_alike = {"name": "B0B", "password": PASSWORD, "password_repete": PASSWORD}
        assert (await ann.call("/register", look_alike))["code"] != 0
    finally:
        await harness.stop()


async def test_a_failed_copy_keeps_nothing(tmp_path: Path, pg_url: str) -> None:
    # Foreign keys were not enforced on this file: a token of a user who is not there.
    broken = first_schema_database(tmp_path, [(1, 2, "fine")])
    with contextlib.closing(sqlite3.connect(broken)) as db, db:
        db.execute("INSERT INTO tokens VALUES (?, 7, 0, 1e12)", (b"\x01" * 32,))
    with pytest.raises(MigrateError, match=r"failed, nothing was kept: .*foreign key"):
        await migrate(str(broken), pg_url)
    import asyncpg

    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM users") == 0
    finally:
        await conn.close()
    with contextlib.closing(sqlite3.connect(broken)) as db, db:
        db.execute("DELETE FROM tokens WHERE user_id = 7")
    report = await migrate(str(broken), pg_url)  # the target is still empty: try again
    assert report.copied["private_messages"] == 1


FIXTURE_V4 = Path(__file__).parent / "fixtures" / "chatd-v4.sqlite3"


async def test_a_file_of_the_code_before_seqs_is_numbered_as_sqlite_numbers_it(
    tmp_path: Path, pg_url: str
) -> None:
    """The v4 fixture (made by main's Store before per-stream seqs), migrated as it is,
    gets the seqs and heads that SQLite's own in-place migration gives it; and migrate
    only read it."""
    from chatd.store import Store

    source, upgraded = tmp_path / "source.sqlite3", tmp_path / "upgraded.sqlite3"
    for copy in (source, upgraded):
        await asyncio.to_thread(shutil.copyfile, FIXTURE_V4, copy)
    await migrate(str(source), pg_url)
    assert await asyncio.to_thread(source.read_bytes) == FIXTURE_V4.read_bytes()
    store = await Store.open(str(upgraded))  # numbers the streams in place
    await store.close()
    import asyncpg

    conn = await asyncpg.connect(pg_url)
    sqlite = sqlite3.connect(upgraded)
    try:
        for sql in (
            "SELECT id, recipient_id, seq FROM private_messages ORDER BY id",
            "SELECT id, channel_id, seq FROM channel_messages ORDER BY id",
            "SELECT id, inbox_seq FROM users ORDER BY id",
            "SELECT id, last_seq FROM channels ORDER BY id",
            "SELECT channel_id, user_id, read_cursor, left_at FROM channel_members"
            " ORDER BY channel_id, user_id",
            "SELECT id, inbox_cursor, password_hash FROM users ORDER BY id",
        ):
            assert [tuple(row) for row in await conn.fetch(sql)] == sqlite.execute(sql).fetchall()
    finally:
        sqlite.close()
        await conn.close()
