"""The latency tracer (chatd/trace.py, CHATD_TRACE_FILE) and scripts/tail_trace.py."""

from __future__ import annotations

import json
from pathlib import Path

from chatd.client import Client
from tests.conftest import PASSWORD, Spawn, fast_env, load_script

tail_trace = load_script("tail_trace")


async def register(port: int, name: str) -> Client:
    client = await Client.connect("127.0.0.1", port)
    await client.request(
        "/register", {"name": name, "password": PASSWORD, "password_repete": PASSWORD}
    )
    await client.login(name, PASSWORD)
    return client


async def test_a_traced_server_writes_its_commits_when_it_stops(
    spawn: Spawn, tmp_path: Path
) -> None:
    trace_file = tmp_path / "spans.jsonl"
    server = await spawn(env=fast_env(CHATD_TRACE_FILE=str(trace_file)))
    port = await server.wait_listening()
    ann, bob = await register(port, "ann"), await register(port, "bob")
    for text in ("one", "two", "three"):
        reply = await ann.call("/send", {"name": "bob", "msg": text})
        assert reply["code"] == 0
    await ann.close()
    await bob.close()
    assert not trace_file.exists()  # kept in memory while serving
    assert await server.stop() == 0
    spans = [json.loads(line) for line in trace_file.read_text().splitlines()]
    commits = [s for s in spans if s["what"] == "commit"]
    assert sum(s["n"] for s in commits) == 3  # every message, in some commit
    assert all(0 < s["start"] <= s["end"] for s in spans)


def test_a_message_is_split_at_the_commit_that_delivered_it() -> None:
    ms = 1_000_000
    commits = [(10 * ms, 12 * ms, 1), (20 * ms, 23 * ms, 2), (30 * ms, 31 * ms, 1)]
    ends = [end for _, end, _ in commits]
    # Sent at 19 ms, arrived at 25 ms: delivered by the commit that ran from 20 to 23 ms.
    before, commit, after, size = tail_trace.split((19 * ms, 6 * ms), ends, commits)
    assert (before, commit, after, size) == (1.0, 3.0, 2.0, 2)


def test_overlaps_counts_only_the_part_in_flight() -> None:
    spans = [(0, 10, 0), (20, 30, 0), (50, 60, 0)]
    assert tail_trace.overlaps(spans, 5, 25) == 5 + 5
    assert tail_trace.overlaps(spans, 31, 49) == 0
    assert tail_trace.overlaps(spans, 55, 100) == 5
