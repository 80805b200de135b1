"""Password hashing and session tokens.

argon2id is deliberately slow (tens of milliseconds, 64 MiB by default), so
every hash and verify runs in a small dedicated thread pool: the event loop
keeps serving other clients, and at most ``hash_workers`` hashes are in memory
at once however many logins arrive together.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from chatd.config import Config
from chatd.errors import RateLimited

TOKEN_BYTES = 32
P = ParamSpec("P")
R = TypeVar("R")


def new_token() -> str:
    """32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> bytes:
    """What the database keeps instead of the token: a leaked table grants no session.

    A fast hash suffices here (unlike passwords) because tokens carry 256 bits of entropy.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    new_hash: str | None = None  # set when the stored hash used outdated parameters


class Hasher:
    def __init__(self, config: Config) -> None:
        self._hasher = PasswordHasher(
            time_cost=config.argon2_time_cost,
            memory_cost=config.argon2_memory_cost,
            parallelism=config.argon2_parallelism,
            type=Type.ID,
        )
        self._pool = ThreadPoolExecutor(config.hash_workers, thread_name_prefix="chatd-argon2")
        self._queue_limit = config.hash_queue
        self._queued = 0
        # Verified when a name is unknown, so a failed login costs the same either way.
        self._dummy_hash = self._hasher.hash(secrets.token_hex(16))

    async def hash(self, password: str) -> str:
        return await self._run(self._hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> Verdict:
        return await self._run(self._verify, stored_hash, password)

    def _verify(self, stored_hash: str | None, password: str) -> Verdict:
        try:
            self._hasher.verify(stored_hash or self._dummy_hash, password)
        except (VerificationError, InvalidHashError):
            return Verdict(ok=False)
        if stored_hash is None:
            return Verdict(ok=False)
        if self._hasher.check_needs_rehash(stored_hash):
            return Verdict(ok=True, new_hash=self._hasher.hash(password))
        return Verdict(ok=True)

    async def _run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        # A login storm must not queue unbounded 64 MiB jobs: past the limit, come back later.
        if self._queued >= self._queue_limit:
            raise RateLimited("server busy: too many password checks at once", retry_after=1.0)
        self._queued += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        finally:
            self._queued -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
