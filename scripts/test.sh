#!/usr/bin/env bash
# The whole test suite. The tests run real programs where the product meets them (a Prometheus server and
# promtool scrape and check the metrics, dnsmasq answers DNS), so this installs the ones the machine lacks,
# runs every test, prints a total, then tests the compose deployment on the real Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests run: prometheus (server and promtool: the metrics tests), dnsmasq-base (a real
# DNS server on loopback: the discovery tests), curl and openssl (TLS clients of the mesh listener).
packages=()
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then packages+=(prometheus); fi
if ! command -v dnsmasq >/dev/null && [[ ! -x /usr/sbin/dnsmasq ]]; then packages+=(dnsmasq-base); fi
if ! command -v curl >/dev/null; then packages+=(curl); fi
if ! command -v openssl >/dev/null; then packages+=(openssl); fi
if ((${#packages[@]})); then
    echo "installing ${packages[*]} for the tests" >&2
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine may have empty package lists: update only when the plain install fails.
    if ! "${sudo[@]}" apt-get install -y --no-install-recommends "${packages[@]}"; then
        "${sudo[@]}" apt-get update
        "${sudo[@]}" apt-get install -y --no-install-recommends "${packages[@]}"
    fi
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"

# The compose deployment on the real Docker engine: images, a two-service mesh, reloads, restarts, drain.
scripts/compose-test.sh
