#!/usr/bin/env bash
# Load benchmark: direct vs nginx reverse proxy vs sidecar, all in front of the same nginx upstream.
# See bench/README.md. Does not build the sidecar: run `cargo build --release -p sidecar` first.
#
# Environment:
#   DURATION     measured run per setup, wrk syntax (default 10s)
#   CONNECTIONS  wrk keep-alive connections (default 64)
#   SIDECAR_BIN  sidecar binary (default target/release/sidecar, relative to the repo root)
#   SIDECAR_ARGS extra sidecar arguments, e.g. "--access-log off" (the access log goes to a file here)
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
WARMUP=2s
THREADS=1 # wrk threads: part of the seat, keep it fixed

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIDECAR_BIN=${SIDECAR_BIN:-target/release/sidecar}
case $SIDECAR_BIN in /*) ;; *) SIDECAR_BIN=$REPO_ROOT/$SIDECAR_BIN ;; esac

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

# --- tools -------------------------------------------------------------------------------------------------------

ensure_tools() {
    local nginx_bin wrk_bin
    nginx_bin=$(command -v nginx || { test -x /usr/sbin/nginx && echo /usr/sbin/nginx; } || true)
    wrk_bin=$(command -v wrk || true)
    if [[ -z $nginx_bin || -z $wrk_bin ]]; then
        log "installing nginx-light and wrk"
        local sudo=()
        if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
        export DEBIAN_FRONTEND=noninteractive
        # A fresh CI image often has empty package lists: update only when the plain install fails.
        if ! "${sudo[@]}" apt-get install -y nginx-light wrk; then
            "${sudo[@]}" apt-get update
            "${sudo[@]}" apt-get install -y nginx-light wrk
        fi
        nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
        wrk_bin=$(command -v wrk)
    fi
    test -x "$nginx_bin" || die "nginx not found after install"
    NGINX=$nginx_bin
    WRK=$wrk_bin
}

# --- processes and ports -----------------------------------------------------------------------------------------

PIDS=()
TMP=

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # nginx/sidecar exit quickly on TERM; KILL anything still there after ~3 s.
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    if [[ -n $TMP && -d $TMP ]]; then rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

stop() { # stop one process started by this script
    local pid=$1 p keep=()
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() { # a port nothing listens on (127.0.0.1), avoiding ones handed out earlier
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 40000))
        [[ " ${USED_PORTS:-} " == *" $p "* ]] && continue
        if ! port_open "$p"; then USED_PORTS="${USED_PORTS:-} $p"; echo "$p"; return; fi
    done
    die "no free port found"
}

wait_port() { # wait_port PORT PID NAME LOG: until PORT accepts, at most 10 s
    local port=$1 pid=$2 name=$3 logf=$4
    for _ in $(seq 100); do
        if port_open "$port"; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$logf" >&2 || true
            die "$name exited before listening on $port"
        fi
        sleep 0.1
    done
    tail -n 20 "$logf" >&2 || true
    die "$name did not listen on 127.0.0.1:$port within 10 s"
}

probe() { # probe PORT [HEADER]: one request; fails unless it answers 200 with the body "ok"
    local port=$1 extra= status
    if [[ -n ${2:-} ]]; then extra="$2"$'\r\n'; fi
    timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"
        printf "GET / HTTP/1.1\r\nHost: 127.0.0.1:%s\r\n%sConnection: close\r\n\r\n" "$1" "$2" >&3
        cat <&3' _ "$port" "$extra" >"$TMP/probe.out" 2>&1 || true
    status=$(head -n 1 "$TMP/probe.out" | tr -d '\r')
    if [[ $status != *" 200 "* ]] || ! tr -d '\r' <"$TMP/probe.out" | grep -qx ok; then
        sed 's/^/    /' "$TMP/probe.out" >&2
        die "probe of 127.0.0.1:$port did not answer 200 ok (got: ${status:-nothing})"
    fi
}

child_of() { # first child pid of $1 (the nginx worker of a master)
    local pid=$1 f
    for f in /proc/[0-9]*/stat; do
        if [[ $(awk '{print $4}' "$f" 2>/dev/null) == "$pid" ]]; then
            basename "$(dirname "$f")"
            return
        fi
    done
}

