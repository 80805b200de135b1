#!/bin/sh
# Installs the servers that `scripts/bench.py --peers` compares chatd with, and the
# profiler used for docs/benchmarks.md's cost breakdown.  None of them is a dependency
# of chatd: ngircd comes from Debian, miniircd and py-spy go into a virtualenv of their
# own under $CHATD_BENCH_PEERS (default ~/.cache/chatd-bench-peers), where bench.py
# looks for miniircd (or give it --miniircd PATH, --ngircd PATH).
#
#   sh scripts/bench-peers-setup.sh
#   python scripts/bench.py --peers --pin
set -eu

PEERS_HOME="${CHATD_BENCH_PEERS:-$HOME/.cache/chatd-bench-peers}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if ! command -v ngircd >/dev/null 2>&1 && [ ! -x /usr/sbin/ngircd ]; then
    $SUDO apt-get update
    # The benchmark starts its own ngircd (generated config, spare loopback port,
    # --nodaemon); the package's system service is not used.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ngircd
fi

python3 -m venv "$PEERS_HOME/venv"
"$PEERS_HOME/venv/bin/pip" install --quiet 'miniircd==2.3' 'py-spy>=0.3'

echo "ngircd:   $(command -v ngircd || echo /usr/sbin/ngircd)"
echo "miniircd: $PEERS_HOME/venv/bin/miniircd"
echo "py-spy:   $PEERS_HOME/venv/bin/py-spy"
