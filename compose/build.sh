#!/usr/bin/env bash
# Builds the two static binaries and the images the compose file runs: sidecar:local and simple-app:local.
# Usage: compose/build.sh   (then: docker-compose -f compose/docker-compose.yml up -d)
set -euo pipefail
cd "$(dirname "$0")/.."

# Static glibc binaries run in a FROM scratch image and resolve compose names through Docker's DNS. Always name
# the target, so the static flag does not reach build scripts and proc macros.
target=x86_64-unknown-linux-gnu
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --target "$target" -p sidecar -p simple-app

stage=compose/.build
rm -rf "$stage"
mkdir -p "$stage/empty"
# The images carry the binaries without their symbols and line tables (72 MB -> 12 MB for the sidecar); the
# ones in target/ keep them for debugging.
for bin in sidecar simple-app; do
    strip -o "$stage/$bin" "target/$target/release/$bin"
done
bundle=/etc/ssl/certs/ca-certificates.crt
if [[ -f $bundle ]]; then cp "$bundle" "$stage/"; else : >"$stage/ca-certificates.crt"; fi

docker build -q -t sidecar:local -f compose/Dockerfile.sidecar compose >/dev/null
docker build -q -t simple-app:local -f compose/Dockerfile.app compose >/dev/null
for image in sidecar:local simple-app:local; do
    printf '%s: %s bytes\n' "$image" "$(docker image inspect -f '{{.Size}}' "$image")"
done
