"""``chatd admin``, ``chatd backup`` and ``chatd init`` with ``--db postgresql://...``: the
real commands against a real server on a real PostgreSQL database.

Skipped where PostgreSQL is absent, failed instead with CHATD_REQUIRE_POSTGRES=1
(tests/pg_helpers.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatd.admin import AdminError, backup
from chatd.config import Config
from chatd.errors import NotAuthenticated
from tests.conftest import PASSWORD, TEST_SETTINGS, Harness
from tests.test_operations import chatd_command


@pytest.fixture
async def pg_harness(pg_url: str) -> AsyncIterator[Harness]:
    # token_recheck=0: revoked sessions end at the next request.
    config = Config(host="127.0.0.1", port=0, db=pg_url, token_recheck=0, **TEST_SETTINGS)
    harness = Harness(config)
    await harness.start()
    yield harness
    await harness.stop()


async def test_admin_lists_users_and_revokes_tokens(pg_harness: Harness) -> None:
    alice = await pg_harness.user("alice")
    await pg_harness.user("Bob")
    db = pg_harness.config.db
    status, out, err = await chatd_command("admin", "users", "--db", db)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["name", "registered", "(UTC)", "tokens"]
    assert [(line.split()[0], line.split()[-1]) for line in lines[1:]] == [
        ("alice", "1"), ("Bob", "1")
    ]
    status, out, _ = await chatd_command("--db", db, "admin", "revoke-tokens", "ALICE")
    assert status == 0 and "1 session token(s) of alice revoked" in out
    with pytest.raises(NotAuthenticated):
        await alice.request("/user/info", {"name": "bob"})
    status, _, err = await chatd_command("admin", "revoke-tokens", "nobody", "--db", db)
    assert status == 1 and "no user named 'nobody'" in err


async def test_admin_resets_a_password(pg_harness: Harness) -> None:
    alice = await pg_harness.user("alice")
    db = pg_harness.config.db
    status, out, err = await chatd_command(
        "admin", "reset-password", "alice", "--db", db, stdin="a brand new password\n"
    )
    assert status == 0 and "1 session token(s) revoked" in out, err
    with pytest.raises(NotAuthenticated):
        await alice.request("/channel/list")
    fresh = await pg_harness.connect()
    assert (await fresh.call("/login", {"name": "alice", "password": PASSWORD}))["code"] == 3
    await fresh.login("alice", "a brand new password")


async def test_admin_deletes_a_user_and_their_data(pg_harness: Harness) -> None:
    alice = await pg_harness.user("alice")
    bob = await pg_harness.user("bob")
    await alice.request("/send", {"name": "bob", "msg": "from alice"})
    await alice.request("/channel/send", {"name": "dev", "message": "alice was here"})
    await bob.request("/channel/send", {"name": "dev", "message": "bob too"})
    db = pg_harness.config.db
    status, out, err = await chatd_command("admin", "delete-user", "alice", "--yes", "--db", db)
    assert status == 0 and "deleted alice" in out, err
    assert (await bob.request("/receive"))["messages"] == {}
    history = await bob.request("/channel/history", {"name": "dev"})
    assert [m["msg"] for m in history["messages"]] == ["bob too"]
    assert (await bob.call("/user/info", {"name": "alice"}))["code"] == 5


async def test_backup_runs_pg_dump_and_the_dump_restores(
    tmp_path: Path, pg_harness: Harness
) -> None:
    if shutil.which("pg_dump") is None or shutil.which("pg_restore") is None:
        pytest.skip("the PostgreSQL client tools (pg_dump, pg_restore) are not installed")
    await pg_harness.user("alice")
    target = tmp_path / "chatd.dump"
    url = pg_harness.config.db
    status, out, err = await chatd_command("backup", str(target), "--db", url)
    assert status == 0, err
    assert f"backed up {url} to {target} with pg_dump" in out
    listing = await asyncio.to_thread(
        subprocess.run, ["pg_restore", "--list", str(target)],
        capture_output=True, text=True, check=True,
    )
    assert "TABLE DATA public users" in listing.stdout
    # A second run refuses to overwrite the backup it made.
    status, _, err = await chatd_command("backup", str(target), "--db", url)
    assert status == 1 and "exists" in err


async def test_backup_without_pg_dump_fails_and_names_the_command(
    tmp_path: Path, pg_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no pg_dump to be found
    target = tmp_path / "chatd.dump"
    url = pg_harness.config.db
    with pytest.raises(AdminError) as failure:
        backup(dataclasses.replace(pg_harness.config, db=url), str(target))
    assert "pg_dump is not installed" in str(failure.value)
    assert f"pg_dump --format=custom --file={target} {url}" in str(failure.value)
    assert not await asyncio.to_thread(target.exists)


async def test_backup_leaves_a_password_out_of_the_command() -> None:
    from chatd.admin import postgres_backup_advice

    advice = postgres_backup_advice("postgresql://ann:s3cret@db.example:5433/chat", "x.dump")
    assert "s3cret" not in advice
    assert "pg_dump --format=custom --file=x.dump postgresql://ann@db.example:5433/chat" in advice


async def test_init_creates_the_tables_and_a_server_starts_on_them(pg_url: str) -> None:
    status, out, err = await chatd_command("init", "--db", pg_url)
    assert status == 0 and "chatd's tables are ready" in out, err
    # The database is a chatd database now: admin finds it (empty), a server serves it.
    status, out, err = await chatd_command("admin", "users", "--db", pg_url)
    assert status == 0 and out.splitlines()[1:] == [], err
    harness = Harness(Config(host="127.0.0.1", port=0, db=pg_url, **TEST_SETTINGS))
    await harness.start()
    try:
        await harness.user("alice")
    finally:
        await harness.stop()


async def test_admin_on_a_missing_postgres_database_says_so(pg_url: str) -> None:
    missing = pg_url + "_typo"
    status, _, err = await chatd_command("admin", "users", "--db", missing)
    assert status == 1
    assert "no database at" not in err  # a URL is not a path
    assert "cannot open database" in err and "does not exist" in err
