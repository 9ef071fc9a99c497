#!/usr/bin/env bash
# Benchmark: berth against the distribution registry in proxy mode (the reference mirror), both
# pulling through from the same upstream distribution registry on 127.0.0.1, with nginx
# (sendfile) serving the same big blob as the loopback limit.
#
#   bash benches/mirror.sh [--quick] [--runs N] [--wrk-duration 10s] [--out FILE]
#
#   --quick          small images (10 MiB 5-layer image, 32 MiB big blob) and 3 s wrk runs
#   --runs N         runs per measurement; figures are medians (default 3)
#   --wrk-duration   length of each wrk run (default 10s, 3s with --quick)
#   --out FILE       JSON output (default target/bench/mirror.json)
#
# A benchmark, not a test: nothing here fails on a slow figure; targets are only reported. It
# installs what it needs with apt-get (as root) and builds berth with `cargo build --profile dist`.
# Every server binds 127.0.0.1; all of them are killed and the temp dir removed on exit.
# The table goes to stdout, progress to stderr. Helper: benches/mirror.py (python3 stdlib).
#
# What one run does, for berth and for the reference, each phase in a fresh mirror process
# (VmHWM, the peak RSS, cannot be reset) and, for cold figures, with fresh storage:
#   pull   skopeo pull of the 5-layer image (cold, then warm), then the multi-arch index with
#          --all (cold, then warm); then wrk on warm manifest GETs, by tag and by digest
#   cold8  8 concurrent curl GETs of the big blob, nothing cached: wall time, upstream GETs of
#          that blob (upstream access log), peak RSS
#   ttfb   one curl GET of the big blob, nothing cached: time to first byte
#   hit    the mirror restarted on the ttfb phase's storage: 1 client, then 8 concurrent
#          clients, GET the cached big blob: MB/s, peak RSS; and the same against nginx
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
HELPER="python3 $ROOT/benches/mirror.py"

QUICK=0
RUNS=3
WRK_DURATION=""
OUT="$ROOT/target/bench/mirror.json"
CLIENTS=8
CURL_EXTRA=""
WRK_CONNECTIONS=12
DOCKER_MANIFEST="application/vnd.docker.distribution.manifest.v2+json"

while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --runs) RUNS=$2; shift ;;
        --wrk-duration) WRK_DURATION=$2; shift ;;
        --out) OUT=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$WRK_DURATION" ] || WRK_DURATION=$([ $QUICK = 1 ] && echo 3s || echo 10s)

# Logging, tools, the temp dir, processes (stopped on exit), timing and samples: shared with the
# other benchmark scripts.
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# ---------------------------------------------------------------------------------------------
# Tools and build

# (The nginx package starts a server on :80 where an init system exists; not ours.)
need_tools docker-registry skopeo wrk nginx curl python3
log "cargo build --profile dist"
cargo build --profile dist >&2
BERTH=$ROOT/target/dist/berth

# ---------------------------------------------------------------------------------------------
# Upstream: a distribution registry seeded with the synthetic images.

log "writing the synthetic images"
eval "$($HELPER images "$TMP/images" $([ $QUICK = 1 ] && echo --quick))"
BIG_HEX=${BIG_DIGEST#sha256:}

start_upstream

log "seeding the upstream $UPSTREAM"
push() { skopeo_copy --dest-tls-verify=false --preserve-digests "$@" || die "skopeo push $*: $(tail -3 "$TMP/skopeo/log")"; }
push "dir:$TMP/images/five" "docker://127.0.0.1:$UPORT/library/five:v1"
push "oci:$TMP/images/big:v1" "docker://127.0.0.1:$UPORT/library/big:v1"
push --all "oci:$TMP/images/multi:v1" "docker://127.0.0.1:$UPORT/library/multi:v1"

# How many times the upstream has served the big blob with a GET.
upstream_big_gets() {
    grep -c "\"GET /v2/library/big/blobs/$BIG_DIGEST HTTP" "$TMP/upstream/access.log" || true
}

# ---------------------------------------------------------------------------------------------
# nginx: the big blob from a plain file, sendfile on.

NPORT=$(free_port)
NGINX_URL=http://127.0.0.1:$NPORT
mkdir -p "$TMP/nginx/root" "$TMP/nginx/logs"
chmod 755 "$TMP" # nginx's workers run as www-data; mktemp -d makes the dir private
cp "$BIG_PATH" "$TMP/nginx/root/big"
cat >"$TMP/nginx/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    server {
        listen 127.0.0.1:$NPORT;
        root $TMP/nginx/root;
    }
}
EOF
spawn "$TMP/nginx/logs/stdout" "$TMP/nginx/logs/stderr" \
    nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf"
