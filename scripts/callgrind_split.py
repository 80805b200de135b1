#!/usr/bin/env python3
"""Instructions per message by shared object and by function, from two callgrind files.

    python scripts/dm_instructions.py --scenario latency --small 100 --large 500 \\
        --source base=/tmp/base --keep /tmp/cg
    python scripts/callgrind_split.py /tmp/cg/r0bases.callgrind /tmp/cg/r0basel.callgrind 400

The files are one tree's small and large runs of dm_instructions.py (``--keep``); the
count is the messages between them (latency: large - small; dm: pairs x (large - small)).
Each function's self cost in the large run less that in the small one, over the count:
start-up and shutdown cancel as in dm_instructions.py. Needs callgrind_annotate.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections import Counter

LINE = re.compile(r"\s*([\d,]+) \([ \d.]+%\)\s+(.*)$")
OBJECT = re.compile(r"\[([^\]]*)\]\s*$")


def self_costs(path: str) -> Counter[str]:
    """Self instructions of each "file:function [object]" in one callgrind file."""
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", "--auto=no", path],
        capture_output=True, text=True, check=True).stdout
    costs: Counter[str] = Counter()
    for line in out.splitlines():
        found = LINE.match(line)
        if found and "PROGRAM TOTALS" not in found[2]:
            costs[found[2]] += int(found[1].replace(",", ""))
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("small")
    parser.add_argument("large")
    parser.add_argument("messages", type=int)
    parser.add_argument("--top", type=int, default=20, help="functions to list")
    args = parser.parse_args()
    small, large = self_costs(args.small), self_costs(args.large)
    by_object: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    for key in small.keys() | large.keys():
        per_message = (large[key] - small[key]) / args.messages
        found = OBJECT.search(key)
        obj = found[1].rsplit("/", 1)[-1] if found else "?"
        function = OBJECT.sub("", key).rstrip().rsplit(":", 1)[-1]
        by_object[obj] += per_message
        by_function[f"{function} ({obj})"] += per_message
    print(f"{sum(by_object.values()):10.0f} in all")
    for name, cost in by_object.most_common():
        if abs(cost) >= 1:
            print(f"{cost:10.0f} {name}")
    print()
    for name, cost in by_function.most_common(args.top):
        print(f"{cost:10.0f} {name}")


if __name__ == "__main__":
    main()
