"""The bus over its other transports (chatd/bus_redis.py ``_connect``): a unix socket
(``unix://``) and TLS with client certificates (``rediss://`` with ssl_certfile and
ssl_keyfile), each against a redis-server of the test's own configured for it, and
with real nodes (in-process Servers on a fresh PostgreSQL database) where it matters.

The certificates are made at test time (trustme: a CA, a server certificate for
127.0.0.1, a client certificate).  redis-py is the reference for what a rediss://
URL means: the bus's own connections and redis-py's (presence) must accept and
refuse the same servers.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chatd.bus_redis import BusMessage, Notice, RedisBus, _parse_url, _tls_context
from tests.cluster_helpers import RedisServer, redis_server
from tests.conftest import harness_factory
from tests.pg_helpers import unavailable
from tests.test_cov_cluster import next_push

WAIT = 20.0  # bound on every wait for an event; generous for a loaded machine


class Heard:
    """What a bus received, with an event to wait on."""

    def __init__(self) -> None:
        self.messages: list[BusMessage] = []
        self.changed = asyncio.Event()

    def __call__(self, message: BusMessage) -> None:
        self.messages.append(message)
        self.changed.set()

    async def wait_for(self, count: int) -> list[BusMessage]:
        async with asyncio.timeout(WAIT):
            while len(self.messages) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.messages


async def carries(url: str) -> None:
    """Two buses on ``url`` carry each other's notices, both ways."""
    heard_a, heard_b = Heard(), Heard()
    a = RedisBus(url, "a", heard_a, lambda: None, reconnect_delay=0.05)
    b = RedisBus(url, "b", heard_b, lambda: None, reconnect_delay=0.05)
    try:
        await a.start()
        await b.start()
        a.publish(Notice("c:1", 1, 11, {"msg": "from a"}))
        b.publish(Notice("c:1", 2, 12, {"msg": "from b"}))
        assert await heard_b.wait_for(1) == [Notice("c:1", 1, 11, {"msg": "from a"})]
        assert await heard_a.wait_for(1) == [Notice("c:1", 2, 12, {"msg": "from b"})]
    finally:
        await a.close()
        await b.close()


async def refused(url: str) -> str:
    """The error a bus on ``url`` starts with (it must not hang): its text."""
    bus = RedisBus(url, "c", lambda m: None, lambda: None, reconnect_delay=0.05)
    async with asyncio.timeout(WAIT):  # start's own bound (1 s) and not more
        with pytest.raises(ConnectionError, match="cannot subscribe") as failed:
            await bus.start(timeout=1.0)
    return str(failed.value)


async def two_nodes_share_a_channel(url: str, pg_url: str) -> None:
    """Two real nodes on the bus at ``url``: a channel message sent on one is pushed on
    the other, and each sees the other's user online (presence: redis-py on ``url``)."""
    async with harness_factory(lambda n: pg_url) as make:
        a = await make(bus=url, node_id="a")
        b = await make(bus=url, node_id="b")
        alice, bob = await a.user("alice"), await b.user("bob")
        for client in (alice, bob):
            await client.request("/channel/join", {"name": "hall"})
        await bob.request("/subscribe", {})
        sent = await alice.request("/channel/send", {"name": "hall", "message": "over the bus"})
        event = await next_push(bob, "channel_message")
        assert (event["data"]["id"], event["data"]["msg"]) == (sent["id"], "over the bus")
        assert (await alice.request("/user/info", {"name": "bob"}))["online"] is True
        cluster = b.server._cluster
        assert cluster is not None and cluster.redis.counts.received >= 1


# A unix socket.


@pytest.fixture
async def unix_redis() -> AsyncIterator[RedisServer]:
    async with redis_server(unix=True) as server:
        yield server


async def test_a_bus_over_a_unix_socket_carries_notices_both_ways(
    unix_redis: RedisServer,
) -> None:
    assert unix_redis.url.startswith("unix://")
    await carries(unix_redis.url)


