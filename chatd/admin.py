"""``chatd backup``, ``chatd admin`` and ``chatd init``: what an operator needs, run
against the database file.

Backup and admin work while the server runs (SQLite WAL lets both use the file;
they do not take the server's instance lock, chatd/dbfile.py).  Revoking
tokens or deleting a user ends that user's live sessions within
``token_recheck`` seconds (protocol.md, "Authentication and sessions").
"""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from chatd import store as store_module
from chatd.auth import Hasher
from chatd.config import Config
from chatd.dbfile import InstanceLock
from chatd.protocol import format_datetime
from chatd.store import Store, StoreError, User
from chatd.validation import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH, name_key


class AdminError(Exception):
    """A failed operation; the message is printed as is."""


def backup(config: Config, target: str) -> str:
    if os.path.exists(target):
        raise AdminError(f"{target} exists; choose a new file name")
    require_database(config)
    try:
        store_module.backup(config.db, target)
    except Exception as exc:
        raise AdminError(f"backup failed: {exc}") from exc
    return f"backed up {config.db} to {target}"


async def init_database(config: Config) -> str:
    """Create a new, empty database: the explicit way to start over once one went missing.

    Takes the server's instance lock, so it is refused while a server runs.
    """
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


async def list_users(store: Store, out: TextIO) -> None:
    users = await store.list_users(time.time())
    print(f"{'name':<32}  {'registered (UTC)':<19}  tokens", file=out)
    for name, created_at, tokens in users:
        print(f"{name:<32}  {format_datetime(created_at):<19}  {tokens}", file=out)


async def reset_password(
    store: Store, config: Config, name: str, read_password: Callable[[], str]
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


async def revoke_tokens(store: Store, name: str) -> str:
    user = await _user(store, name)
    return f"{await store.revoke_tokens(user.id)} session token(s) of {user.name} revoked"


async def delete_user(store: Store, name: str) -> str:
    user = await _user(store, name)
    await store.delete_user(user.id)
    return f"deleted {user.name} and their messages, memberships and tokens"


async def _user(store: Store, name: str) -> User:
    user = await store.find_user(name_key(name))
    if user is None:
        raise AdminError(f"no user named {name!r}")
    return user


def read_new_password(stdin: TextIO = sys.stdin) -> str:
    """Twice at a prompt on a terminal; otherwise the first line of stdin (for scripts)."""
    if stdin.isatty():
        first = getpass.getpass("new password: ")
        if getpass.getpass("again: ") != first:
            raise AdminError("the passwords differ")
        return first
    return stdin.readline().rstrip("\n")


def require_database(config: Config) -> None:
    """Operations work on an existing database: a mistyped path must not create one."""
    if not os.path.exists(config.db):
        raise AdminError(f"no database at {config.db}")


async def open_store(config: Config) -> Store:
    """The existing database (callers check it exists: a typo must not create a new one)."""
    try:
        return await Store.open(config.db, config.db_synchronous, config.db_busy_timeout)
    except StoreError as exc:
        raise AdminError(str(exc)) from exc
