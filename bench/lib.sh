# shellcheck disable=SC2034 # globals set here (CLK_TCK, TMP, SIDECAR, ...) are read by the sourcing script
# Shared by bench/run.sh and bench/mesh.sh (sourced, not run): logging, tools, processes and ports, CPU and
# memory readings, and table formatting. The sourcing script sets BENCH_TAG (the log prefix) and the globals
# these read when called: REPO_ROOT, PIDS, TMP, USED_PORTS, SIDECAR_BIN, BUILD, PROXY_CPU/LOAD_CPU, ...

log() { printf '[%s] %s\n' "$BENCH_TAG" "$*" >&2; }
die() {
    printf '[%s] error: %s\n' "$BENCH_TAG" "$*" >&2
    exit 1
}

secs_of() { # "10", "10s", "2m" -> whole seconds
    [[ $1 =~ ^([0-9]+)([smh]?)$ ]] || return 1
    local n=$((10#${BASH_REMATCH[1]}))
    case ${BASH_REMATCH[2]} in
        h) echo $((n * 3600)) ;;
        m) echo $((n * 60)) ;;
        *) echo "$n" ;;
    esac
}

apt_install() { # apt_install PACKAGE...: a fresh CI image often has empty lists, so update only on failure
    log "installing $*"
    export DEBIAN_FRONTEND=noninteractive
    if ! "${SUDO[@]}" apt-get install -y "$@"; then
        "${SUDO[@]}" apt-get update
        "${SUDO[@]}" apt-get install -y "$@"
    fi
}

find_bin() { # find_bin NAME: on PATH or in /usr/sbin
    command -v "$1" 2>/dev/null || { [[ -x /usr/sbin/$1 ]] && echo "/usr/sbin/$1"; } || true
}

sidecar_stale() { # a source file newer than the binary
    [[ -n $(find "$REPO_ROOT/sidecar/src" "$REPO_ROOT/sidecar/Cargo.toml" "$REPO_ROOT/sidecar/build.rs" \
        "$REPO_ROOT/policies" "$REPO_ROOT/Cargo.toml" "$REPO_ROOT/Cargo.lock" "$REPO_ROOT/.cargo" \
        -type f -newer "$1" -print -quit 2>/dev/null) ]]
}

ensure_sidecar() {
    if [[ -n ${SIDECAR_BIN:-} ]]; then # given: never built here
        case $SIDECAR_BIN in /*) ;; *) SIDECAR_BIN=$REPO_ROOT/$SIDECAR_BIN ;; esac
        [[ -x $SIDECAR_BIN ]] || die "no sidecar binary at SIDECAR_BIN=$SIDECAR_BIN"
        return
    fi
    SIDECAR_BIN=$REPO_ROOT/target/release/sidecar
    local why=
    if [[ $BUILD == 1 ]]; then
        why="BUILD=1"
    elif [[ ! -x $SIDECAR_BIN ]]; then
        why="no binary at target/release/sidecar"
    elif sidecar_stale "$SIDECAR_BIN"; then
        why="target/release/sidecar is older than the sources"
    fi
    if [[ -n $why ]]; then
        if [[ $BUILD == 0 ]]; then
            [[ -x $SIDECAR_BIN ]] || die "$why, and BUILD=0: build it or set SIDECAR_BIN"
            log "warning: $why (BUILD=0: measuring it as it is)"
        else
            log "$why: cargo build --release -p sidecar"
            (cd "$REPO_ROOT" && cargo build --release -p sidecar) ||
                die "cargo build --release -p sidecar failed (BUILD=0 or SIDECAR_BIN to measure an existing binary)"
        fi
    fi
}

busy_builds() { # cargo/rustc/cc processes that would distort the figures
    local f c
    for f in /proc/[0-9]*/comm; do
        read -r c 2>/dev/null <"$f" || continue
        case $c in cargo | cargo-* | rustc | clippy-driver | rustdoc | cc1 | cc1plus | ld | ld.lld | mold) echo "$c" ;; esac
    done | sort | uniq -c | awk '{printf "%s%s x%s", (NR > 1 ? ", " : ""), $2, $1}'
}