async def test_two_nodes_over_a_unix_socket_push_each_others_messages(
    unix_redis: RedisServer, pg_url: str
) -> None:
    await two_nodes_share_a_channel(unix_redis.url, pg_url)


async def test_a_unix_socket_nobody_listens_on_is_refused_saying_why(
    unix_redis: RedisServer,
) -> None:
    gone = unix_redis.url.replace("redis.sock", "nobody.sock")
    assert "No such file" in await refused(gone)


async def test_a_refusal_never_shows_the_password_of_the_url(unix_redis: RedisServer) -> None:
    # The socket path is missing; the URL's password and a TLS key's password must not
    # reach the error (nor the logs, which take the same text).
    gone = unix_redis.url.replace("redis.sock", "nobody.sock")
    assert "?" in gone  # ?db=0
    error = await refused(gone.replace("unix://", "unix://:s3cret@") + "&password=s3cret")
    assert "No such file" in error and "s3cret" not in error


# TLS with client certificates.


@dataclass(frozen=True)
class Pki:
    """Files of a CA that signed a server certificate and a client certificate, and of
    another CA (``stranger``) that signed nothing here."""

    ca: Path
    client_cert: Path
    client_key: Path
    stranger: Path

    def url(self, server: RedisServer, **query: str) -> str:
        return server.url + "?" + "&".join(f"{k}={v}" for k, v in query.items())

    def trusting(self, server: RedisServer, **query: str) -> str:
        """The server's URL with this CA trusted and the client certificate given."""
        return self.url(server, ssl_ca_certs=str(self.ca), ssl_certfile=str(self.client_cert),
                        ssl_keyfile=str(self.client_key), **query)


