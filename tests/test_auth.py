"""Password hashing: production parameters, rehash on change, and off the event loop."""

from __future__ import annotations

import asyncio
import sqlite3

from argon2 import extract_parameters

from chatd.auth import Hasher, token_digest
from chatd.client import Client
from chatd.config import Config
from tests.conftest import PASSWORD, Harness, MakeHarness


async def test_production_default_is_rfc9106_argon2id() -> None:
    hasher = Hasher(Config())
    try:
        stored = await hasher.hash(PASSWORD)
    finally:
        hasher.close()
    params = extract_parameters(stored)
    assert stored.startswith("$argon2id$")
    assert (params.time_cost, params.memory_cost, params.parallelism) == (3, 65536, 4)
    assert (params.salt_len, params.hash_len) == (16, 32)


async def test_login_rehashes_when_parameters_change(harness: Harness) -> None:
    await harness.user("alice")
    await harness.restart(argon2_time_cost=2)
    client = await harness.connect()
    await client.login("alice", PASSWORD)
    with sqlite3.connect(harness.config.db) as db:
        (stored,) = db.execute("SELECT password_hash FROM users").fetchone()
    assert extract_parameters(stored).time_cost == 2
    await client.close()
    again = await harness.connect()
    await again.login("alice", PASSWORD)


async def test_hashing_does_not_stall_other_clients(make_harness: MakeHarness) -> None:
    # Production cost: each login takes tens of milliseconds of argon2 in a worker thread.
    harness = await make_harness(
        argon2_time_cost=3,
        argon2_memory_cost=65536,
        argon2_parallelism=4,
        # Four logins of one name at once are over the default login limits
        # (test_login_guard.py): allowed here, where only the hashing pool is tested.
        login_free_failures=4,
        login_name_concurrency=4,
    )
    await harness.user("alice")
    pinger = await harness.connect()
    logins = [await harness.connect() for _ in range(4)]
    order: list[str] = []

    async def login(client: Client) -> None:
        await client.login("alice", PASSWORD)
        order.append("login")

    async def ping() -> None:
        await asyncio.sleep(0.005)  # let every login reach the hashing pool first
        await pinger.request("/ping")
        order.append("ping")

    await asyncio.gather(ping(), *(login(c) for c in logins))
    # The ping is answered while the hashes are still running, not after them.
    assert order[0] == "ping"


def _slot_values(obj: object) -> list[object]:
    names = {name for cls in type(obj).__mro__ for name in getattr(cls, "__slots__", ())}
    return [getattr(obj, name, None) for name in names]


async def test_a_bound_connection_keeps_the_digest_of_its_token_never_the_token(
    harness: Harness,
) -> None:
    # The gate hashes each read's token and compares digests: no bearer token outlives
    # its request in the server's memory (and an idle connection is 92 bytes smaller).
    alice = await harness.user("alice")
    token = alice.token
    assert token is not None
    other = await harness.connect(token=token)  # bound by the token alone
    await other.request("/ping")
    await alice.request("/ping")
    bound = [c for c in harness.server._connections if c.user_id is not None]
    assert len(bound) == 2  # one by /login, one by the token alone
    for connection in bound:
        values = _slot_values(connection)
        assert token_digest(token) in values
        assert not any(isinstance(value, str) and token in value for value in values)