hwm() { # peak RSS of a pid, in MiB (VmHWM)
    awk '/^VmHWM:/ {printf "%.1f MiB", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "-"
}

# --- nginx instances ---------------------------------------------------------------------------------------------

nginx_conf() { # nginx_conf DIR HTTP_BODY: a one-worker nginx whose prefix, pid, logs and temp files live in DIR
    local dir=$1 body=$2
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
$body
}
EOF
}

start_nginx() { # start_nginx DIR: prints the master pid
    local dir=$1
    "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;' >"$dir/stdout.log" 2>&1 &
    PIDS+=($!)
    LAST_PID=$!
}

# --- measuring ---------------------------------------------------------------------------------------------------

# Parsed results, indexed by setup name.
declare -A RPS P50 P99 RSS ERRS

to_ms() { # wrk latency ("812.00us", "1.23ms", "1.02s", "2.00m") to milliseconds
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.2f", n }'
}

run_wrk() { # run_wrk NAME PORT [HEADER]: warm-up, then the measured run; parses into RPS/P50/P99/ERRS
    local name=$1 port=$2 header=${3:-} hargs=() out=$TMP/wrk-$1.txt secs
    if [[ -n $header ]]; then hargs=(-H "$header"); fi
    secs=$(awk -v d="$DURATION" 'BEGIN { n = d + 0; if (d ~ /m$/) n *= 60; else if (d ~ /h$/) n *= 3600; print int(n) + 30 }')

    log "$name: warm-up $WARMUP"
    timeout 60 "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" "${hargs[@]}" "http://127.0.0.1:$port/" >/dev/null
    log "$name: measuring $DURATION, $THREADS thread, $CONNECTIONS connections"
    timeout "$secs" "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "${hargs[@]}" \
        "http://127.0.0.1:$port/" >"$out"
    sed 's/^/    /' "$out" >&2

    RPS[$name]=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    P50[$name]=$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")
    P99[$name]=$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")
    local non2xx sock
    non2xx=$(awk -F: '/Non-2xx or 3xx responses/ {gsub(/ /, "", $2); print $2}' "$out")
    sock=$(awk '/Socket errors:/ {sub(/^ *Socket errors: */, ""); print}' "$out")
    local e=()
    if [[ -n $non2xx ]]; then e+=("non-2xx $non2xx"); fi
    if [[ -n $sock ]]; then e+=("socket: $sock"); fi
    if ((${#e[@]})); then ERRS[$name]=$(IFS=';'; echo "${e[*]}"); else ERRS[$name]=none; fi
}

busy_builds() { # cargo/rustc processes that would distort the figures
    local f c
    for f in /proc/[0-9]*/comm; do
        c=$(cat "$f" 2>/dev/null) || continue
        case $c in cargo | cargo-* | rustc | clippy-driver | rustdoc) echo "$c" ;; esac
    done | sort | uniq -c | tr '\n' ' '
}

# --- main --------------------------------------------------------------------------------------------------------

ensure_tools
[[ -x $SIDECAR_BIN ]] || die "no sidecar binary at $SIDECAR_BIN: run \`cargo build --release -p sidecar\` first (or set SIDECAR_BIN)"
if [[ -n $(busy_builds) ]]; then
    log "warning: compilation is running ($(busy_builds)); figures will be distorted"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/sidecar-bench.XXXXXX")
chmod 755 "$TMP" # nginx workers may run as another user when started as root

UP_PORT=$(free_port)
NGINX_PORT=$(free_port)
SIDECAR_PORT_=$(free_port)
TARGET="target: http://127.0.0.1:$UP_PORT"

log "nginx $("$NGINX" -v 2>&1 | sed 's/.*version: //'), $("$WRK" -v 2>&1 | head -n 1 | awk '{print $1, $2}'), sidecar $SIDECAR_BIN"
log "$(nproc) cores; seat: proxy 1 worker, upstream 1 worker, wrk $THREADS thread x $CONNECTIONS connections"

# Upstream: the same fast nginx for every setup, up for the whole run.
nginx_conf "$TMP/upstream" "    server {
        listen 127.0.0.1:$UP_PORT;
        location / { return 200 \"ok\\n\"; }
    }"
start_nginx "$TMP/upstream"
wait_port "$UP_PORT" "$LAST_PID" "upstream nginx" "$TMP/upstream/error.log"
log "upstream nginx on 127.0.0.1:$UP_PORT"

# (a) direct
probe "$UP_PORT"
run_wrk direct "$UP_PORT"
RSS[direct]="-"

# (b) nginx as a reverse proxy, the tuned config: pooled HTTP/1.1 keep-alive to the upstream.
nginx_conf "$TMP/proxy" "    upstream upstream {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"
start_nginx "$TMP/proxy"
proxy_pid=$LAST_PID
wait_port "$NGINX_PORT" "$proxy_pid" "proxy nginx" "$TMP/proxy/error.log"
probe "$NGINX_PORT"
run_wrk nginx "$NGINX_PORT"
worker=$(child_of "$proxy_pid")
RSS[nginx]=$(if [[ -n $worker ]]; then hwm "$worker"; else echo "-"; fi)
stop "$proxy_pid"

# (c) the sidecar, embedded default policy, run from the temp dir so no ./config.yaml is picked up.
mkdir -p "$TMP/sidecar"
(
    cd "$TMP/sidecar"
    unset SIDECAR_POLICY SIDECAR_CONFIG
    export RUST_LOG=warn SIDECAR_PORT=$SIDECAR_PORT_
    # shellcheck disable=SC2086 # SIDECAR_ARGS is a list of words
    exec "$SIDECAR_BIN" --workers 1 ${SIDECAR_ARGS:-}
) >"$TMP/sidecar/access.log" 2>"$TMP/sidecar/sidecar.log" &
sidecar_pid=$!
PIDS+=("$sidecar_pid")
wait_port "$SIDECAR_PORT_" "$sidecar_pid" "sidecar" "$TMP/sidecar/sidecar.log"
probe "$SIDECAR_PORT_" "$TARGET"
run_wrk sidecar "$SIDECAR_PORT_" "$TARGET"
RSS[sidecar]=$(hwm "$sidecar_pid")
stop "$sidecar_pid"
if [[ -s $TMP/sidecar/sidecar.log ]]; then
    log "sidecar log (RUST_LOG=warn), last lines:"
    tail -n 10 "$TMP/sidecar/sidecar.log" | sed 's/^/    /' >&2
fi
for n in upstream proxy; do
    if [[ -s $TMP/$n/error.log ]]; then
        log "$n nginx error.log, last lines:"
        tail -n 10 "$TMP/$n/error.log" | sed 's/^/    /' >&2
    fi
done

# --- table -------------------------------------------------------------------------------------------------------

echo
echo "duration $DURATION, wrk -t$THREADS -c$CONNECTIONS, 1 proxy worker, 1 upstream worker, $(nproc) cores"
printf '%-8s  %12s  %9s  %9s  %9s  %12s  %s\n' setup "requests/s" "p50 ms" "p99 ms" "vs direct" "peak RSS" errors
for name in direct nginx sidecar; do
    ratio=$(awk -v a="${RPS[$name]}" -v b="${RPS[direct]}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    printf '%-8s  %12s  %9s  %9s  %9s  %12s  %s\n' "$name" "${RPS[$name]}" "${P50[$name]}" "${P99[$name]}" \
        "$ratio" "${RSS[$name]}" "${ERRS[$name]}"
done
echo "peak RSS: VmHWM of the proxy process (nginx: its worker); direct has no proxy."