NGINX_PID=$LAST_PID
wait_ready "$NGINX_URL/big" "$NGINX_PID" "nginx"

# ---------------------------------------------------------------------------------------------
# The mirrors

# start_mirror KIND DIR: berth or the reference, storing under DIR (kept across restarts).
# Sets MIRROR_PID and MIRROR (host:port).
start_mirror() {
    local kind=$1 dir=$2 port
    port=$(free_port)
    MIRROR=127.0.0.1:$port
    mkdir -p "$dir"
    case "$kind" in
        berth)
            spawn "$dir/berth.stdout" "$dir/berth.log" "$BERTH" serve --listen "$MIRROR" \
                --data-dir "$dir/data" --upstream "$UPSTREAM"
            ;;
        reference)
            cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $dir/storage
http:
  addr: $MIRROR
  secret: berth-bench-reference
proxy:
  remoteurl: $UPSTREAM
EOF
            spawn "$dir/access.log" "$dir/registry.log" docker-registry serve "$dir/config.yml"
            ;;
    esac
    MIRROR_PID=$LAST_PID
    wait_ready "http://$MIRROR/v2/" "$MIRROR_PID" "$kind"
}

# wait_cached KIND DIR: until the mirror has the big blob complete in its storage (120 s).
wait_cached() {
    local kind=$1 dir=$2 path i
    case "$kind" in
        berth) path=$dir/data/cache/blobs/sha256/${BIG_HEX:0:2}/$BIG_HEX ;;
        reference) path=$dir/storage/docker/registry/v2/blobs/sha256/${BIG_HEX:0:2}/$BIG_HEX/data ;;
    esac
    for i in $(seq 1200); do
        [ "$(stat -c %s "$path" 2>/dev/null || echo 0)" = "$BIG_BYTES" ] && return 0
        sleep 0.1
    done
    note "$kind: the big blob was not in its storage 120 s after the pull"
    return 1
}

# get_big URL N: N concurrent curl GETs of URL; sets WALL (s), TTFB and TOTAL of the first, and
# OK=1 if every one got 200 with all the bytes.
get_big() {
    local url=$1 n=$2 start i pids=() code size
    start=$(now)
    for i in $(seq "$n"); do
        # shellcheck disable=SC2086 # CURL_EXTRA is a list of options
        curl -s $CURL_EXTRA -o /dev/null -w '%{http_code} %{size_download} %{time_starttransfer} %{time_total}\n' \
            "$url" >"$TMP/curl.$i" 2>&1 &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || true; done
    WALL=$(since "$start")
    OK=1
    for i in $(seq "$n"); do
        read -r code size _ _ <"$TMP/curl.$i" || true
        if [ "$code" != 200 ] || [ "$size" != "$BIG_BYTES" ]; then
            OK=0
            note "GET $url: status ${code:-none}, ${size:-0} of $BIG_BYTES bytes"
        fi
    done
    read -r _ _ TTFB TOTAL <"$TMP/curl.1"
}

# pull WHO METRIC ARGS...: times one skopeo pull into a fresh dir: layout.
pull() {
    local who=$1 metric=$2 start
    shift 2
    rm -rf "$TMP/pulled"
    start=$(now)
    if skopeo_copy --src-tls-verify=false "$@" "dir:$TMP/pulled"; then
        rec "$who" "$metric" "$(since "$start")"
    else
        note "$who: skopeo pull for $metric failed: $(tail -1 "$TMP/skopeo/log")"
    fi
}

# bench_wrk WHO PREFIX URL: warm manifest GETs (the first GET, a cache fill, is not timed).
bench_wrk() {
    local who=$1 prefix=$2 url=$3 code rps p99 bad
    # shellcheck disable=SC2086 # CURL_EXTRA is a list of options
    code=$(curl -s $CURL_EXTRA -o /dev/null -w '%{http_code}' -H "Accept: $DOCKER_MANIFEST" "$url" || true)
    [ "$code" = 200 ] || { note "$who: GET $url answered $code; no wrk run"; return 0; }
    wrk -t2 -c"$WRK_CONNECTIONS" -d"$WRK_DURATION" --latency -H "Accept: $DOCKER_MANIFEST" \
        "$url" >"$TMP/wrk.out" 2>&1 || true
    read -r rps p99 bad < <($HELPER wrk "$TMP/wrk.out")
    rec "$who" "${prefix}_rps" "$rps"
    rec "$who" "${prefix}_p99_ms" "$p99"
    [ "$bad" = 0 ] || note "$who: wrk $url: $bad non-2xx responses or socket errors"
}

