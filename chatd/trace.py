"""A tracer for the latency tail, off unless ``CHATD_TRACE_FILE`` names a file.

It records spans (what, start, end, how many) on the ``time.perf_counter_ns()``
clock, which on Linux is CLOCK_MONOTONIC and so shared with the load generator on
the same machine: ``scripts/tail_trace.py`` lines the slowest messages of a latency
run up with what the server was doing meanwhile (a group commit, a checkpoint,
writes held back, a garbage collection). The spans are written out as JSON lines
when the server stops. Off (the default), each trace point costs one test of a
module-level flag.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import time
from typing import Any

FILE = os.environ.get("CHATD_TRACE_FILE", "")
ON = bool(FILE)
# A span per group commit at 2,000 msg/s for a minute is about 100,000 tuples: kept in
# memory (a few MB) and written once, so that tracing does not write while measuring.
_spans: list[tuple[str, int, int, int]] = []
_gc_started = 0

now = time.perf_counter_ns


def span(what: str, start: int, end: int, count: int = 0) -> None:
    """Record that ``what`` ran from ``start`` to ``end`` (perf_counter_ns)."""
    _spans.append((what, start, end, count))


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = now()
    else:
        span(f"gc{info['generation']}", _gc_started, now(), info.get("collected", 0))


def dump() -> None:
    """Write the spans recorded so far to FILE (once; later calls add nothing)."""
    if not ON or not _spans:
        return
    spans = _spans[:]
    _spans.clear()
    with open(FILE, "a", encoding="utf-8") as out:
        for what, start, end, count in spans:
            out.write(json.dumps({"what": what, "start": start, "end": end, "n": count}) + "\n")


if ON:
    gc.callbacks.append(_on_gc)
    atexit.register(dump)
