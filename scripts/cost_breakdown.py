#!/usr/bin/env python3
"""chatd's CPU per message, by stage, from a py-spy profile (docs/benchmarks.md).

    py-spy record --native --threads --format raw -r 250 -d 20 -o dm.txt -p CHATD_PID
    python scripts/cost_breakdown.py dm.txt --main-us 15.2 --db-us 3.9

``--main-us`` and ``--db-us`` are chatd's CPU time per delivered message on its event
loop's thread and on its other threads (aiosqlite's workers running SQLite), measured
over the same window from /proc/PID/task/*/stat.  The event loop's samples are split
into stages, each sample going to the innermost frame that names one (the rules below,
leaf first): a msgpack call made while fanning out counts as "encode", not "fan-out".
The other threads are not split: py-spy's idle detection cannot tell a thread waiting
for the GIL from one running, so their samples would mislead; their CPU is exact.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Sequence

# (stage, pattern on "function (file)"), tried on each frame from the leaf up.
RULES: tuple[tuple[str, str], ...] = (
    ("gc", r"gc_collect|collect_with_callback|gc_collect_main|\bcollect \(gc"),
    ("decode", r"decode_body|unpackb|FrameDecoder|unpack_|_unpacker"),
    ("encode", r"encode_frame|Packer|msgpack_pack|(?<!un)pack_|format_datetime|_format_second|"
               r"events\.py"),
    ("write", r"Connection\.write\b|_flush_pushes|UVStream.*write|try_write|__libc_write|"
              r"^writev? \(|sendmsg|__send\b|tcp_sendmsg|sock_sendmsg"),
    ("rate limit", r"limits\.py|RateLimiter|_throttle"),
    ("reply", r"_ReplyQueue|PendingReply|ReplyGroup|app\.py.*(finish|result)|metrics\.py|"
              r"^success \(|^_?sent \("),
    ("validation", r"parse_request|protocol\.py|Params\.|valid|names\.py|_existing_user|"
                   r"^_known \(|request_id"),
    ("store, main thread", r"store\.py|storage\.py|chatd/store/|aiosqlite/core\.py.*(_execute|"
                           r"execute|_connection_worker_thread_done)|call_soon_threadsafe"),
    ("fan-out", r"hub\.py|delivery\.py|publish|_after_commit"),
    ("dispatch", r"handlers\.py|app\.py|dispatch|Context"),
    ("read", r"_handle_bytes|_run \(chatd/connection|StreamReader|uv__read|__libc_read|"
             r"^read \(|recv"),
    ("event loop", r"uvloop|uv__|epoll|asyncio|_run_once|Handle\._run"),
)
IDLE = re.compile(r"^epoll_p?wait ")
COMPILED = tuple((stage, re.compile(pattern)) for stage, pattern in RULES)


def stage_of(frames: Sequence[str]) -> str:
    for frame in reversed(frames):
        for stage, pattern in COMPILED:
            if pattern.search(frame):
                return stage
    return "other"


def parse(lines: Sequence[str]) -> Counter[str]:
    """The event loop thread's samples by stage; py-spy's raw format is
    'thread (tid);frame;frame... COUNT', root first."""
    counts: Counter[str] = Counter()
    main_tid: str | None = None
    rows: list[tuple[str, list[str], int]] = []
    for line in lines:
        stack, _, samples = line.rstrip("\n").rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        frames = stack.split(";")
        rows.append((frames[0], frames[1:], int(samples)))
        # The event loop's thread is the one that runs chatd's connection code.
        if main_tid is None and any("chatd/connection.py" in f for f in frames):
            main_tid = frames[0]
    for tid, stack_frames, samples_in in rows:
        # A sample in epoll's wait is the loop waiting for work, not CPU spent.
        if tid == main_tid and not (stack_frames and IDLE.search(stack_frames[-1])):
            counts[stage_of(stack_frames)] += samples_in
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", help="py-spy record --format raw output")
    parser.add_argument("--main-us", type=float, required=True,
                        help="event loop thread CPU microseconds per delivered message")
    parser.add_argument("--db-us", type=float, required=True,
                        help="other threads' CPU microseconds per delivered message")
    args = parser.parse_args(argv)
    with open(args.profile) as profile:
        counts = parse(profile.readlines())
    total = sum(counts.values())
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print(f"{'stage (event loop thread)':<26} {'share':>7} {'us/msg':>7}")
    for stage, count in counts.most_common():
        share = count / total
        print(f"{stage:<26} {share:>6.1%} {share * args.main_us:>7.2f}")
    print(f"{'event loop thread':<26} {1:>6.0%} {args.main_us:>7.2f}  ({total} samples)")
    print(f"{'store, DB threads':<26} {'':>7} {args.db_us:>7.2f}")
    print(f"{'all threads':<26} {'':>7} {args.main_us + args.db_us:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
