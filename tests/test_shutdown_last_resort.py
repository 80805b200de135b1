"""The server's last resort at shutdown: a connection that does not end when it is reset
(which would be a bug) is cancelled, said where it was stuck, and the server stops all the
same; the other connections end through their own clean-up.

In process, so that the bug can be made: Connection.abort is made to do nothing.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from chatd import server as server_module
from chatd.connection import Connection
from tests.conftest import MakeHarness
from tests.test_faults import stop_reading_with_replies_owed


async def test_a_connection_that_ignores_its_reset_is_cancelled_and_shutdown_ends(
    make_harness: MakeHarness,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = await make_harness(graceful_timeout=0.2, write_timeout=60.0)
    await harness.user("alice")
    bystander = await harness.user("bob")
    writer = await stop_reading_with_replies_owed(harness.port, "alice")
    monkeypatch.setattr(server_module, "ABORT_GRACE", 0.2)
    monkeypatch.setattr(Connection, "abort", lambda self, reason: None)  # the bug
    try:
        with caplog.at_level(logging.WARNING, logger="chatd.server"):
            async with asyncio.timeout(20):
                await harness.server.close()
    finally:
        writer.transport.abort()
    messages = [record.getMessage() for record in caplog.records]
    assert any("closing" in m and "still busy at shutdown" in m for m in messages), messages
    stuck = [m for m in messages if "cancelling a connection that did not end" in m]
    assert len(stuck) == 1, messages
    assert "Connection._run" in stuck[0]  # where it waited, for the bug report
    assert not harness.server._connections  # each one's clean-up ran, the stuck one too
    await bystander.close()
