"""Password guessing: a guess counts when it starts, and nobody can lock an owner out.

Pure tests of the guard with an injected clock, then the same rules through a real
server with real argon2 (at a small cost) and real addresses (127.0.0.2 and up are
loopback too, so a test can speak from several addresses).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from chatd.auth import Hasher, Verdict
from chatd.client import Client, Reply
from chatd.errors import RateLimited
from chatd.limits import NAME_BUSY_RETRY, BackOff, LoginAttempt, LoginGuard
from tests.conftest import PASSWORD, Harness, MakeHarness

# The pure guard: time is passed in.

ATTACKER, OWNER, OTHER = "192.0.2.1", "192.0.2.2", "192.0.2.3"


def test_a_burst_of_guesses_gets_only_the_free_ones_checked() -> None:
    back_off = BackOff(free=3, max_delay=300.0)
    admitted = 0
    for _ in range(50):
        if back_off.wait("k", 0.0) == 0.0:
            back_off.started("k", 0.0)
            admitted += 1
    assert admitted == 3
    # Refused meanwhile with the wait the three would impose if they all failed.
    assert back_off.wait("k", 0.0) == 1.0
    for _ in range(3):
        back_off.failed("k", 0.1)
    assert back_off.wait("k", 0.1) == pytest.approx(1.0)
    assert back_off.wait("k", 1.1) == 0.0  # past the free ones: one at a time...
    back_off.started("k", 1.1)
    assert back_off.wait("k", 1.1) == 2.0  # ...not two
    back_off.failed("k", 1.2)
    assert back_off.wait("k", 1.2) == pytest.approx(2.0)


def test_a_guess_the_server_gave_up_on_does_not_count() -> None:
    back_off = BackOff(free=1, max_delay=300.0)
    back_off.started("k", 0.0)
    assert back_off.wait("k", 0.0) == 1.0
    back_off.released("k")  # e.g. the hash queue was full
    assert back_off.wait("k", 0.0) == 0.0 and not back_off.has_failed("k", 0.0)


def test_failures_are_forgotten_after_a_quiet_spell_and_so_is_the_one_at_a_time_rule() -> None:
    back_off = BackOff(free=3, max_delay=10.0)
    for _ in range(5):
        back_off.failed("k", 0.0)
    assert back_off.has_failed("k", 10.0) and not back_off.has_failed("k", 10.5)
    for _ in range(3):  # free guesses again, checked concurrently
        assert back_off.wait("k", 11.0) == 0.0
        back_off.started("k", 11.0)


def test_the_table_never_drops_a_key_with_guesses_in_flight() -> None:
    back_off = BackOff(free=3, max_delay=300.0, max_keys=10)
    back_off.started("busy", 0.0)
    for i in range(1000):
        back_off.failed(i, 0.0)
    assert back_off.in_flight("busy") == 1
    assert len(back_off._guesses) <= 11


def _guesses(guard: LoginGuard, name: str, address: str, times: int) -> list[LoginAttempt]:
    """Start ``times`` guesses at once; the ones the guard admitted."""
    admitted = []
    for _ in range(times):
        with contextlib.suppress(RateLimited):
            admitted.append(guard.start(name, address, by_address=True, now=0.0))
    return admitted


def test_an_attacker_cannot_lock_the_owner_out_from_elsewhere() -> None:
    guard = LoginGuard(free=3, max_delay=300.0, name_concurrency=50)
    attempts = _guesses(guard, "alice", ATTACKER, 50)
    assert len(attempts) == 3
    for attempt in attempts:
        guard.failed(attempt, 0.1)
    with pytest.raises(RateLimited):  # the attacker's address is backing off for every name
        guard.start("bob", ATTACKER, by_address=True, now=0.2)
    owner = guard.start("alice", OWNER, by_address=True, now=0.2)
    guard.succeeded(owner)
    with pytest.raises(RateLimited):  # the owner's success does not excuse the attacker
        guard.start("alice", ATTACKER, by_address=True, now=0.3)
    assert not guard.names.has_failed("alice", 0.3)  # but it clears the name's failures


def test_the_name_back_off_holds_only_addresses_that_failed_for_that_name() -> None:
    guard = LoginGuard(free=3, max_delay=300.0, name_concurrency=50)
    bots = [f"198.51.100.{i}" for i in range(1, 6)]
    for bot in bots:  # one guess each: free by pair and by address
        guard.failed(guard.start("alice", bot, by_address=True, now=0.0), 0.0)
    assert guard.names.blocked("alice", 0.0) == 4.0  # 5 failures: 2 ** (5 - 3)
    with pytest.raises(RateLimited) as refused:  # a second guess from a bot waits for it
        guard.start("alice", bots[0], by_address=True, now=0.0)
    assert refused.value.retry_after == 4.0
    guard.start("alice", OWNER, by_address=True, now=0.0)  # an address that never failed
    guard.start("carol", bots[0], by_address=True, now=0.0)  # another name


def test_only_a_few_guesses_for_one_name_are_checked_at_once() -> None:
    guard = LoginGuard(free=3, max_delay=300.0, name_concurrency=2)
    first = guard.start("alice", OWNER, by_address=True, now=0.0)
    guard.start("alice", OTHER, by_address=True, now=0.0)
    with pytest.raises(RateLimited) as refused:
        guard.start("alice", ATTACKER, by_address=True, now=0.0)
    assert refused.value.retry_after == NAME_BUSY_RETRY
    assert "at once" in str(refused.value)
    guard.start("bob", ATTACKER, by_address=True, now=0.0)  # per name
    guard.succeeded(first)
    guard.start("alice", ATTACKER, by_address=True, now=0.0)


def test_a_trusted_address_is_counted_per_name_and_address_only() -> None:
    guard = LoginGuard(free=1, max_delay=300.0, name_concurrency=50)
    guard.failed(guard.start("alice", "127.0.0.1", by_address=False, now=0.0), 0.0)
    with pytest.raises(RateLimited):
        guard.start("alice", "127.0.0.1", by_address=False, now=0.0)
    guard.start("bob", "127.0.0.1", by_address=False, now=0.0)  # no per-address back-off
    assert guard.addresses.in_flight("127.0.0.1") == 0


# Through a real server.

# Cheap enough for a test, dear enough that 50 guesses overlap in the hash pool.
ARGON2_TEST_COST = {"argon2_time_cost": 1, "argon2_memory_cost": 4096, "argon2_parallelism": 1}


async def connect_from(harness: Harness, address: str) -> Client:
    """A client whose connection comes from ``address`` (a loopback address)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", harness.port, local_addr=(address, 0)
    )
    return Client(reader, writer, timeout=30)