cpu_busy() { # how busy each CPU is over 1 s, before or after the run: "cpu0 3%, cpu1 97%"
    local a b
    a=$(grep '^cpu[0-9]' /proc/stat)
    sleep 1
    b=$(grep '^cpu[0-9]' /proc/stat)
    awk 'NR == FNR { for (i = 2; i <= NF; i++) t0[$1] += $i; i0[$1] = $5 + $6; next }
        { t = 0; for (i = 2; i <= NF; i++) t += $i; dt = t - t0[$1]; di = $5 + $6 - i0[$1]
          printf "%s%s %d%%", (FNR > 1 ? ", " : ""), $1, (dt > 0 ? 100 * (dt - di) / dt + 0.5 : 0) }' \
        <(echo "$a") <(echo "$b")
}

busy_max() { # the highest percentage in a cpu_busy line
    grep -o '[0-9]*%' <<<"$1" | tr -d % | sort -n | tail -n 1
}

cleanup() {
    local pid
    if [[ -n $LOAD_PID ]]; then kill -TERM "$LOAD_PID" 2>/dev/null || true; fi
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    if [[ -n $TMP && -d $TMP ]]; then rm -rf "$TMP"; fi
}

stop() { # stop one process started by this script: TERM, KILL after 5 s
    local pid=$1 p keep=()
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "warning: pid $pid did not stop within 5 s of TERM: killed"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { # free_port VAR: a port nothing listens on (127.0.0.1), not handed out before
    local -n out=$1
    local p
    for _ in $(seq 200); do
        p=$((PORT_BASE + RANDOM % PORT_SPAN))
        [[ $USED_PORTS == *" $p "* ]] && continue
        if ! port_open "$p"; then
            USED_PORTS+="$p "
            out=$p
            return
        fi
    done
    die "no free port found"
}

wait_port() { # wait_port PORT PID NAME LOG [soft]: until PORT accepts, at most 10 s; soft: return 1 when PID exits
    local port=$1 pid=$2 name=$3 logf=$4
    for _ in $(seq 100); do
        if port_open "$port"; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            if [[ ${5:-} == soft ]]; then return 1; fi
            tail -n 20 "$logf" >&2 || true
            die "$name exited before listening on $port"
        fi
        sleep 0.1
    done
    tail -n 20 "$logf" >&2 || true
    die "$name did not listen on 127.0.0.1:$port within 10 s"
}

stat_fields() { # stat_fields PID: /proc/PID/stat after "pid (comm) " into STAT (STAT[0] is the state)
    local line
    STAT=()
    read -r line 2>/dev/null <"/proc/$1/stat" || return 1
    read -r -a STAT <<<"${line##*) }"
}

cpu_ticks() { # utime+stime of the pids (all their threads), in clock ticks
    local pid sum=0
    for pid in "$@"; do
        if stat_fields "$pid"; then sum=$((sum + STAT[11] + STAT[12])); fi
    done
    echo "$sum"
}

render() { # render TEMPLATE OUT KEY=VALUE...: replace @KEY@ placeholders
    local tpl=$1 out=$2 kv args=()
    shift 2
    for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${args[@]}" "$tpl" >"$out"
    if grep -q '@[A-Z_]*@' "$out"; then die "unfilled placeholder in $out: $(grep -o '@[A-Z_]*@' "$out" | head -n 1)"; fi
}

start_upstream() {
    local dir=$TMP/upstream
    mkdir -p "$dir/empty"
    render "$BENCH_DIR/nginx-upstream.conf" "$dir/nginx.conf" "DIR=$dir" "PORT=$UP_PORT"
    "${PIN_LOAD[@]}" "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;' \
        >"$dir/stdout.log" 2>&1 &
    PIDS+=($!)
    UP_PID=$!
    wait_port "$UP_PORT" "$UP_PID" "upstream nginx" "$dir/error.log"
}

run_load() { # run_load SECONDS OUT ERR: CMD on the load CPU, bounded; in the background so a signal stops it at once
    local rc=0
    timeout "$1" "${PIN_LOAD[@]}" "${CMD[@]}" >"$2" 2>"$3" &
    LOAD_PID=$!
    wait "$LOAD_PID" || rc=$?
    LOAD_PID=
    return "$rc"
}

median() { # numbers on stdin ("-" and empty lines skipped) -> the median, or "-"
    grep -E '^-?[0-9.]+(e[-+]?[0-9]+)?$' | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "-"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else printf "%.6f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }' || true
}

fmt() { # fmt DECIMALS VALUE
    awk -v d="$1" -v v="$2" 'BEGIN { if (v ~ /^-?[0-9.]+(e[-+]?[0-9]+)?$/) printf "%.*f", d, v; else print "-" }'
}

signed() { # an added latency: +12, -3, or "-" when not a number
    awk -v v="$1" 'BEGIN { if (v ~ /^-?[0-9.]+(e[-+]?[0-9]+)?$/) printf "%+.0f", v; else print "-" }'
}

md_table() { # md_table ALIGN: TSV on stdin (header first) -> a padded markdown table; ALIGN is l or r per column
    # Widths count characters, not bytes (µ, ≥, − and → are several bytes in UTF-8), whatever awk this is.
    awk -F'\t' -v align="$1" '
        function width(s,   t) { t = s; return length(s) - gsub("[\200-\277]", "", t) }
        function pad(s, n, right,   p) { p = ""; while (width(s) + length(p) < n) p = p " "; return right ? p s : s p }
        { for (i = 1; i <= NF; i++) { c[NR, i] = $i; if (width($i) > w[i]) w[i] = width($i); if (w[i] < 3) w[i] = 3 } if (NF > nf) nf = NF; n = NR }
        END {
            for (r = 1; r <= n; r++) {
                line = "|"
                for (i = 1; i <= nf; i++) line = line " " pad(c[r, i], w[i], r > 1 && substr(align, i, 1) == "r") " |"
                print line
                if (r == 1) {
                    line = "|"
                    for (i = 1; i <= nf; i++) { d = ""; while (length(d) < w[i]) d = d "-"; line = line " " (substr(align, i, 1) == "r" ? substr(d, 2) ":" : d) " |" }
                    print line
                }
            }
        }'
}

prepare_run() { # prepare_run PROXY_CPU TMP_PREFIX: tools, the binary, pinning (PIN_PROXY, PIN_LOAD), TMP, RESULTS_KEEP,
    # and the copy of the sidecar measured (SIDECAR, SIDECAR_VERSION)
    local proxy_cpu=$1 prefix=$2
    ensure_tools
    ensure_sidecar
    CLK_TCK=$(getconf CLK_TCK)
    NCPU=$(nproc)
    if [[ $PIN != 0 ]]; then
        if ((NCPU < 2)) && [[ $proxy_cpu != "$LOAD_CPU" ]]; then
            log "warning: $NCPU CPU: no pinning"
            PIN=0
        fi
    fi
    if [[ $PIN != 0 ]]; then
        PIN_PROXY=(taskset -c "$proxy_cpu")
        PIN_LOAD=(taskset -c "$LOAD_CPU")
        if ! "${PIN_PROXY[@]}" true || ! "${PIN_LOAD[@]}" true; then
            die "taskset -c $proxy_cpu / -c $LOAD_CPU failed (PIN=0 to run unpinned)"
        fi
    else
        PIN_PROXY=()
        PIN_LOAD=()
    fi

    TMP=$(mktemp -d "${TMPDIR:-/tmp}/$prefix.XXXXXX")
    chmod 755 "$TMP" # nginx workers run as another user when started as root
    mkdir -p "$TMP/out"
    RESULTS_KEEP=
    if [[ -n ${RESULTS_DIR:-} ]]; then
        mkdir -p "$RESULTS_DIR"
        RESULTS_KEEP=$(cd "$RESULTS_DIR" && pwd)
    fi

    # The binary measured is a copy: a rebuild during the run cannot swap it midway.
    mkdir -p "$TMP/bin"
    SIDECAR=$TMP/bin/sidecar
    cp "$SIDECAR_BIN" "$SIDECAR"
    SIDECAR_VERSION=$("$SIDECAR" --version 2>/dev/null | head -n 1 || echo "unknown")
}
