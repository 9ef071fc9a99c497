# Shared by the benchmark scripts (sourced, not run): logging, installing tools, a temp dir,
# processes started in the background and stopped on exit, readiness, timing, /proc figures,
# the samples file and their medians, the upstream registry, skopeo, curl clients.
# Needs: ROOT and HELPER (benches/mirror.py) set by the sourcing script.

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# need_tools TOOL...: installs (apt-get, as root) the Debian package of each missing tool; the
# package has the tool's name.
need_tools() {
    local missing="" t
    for t in "$@"; do command -v "$t" >/dev/null || missing="$missing $t"; done
    [ -z "$missing" ] && return 0
    log "apt-get install$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    # shellcheck disable=SC2086 # the list is meant to split into words
    apt-get install -y -q $missing >&2
}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/berth-bench.XXXXXX")
PIDS=()

stop_pid() {
    local pid=$1 i
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# spawn OUT ERR CMD...: starts CMD in the background; its pid is in LAST_PID.
spawn() {
    local out=$1 err=$2
    shift 2
    "$@" </dev/null >>"$out" 2>>"$err" &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# stop PID: stops one process started by spawn.
stop() {
    local pid=$1 keep=() p
    stop_pid "$pid"
    for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# wait_ready URL PID WHAT: until URL answers 200 (30 s), failing if PID exits.
wait_ready() {
    local url=$1 pid=$2 what=$3 i
    for i in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || die "$what exited before it was ready"
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$url" || true)" = 200 ] && return 0
        sleep 0.1
    done
    die "$what did not answer $url within 30 s"
}

free_port() { $HELPER port; }
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
calc() { awk "BEGIN { printf \"%.3f\", $1 }"; }

# Peak RSS (MiB) and CPU seconds (user+system) of a process so far.
peak_rss_mib() { awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
cpu_s() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' \
        "/proc/$1/stat"
}

SAMPLES=$TMP/samples
: >"$SAMPLES"
# rec WHO METRIC VALUE: one sample of one run.
rec() {
    echo "$1 $2 $3" >>"$SAMPLES"
    log "  $1 $2 = $3"
}
note() {
    echo "note $*" >>"$SAMPLES"
    log "  note: $*"
}

# start_upstream: the distribution registry on a free port, storing under $TMP/upstream; sets
# UPORT, UPSTREAM and UPSTREAM_PID. Its access log (stdout) is $TMP/upstream/access.log.
start_upstream() {
    UPORT=$(free_port)
    UPSTREAM=http://127.0.0.1:$UPORT
    mkdir -p "$TMP/upstream"
    cat >"$TMP/upstream/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $TMP/upstream/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$UPORT
  secret: berth-bench-upstream
EOF
    # The registry writes its access log to stdout, its own log to stderr.
    spawn "$TMP/upstream/access.log" "$TMP/upstream/registry.log" \
        docker-registry serve "$TMP/upstream/config.yml"
    UPSTREAM_PID=$LAST_PID
    wait_ready "$UPSTREAM/v2/" "$UPSTREAM_PID" "the upstream registry"
}

# skopeo with a private policy, auth file and temp dir, so the host's settings do not matter.
mkdir -p "$TMP/skopeo/tmp"
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$TMP/skopeo/policy.json"
echo '{}' >"$TMP/skopeo/auth.json"
skopeo_copy() {
    REGISTRY_AUTH_FILE=$TMP/skopeo/auth.json skopeo --policy "$TMP/skopeo/policy.json" \
        --tmpdir "$TMP/skopeo/tmp" copy --retry-times=0 "$@" >>"$TMP/skopeo/log" 2>&1
}

# get URL: one GET, body discarded; prints seconds.
get() { curl -sf -o /dev/null -w '%{time_total}' "$1" || die "GET $1 failed"; }

# clients N URL: N concurrent GETs; prints the wall time in seconds.
clients() {
    local n=$1 url=$2 start i pids=()
    start=$(now)
    for i in $(seq "$n"); do
        curl -sf -o /dev/null "$url" &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || die "a GET of $url failed"; done
    since "$start"
}

# median WHO METRIC: the median of the samples recorded with `rec WHO METRIC`.
median() {
    awk -v who="$1" -v what="$2" '$1 == who && $2 == what { print $3 }' "$SAMPLES" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# start_peer WHO DIR: a mirror of $UPSTREAM storing in DIR — berth ($BERTH), nginx
# `proxy_cache` (keyed by $NGINX_CACHE_KEY, `$uri` unless set, with `proxy_cache_lock`, the way
# docker-registry-proxy configures it) or the distribution registry in proxy mode; URL in
# MIRROR_URL, pid in MIRROR_PID. Every client of a benchmark is 127.0.0.1: berth's per-client
# connection cap is lifted.
start_peer() {
    local who=$1 dir=$2 port
    port=$(free_port)
    MIRROR_URL=http://127.0.0.1:$port
    mkdir -p "$dir"
    chmod 755 "$dir"
    case "$who" in
        berth)
            printf '[limits]\nmax_connections_per_client = 4096\n' >"$dir/berth.toml"
            spawn "$dir/out" "$dir/err" env BERTH_LOG=warn "$BERTH" serve --config "$dir/berth.toml" \
                --listen "127.0.0.1:$port" --data-dir "$dir/data" --upstream "$UPSTREAM" ;;
        nginx)
            cat >"$dir/nginx.conf" <<EOF
daemon off; pid $dir/nginx.pid; error_log $dir/error.log;
worker_processes auto;
worker_rlimit_nofile 65536;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $dir/body; proxy_temp_path $dir/proxy;
    proxy_cache_path $dir/cache levels=1:2 keys_zone=blobs:10m max_size=20g inactive=7d use_temp_path=off;
    server {
        listen 127.0.0.1:$port backlog=4096;
        location /v2/ {
            proxy_pass $UPSTREAM;
            proxy_cache blobs;
            proxy_cache_key ${NGINX_CACHE_KEY:-\$uri};
            proxy_cache_valid 200 7d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 600s;
            proxy_cache_lock_age 600s;
            proxy_read_timeout 600s;
        }
    }
}
EOF
            spawn "$dir/out" "$dir/err" nginx -p "$dir" -c "$dir/nginx.conf" ;;
        distribution)
            cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $dir/storage