def count_verifications(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """Every password check the server's hasher makes, by stored hash (None: unknown name)."""
    hasher: Hasher = harness.server.app.hasher
    checked: list[str | None] = []
    real_verify: Callable[[str | None, str], Verdict] = hasher._verify

    def verify(stored_hash: str | None, password: str) -> Verdict:
        checked.append(stored_hash)
        return real_verify(stored_hash, password)

    monkeypatch.setattr(hasher, "_verify", verify)
    return checked


async def wave(harness: Harness, name: str, address: str, count: int = 50) -> list[Reply]:
    """``count`` wrong guesses for ``name`` from ``address``, each on its own connection,
    all sent before any reply is read."""
    clients = [await connect_from(harness, address) for _ in range(count)]
    try:
        return await asyncio.gather(
            *(c.call("/login", {"name": name, "password": "wrong password"}) for c in clients)
        )
    finally:
        for client in clients:
            await client.close()


async def test_concurrent_guesses_get_only_the_free_ones_checked_and_the_owner_gets_in(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = await make_harness(
        **ARGON2_TEST_COST,
        trusted_networks="",  # loopback is counted per address like any other
        max_connections_per_address=100,
        login_free_failures=3,
        login_name_concurrency=50,  # not this limit: the per-address ones
    )
    await harness.user("alice")
    checked = count_verifications(harness, monkeypatch)
    replies = await wave(harness, "alice", "127.0.0.1")
    codes = [r["code"] for r in replies]
    # The first wait (1 s) starts with the third failure: far longer than the wave.
    assert codes.count(3) == len(checked) == 3  # a code 3 is a check; nothing else was
    assert codes.count(8) == 50 - codes.count(3)
    assert all(0 < r["retry_after"] <= 1.0 for r in replies if r["code"] == 8)

    attacker = await connect_from(harness, "127.0.0.1")
    blocked = await attacker.call("/login", {"name": "alice", "password": PASSWORD})
    assert blocked["code"] == 8  # even the right password, from the guessing address
    owner = await connect_from(harness, "127.0.0.2")
    data = await owner.request("/login", {"name": "alice", "password": PASSWORD})
    assert data["name"] == "alice"
    assert len(checked) == codes.count(3) + 1  # the owner's check, and no other
    again = await attacker.call("/login", {"name": "alice", "password": PASSWORD})
    assert again["code"] == 8  # the owner's success does not clear the guesser's address
    await attacker.close()
    await owner.close()


async def test_unknown_names_are_limited_exactly_like_known_ones(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = await make_harness(
        **ARGON2_TEST_COST, trusted_networks="", max_connections_per_address=100
    )
    await harness.user("alice")
    checked = count_verifications(harness, monkeypatch)
    known = await wave(harness, "alice", "127.0.0.3")
    unknown = await wave(harness, "nobody", "127.0.0.4")
    assert checked.count(None) == [r["code"] for r in unknown].count(3)

    def outcome(replies: list[Reply]) -> list[tuple[int, str, float]]:
        return sorted((r["code"], r["msg"], r.get("retry_after", 0.0)) for r in replies)

    assert outcome(known) == outcome(unknown)


async def test_only_a_few_checks_for_one_name_run_at_once(make_harness: MakeHarness) -> None:
    # Production cost and one hashing thread: the first check holds the pool long
    # enough for the others to arrive while it runs.
    harness = await make_harness(
        argon2_time_cost=3,
        argon2_memory_cost=65536,
        argon2_parallelism=4,
        hash_workers=1,
        login_name_concurrency=2,
    )
    await harness.user("alice")
    clients = [await connect_from(harness, f"127.0.0.{i}") for i in range(5, 8)]
    replies = await asyncio.gather(
        *(c.call("/login", {"name": "alice", "password": PASSWORD}) for c in clients)
    )
    assert sorted(r["code"] for r in replies) == [0, 0, 8]
    (busy,) = [r for r in replies if r["code"] == 8]
    assert busy["msg"] == "too many logins for this name at once"
    assert busy["retry_after"] == NAME_BUSY_RETRY
    late = clients[[r["code"] for r in replies].index(8)]
    await late.request("/login", {"name": "alice", "password": PASSWORD})  # once they end
    for client in clients:
        await client.close()
