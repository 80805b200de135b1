"""Flood control and hostile clients: every limit gets its documented answer; others carry on."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import struct

import pytest
import trustme

from chatd.client import Client
from chatd.codec import encode_frame
from chatd.config import Config
from chatd.errors import RateLimited
from chatd.limits import BackOff, Guards, Networks, RateLimiter, address_key
from tests.conftest import PASSWORD, MakeHarness
from tests.test_wire import RawPeer

# Unit tests of the pure parts: time is passed in, nothing sleeps.

# Event-loop timers may fire up to a millisecond early (libuv counts whole ms from a
# cached clock); the server rounds retry_after up, the test allows for its own timer.
TIMER_SLACK = 0.005


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = RateLimiter(rate=2.0, burst=3)
    assert [bucket.take("u", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("u", 0.0) == pytest.approx(0.5)
    assert bucket.take("u", 0.5) == 0.0
    assert bucket.take("other", 0.5) == 0.0  # keys are independent
    assert bucket.take("u", 10.0) == 0.0 and bucket.take("u", 10.0) == 0.0


def test_takes_at_one_time_are_one_refill_then_spending() -> None:
    """The sends of one read refill the bucket once and spend from it in turn
    (handlers._message_now): every answer must be take()'s."""
    taking, spending = RateLimiter(rate=2, burst=3), RateLimiter(rate=2, burst=3)
    for now in (100.0, 100.0, 100.4, 100.4, 107.0):
        taken = [taking.take("u", now) for _ in range(5)]
        bucket = spending.refilled("u", now)
        spent = []
        for _ in range(5):
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                spent.append(0.0)
            else:
                spent.append(spending.wait(bucket))
        assert spent == taken


def test_token_bucket_table_is_bounded() -> None:
    bucket = RateLimiter(rate=1.0, burst=1, max_keys=100)
    for key in range(10_000):
        bucket.take(key, 0.0)
    assert len(bucket._buckets) == 100


def test_back_off_doubles_after_the_free_failures_and_clears_on_success() -> None:
    back_off = BackOff(free=2, max_delay=5.0)
    waits = []
    for _ in range(7):
        back_off.failed("k", 0.0)
        waits.append(back_off.wait("k", 0.0))
    assert waits == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]  # 2 free, then 1 s, 2 s, 4 s...
    assert back_off.wait("k", 5.0) == 0.0
    back_off.failed("k", 100.0)  # a quiet spell longer than max_delay starts afresh
    assert back_off.wait("k", 100.0) == 0.0
    back_off.failed("k", 100.0)
    assert back_off.wait("k", 100.0) == 1.0
    back_off.succeeded("k")
    back_off.failed("k", 110.0)
    assert back_off.wait("k", 110.0) == 0.0


def test_networks_and_address_keys() -> None:
    trusted = Networks("127.0.0.0/8, ::1/128,10.1.0.0/16")
    assert "127.0.0.1" in trusted and "::1" in trusted and "10.1.2.3" in trusted
    assert "::ffff:127.0.0.1" in trusted  # IPv4-mapped
    assert "10.2.0.1" not in trusted and "garbage" not in trusted
    assert "127.0.0.1" not in Networks("")
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff") == "2001:db8::/64"


# Live: each limit answered as protocol.md says.


async def test_sending_too_fast_gets_code_8_with_a_retry_hint(make_harness: MakeHarness) -> None:
    harness = await make_harness(message_rate=20.0, message_burst=3)
    alice = await harness.user("alice")
    for i in range(3):
        await alice.request("/send", {"name": "alice", "msg": f"m{i}"})
    reply = await alice.call("/send", {"name": "alice", "msg": "too fast"})
    assert reply["code"] == 8 and 0 < reply["retry_after"] <= 0.05
    await asyncio.sleep(reply["retry_after"] + TIMER_SLACK)
    await alice.request("/channel/send", {"name": "dev", "message": "after waiting"})
    data = await alice.request("/receive")
    assert data["messages"] == {"alice": ["m0", "m1", "m2"]}  # the refused one was not stored
    other = await harness.user("bob")  # limits are per user
    await other.request("/send", {"name": "alice", "msg": "unaffected"})