http:
  addr: 127.0.0.1:$port
  secret: berth-bench-reference
proxy:
  remoteurl: $UPSTREAM
EOF
            spawn "$dir/out" "$dir/err" docker-registry serve "$dir/config.yml" ;;
    esac
    MIRROR_PID=$LAST_PID
    wait_ready "$MIRROR_URL/v2/" "$MIRROR_PID" "$who"
}

# seed_big_blob [keep]: SIZE_MIB random bytes pushed to the upstream as bench/big (a monolithic
# upload); sets DIGEST and BLOB_PATH. With `keep`, the bytes stay in $TMP/big (readable by all).
seed_big_blob() {
    local location sep
    log "a $SIZE_MIB MiB blob into the upstream"
    head -c "$((SIZE_MIB << 20))" /dev/urandom >"$TMP/big"
    chmod 644 "$TMP/big"
    DIGEST="sha256:$(sha256sum "$TMP/big" | cut -d' ' -f1)"
    location=$(curl -sf -X POST -D - -o /dev/null "$UPSTREAM/v2/bench/big/blobs/uploads/" |
        tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }')
    case "$location" in http*) ;; *) location=$UPSTREAM$location ;; esac
    sep=$([[ $location == *\?* ]] && echo '&' || echo '?')
    curl -sf -X PUT --data-binary "@$TMP/big" -H 'Content-Type: application/octet-stream' \
        "$location${sep}digest=$DIGEST" -o /dev/null || die "the upstream refused the blob"
    [ "${1:-}" = keep ] || rm -f "$TMP/big"
    BLOB_PATH=/v2/bench/big/blobs/$DIGEST
}
