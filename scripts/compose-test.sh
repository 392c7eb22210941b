#!/usr/bin/env bash
# The compose deployment, tested on the real engine as a user would try it: builds the static binaries and the
# images, brings compose/docker-compose.yml up under a project name of its own (random host ports, a copy of the
# policies), and checks the mesh, live policy edits, restarts, a draining stop, a dead upstream and a clean
# teardown. Cleans up after itself whatever fails. Run by scripts/test.sh; usable by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if ! docker info >/dev/null 2>&1; then
    echo "compose-test: no Docker engine answers (docker info failed); the compose deployment cannot be tested" >&2
    exit 1
fi

step() { printf '\n== %s\n' "$*"; }
fail() {
    echo "compose-test: FAILED: $*" >&2
    exit 1
}

step "building the static binaries and the images"
compose/build.sh

project="sidecar-test-$$"
work=$(mktemp -d)
# The sidecars run as nobody (65534): they must be able to read the policies' copy.
chmod 755 "$work"
cp -r compose/policies "$work/policies"
chmod -R a+rX "$work/policies"
export SIDECAR_POLICIES="$work/policies"
# Empty: docker picks free host ports (read back with `docker-compose port`).
export ORDERS_PORT="" ORDERS_ADMIN_PORT="" PAYMENTS_PORT="" PAYMENTS_ADMIN_PORT=""
dc() { docker-compose -p "$project" -f "$root/compose/docker-compose.yml" "$@"; }

cleanup() {
    local status=$?
    if ((status != 0)); then
        echo "-- logs of the failed run" >&2
        dc logs --no-color --tail=40 >&2 2>/dev/null || true
    fi
    dc down -v --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

# Polls a command until it succeeds or `deadline` seconds pass.
wait_for() {
    local what=$1 deadline=$2
    shift 2
    local end=$((SECONDS + deadline))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || fail "$what: not within ${deadline}s"
        sleep 0.2
    done
}

step "up"
started=$(date +%s.%N)
dc up -d --quiet-pull 2>&1 | grep -v "^$" || true
awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "up (both pods, the sidecars healthy): %.1fs\n", b - a }'
payments=$(dc port payments 8080)
payments_admin=$(dc port payments 9901)
orders_admin=$(dc port orders 9901)
[[ -n $payments && -n $payments_admin && -n $orders_admin ]] || fail "the pods publish no ports"

# One call from payments to orders, through both sidecars; prints the app's JSON answer.
call() { curl -sS --max-time 20 "http://$payments/call?target=orders&internal=true&path=${1:-/echo}"; }
status_of() { python3 -c 'import json,sys; print(json.load(sys.stdin).get("status"))'; }
calls_ok() { [[ $(call | status_of) == 200 ]]; }

step "payments calls orders through both sidecars, over mTLS"
wait_for "a first 200 from orders (discovery by Docker's DNS)" 30 calls_ok
answer=$(call)
echo "$answer" | python3 -c '
import json, sys
outer = json.load(sys.stdin)
assert outer["status"] == 200, outer
inner = json.loads(outer["body"])
headers = dict((k.lower(), v) for k, v in inner["headers"])
assert inner["app"] == "orders", inner
identity = headers.get("x-sidecar-peer-identity")
assert identity == "spiffe://mesh.local/service/payments", headers
print("orders saw the caller as", identity)
' || fail "orders did not see payments' SPIFFE identity"

step "image sizes and start-to-ready"
for image in sidecar:local simple-app:local; do
    awk -v i="$image" -v n="$(docker image inspect -f '{{.Size}}' "$image")" 'BEGIN { printf "%s: %.1f MB\n", i, n / 1e6 }'
done
sidecar_id=$(dc ps -q orders-sidecar)
python3 - "$(docker inspect -f '{{.State.StartedAt}}' "$sidecar_id")" "$(docker logs "$sidecar_id" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep -m1 'sidecar listening' | cut -c1-30)" <<'PY'
import sys, datetime
def parse(t):
    t = t.strip().rstrip("Z").split(" ")[0]
    whole, _, frac = t.partition(".")
    return datetime.datetime.fromisoformat(whole) + datetime.timedelta(microseconds=int((frac + "000000")[:6] or 0))