def make_pki(directory: Path, server_names: tuple[str, ...]) -> tuple[Pki, tuple[str, ...]]:
    """A CA, a server certificate for ``server_names`` and a client certificate, in
    ``directory``; and the redis-server options that use them (client certificates
    required)."""
    try:
        import trustme
    except ImportError:
        unavailable("trustme is not installed: pip install 'chatd[test]'")
    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert(*server_names)
    client = ca.issue_cert("chatd-node@example.org")
    files = {name: directory / f"{name}.pem" for name in (
        "ca", "stranger", "server", "server-key", "client", "client-key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    stranger.cert_pem.write_to_path(str(files["stranger"]))
    server.cert_chain_pems[0].write_to_path(str(files["server"]))
    server.private_key_pem.write_to_path(str(files["server-key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client"]))
    client.private_key_pem.write_to_path(str(files["client-key"]))
    options = ("--tls-cert-file", str(files["server"]), "--tls-key-file",
               str(files["server-key"]), "--tls-ca-cert-file", str(files["ca"]),
               "--tls-auth-clients", "yes")
    pki = Pki(files["ca"], files["client"], files["client-key"], files["stranger"])
    return pki, options


@pytest.fixture
async def tls(tmp_path: Path) -> AsyncIterator[tuple[Pki, RedisServer]]:
    """A redis-server that takes TLS only, from clients with a certificate of its CA."""
    pki, options = make_pki(tmp_path, ("127.0.0.1",))
    async with redis_server(tls_options=options) as server:
        yield pki, server


async def redis_py_accepts(url: str) -> bool:
    """Whether redis-py (what presence uses) gets a PING answered at ``url``."""
    from redis import asyncio as aioredis

    client: Any = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        return bool(await client.ping())
    except Exception:  # redis-py's own errors, OSError, ssl.SSLError: refused
        return False
    finally:
        await client.aclose()


async def test_a_bus_with_a_client_certificate_carries_notices(
    tls: tuple[Pki, RedisServer],
) -> None:
    pki, server = tls
    await carries(pki.trusting(server))


async def test_two_nodes_with_client_certificates_push_each_others_messages(
    tls: tuple[Pki, RedisServer], pg_url: str
) -> None:
    pki, server = tls
    await two_nodes_share_a_channel(pki.trusting(server), pg_url)


async def test_a_bus_without_a_client_certificate_is_refused_saying_why(
    tls: tuple[Pki, RedisServer],
) -> None:
    pki, server = tls
    url = pki.url(server, ssl_ca_certs=str(pki.ca))
    assert not await redis_py_accepts(url)
    # Redis checks the certificate after the handshake and drops the connection: the
    # reason is that, whichever way the client learns it (TLS 1.3's alert, or the
    # reset that answers its SUBSCRIBE), at once rather than when the wait times out.
    why = await refused(url)
    assert re.search("reset by peer|closed by Redis|certificate required", why), why


async def test_a_bus_that_trusts_another_ca_is_refused_saying_why(
    tls: tuple[Pki, RedisServer],
) -> None:
    pki, server = tls
    url = pki.trusting(server).replace(str(pki.ca), str(pki.stranger))
    assert not await redis_py_accepts(url)
    assert "certificate verify failed" in await refused(url)


async def test_ssl_cert_reqs_none_takes_a_server_of_any_ca_as_redis_py_does(
    tls: tuple[Pki, RedisServer],
) -> None:
    pki, server = tls
    url = pki.trusting(server, ssl_cert_reqs="none").replace(str(pki.ca), str(pki.stranger))
    assert await redis_py_accepts(url)
    await carries(url)


@pytest.fixture
async def misnamed(tmp_path: Path) -> AsyncIterator[tuple[Pki, RedisServer]]:
    """A redis-server whose certificate names another host than the 127.0.0.1 dialled."""
    pki, options = make_pki(tmp_path, ("redis.example.org",))
    async with redis_server(tls_options=options) as server:
        yield pki, server


async def test_a_server_certificate_for_another_host_is_refused_saying_why(
    misnamed: tuple[Pki, RedisServer],
) -> None:
    pki, server = misnamed
    url = pki.trusting(server)
    assert not await redis_py_accepts(url)
    assert "mismatch" in await refused(url)


async def test_ssl_check_hostname_false_takes_it_as_redis_py_does(
    misnamed: tuple[Pki, RedisServer],
) -> None:
    pki, server = misnamed
    url = pki.trusting(server, ssl_check_hostname="false")
    assert await redis_py_accepts(url)
    await carries(url)


async def test_the_systems_authorities_stay_trusted_beside_ssl_ca_certs_as_redis_py_does(
    tls: tuple[Pki, RedisServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py trusts the URL's ssl_ca_certs in addition to the system's authorities
    (here SSL_CERT_FILE, which OpenSSL reads as the system's): so must the bus, or a
    node's presence works and its bus cannot subscribe."""
    pki, server = tls
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    url = pki.trusting(server).replace(str(pki.ca), str(pki.stranger))
    assert await redis_py_accepts(url)
    await carries(url)


async def test_an_encrypted_client_key_is_read_with_ssl_password_as_redis_py_does(
    tls: tuple[Pki, RedisServer], tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization

    pki, server = tls
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), password=None)
    locked = tmp_path / "client-key-locked.pem"
    locked.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"open sesame"),
    ))
    url = pki.trusting(server, ssl_password="open%20sesame").replace(
        str(pki.client_key), str(locked))
    assert await redis_py_accepts(url)
    await carries(url)


@pytest.mark.parametrize(
    "query",
    ["", "?ssl_cert_reqs=none", "?ssl_cert_reqs=optional", "?ssl_check_hostname=false",
     "?ssl_cert_reqs=none&ssl_check_hostname=true"],
)
def test_the_bus_builds_the_tls_context_redis_py_builds(query: str) -> None:
    from redis.asyncio.connection import SSLConnection

    options = _parse_url(f"rediss://redis.example:6380/0{query}")
    ours = _tls_context(options)
    options.pop("connection_class")
    theirs = SSLConnection(**options).ssl_context.get()
    assert (ours.verify_mode, ours.check_hostname) == (theirs.verify_mode, theirs.check_hostname)
