"""Service URLs as logs and error messages show them: no password in them."""

from __future__ import annotations

import pytest

from chatd.urls import redact


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://chatd:s3cret@db.example:5432/chat", "postgresql://chatd:***@db.example:5432/chat"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://p%40ss:s3cret@host", "redis://p%40ss:***@host"),
        ("redis://user:p@ss@host:1", "redis://user:***@host:1"),  # an @ in the password
        (
            "rediss://host:6380?ssl_certfile=/c.pem&ssl_password=s3cret&ssl_cert_reqs=none",
            "rediss://host:6380?ssl_certfile=%2Fc.pem&ssl_password=***&ssl_cert_reqs=none",
        ),
        ("unix:///run/redis.sock?password=s3cret&db=2", "unix:///run/redis.sock?password=***&db=2"),
        ("postgresql:///test", "postgresql:///test"),  # nothing secret: unchanged
        ("redis://user@host?db=1", "redis://user@host?db=1"),
    ],
)
def test_a_url_is_shown_without_its_passwords(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert "s3cret" not in redact(url)
