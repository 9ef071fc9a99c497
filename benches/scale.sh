#!/usr/bin/env bash
# Benchmark: how berth, nginx `proxy_cache` and the distribution registry (proxy mode) hold up
# as clients grow: cache-hit blob GETs and manifest GETs at 1, 8, 64, 256 and 1024 concurrent
# connections (wrk), with throughput, p99 latency and the server's peak RSS at each level.
#
#   bash benches/scale.sh [--duration 5s] [--levels "1 8 64 256 1024"] [--profile dist|release]
#                         [--mirrors "berth nginx distribution"] [--berth PATH]
#
# --berth runs that binary (an A/B of two builds) instead of building one.
# The blob is a 2 MiB layer and the manifest a Docker schema 2 image manifest, both warm in
# every mirror (fetched once before measuring). RSS is sampled every 100 ms during each level
# (nginx: master and workers together), whole and anonymous (RssAnon: without the page-cache
# pages a server maps, which are shared and not its own). A benchmark, not a test: nothing fails on a slow figure.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
HELPER="python3 $ROOT/benches/mirror.py"

DURATION=5s
LEVELS="1 8 64 256 1024"
PROFILE=dist
MIRRORS="berth nginx distribution"
BERTH=""
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION=$2; shift ;;
        --levels) LEVELS=$2; shift ;;
        --profile) PROFILE=$2; shift ;;
        --mirrors) MIRRORS=$2; shift ;;
        --berth) BERTH=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
need_tools docker-registry nginx curl python3 skopeo wrk
if [ -z "$BERTH" ]; then
    log "cargo build --profile $PROFILE"
    cargo build --profile "$PROFILE" >&2
    BERTH=$ROOT/target/$PROFILE/berth
fi
ulimit -n 65536 2>/dev/null || true

start_upstream
eval "$($HELPER images "$TMP/images" --quick)"
skopeo_copy --dest-tls-verify=false --preserve-digests "dir:$TMP/images/five" \
    "docker://127.0.0.1:$UPORT/library/five:v1" || die "skopeo push: $(tail -3 "$TMP/skopeo/log")"
LAYER=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['layers'][0]['digest'])" \
    "$TMP/images/five/manifest.json")
rm -rf "$TMP/images"
BLOB_PATH=/v2/library/five/blobs/$LAYER
MANIFEST_PATH=/v2/library/five/manifests/v1
ACCEPT="application/vnd.docker.distribution.manifest.v2+json"
chmod 755 "$TMP"

# rss_kib PID [FIELD]: resident KiB (VmRSS, or another /proc status field such as RssAnon:
# what the process itself allocated, without the page cache it maps) of a process and its
# children (nginx's workers).
rss_kib() {
    local total=0 p r field=${2:-VmRSS}
    for p in $1 $(pgrep -P "$1" || true); do
        r=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)
        total=$((total + ${r:-0}))
    done
    echo "$total"
}

# level WHO KIND C URL [HEADER]: one wrk run; records MB/s or req/s, p99 ms, peak RSS MiB.
level() {
    local who=$1 kind=$2 c=$3 url=$4 out peak=0 anon=0 sampler hdr=()
    [ -z "${5:-}" ] || hdr=(-H "$5")
    (
        while :; do
            echo "$(rss_kib "$MIRROR_PID") $(rss_kib "$MIRROR_PID" RssAnon)"
            sleep 0.1
        done
    ) >"$TMP/rss" 2>/dev/null &
    sampler=$!
    # wrk needs a connection per thread: one thread for one client.
    out=$(wrk -t"$([ "$c" -ge 2 ] && echo 2 || echo 1)" -c"$c" -d"$DURATION" --latency "${hdr[@]}" \
        "$url" 2>&1) ||
        die "wrk $url: $out"
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    peak=$(awk '$1 > m { m = $1 } END { print m + 0 }' "$TMP/rss")
    anon=$(awk '$2 > m { m = $2 } END { print m + 0 }' "$TMP/rss")
    rec "$who" "${kind}_rps_c$c" "$(echo "$out" | awk '/^Requests\/sec:/ { print $2 }')"
    rec "$who" "${kind}_mbs_c$c" "$(echo "$out" | awk '/^Transfer\/sec:/ {
        v = $2; u = substr(v, length(v) - 1); n = v + 0
        if (u == "GB") n *= 1024; else if (u == "KB") n /= 1024; else if (u !~ /MB/) n /= 1048576
        printf "%.1f", n * 1.048576 }')"
    rec "$who" "${kind}_p99ms_c$c" "$(echo "$out" | awk '$1 == "99%" {
        v = $2; n = v + 0
        if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000
        printf "%.2f", n }')"
    rec "$who" "${kind}_rss_c$c" "$(calc "${peak:-0} / 1024")"
    rec "$who" "${kind}_anon_c$c" "$(calc "${anon:-0} / 1024")"
    if echo "$out" | grep -q "Non-2xx\|Socket errors"; then
        note "$who $kind c=$c: $(echo "$out" | grep "Non-2xx\|Socket errors" | tr -s ' ')"
    fi
}

# Manifests differ by Accept: nginx keys its cache by both.
NGINX_CACHE_KEY='$uri$http_accept'
for who in $MIRRORS; do
    log "$who"
    start_peer "$who" "$TMP/$who"
    curl -sf -o /dev/null "$MIRROR_URL$BLOB_PATH" || die "$who: blob GET"
    curl -sf -o /dev/null -H "Accept: $ACCEPT" "$MIRROR_URL$MANIFEST_PATH" || die "$who: manifest GET"
    rec "$who" idle_rss "$(calc "$(rss_kib "$MIRROR_PID") / 1024")"
    rec "$who" idle_anon "$(calc "$(rss_kib "$MIRROR_PID" RssAnon) / 1024")"
    for c in $LEVELS; do
        level "$who" blob "$c" "$MIRROR_URL$BLOB_PATH"
        level "$who" manifest "$c" "$MIRROR_URL$MANIFEST_PATH" "Accept: $ACCEPT"
    done
    stop "$MIRROR_PID"
done

value() { awk -v w="$1" -v m="$2" '$1 == w && $2 == m { print $3 }' "$SAMPLES" | tail -1; }
echo "scale curve — $(date -u +%F), $(nproc) cores, wrk -t2 -d$DURATION, berth profile $PROFILE"
echo "blob: a cached 2 MiB layer; manifest: a cached image manifest; RSS: peak during the level"
for who in $MIRRORS; do
    echo
    echo "$who (idle: RSS $(value "$who" idle_rss) MiB, of which anonymous $(value "$who" idle_anon) MiB)"
    echo
    echo "| clients | blob MB/s | blob p99 ms | manifest req/s | manifest p99 ms | peak RSS MiB (blob / manifest) | peak anonymous MiB (blob / manifest) |"
    echo "|---|---|---|---|---|---|---|"
    for c in $LEVELS; do
        echo "| $c | $(value "$who" "blob_mbs_c$c") | $(value "$who" "blob_p99ms_c$c") | $(value "$who" "manifest_rps_c$c") | $(value "$who" "manifest_p99ms_c$c") | $(value "$who" "blob_rss_c$c") / $(value "$who" "manifest_rss_c$c") | $(value "$who" "blob_anon_c$c") / $(value "$who" "manifest_anon_c$c") |"
    done
done
grep '^note' "$SAMPLES" | sed 's/^note /note: /' || true