started, ready = parse(sys.argv[1]), parse(sys.argv[2].split()[0])
print(f"orders-sidecar: container started to listening in {(ready - started).total_seconds() * 1000:.0f} ms")
PY

docker stats --no-stream --format '{{.Name}}: {{.MemUsage}}' \
    "$(dc ps -q orders)" "$sidecar_id" "$(dc ps -q orders-app)" | sed "s/^${project}_//"

step "an edit of a policy file on the host takes effect without a restart"
policy="$work/policies/payments/sidecar.yaml"
cp "$policy" "$work/payments.yaml.orig"
cat >>"$policy" <<'EOF'
    rate_limit:
      rate: 1/s
      burst: 1
EOF
limited() { call >/dev/null; [[ $(call | status_of) == 429 ]]; }
wait_for "a rate limit written on the host to apply" 20 limited
echo "the new rate limit answers 429"
cp "$work/payments.yaml.orig" "$policy"
both_ok() { calls_ok && calls_ok; }
wait_for "the rate limit removed on the host to stop applying" 20 both_ok
echo "removed again: 200"

step "restarting the app, then the sidecar: traffic recovers by itself"
dc restart orders-app >/dev/null 2>&1
wait_for "orders after its app restarted" 30 calls_ok
echo "after orders-app restarted: 200"
dc restart orders-sidecar >/dev/null 2>&1
wait_for "orders after its sidecar restarted" 30 calls_ok
echo "after orders-sidecar restarted: 200"

step "docker stop drains: requests already in the sidecar finish, exit code 0"
in_flight() {
    curl -sS --max-time 2 "http://$payments_admin/metrics" |
        awk '/^http_server_active_requests / { print int($2) }'
}
results="$work/in-flight"
mkdir -p "$results"
for i in 1 2 3 4; do
    (call '/echo%3Flatency%3D1500ms' | status_of >"$results/$i") &
done
has_four() { [[ $(in_flight) -ge 4 ]]; }
wait_for "four slow requests in the payments sidecar" 10 has_four
stop_started=$SECONDS
dc stop payments-sidecar >/dev/null 2>&1
wait
stop_took=$((SECONDS - stop_started))
for i in 1 2 3 4; do
    [[ $(cat "$results/$i") == 200 ]] || fail "request $i in flight during the stop got $(cat "$results/$i")"
done
code=$(docker inspect -f '{{.State.ExitCode}}' "$(dc ps -q payments-sidecar)")
[[ $code == 0 ]] || fail "the stopped sidecar exited with $code"
((stop_took < 10)) || fail "docker stop took ${stop_took}s (drain_timeout is 10s)"
echo "4 requests in flight answered 200; the sidecar exited 0 in ${stop_took}s"
dc start payments-sidecar >/dev/null 2>&1
wait_for "payments' sidecar back" 30 calls_ok

step "a dead orders app: the caller gets 502/503 with x-sidecar-error, never a hang"
dc stop orders-app >/dev/null 2>&1
answer=$(call)
echo "$answer" | python3 -c '
import json, sys
outer = json.load(sys.stdin)
assert outer["status"] in (502, 503), outer
assert outer["sidecar_error"], outer
print(outer["status"], outer["sidecar_error"])
' || fail "a dead upstream was not reported as the sidecar's error: $answer"
dc start orders-app >/dev/null 2>&1

step "down -v leaves nothing behind"
dc down -v --remove-orphans >/dev/null 2>&1
label="label=com.docker.compose.project=$project"
left="$(docker ps -aq --filter "$label")$(docker volume ls -q --filter "$label")$(docker network ls -q --filter "$label")"
[[ -z $left ]] || fail "left behind: $left"
echo "no container, volume or network of $project is left"

step "compose: every check passed"
