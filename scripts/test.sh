#!/usr/bin/env bash
# The whole test suite. The tests run real programs where the product meets them (a Prometheus server and
# promtool scrape and check the metrics), so this installs the ones the machine lacks, runs every test, and
# prints a total.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    echo "installing prometheus (Debian's package: the server and promtool) for the metrics tests" >&2
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine may have empty package lists: update only when the plain install fails.
    if ! "${sudo[@]}" apt-get install -y --no-install-recommends prometheus; then
        "${sudo[@]}" apt-get update
        "${sudo[@]}" apt-get install -y --no-install-recommends prometheus
    fi
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
