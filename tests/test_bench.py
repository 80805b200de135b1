"""The benchmark measures what it claims: a quick run of every scenario verifies itself.

No timing is asserted (the machine may be busy); only that every scenario ran and
found exactly what it sent -- counts, order, ids -- with no loss and no duplicate.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"
SCENARIOS = {"dm", "fanout", "latency", "idle", "logins", "catchup", "store", "hostile"}
PEER_SCENARIOS = ("dm", "fanout", "latency", "idle")


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


def ngircd_installed() -> bool:
    return shutil.which("ngircd") is not None or Path("/usr/sbin/ngircd").exists()


def run_peers(tmp_path: Path, *extra: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--peers", "--quick", "--json-only", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert lines, done.stderr[-3000:]
    failed = [(r["scenario"], r["server"], r.get("verification")) for r in lines
              if not r["verified"]]
    assert not failed, failed
    assert done.returncode == 0, done.stderr[-3000:]
    return lines[:-1], lines[-1]


def check_peer_lines(results: list[dict[str, Any]], servers: set[str]) -> None:
    assert {(r["scenario"], r["server"]) for r in results} == {
        (name, server) for name in PEER_SCENARIOS for server in servers}
    for result in results:
        assert result["mode"] == "peers"
        assert result["verification"]["error_count"] == 0
        # Every figure carries both sides' CPU and whether the generator may have bound it.
        for key in ("server_cpu_pct", "client_cpu_pct", "lower_bound", "commit", "machine"):
            assert key in result, (key, result["scenario"], result["server"])
        assert result["lower_bound"] == (result["client_cpu_pct"] > 80)


@pytest.mark.slow
def test_quick_peers_run_against_chatd_over_msgpack_and_irc(tmp_path: Path) -> None:
    results, summary = run_peers(tmp_path, "--peer", "chatd", "--peer", "chatd-irc")
    check_peer_lines(results, {"chatd", "chatd-irc"})
    for dm in (r for r in results if r["scenario"] == "dm"):
        assert dm["delivered"] == dm["pairs"] * dm["messages_per_sender"]
    assert {r["protocol"] for r in results} == {"msgpack", "irc"}
    assert summary["scenario"] == "peers" and summary["ratios"] == {}
    assert [t["met"] for t in summary["targets"]] == [False] * 4  # no peer, no ratio


@pytest.mark.slow
@pytest.mark.skipif(not ngircd_installed(), reason="ngircd not installed "
                    "(scripts/bench-peers-setup.sh)")
def test_quick_peers_run_against_ngircd(tmp_path: Path) -> None:
    results, summary = run_peers(tmp_path, "--peer", "chatd", "--peer", "ngircd")
    check_peer_lines(results, {"chatd", "ngircd"})
    assert set(summary["ratios"]) == {f"{name}/ngircd" for name in PEER_SCENARIOS}
    for ratio in summary["ratios"].values():
        assert ratio["ratio"] > 0 and ratio["verified"] is True


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chatd_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chatd_bench"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_lower_bound_never_meets_a_target() -> None:
    bench = load_bench()

    def line(server: str, delivered: int, lower_bound: bool) -> dict[str, Any]:
        return {"scenario": "dm", "server": server, "delivered_per_s": delivered,
                "lower_bound": lower_bound, "verified": True}

    trusted = bench.peer_ratios([line("chatd", 60, False), line("miniircd", 100, False)])
    assert trusted["ratios"]["dm/miniircd"]["ratio"] == 0.6
    assert trusted["targets"][0]["met"] is True
    for chatd_bound, peer_bound in ((True, False), (False, True)):
        judged = bench.peer_ratios([line("chatd", 60, chatd_bound),
                                    line("miniircd", 100, peer_bound)])
        assert judged["targets"][0]["met"] is False
        assert judged["targets"][0]["counted"] is False
    short = bench.peer_ratios([line("chatd", 40, False), line("miniircd", 100, False)])
    assert short["targets"][0]["met"] is False and short["targets"][0]["counted"] is True
