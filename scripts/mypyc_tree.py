#!/usr/bin/env python3
"""A copy of this checkout with chatd's hot modules compiled by mypyc (docs/benchmarks.md).

    python scripts/mypyc_tree.py /tmp/mypyc-tree
    python scripts/dm_instructions.py --source base=/tmp/base --source mypyc=/tmp/mypyc-tree
    cd /tmp/mypyc-tree && PYTHONPATH=$PWD /path/to/.venv/bin/pytest -q -p no:cacheprovider

An experiment, not a build: the checkout itself is left as it is. The copy gets the two
source changes mypyc needs (PATCHES, applied to the copy only), then ``mypyc`` compiles
MODULES in it; the extension modules land beside their sources, which they shadow.

Run the tests from inside the copy: pytest puts the rootdir (the directory above the
``tests`` package) first on sys.path, so run from the checkout with
``PYTHONPATH=/tmp/mypyc-tree`` they would import the checkout's pure-Python chatd.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The brief's hot modules that compile and import (docs/benchmarks.md, the mypyc
# section, lists the ones left out and why).
MODULES = (
    "chatd/codec.py", "chatd/events.py", "chatd/app.py", "chatd/connection.py",
    "chatd/handlers.py", "chatd/hub.py", "chatd/delivery.py", "chatd/limits.py",
    "chatd/bus.py", "chatd/store/commit.py", "chatd/validation.py", "chatd/names.py",
)
# --more: the other modules that compile and pass the tests compiled.
MORE = ("chatd/store/__init__.py", "chatd/trace.py", "chatd/metrics.py",
        "chatd/errors.py", "chatd/protocol.py")

# (file, text, replacement): what mypyc needs changed, each found exactly once.
PATCHES = (
    # mypyc passes the *-unpacked tuple to a native base class's __init__ as its first
    # argument (Session.address became a tuple: TypeError in Networks.__contains__).
    ("chatd/connection.py",
     '        super().__init__(*_peer(writer.get_extra_info("peername")))\n',
     '        address, port = _peer(writer.get_extra_info("peername"))\n'
     "        super().__init__(address, port)\n"),
    # The loop's tuples join to (RateLimiter, float, int): mypyc refuses an int stored
    # in a float attribute ("Incompatible value representations").
    ("chatd/limits.py",
     "            bucket.rate, bucket.burst = rate, burst\n",
     "            bucket.rate, bucket.burst = rate, float(burst)\n"),
)

IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "*.so",
                                "*.egg-info", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                                ".hypothesis")


def copy_tree(out: Path) -> None:
    """The checkout's files (not its venv or caches) into a fresh ``out``."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(ROOT, out, ignore=IGNORE)


def patch(out: Path) -> None:
    for name, old, new in PATCHES:
        path = out / name
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{name}: the text mypyc needs changed is no longer there")
        path.write_text(text.replace(old, new))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the copy to make (replaced if it exists)")
    parser.add_argument("--more", action="store_true", help="compile MORE too")
    parser.add_argument("--also", action="append", default=[], metavar="FILE",
                        help="another module to compile, e.g. chatd/irc/session.py")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    if out == ROOT or ROOT in out.parents:
        raise SystemExit("the copy must be outside the checkout")
    copy_tree(out)
    patch(out)
    modules = [*MODULES, *(MORE if args.more else ()), *args.also]
    # mypyc reads pyproject.toml's [tool.mypy] (msgpack has no stubs) from the copy.
    subprocess.run([sys.executable, "-m", "mypyc", *modules], cwd=out, check=True)
    print(f"compiled {len(modules)} modules in {out}")


if __name__ == "__main__":
    main()
