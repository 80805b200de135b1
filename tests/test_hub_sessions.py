"""What the hub keeps per session (in memory: no I/O in the hub)."""

from __future__ import annotations

import hashlib

from chatd.hub import Hub, Session


def digest_of(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()  # a new bytes object each call


def test_sessions_bound_with_one_token_share_its_digest() -> None:
    hub = Hub()
    first, second, other = Session(), Session(), Session()
    hub.bind(first, 1, "ann", digest_of("token-a"), float("inf"))
    hub.bind(second, 1, "ann", digest_of("token-a"), float("inf"))
    hub.bind(other, 1, "ann", digest_of("token-b"), float("inf"))
    assert second.token_digest is first.token_digest
    assert other.token_digest == digest_of("token-b")
    assert other.token_digest != first.token_digest


def test_a_shared_digest_is_still_each_sessions_own_to_revoke() -> None:
    hub = Hub()
    first, second = Session(), Session()
    hub.bind(first, 1, "ann", digest_of("token-a"), float("inf"))
    hub.bind(second, 1, "ann", digest_of("token-a"), float("inf"))
    assert set(hub.sessions_with_token(1, digest_of("token-a"))) == {first, second}
    hub.unbind(first)
    assert first.token_digest is None
    assert second.token_digest == digest_of("token-a")
    assert hub.sessions_with_token(1, digest_of("token-a")) == [second]
