"""No op, with any parameters, shows one user's private messages or a channel to someone else."""

from __future__ import annotations

import asyncio
import statistics
import time
from itertools import product
from typing import Any

from chatd.client import Client
from chatd.handlers import OPS
from tests.conftest import PASSWORD, Harness, MakeHarness

SECRETS = ("dm-secret-1", "dm-secret-2", "channel-secret-3")
# Ops that join the named channel: channels are open to anyone who joins (the seed's
# design), so those are only tried on channels other than the private one.
JOINING = {"/channel/join", "/channel/receive", "/channel/send"}


def leaked(reply: Any) -> list[str]:
    text = repr(reply)
    return [secret for secret in SECRETS if secret in text]


async def test_no_op_and_no_parameter_reveals_others_messages(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    sent = [
        await alice.request("/send", {"name": "bob", "msg": "dm-secret-1"}),
        await bob.request("/send", {"name": "alice", "msg": "dm-secret-2"}),
    ]
    await alice.request("/channel/join", {"name": "inner"})
    await bob.request("/channel/join", {"name": "inner"})
    sent.append(
        await alice.request("/channel/send", {"name": "inner", "message": "channel-secret-3"})
    )
    ids = [s["id"] for s in sent] + [0, 1, 2, 3, 10**6]

    carol = await harness.user("carol")
    await carol.request("/subscribe")
    names = ["alice", "bob", "carol", "inner", "ALICE", "nobody"]
    values: list[Any] = [*names, *ids, None, "", True, [1], {"name": "bob"}]
    tried = 0
    for op in OPS:
        if op in ("/logout",):
            continue
        for key, value in product(("name", "channel", "id", "before", "limit"), values):
            if op in JOINING and key == "name" and str(value).lower() == "inner":
                continue
            for params in ({key: value}, {key: value, "name": "bob"}, {key: value, "id": 1}):
                if op in JOINING and str(params.get("name", "")).lower() == "inner":
                    continue
                reply = await carol.call(op, params)
                tried += 1
                assert not leaked(reply), (op, params, reply)
    assert tried > 1000
    # Nothing was pushed to her either, and a poll shows none of it.
    assert not leaked(carol.waiting_events())
    assert not leaked(await carol.request("/receive"))
    # The owners still see their messages: the secrets are really there to be found.
    assert leaked(await bob.request("/history", {"name": "alice"})) == [
        "dm-secret-1",
        "dm-secret-2",
    ]


async def test_a_member_who_left_cannot_read_on(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    for client in (alice, bob):
        await client.request("/channel/join", {"name": "inner"})
    await bob.request("/channel/leave", {"name": "inner"})
    await alice.request("/channel/send", {"name": "inner", "message": "channel-secret-3"})
    for op, params in (
        ("/channel/receive", {"name": "inner"}),
        ("/channel/history", {"name": "inner"}),
        ("/ack", {"channel": "inner", "id": 0}),
        ("/channel/list", {}),
    ):
        reply = await bob.call(op, params)
        assert not leaked(reply), (op, reply)


async def test_a_failed_login_takes_as_long_for_an_unknown_name(
    make_harness: MakeHarness,
) -> None:
    # A real argon2 cost, so the hash dominates; medians, so a busy machine does not matter.
    harness = await make_harness(
        argon2_time_cost=2,
        argon2_memory_cost=16384,
        argon2_parallelism=1,
        login_free_failures=1000,
    )
    await harness.user("alice")
    client = await harness.connect()

    async def timed(name: str) -> float:
        started = time.perf_counter()
        reply = await client.call("/login", {"name": name, "password": "wrong password"})
        assert reply["code"] == 3
        return time.perf_counter() - started

    known, unknown = [], []
    for _ in range(7):
        known.append(await timed("alice"))
        unknown.append(await timed("nobody"))
    ratio = statistics.median(unknown) / statistics.median(known)
    assert 0.6 < ratio < 1.6, (known, unknown)


async def test_tokens_are_unguessable_and_single_purpose(harness: Harness) -> None:
    tokens: set[str] = set()
    for _ in range(5):
        client = await harness.connect()
        await client.request(
            "/register",
            {"name": f"u{len(tokens)}", "password": PASSWORD, "password_repete": PASSWORD},
        )
        tokens.add(await client.login(f"u{len(tokens)}", PASSWORD))
    assert len(tokens) == 5 and all(len(t) == 43 for t in tokens)
    forged = await Client.connect("127.0.0.1", harness.port)
    real = next(iter(tokens))
    near_miss = real[:-1] + ("A" if real[-1] != "A" else "B")
    for guess in ("", "a" * 43, near_miss, "null"):
        forged.token = guess
        assert (await forged.call("/user/info", {"name": "u0"}))["code"] == 2
    await forged.close()
    await asyncio.sleep(0)