# Phase "pull": skopeo cold/warm pulls, then wrk on the warm manifests.
phase_pull() {
    local kind=$1 run=$2 dir=$TMP/$1-pull-$2
    log "$kind run $run: skopeo pulls, manifest GETs"
    start_mirror "$kind" "$dir"
    pull "$kind" pull_cold_s "docker://$MIRROR/library/five:v1"
    [ "$(sha256sum <"$TMP/pulled/manifest.json" | cut -d' ' -f1)" = "${FIVE_MANIFEST_DIGEST#sha256:}" ] ||
        note "$kind: the pulled 5-layer manifest is not the pushed one"
    pull "$kind" pull_warm_s "docker://$MIRROR/library/five:v1"
    pull "$kind" index_cold_s --all "docker://$MIRROR/library/multi:v1"
    pull "$kind" index_warm_s --all "docker://$MIRROR/library/multi:v1"
    bench_wrk "$kind" tag "http://$MIRROR/v2/library/five/manifests/v1"
    bench_wrk "$kind" digest "http://$MIRROR/v2/library/five/manifests/$FIVE_MANIFEST_DIGEST"
    stop "$MIRROR_PID"
    rm -rf "$dir"
}

# Phase "cold8": 8 concurrent cold GETs of the big blob.
phase_cold8() {
    local kind=$1 run=$2 dir=$TMP/$1-cold8-$2 before after
    log "$kind run $run: $CLIENTS concurrent cold GETs of the big blob"
    start_mirror "$kind" "$dir"
    before=$(upstream_big_gets)
    get_big "http://$MIRROR/v2/library/big/blobs/$BIG_DIGEST" "$CLIENTS"
    [ $OK = 1 ] && rec "$kind" cold8_wall_s "$WALL"
    wait_cached "$kind" "$dir" || true
    # Fetches still running upstream (the reference stores the blob in the background) are
    # logged when they end: count once the access log stops growing.
    after=$(upstream_big_gets)
    while sleep 1; [ "$(upstream_big_gets)" != "$after" ]; do after=$(upstream_big_gets); done
    rec "$kind" cold8_upstream_gets $((after - before))
    rec "$kind" rss_cold8_mib "$(peak_rss_mib "$MIRROR_PID")"
    rec "$kind" cold8_cpu_s "$(cpu_s "$MIRROR_PID")"
    stop "$MIRROR_PID"
    rm -rf "$dir"
}

# Phase "ttfb" then "hit": one cold GET, then (restarted, fresh process) cache-hit throughput.
phase_ttfb_hit() {
    local kind=$1 run=$2 dir=$TMP/$1-hit-$2 url
    log "$kind run $run: TTFB of a cold big blob, then cache-hit throughput"
    start_mirror "$kind" "$dir"
    url="http://$MIRROR/v2/library/big/blobs/$BIG_DIGEST"
    get_big "$url" 1
    [ $OK = 1 ] && rec "$kind" ttfb_cold_s "$TTFB"
    wait_cached "$kind" "$dir" || true
    stop "$MIRROR_PID"

    start_mirror "$kind" "$dir"
    url="http://$MIRROR/v2/library/big/blobs/$BIG_DIGEST"
    bench_hits "$kind" "$url"
    rec "$kind" rss_hit_mib "$(peak_rss_mib "$MIRROR_PID")"
    rec "$kind" hit_cpu_s "$(cpu_s "$MIRROR_PID")"
    stop "$MIRROR_PID"
    rm -rf "$dir"
}

# single_hit URL: sets MBPS, one client's rate on the big blob: the median of 3 GETs one after
# another, each timed by curl from its request to its last byte (a 512 MiB hit takes ~0.2 s, so
# curl's own start-up would be noise). OK=1 if all three got every byte.
single_hit() {
    local url=$1 i all_ok=1 times=""
    for i in 1 2 3; do
        get_big "$url" 1
        [ $OK = 1 ] || all_ok=0
        times="$times $TOTAL"
    done
    OK=$all_ok
    MBPS=$(printf '%s\n' $times | sort -g | sed -n 2p |
        awk -v b="$BIG_BYTES" '{ printf "%.3f", b / $1 / 1e6 }')
}

