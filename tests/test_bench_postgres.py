"""``scripts/bench.py --db-url ... --compare``: the same scenario on SQLite and on
PostgreSQL in one run, both verified, the databases it made dropped.

No timing is asserted (the machine may be busy).  Skipped where PostgreSQL is absent,
failed instead with CHATD_REQUIRE_POSTGRES=1 (tests/pg_helpers.py).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from tests.pg_helpers import fresh_database
from tests.test_bench import BENCH, ROOT


@pytest.mark.slow
async def test_compare_runs_each_scenario_on_both_stores() -> None:
    async with fresh_database() as url:  # the server to make the benchmark's databases on
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(BENCH), "--quick", "--json-only", "--db-url", url,
             "--compare", "--scenario", "store"],
            cwd=ROOT, capture_output=True, text=True, timeout=110,
        )
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            made = lines[-1]["postgres_database"]
            assert made.startswith("chatd_bench_")
            left = await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", made)
        finally:
            await conn.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(r["scenario"], r["store"], r["verified"]) for r in lines] == [
        ("store", "sqlite", True), ("store", "postgresql", True)
    ]
    on_sqlite, on_postgres = lines
    assert on_postgres["vs_sqlite"] == round(
        on_postgres["messages_per_s"] / on_sqlite["messages_per_s"], 3
    )
    assert left == 0
