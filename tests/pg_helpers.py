"""A fresh PostgreSQL database for a test, and the rule for when PostgreSQL is absent.

Tests get their own database ``chatd_test_<random>`` on the server of
CHATD_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/test), dropped
afterwards.  Where that server or the asyncpg driver is missing the test is skipped
with the reason, unless CHATD_REQUIRE_POSTGRES=1 (CI sets it): then it fails.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

SERVER_URL = os.environ.get("CHATD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRED = os.environ.get("CHATD_REQUIRE_POSTGRES") == "1"


def unavailable(reason: str) -> NoReturn:
    if REQUIRED:
        pytest.fail(f"{reason} (CHATD_REQUIRE_POSTGRES=1 makes this a failure)")
    pytest.skip(f"{reason} (set CHATD_REQUIRE_POSTGRES=1 to fail instead)")


def database_url(name: str) -> str:
    """SERVER_URL with its database replaced by ``name``."""
    return urlunsplit(urlsplit(SERVER_URL)._replace(path=f"/{name}"))


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """The URL of a new, empty database, dropped (with any connection left) on exit."""
    try:
        import asyncpg
    except ImportError:
        unavailable("asyncpg is not installed: pip install 'chatd[postgresql]'")
    try:
        admin = await asyncpg.connect(SERVER_URL, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        unavailable(f"PostgreSQL is unreachable at {SERVER_URL}: {exc}")
    name = f"chatd_test_{secrets.token_hex(6)}"
    try:
        try:
            # A natural-language collation (as most installations have), so that tests
            # catch an ORDER BY that would not sort as SQLite does.
            await admin.execute(
                f"CREATE DATABASE \"{name}\" TEMPLATE template0"
                " LOCALE_PROVIDER icu ICU_LOCALE 'en' LOCALE 'C.UTF-8'"
            )
        except asyncpg.PostgresError:  # a server built without ICU
            await admin.execute(f'CREATE DATABASE "{name}"')
        yield database_url(name)
    finally:
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