async def test_a_client_that_ignores_the_rate_limit_is_disconnected(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(message_rate=0.001, message_burst=1, abuse_limit=5)
    alice = await harness.user("alice")
    codes = []
    with pytest.raises(ConnectionError):
        for _ in range(20):
            codes.append((await alice.call("/send", {"name": "alice", "msg": "x"}))["code"])
    assert codes == [0, 8, 8, 8, 8, 8]


async def test_failed_logins_back_off_the_same_for_known_and_unknown_names(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(login_free_failures=2)
    await harness.user("alice")
    client = await harness.connect()
    for name in ("alice", "nobody"):
        codes = [
            (await client.call("/login", {"name": name, "password": "wrong password"}))["code"]
            for _ in range(4)
        ]
        assert codes == [3, 3, 8, 8]  # two free failures, then a wait
    blocked = await client.call("/login", {"name": "alice", "password": PASSWORD})
    assert blocked["code"] == 8 and 0 < blocked["retry_after"] <= 1.0  # even the right one
    await asyncio.sleep(blocked["retry_after"] + TIMER_SLACK)
    await client.login("alice", PASSWORD)
    # Success clears the name's count.
    assert (await client.call("/login", {"name": "alice", "password": "bad pass!"}))["code"] == 3


async def test_failed_logins_from_one_address_back_off_across_names(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(login_free_failures=3, trusted_networks="")
    client = await harness.connect()
    codes = [
        (await client.call("/login", {"name": f"guess{i}", "password": "wrong password"}))["code"]
        for i in range(5)
    ]
    assert codes == [3, 3, 3, 8, 8]


async def test_registrations_from_one_address_are_rate_limited(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(register_rate=0.001, register_burst=2, trusted_networks="")
    client = await harness.connect()
    codes = [
        (
            await client.call(
                "/register", {"name": f"bot{i}", "password": PASSWORD, "password_repete": PASSWORD}
            )
        )["code"]
        for i in range(3)
    ]
    assert codes == [0, 0, 8]


async def test_hashing_is_bounded_under_a_login_storm(make_harness: MakeHarness) -> None:
    harness = await make_harness(
        argon2_time_cost=3,
        argon2_memory_cost=65536,
        argon2_parallelism=4,
        hash_workers=1,
        hash_queue=1,
        login_free_failures=1000,
        login_name_concurrency=1000,  # this test is about the server-wide hash queue
    )
    await harness.user("alice")
    clients = [await harness.connect() for _ in range(6)]
    replies = await asyncio.gather(
        *(c.call("/login", {"name": "alice", "password": PASSWORD}) for c in clients)
    )
    codes = sorted(r["code"] for r in replies)
    assert codes[0] == 0 and codes[-1] == 8
    assert all(r["msg"].startswith("server busy") for r in replies if r["code"] == 8)


async def test_connection_caps_overall_and_per_address(make_harness: MakeHarness) -> None:
    harness = await make_harness(max_connections=3)
    clients = [await harness.connect() for _ in range(3)]
    refused = await RawPeer.open(harness.port)
    assert (await refused.reply())["code"] == 8
    assert await refused.closed()
    refused.close()
    await clients[0].close()
    await asyncio.sleep(0.05)  # the server notices the close
    again = await harness.connect()
    assert (await again.call("/ping"))["code"] == 0

    per_address = await make_harness(max_connections_per_address=2, trusted_networks="")
    first, second = await per_address.connect(), await per_address.connect()
    third = await RawPeer.open(per_address.port)
    reply = await third.reply()
    assert reply["code"] == 8 and "your address" in reply["msg"]
    third.close()
    for client in (first, second):
        assert (await client.call("/ping"))["code"] == 0


async def test_loopback_is_exempt_from_the_per_address_cap_by_default(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(max_connections_per_address=2)
    clients = [await harness.connect() for _ in range(5)]
    for client in clients:
        assert (await client.call("/ping"))["code"] == 0


async def test_a_frame_left_unfinished_is_dropped(make_harness: MakeHarness) -> None:
    harness = await make_harness(frame_timeout=0.3)
    alice = await harness.user("alice")
    stuck = await RawPeer.open(harness.port)
    stuck.writer.write(struct.pack(">I", 100) + b"\x81")  # a frame that never ends
    trickler = await RawPeer.open(harness.port)
    frame = struct.pack(">I", 100) + b"\x81" + b"a" * 99

    async def trickle() -> None:
        for byte in frame:  # a byte every 50 ms: the frame would take 5 s
            if trickler.writer.is_closing() or trickler.reader.at_eof():
                return
            trickler.writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    task = asyncio.create_task(trickle())
    assert await stuck.closed()
    assert await trickler.closed()
    task.cancel()
    assert (await alice.call("/ping"))["code"] == 0
    for peer in (stuck, trickler):
        assert not peer.pending  # dropped without a reply: the stream is not trusted
        peer.close()


async def test_a_connection_that_never_logs_in_is_closed(make_harness: MakeHarness) -> None:
    harness = await make_harness(auth_timeout=0.3)
    anonymous = await harness.connect()
    member = await harness.user("alice")
    with pytest.raises(ConnectionError):
        async with asyncio.timeout(5):
            while True:  # pinging does not count as logging in
                await anonymous.request("/ping")
                await asyncio.sleep(0.05)
    await asyncio.sleep(0.4)
    assert (await member.call("/ping"))["code"] == 0  # a logged-in connection stays


async def test_tls(make_harness: MakeHarness, tmp_path: object) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = f"{tmp_path}/cert.pem", f"{tmp_path}/key.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(cert_file)
    certificate.private_key_pem.write_to_path(key_file)
    harness = await make_harness(tls_cert=cert_file, tls_key=key_file)

    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    client = await Client.connect("127.0.0.1", harness.port, ssl=client_context)
    await client.request(
        "/register", {"name": "ann", "password": PASSWORD, "password_repete": PASSWORD}
    )
    await client.login("ann", PASSWORD)
    assert (await client.request("/user/info", {"name": "ann"}))["name"] == "ann"
    await client.close()

    plain = await RawPeer.open(harness.port)  # speaking plain frames to a TLS port
    plain.send({"op": "/ping", "id": 1})
    assert await plain.closed()
    assert not plain.pending
    plain.close()
    untrusting = ssl.create_default_context()  # does not know our CA
    with pytest.raises(ssl.SSLError):
        await Client.connect("127.0.0.1", harness.port, ssl=untrusting)


async def test_retry_after_survives_the_client_library(make_harness: MakeHarness) -> None:
    harness = await make_harness(message_rate=0.001, message_burst=1)
    alice = await harness.user("alice")
    await alice.request("/send", {"name": "alice", "msg": "one"})
    with pytest.raises(RateLimited) as refused:
        await alice.request("/send", {"name": "alice", "msg": "two"})
    assert refused.value.retry_after > 100  # the server's hint, not a default


async def test_a_busy_pipelining_client_is_not_taken_for_a_slowloris(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(frame_timeout=0.3)
    peer = await RawPeer.open(harness.port)
    stream = b"".join(encode_frame({"op": "/ping", "id": i}) for i in range(12))
    cut = len(stream) // 12  # every write ends in the middle of a frame
    for start in range(0, len(stream), cut):
        peer.writer.write(stream[start : start + cut])
        await asyncio.sleep(0.1)  # 1.2 s in all, four frame timeouts
    assert [(await peer.reply())["id"] for _ in range(12)] == list(range(12))
    peer.close()


async def test_logging_out_does_not_start_the_login_deadline(make_harness: MakeHarness) -> None:
    harness = await make_harness(auth_timeout=0.3)
    alice = await harness.user("alice")
    await alice.request("/logout")
    alice.token = None
    await asyncio.sleep(0.5)
    assert (await alice.call("/ping"))["code"] == 0


# Joins, leaves, acks and subscribes: a bucket per user each, like sends.


def test_each_write_op_has_its_own_bucket_per_user() -> None:
    config = Config(
        message_rate=1.0, message_burst=1,
        membership_rate=1.0, membership_burst=2,
        ack_rate=2.0, ack_burst=3,
        subscribe_rate=0.5, subscribe_burst=1,
    )  # fmt: skip
    guards = Guards(config)
    buckets = {
        "messages": guards.messages,
        "memberships": guards.memberships,
        "acks": guards.acks,
        "subscribes": guards.subscribes,
    }
    for name, bucket in buckets.items():
        burst = int(bucket.burst)
        assert [bucket.take(1, 0.0) for _ in range(burst)] == [0.0] * burst, name
        assert bucket.take(1, 0.0) == pytest.approx(1 / bucket.rate), name
        assert bucket.take(2, 0.0) == 0.0, name  # another user
    # Emptying one bucket left the others as they were: a fresh user in each is full.
    guards.reconfigure(dataclasses.replace(config, ack_rate=10.0, ack_burst=5))
    assert guards.acks.take(1, 0.0) == pytest.approx(0.1)  # the used bucket, at the new rate
    assert [guards.acks.take(3, 0.0) for _ in range(5)] == [0.0] * 5
    guards.reconfigure(
        dataclasses.replace(config, login_free_failures=1, login_name_concurrency=7)
    )
    for table in (guards.logins.pairs, guards.logins.addresses, guards.logins.names):
        assert table.free == 1
    assert guards.logins.name_concurrency == 7


def test_default_ack_rate_allows_an_ack_per_message_at_the_message_rate() -> None:
    defaults = Config()
    assert defaults.ack_rate >= defaults.message_rate
    assert defaults.ack_burst >= defaults.message_burst


async def test_joins_and_leaves_share_a_rate_limit(make_harness: MakeHarness) -> None:
    harness = await make_harness(membership_rate=0.001, membership_burst=3)
    alice = await harness.user("alice")
    await alice.request("/channel/join", {"name": "a"})
    await alice.request("/channel/leave", {"name": "a"})
    await alice.request("/channel/join", {"name": "b"})
    for op in ("/channel/join", "/channel/leave"):
        refused = await alice.call(op, {"name": "b"})
        assert refused["code"] == 8 and refused["retry_after"] > 100
        assert refused["msg"] == "joining and leaving channels too fast"
    # A first use joins, so it is limited likewise; and nothing was created.
    refused = await alice.call("/channel/receive", {"name": "c"})
    assert refused["code"] == 8
    assert (await alice.call("/channel/list_users", {"name": "c"}))["code"] == 5
    assert (await alice.request("/channel/list"))["channels"] == [{"name": "b", "unread": 0}]
    # Using a channel one is a member of takes nothing from the bucket.
    await alice.request("/channel/send", {"name": "b", "message": "still here"})
    history = await alice.request("/channel/history", {"name": "b"})
    assert [m["msg"] for m in history["messages"]] == ["still here"]
    bob = await harness.user("bob")  # per user
    await bob.request("/channel/join", {"name": "b"})


async def test_memberships_per_user_are_capped(make_harness: MakeHarness) -> None:
    harness = await make_harness(max_channels_per_user=3)
    alice, bob = await harness.user("alice"), await harness.user("bob")
    await bob.request("/channel/join", {"name": "bobs"})
    await alice.request("/channel/join", {"name": "a"})
    await alice.request("/channel/send", {"name": "b", "message": "hi"})  # a first use joins
    await alice.request("/channel/receive", {"name": "c"})
    too_many = "member of too many channels (at most 3): leave one first"
    for op, params in (
        ("/channel/join", {"name": "new"}),
        ("/channel/send", {"name": "new", "message": "hi"}),
        ("/channel/receive", {"name": "new"}),
        ("/channel/join", {"name": "bobs"}),  # an existing channel likewise
    ):
        refused = await alice.call(op, params)
        assert (refused["code"], refused["msg"]) == (6, too_many), op
    # Nothing was created or joined: no channel "new", bob's channel has bob alone.
    assert (await alice.call("/channel/list_users", {"name": "new"}))["code"] == 5
    bobs = await bob.request("/channel/list_users", {"name": "bobs"})
    assert bobs == {"users": [{"name": "bob", "online": True}]}
    # A channel one is a member of goes on working at the cap.
    assert (await alice.request("/channel/join", {"name": "A"}))["name"] == "a"
    await alice.request("/channel/send", {"name": "c", "message": "still fine"})
    await bob.request("/channel/join", {"name": "a"})  # per user
    await alice.request("/channel/leave", {"name": "b"})  # leaving makes room
    await alice.request("/channel/join", {"name": "bobs"})
    listed = (await alice.request("/channel/list"))["channels"]
    assert sorted(c["name"] for c in listed) == ["a", "bobs", "c"]
    # A channel left is joined again only within the cap.
    refused = await alice.call("/channel/join", {"name": "b"})
    assert (refused["code"], refused["msg"]) == (6, too_many)


async def test_acks_are_rate_limited(make_harness: MakeHarness) -> None:
    harness = await make_harness(ack_rate=0.001, ack_burst=2, abuse_limit=4)
    alice, bob = await harness.user("alice"), await harness.user("bob")
    ids = [(await bob.request("/send", {"name": "alice", "msg": f"m{i}"}))["id"] for i in range(3)]
    assert (await alice.request("/ack", {"id": ids[0]}))["position"] == ids[0]
    assert (await alice.request("/ack", {"id": ids[0]}))["position"] == ids[0]
    refused = await alice.call("/ack", {"id": ids[2]})
    assert refused["code"] == 8 and refused["retry_after"] > 100
    assert refused["msg"].startswith("acknowledging too often")
    data = await alice.request("/receive")  # the refused ack moved nothing
    assert data["messages"] == {"bob": ["m1", "m2"]}
    await bob.request("/ack", {"id": ids[2]})  # per user
    # Counted by the abuse limit like sends: the 4th code 8 is the last reply.
    with pytest.raises(ConnectionError):
        for _ in range(10):
            assert (await alice.call("/ack", {"id": ids[2]}))["code"] == 8


async def test_subscribes_are_rate_limited(make_harness: MakeHarness) -> None:
    harness = await make_harness(subscribe_rate=0.001, subscribe_burst=2)
    alice, bob = await harness.user("alice"), await harness.user("bob")
    await alice.request("/subscribe")
    await alice.request("/unsubscribe")
    await alice.request("/subscribe")
    await alice.request("/unsubscribe")
    refused = await alice.call("/subscribe")
    assert refused["code"] == 8 and refused["retry_after"] > 100
    assert refused["msg"] == "subscribing too often"
    await bob.request("/send", {"name": "alice", "msg": "not pushed"})
    await alice.request("/ping")  # a push would have come before this reply
    assert alice.waiting_events() == []
    await bob.request("/subscribe")  # per user