# bench_hits WHO URL: 1 client, then 8 concurrent clients, GET the big blob (MB = 10^6 bytes).
bench_hits() {
    local who=$1 url=$2
    single_hit "$url"
    [ $OK = 1 ] && rec "$who" hit1_mbps "$MBPS"
    get_big "$url" "$CLIENTS"
    [ $OK = 1 ] && rec "$who" hit8_mbps "$(calc "$CLIENTS * $BIG_BYTES / $WALL / 1e6")"
}

# ---------------------------------------------------------------------------------------------
# 7. berth over TLS against berth plain, for the cache-hit and manifest benchmarks: one berth
# process with both listeners, its certificate from `berth certs`, clients verifying it.
bench_tls() {
    local run=$1 dir=$TMP/berth-tls-$1 port tport plain tls
    log "berth run $run: TLS vs plain (cache hits, manifest GETs)"
    "$BERTH" certs --host 127.0.0.1 --out "$dir/certs" --force >/dev/null
    port=$(free_port)
    tport=$(free_port)
    spawn "$dir/berth.stdout" "$dir/berth.log" "$BERTH" serve --listen "127.0.0.1:$port" \
        --tls-listen "127.0.0.1:$tport" --tls-cert "$dir/certs/server.crt" \
        --tls-key "$dir/certs/server.key" --data-dir "$dir/data" --upstream "$UPSTREAM"
    MIRROR_PID=$LAST_PID
    plain=http://127.0.0.1:$port
    tls=https://127.0.0.1:$tport
    wait_ready "$plain/v2/" "$MIRROR_PID" berth
    get_big "$plain/v2/library/big/blobs/$BIG_DIGEST" 1
    wait_cached berth "$dir" || true
    for side in plain tls; do
        local base=$plain prefix=""
        if [ $side = tls ]; then
            base=$tls
            prefix=tls_
            CURL_EXTRA="--cacert $dir/certs/ca.crt"
        fi
        single_hit "$base/v2/library/big/blobs/$BIG_DIGEST"
        [ $OK = 1 ] && rec berth "${prefix}same_hit1_mbps" "$MBPS"
        get_big "$base/v2/library/big/blobs/$BIG_DIGEST" "$CLIENTS"
        [ $OK = 1 ] && rec berth "${prefix}same_hit8_mbps" "$(calc "$CLIENTS * $BIG_BYTES / $WALL / 1e6")"
        bench_wrk berth "${prefix}same_tag" "$base/v2/library/five/manifests/v1"
        CURL_EXTRA=""
    done
    stop "$MIRROR_PID"
    rm -rf "$dir"
}

# ---------------------------------------------------------------------------------------------
# Runs

LOAD_START=$(loadavg)
log "load average at start: $LOAD_START; $RUNS runs; big blob $((BIG_BYTES >> 20)) MiB"
for run in $(seq "$RUNS"); do
    note "run $run: load average $(loadavg)"
    # Alternate which mirror goes first, so a change in background load hurts neither one alone.
    if [ $((run % 2)) = 1 ]; then order="berth reference"; else order="reference berth"; fi
    for kind in $order; do
        phase_pull "$kind" "$run"
        phase_cold8 "$kind" "$run"
        phase_ttfb_hit "$kind" "$run"
    done
    log "nginx run $run: cache-hit throughput"
    bench_hits nginx "$NGINX_URL/big"
    bench_tls "$run"
done

BENCH_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ) \
BENCH_NPROC=$(nproc) \
BENCH_MEM_MIB=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 }' /proc/meminfo) \
BENCH_KERNEL=$(uname -r) \
BENCH_CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo) \
BENCH_LOAD_START=$LOAD_START \
BENCH_LOAD_END=$(loadavg) \
BENCH_RUNS=$RUNS \
BENCH_QUICK=$QUICK \
BENCH_FIVE_BYTES=$FIVE_BYTES \
BENCH_BIG_BYTES=$BIG_BYTES \
BENCH_CLIENTS=$CLIENTS \
BENCH_WRK="wrk -t2 -c$WRK_CONNECTIONS -d$WRK_DURATION --latency" \
BENCH_BERTH_REV=$(git log -1 --format=%h -- src Cargo.toml Cargo.lock 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo -dirty) \
BENCH_REFERENCE="$(docker-registry --version | awk '{ print $2, $3 }') proxy mode" \
BENCH_TOOLS="$(skopeo --version); $(nginx -v 2>&1); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); $(curl --version | head -1 | cut -d' ' -f1-2)" \
    $HELPER report "$SAMPLES" "$OUT"
log "JSON: $OUT"
