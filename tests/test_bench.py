"""The benchmark measures what it claims: a quick run of every scenario verifies itself.

No timing is asserted (the machine may be busy); only that every scenario ran and
found exactly what it sent -- counts, order, ids -- with no loss and no duplicate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"
SCENARIOS = {"dm", "fanout", "latency", "idle", "logins", "catchup", "store", "hostile"}


@pytest.mark.slow
def test_quick_benchmark_verifies_every_scenario(tmp_path: Path) -> None:
    output = tmp_path / "bench.jsonl"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json-only", "--baseline",
         "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    failed = [(r["scenario"], r["server"], r["verification"]) for r in lines if not r["verified"]]
    assert not failed, failed
    assert done.returncode == 0, done.stderr[-3000:]
    ran = {(r["scenario"], r["server"]) for r in lines}
    assert ran == {(name, "chatd") for name in SCENARIOS} | {("dm", "relay")}
    assert len(lines) == len(ran)
    for result in lines:
        assert result["verified"] is True
        assert result["verification"]["error_count"] == 0
        for key in ("machine", "python", "commit", "date", "pinned", "db_synchronous"):
            assert key in result, (key, result["scenario"])
    chatd_dm = next(r for r in lines if r["scenario"] == "dm" and r["server"] == "chatd")
    assert chatd_dm["delivered"] == chatd_dm["pairs"] * chatd_dm["messages_per_sender"]
    assert "fraction_of_relay" in chatd_dm
    assert "verified" not in done.stderr  # --json-only: no table
    assert output.read_text().splitlines() == done.stdout.splitlines()
