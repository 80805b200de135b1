#!/usr/bin/env python3
"""Where the slowest messages of a latency run spent their time.

Run the latency scenario with chatd tracing and the generator keeping every
message's times (both on the CLOCK_MONOTONIC clock of ``time.perf_counter_ns()``):

    CHATD_TRACE_FILE=/tmp/t.trace LOADGEN_LATENCY_DUMP=/tmp/t.lat \\
        python scripts/bench.py --peers --peer chatd --scenario latency --pin
    python scripts/tail_trace.py /tmp/t.trace /tmp/t.lat

Each message is split at the group commit that delivered it (the last one to end
before the message arrived): ``before`` (from the send until that commit began: the
network, decoding, waiting for the batch ahead), ``commit`` (the commit, thread hops
included) and ``after`` (from the commit's end to the arrival: publishing, the push
write, the generator reading it). For the slowest 1% and for all messages it also
says how often each kind of server span (checkpoints, writes held back, garbage
collections, slow commits) overlapped the message's flight.
"""

from __future__ import annotations

import bisect
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

SLOW_COMMIT_NS = 2_000_000  # a commit longer than this counts as a span of its own


def load_spans(path: Path) -> dict[str, list[tuple[int, int, int]]]:
    spans: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        item = json.loads(line)
        spans[item["what"]].append((item["start"], item["end"], item["n"]))
    for kind in spans.values():
        kind.sort()
    commits = spans.get("commit", [])
    spans["commit>2ms"] = [s for s in commits if s[1] - s[0] > SLOW_COMMIT_NS]
    return spans


def load_messages(path: Path) -> list[tuple[int, int]]:
    return sorted(
        (int(sent), int(latency))
        for sent, latency in (line.split() for line in path.read_text().splitlines())
    )


def overlaps(spans: list[tuple[int, int, int]], start: int, end: int) -> int:
    """Nanoseconds of [start, end] covered by the spans (sorted by start; they do not
    overlap each other much, so the sum is close enough)."""
    total = 0
    for span_start, span_end, _ in spans[: bisect.bisect_left(spans, (end,))]:
        if span_end > start:
            total += min(span_end, end) - max(span_start, start)
    return total


def split(message: tuple[int, int], commit_ends: list[int],
          commits: list[tuple[int, int, int]]) -> tuple[float, float, float, int]:
    """(before, commit, after) in ms and the batch size, at the delivering commit."""
    sent, latency = message
    arrived = sent + latency
    index = bisect.bisect_right(commit_ends, arrived) - 1
    if index < 0:
        return latency / 1e6, 0.0, 0.0, 0
    start, end, size = commits[index]
    return (max(0, start - sent) / 1e6, (end - max(start, sent)) / 1e6,
            (arrived - end) / 1e6, size)


def median_ms(latencies: list[int]) -> str:
    return f"{statistics.median(latencies) / 1e6:.3f}" if latencies else "-"


def describe(label: str, messages: list[tuple[int, int]],
             spans: dict[str, list[tuple[int, int, int]]]) -> None:
    commits = sorted(spans.get("commit", []), key=lambda s: s[1])
    commit_ends = [end for _, end, _ in commits]
    parts = [split(m, commit_ends, commits) for m in messages]
    print(f"{label}: {len(messages)} messages, latency median "
          f"{statistics.median(m[1] for m in messages) / 1e6:.3f} ms")
    for name, column in (("before", 0), ("commit", 1), ("after", 2)):
        values = [p[column] for p in parts]
        print(f"  {name:7} median {statistics.median(values):7.3f} ms   mean "
              f"{statistics.fmean(values):7.3f} ms")
    print(f"  batch size median {statistics.median(p[3] for p in parts)}")
    for kind in sorted(spans):
        if kind == "commit":
            continue
        touched = [overlaps(spans[kind], s, s + lat) for s, lat in messages]
        hit = [m[1] for m, t in zip(messages, touched, strict=True) if t]
        missed = [m[1] for m, t in zip(messages, touched, strict=True) if not t]
        print(f"  overlapped by {kind:20} {100 * len(hit) / len(messages):5.1f}% of them"
              f" (mean overlap {statistics.fmean(touched) / 1e6:.3f} ms; latency median"
              f" {median_ms(hit)} ms overlapped, {median_ms(missed)} ms not)")


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    spans = load_spans(Path(sys.argv[1]))
    messages = load_messages(Path(sys.argv[2]))
    for kind, items in sorted(spans.items()):
        durations = sorted(end - start for start, end, _ in items)
        if durations:
            median = durations[len(durations) // 2]
            print(f"span {kind:20} {len(items):6}x  median {median / 1e6:.3f}"
                  f"  p99 {durations[int(len(durations) * 0.99)] / 1e6:.3f}"
                  f"  max {durations[-1] / 1e6:.3f} ms")
    slowest = sorted(messages, key=lambda m: m[1])[-max(1, len(messages) // 100):]
    print(f"p99 latency {slowest[0][1] / 1e6:.3f} ms")
    describe("slowest 1%", sorted(slowest), spans)
    describe("all", messages, spans)
    return 0


if __name__ == "__main__":
    sys.exit(main())
