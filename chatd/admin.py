"""``chatd backup``, ``chatd admin`` and ``chatd init``: what an operator needs, run
against the database (``--db``: a SQLite file or a ``postgresql://`` URL).

Backup and admin work while the server runs (SQLite WAL lets both use the file;
they do not take the server's instance lock, chatd/dbfile.py).  Admin asks the store
only what chatd.store.MessageStore offers, so it works on either store.  Backing up
PostgreSQL is pg_dump's job: ``chatd backup`` runs it (or, without it, names the command).  Revoking
tokens or deleting a user ends that user's live sessions within
``token_recheck`` seconds (protocol.md, "Authentication and sessions").
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TextIO
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from chatd import store as store_module
from chatd.auth import Hasher
from chatd.config import Config
from chatd.dbfile import InstanceLock
from chatd.protocol import format_datetime
from chatd.store import MessageStore, Store, StoreError, User, is_postgres_url
from chatd.store import open_store as open_any_store
from chatd.validation import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH, name_key


class AdminError(Exception):
    """A failed operation; the message is printed as is."""


def backup(config: Config, target: str) -> str:
    if os.path.exists(target):
        raise AdminError(f"{target} exists; choose a new file name")
    if is_postgres_url(config.db):
        return postgres_backup(config.db, target)
    require_database(config)
    try:
        store_module.backup(config.db, target)
    except Exception as exc:
        raise AdminError(f"backup failed: {exc}") from exc
    return f"backed up {config.db} to {target}"


def postgres_backup(url: str, target: str) -> str:
    """A PostgreSQL database is backed up by pg_dump (a consistent snapshot while chatd
    serves): run it when installed; otherwise fail, naming the command, so that a backup
    job never reports success for a backup that was not made."""
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise AdminError(f"pg_dump is not installed. {postgres_backup_advice(url, target)}")
    # The password goes through the environment, never the process list.
    env = {**os.environ, **({"PGPASSWORD": p} if (p := urlsplit(url).password) else {})}
    done = subprocess.run(
        [pg_dump, "--format=custom", f"--file={target}", without_password(url)],
        env=env, capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            os.remove(target)  # never leave half a dump where a backup is expected
        raise AdminError(f"pg_dump failed: {done.stderr.strip()}")
    return (
        f"backed up {without_password(url)} to {target} with pg_dump; restore it into a new,"
        f" empty database with: pg_restore --dbname=NEW_DATABASE_URL {shlex.quote(target)}"
    )


def postgres_backup_advice(url: str, target: str) -> str:
    """The exact pg_dump command (and its restore), for when pg_dump is not installed here.

    A password in the URL is left out of the printed command (give it through PGPASSWORD
    or ~/.pgpass).
    """
    url = without_password(url)
    return (
        "Install the PostgreSQL client tools, or run where they are:\n"
        f"  pg_dump --format=custom --file={shlex.quote(target)} {shlex.quote(url)}\n"
        "and to restore it into a new, empty database:\n"
        f"  pg_restore --dbname=NEW_DATABASE_URL {shlex.quote(target)}"
    )


async def init_database(config: Config) -> str:
    """Create a new, empty database: the explicit way to start over once one went missing.

    Takes the server's instance lock, so it is refused while a server runs.  On
    PostgreSQL the database itself is the operator's (createdb): init creates chatd's
    tables in it, as a server starting on it would.
    """
    if is_postgres_url(config.db):
        store = await open_store(config)
        await store.close()
        return f"chatd's tables are ready in {without_password(config.db)}"
    try:
        lock = await asyncio.to_thread(InstanceLock.acquire, config.db)
    except StoreError as exc:
        raise AdminError(str(exc)) from exc
    try:
        for leftover in (config.db, config.db + "-wal", config.db + "-shm"):
            if await asyncio.to_thread(os.path.exists, leftover):
                raise AdminError(
                    f"{leftover} exists: chatd init only creates a database where there is"
                    " none (move the old files away first)"
                )
        store = await open_store(config)
        await store.close()
        await asyncio.to_thread(lock.record_database)
    finally:
        await asyncio.to_thread(lock.release)
    return f"created a new, empty database at {config.db}"


async def list_users(store: MessageStore, out: TextIO) -> None:
    users = await store.list_users(time.time())
    print(f"{'name':<32}  {'registered (UTC)':<19}  tokens", file=out)
    for name, created_at, tokens in users:
        print(f"{name:<32}  {format_datetime(created_at):<19}  {tokens}", file=out)


async def reset_password(
    store: MessageStore, config: Config, name: str, read_password: Callable[[], str]
) -> str:
    user = await _user(store, name)
    password = read_password()
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise AdminError(
            f"a password has {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters"
        )
    hasher = Hasher(config)
    try:
        await store.set_password_hash(user.id, await hasher.hash(password))
    finally:
        hasher.close()
    revoked = await store.revoke_tokens(user.id)
    return f"password of {user.name} reset; {revoked} session token(s) revoked"


async def revoke_tokens(store: MessageStore, name: str) -> str:
    user = await _user(store, name)
    return f"{await store.revoke_tokens(user.id)} session token(s) of {user.name} revoked"


async def delete_user(store: MessageStore, name: str) -> str:
    user = await _user(store, name)
    await store.delete_user(user.id)
    return f"deleted {user.name} and their messages, memberships and tokens"


async def _user(store: MessageStore, name: str) -> User:
    user = await store.find_user(name_key(name))
    if user is None:
        raise AdminError(f"no user named {name!r}")
    return user


def without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = quote(unquote(parts.username or ""), safe="")
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}" if user else netloc))


def read_new_password(stdin: TextIO = sys.stdin) -> str:
    """Twice at a prompt on a terminal; otherwise the first line of stdin (for scripts)."""
    if stdin.isatty():
        first = getpass.getpass("new password: ")
        if getpass.getpass("again: ") != first:
            raise AdminError("the passwords differ")
        return first
    return stdin.readline().rstrip("\n")


def require_database(config: Config) -> None:
    """Operations work on an existing database: a mistyped path must not create one.

    A URL is no path: PostgreSQL refuses to connect to a database that does not exist.
    """
    if is_postgres_url(config.db):
        return
    if not os.path.exists(config.db):
        raise AdminError(f"no database at {config.db}")


async def open_store(config: Config) -> MessageStore:
    """The existing database (callers check it exists: a typo must not create a new one)."""
    try:
        if is_postgres_url(config.db):
            return await open_any_store(config.db, config)
        return await Store.open(config.db, config.db_synchronous, config.db_busy_timeout)
    except StoreError as exc:
        raise AdminError(str(exc)) from exc
