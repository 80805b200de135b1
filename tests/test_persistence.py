"""What the server knows survives a restart; secrets are stored hashed."""

from __future__ import annotations

import asyncio
import os
import sqlite3

from tests.conftest import PASSWORD, Harness, MakeHarness


async def test_restart_keeps_users_tokens_unread_messages_and_channels(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    token = bob.token
    await alice.request("/send", {"name": "bob", "msg": "read before restart"})
    await bob.request("/receive")
    await alice.request("/send", {"name": "bob", "msg": "unread across restart"})
    for i in range(3):
        await alice.request("/channel/send", {"name": "dev", "message": f"c{i}"})
    await bob.request("/channel/receive", {"name": "dev"})
    await alice.request("/channel/send", {"name": "dev", "message": "new for bob"})

    await harness.restart()

    bob = await harness.connect(token=token)
    assert (await bob.request("/receive"))["messages"] == {"alice": ["unread across restart"]}
    channel = await bob.request("/channel/receive", {"name": "dev"})
    assert [m["msg"] for m in channel["messages"]] == ["new for bob"]
    users = await bob.request("/channel/list_users", {"name": "dev"})
    assert [u["name"] for u in users["users"]] == ["alice", "bob"]
    carol = await harness.user("carol")
    history = await carol.request("/channel/receive", {"name": "dev"})
    assert [m["msg"] for m in history["messages"]] == ["c0", "c1", "c2", "new for bob"]
    fresh = await harness.connect()
    await fresh.login("alice", PASSWORD)


async def test_passwords_and_tokens_are_never_stored_in_clear(harness: Harness) -> None:
    alice = await harness.user("alice")
    assert alice.token is not None
    with sqlite3.connect(harness.config.db) as db:
        dump = "\n".join(db.iterdump())
        (password_hash,) = db.execute("SELECT password_hash FROM users").fetchone()
    assert PASSWORD not in dump
    assert alice.token not in dump
    assert password_hash.startswith("$argon2id$")


async def test_schema_is_versioned_and_in_wal_mode(harness: Harness) -> None:
    with sqlite3.connect(harness.config.db) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_concurrent_sends_share_commits_and_keep_every_answer_right(
    harness: Harness,
) -> None:
    import asyncio

    senders = [await harness.user(f"s{i}") for i in range(4)]
    bob = await harness.user("bob")
    calls = []
    for n in range(100):
        for index, sender in enumerate(senders):
            params = {"name": "bob", "msg": f"s{index}-{n}"}
            if n % 10 == 0:
                params["client_id"] = f"k{n}"  # sent twice at once below: stored once
                calls.append(sender.request("/send", dict(params)))
            calls.append(sender.request("/send", params))
    replies = await asyncio.gather(*calls)
    history = {}
    for index in range(4):
        page = await bob.request("/history", {"name": f"s{index}", "limit": 200})
        history.update({m["id"]: m["msg"] for m in page["messages"]})
    assert len(history) == 400  # every message once, the repeats not at all
    assert {reply["id"] for reply in replies} == set(history)
    texts = [m for _, m in sorted(history.items())]
    for index in range(4):  # each sender's messages are stored in the order sent
        mine = [t for t in texts if t.startswith(f"s{index}-")]
        assert mine == [f"s{index}-{n}" for n in range(100)]


async def test_the_wal_is_checkpointed_in_the_background(make_harness: MakeHarness) -> None:
    def size() -> int:
        return os.path.getsize(harness.config.db)

    harness = await make_harness(db_checkpoint_interval=0.1)
    alice = await harness.user("alice")
    await harness.user("bob")
    before = await asyncio.to_thread(size)
    text = "x" * 2000
    await asyncio.gather(
        *(alice.request("/send", {"name": "bob", "msg": f"{i}{text}"}) for i in range(400))
    )
    async with asyncio.timeout(5):  # the messages reach the database file itself
        while await asyncio.to_thread(size) < before + 400 * 2000:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
