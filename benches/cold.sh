#!/usr/bin/env bash
# Benchmark: the cold pull — a blob nobody has cached yet — through berth, nginx `proxy_cache`
# (with `proxy_cache_lock`, keyed by URI, the way docker-registry-proxy configures it) and the
# distribution registry in proxy mode, with the upstream itself as the limit. Each figure is a
# median over rounds that alternate the mirrors; every mirror starts each GET empty (a fresh
# process with fresh storage).
#
#   bash benches/cold.sh [--quick] [--rounds N] [--size MIB] [--profile dist|release]
#
#   --quick          a 64 MiB blob, a 10 MiB image and 3 rounds (default: 512 MiB, a 100 MiB
#                    image of 5 layers, 5 rounds)
#   --profile P      cargo profile berth is built with (default dist, as released)
#
# Per round and mirror: one client's total time for the whole blob (curl, body discarded), and
# 8 concurrent clients' wall time with the upstream GETs it cost; plus the mirror's CPU seconds
# for each (from /proc); and a skopeo pull of a 5-layer image into a dir: layout. A benchmark, not a test: nothing fails on a slow figure. It installs
# what it needs (apt-get, as root). Every server binds 127.0.0.1 and is stopped on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
HELPER="python3 $ROOT/benches/mirror.py"

ROUNDS=5
SIZE_MIB=512
PROFILE=dist
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) ROUNDS=3; SIZE_MIB=64 ;;
        --rounds) ROUNDS=$2; shift ;;
        --size) SIZE_MIB=$2; shift ;;
        --profile) PROFILE=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
need_tools docker-registry nginx curl python3 skopeo
log "cargo build --profile $PROFILE"
cargo build --profile "$PROFILE" >&2
BERTH=$ROOT/target/$PROFILE/berth

start_upstream

seed_big_blob

log "the 5-layer image into the upstream"
QUICK_FLAG=$([ "$SIZE_MIB" -le 64 ] && echo --quick || true)
# shellcheck disable=SC2086 # an empty flag is no argument
eval "$($HELPER images "$TMP/images" $QUICK_FLAG)"
skopeo_copy --dest-tls-verify=false --preserve-digests "dir:$TMP/images/five" \
    "docker://127.0.0.1:$UPORT/library/five:v1" || die "skopeo push: $(tail -3 "$TMP/skopeo/log")"
rm -rf "$TMP/images"
# pull_s URL: seconds for a skopeo pull of the image from URL's registry into a new dir.
pull_s() {
    local start
    rm -rf "$TMP/pulled"
    start=$(now)
    skopeo_copy --src-tls-verify=false "docker://${1#http://}/library/five:v1" "dir:$TMP/pulled" ||
        die "skopeo pull from $1: $(tail -1 "$TMP/skopeo/log")"
    since "$start"
}
upstream_gets() { grep -c "\"GET $BLOB_PATH HTTP" "$TMP/upstream/access.log" || true; }
chmod 755 "$TMP"

# Every process of a mirror (nginx's workers are children of its master).
mirror_cpu() {
    local total=0 p
    for p in $1 $(pgrep -P "$1" || true); do
        total=$(calc "$total + $(cpu_s "$p")")
    done
    echo "$total"
}


MIRRORS="berth nginx distribution"
for round in $(seq "$ROUNDS"); do
    log "round $round of $ROUNDS (load $(cut -d' ' -f1-3 /proc/loadavg))"
    rec upstream cold1_s "$(get "$UPSTREAM$BLOB_PATH")"
    rec upstream cold8_s "$(clients 8 "$UPSTREAM$BLOB_PATH")"
    rec upstream pull_s "$(pull_s "$UPSTREAM")"
    for who in $MIRRORS; do
        dir=$TMP/$who-$round-p
        start_peer "$who" "$dir"
        rec "$who" pull_s "$(pull_s "$MIRROR_URL")"
        stop "$MIRROR_PID"
        rm -rf "$dir"

        dir=$TMP/$who-$round-1
        start_peer "$who" "$dir"
        cpu0=$(mirror_cpu "$MIRROR_PID")
        rec "$who" cold1_s "$(get "$MIRROR_URL$BLOB_PATH")"
        rec "$who" cold1_cpu_s "$(calc "$(mirror_cpu "$MIRROR_PID") - $cpu0")"
        stop "$MIRROR_PID"
        rm -rf "$dir"

        dir=$TMP/$who-$round-8
        start_peer "$who" "$dir"
        before=$(upstream_gets)
        cpu0=$(mirror_cpu "$MIRROR_PID")
        rec "$who" cold8_s "$(clients 8 "$MIRROR_URL$BLOB_PATH")"
        rec "$who" cold8_cpu_s "$(calc "$(mirror_cpu "$MIRROR_PID") - $cpu0")"
        rec "$who" cold8_gets "$(($(upstream_gets) - before))"
        stop "$MIRROR_PID"
        rm -rf "$dir"
    done
done

U1=$(median upstream cold1_s) U8=$(median upstream cold8_s) UP=$(median upstream pull_s)
N1=$(median nginx cold1_s) N8=$(median nginx cold8_s) NP=$(median nginx pull_s)
D8=$(median distribution cold8_s)
echo "cold pull of a $SIZE_MIB MiB blob — medians of $ROUNDS rounds, $(date -u +%F), $(nproc) cores, berth profile $PROFILE"
echo
echo "| mirror | 1 client (s) | vs upstream | vs nginx | CPU (s) | 8 clients (s) | vs upstream | vs nginx | vs distribution | CPU (s) | upstream GETs |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
echo "| upstream itself | $U1 | 1.00 | | | $U8 | 1.00 | | | | |"
for who in $MIRRORS; do
    c1=$(median "$who" cold1_s) c8=$(median "$who" cold8_s)
    echo "| $who | $c1 | $(calc "$c1 / $U1") | $(calc "$c1 / $N1") | $(median "$who" cold1_cpu_s) | $c8 | $(calc "$c8 / $U8") | $(calc "$c8 / $N8") | $(calc "$c8 / $D8") | $(median "$who" cold8_cpu_s) | $(median "$who" cold8_gets) |"
done
echo
echo "skopeo pull of the 5-layer image into dir:, cold: upstream itself $UP s"
echo
echo "| mirror | pull (s) | vs upstream | vs nginx |"
echo "|---|---|---|---|"
for who in $MIRRORS; do
    p=$(median "$who" pull_s)
    echo "| $who | $p | $(calc "$p / $UP") | $(calc "$p / $NP") |"
done
