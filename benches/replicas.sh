#!/usr/bin/env bash
# Benchmark: berth on S3 (Garage on 127.0.0.1) against berth on one disk, in one run, each
# figure a ratio to the one-disk berth. The upstream is the distribution registry on
# 127.0.0.1 holding one big blob.
#
#   bash benches/replicas.sh [--quick] [--runs N] [--size MIB] [--profile dist|release]
#
#   --quick          a 64 MiB blob and 3 runs (default: 256 MiB, 5 runs)
#   --runs N         runs per measurement; figures are medians
#   --size MIB       the blob's size
#   --profile P      cargo profile berth is built with (default dist: fat LTO, as released)
#
# Measured, each run from fresh processes (and, for cold figures, fresh storage):
#   hit      cache hit, 1 client and 8 concurrent clients (MB/s): one-disk berth; S3 berth with
#            the blob in its local copy ("local"); S3 berth with the blob only in the bucket (a
#            replica with an empty data dir: "bucket", 1 client)
#   cold8    8 concurrent GETs of the blob nobody has: wall time and upstream GETs, one-disk
#            berth vs one S3 replica; and both behind nginx (deploy/replicas/nginx.conf as
#            shipped): one-disk berth vs two S3 replicas; the upstream itself (8 GETs straight
#            from it) and Garage (one GET straight from it) as the limits
#
# A benchmark, not a test: nothing fails on a slow figure. It installs what it needs (apt-get
# as root; Garage with cargo install when missing). Every server binds 127.0.0.1; all are killed
# and the temp dir removed on exit. Table on stdout, progress on stderr.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
HELPER="python3 $ROOT/benches/mirror.py"

RUNS=5
SIZE_MIB=256
PROFILE=dist
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) RUNS=3; SIZE_MIB=64 ;;
        --runs) RUNS=$2; shift ;;
        --size) SIZE_MIB=$2; shift ;;
        --profile) PROFILE=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
need_tools docker-registry nginx curl python3
command -v garage >/dev/null || cargo install garage --locked --version 2.5.0 >&2
log "cargo build --profile $PROFILE"
cargo build --profile "$PROFILE" >&2
BERTH=$ROOT/target/$PROFILE/berth


# --- the upstream, with one big blob --------------------------------------------------------
start_upstream

seed_big_blob
upstream_gets() { grep -c "\"GET $BLOB_PATH HTTP" "$TMP/upstream/access.log" || true; }

# --- Garage ---------------------------------------------------------------------------------
GPORT=$(free_port)
KEY_ID=GK31c2f218a2e44f485b94239e
SECRET=b892c0665f0ada8a4755dae98baa3b133590e11ae3bcc1f9d2d5f01e0d7c0f56
mkdir -p "$TMP/garage"
cat >"$TMP/garage/garage.toml" <<EOF
metadata_dir = "$TMP/garage/meta"
data_dir = "$TMP/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$(free_port)"
rpc_secret = "$(printf '4%.0s' $(seq 64))"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$GPORT"
EOF
printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' "$KEY_ID" "$SECRET" \
    >"$TMP/garage/credentials"
spawn "$TMP/garage/log" "$TMP/garage/log" env GARAGE_DEFAULT_ACCESS_KEY="$KEY_ID" \
    GARAGE_DEFAULT_SECRET_KEY="$SECRET" GARAGE_DEFAULT_BUCKET=berth RUST_LOG=warn \
    garage -c "$TMP/garage/garage.toml" server --single-node --default-bucket
GARAGE_PID=$LAST_PID
for i in $(seq 300); do
    kill -0 "$GARAGE_PID" 2>/dev/null || die "garage exited"
    [ "$(curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 aws:amz:garage:s3 \
        --user "$KEY_ID:$SECRET" -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' \
        "http://127.0.0.1:$GPORT/berth?list-type=2")" = 200 ] && break
    sleep 0.1
done

# --- berth ----------------------------------------------------------------------------------
# start_berth NAME DATA_DIR [PREFIX EVICT]: one-disk berth, or an S3 replica on bucket prefix
# PREFIX; its address in BERTH_URL, its pid in LAST_PID.
start_berth() {
    local name=$1 data=$2 prefix=${3:-} evict=${4:-true} port config
    port=$(free_port)
    config=$TMP/$name.toml
    : >"$config"
    if [ -n "$prefix" ]; then
        cat >"$config" <<EOF
[storage]
backend = "s3"
bucket = "berth"
endpoint = "http://127.0.0.1:$GPORT"
region = "garage"
prefix = "$prefix"
allow_http = true
credentials_file = "$TMP/garage/credentials"
evict = $evict
EOF
    fi
    spawn "$TMP/$name.out" "$TMP/$name.log" env BERTH_LOG=warn "$BERTH" serve --config "$config" \
        --listen "127.0.0.1:$port" --data-dir "$data" --upstream "$UPSTREAM"
    BERTH_URL=http://127.0.0.1:$port
    wait_ready "$BERTH_URL/v2/" "$LAST_PID" "berth $name"
}



mbps() { calc "$SIZE_MIB * 1.048576 * $1 / $2"; }

# wait_settled DATA_DIR: until the data dir has no write in progress (the bucket upload done).
wait_settled() {
    local i
    for i in $(seq 600); do
        [ -z "$(ls -A "$1/tmp" 2>/dev/null)" ] && return 0
        sleep 0.1
    done
    die "$1 still writing after 60 s"
}

NGINX_CONF=$ROOT/deploy/replicas/nginx.conf
# start_lb A_URL B_URL: nginx with the shipped config, replicas and port swapped.
start_lb() {
    local a=${1#http://} b=${2#http://} port root
    port=$(free_port)
    root=$TMP/nginx-$port
    mkdir -p "$root"
    chmod 755 "$TMP" "$root"
    {
        echo "daemon off; pid $root/nginx.pid; error_log $root/error.log;"
        awk -v a="$a" -v b="$b" -v port="$port" -v root="$root" '
            /server berth-1:5000/ { sub(/berth-1:5000/, a) }
            /server berth-2:5000/ { sub(/berth-2:5000/, b) }
            /listen 5000;/ { sub(/5000/, "127.0.0.1:" port) }
            /^http \{/ { print; print "access_log off; client_body_temp_path " root "/body; proxy_temp_path " root "/proxy;"; next }
            { print }' "$NGINX_CONF"
    } >"$root/nginx.conf"
    spawn "$root/out" "$root/err" nginx -p "$root" -c "$root/nginx.conf"
    LB_URL=http://127.0.0.1:$port
    # nginx answers for berth: /v2/ is 200 once both are behind it.
    wait_ready "$LB_URL/v2/" "$LAST_PID" "nginx"
}

for run in $(seq "$RUNS"); do
    log "run $run of $RUNS (load $(loadavg))"

    # The upstream itself: 8 GETs straight from it, the limit of any cold figure.
    rec upstream cold8_s "$(clients 8 "$UPSTREAM$BLOB_PATH")"

    # One-disk berth: cold 8, then hits.
    start_berth disk "$TMP/disk-$run"
    pid=$LAST_PID
    before=$(upstream_gets)
    rec disk cold8_s "$(clients 8 "$BERTH_URL$BLOB_PATH")"
    rec disk cold8_gets "$(($(upstream_gets) - before))"
    wait_settled "$TMP/disk-$run"
    rec disk hit1_mbs "$(mbps 1 "$(get "$BERTH_URL$BLOB_PATH")")"
    rec disk hit8_mbs "$(mbps 8 "$(clients 8 "$BERTH_URL$BLOB_PATH")")"
    stop "$pid"
    rm -rf "$TMP/disk-$run"

    # The same one-disk berth behind the same nginx config: what the load balancer costs.
    start_berth disk "$TMP/disk-$run"
    pid=$LAST_PID
    start_lb "$BERTH_URL" "$BERTH_URL"
    rec disklb cold8_s "$(clients 8 "$LB_URL$BLOB_PATH")"
    stop "$LAST_PID"
    stop "$pid"
    rm -rf "$TMP/disk-$run"

    # One S3 replica, no load balancer, on a fresh prefix.
    start_berth one "$TMP/one-$run" "one$run" true
    pid=$LAST_PID
    before=$(upstream_gets)
    rec s3one cold8_s "$(clients 8 "$BERTH_URL$BLOB_PATH")"
    rec s3one cold8_gets "$(($(upstream_gets) - before))"
    wait_settled "$TMP/one-$run"
    stop "$pid"
    rm -rf "$TMP/one-$run"

    # Two S3 replicas behind nginx, on a fresh prefix: cold 8 through the load balancer.
    start_berth a "$TMP/a-$run" "run$run" true
    a_pid=$LAST_PID a_url=$BERTH_URL
    start_berth b "$TMP/b-$run" "run$run" false
    b_pid=$LAST_PID b_url=$BERTH_URL
    start_lb "$a_url" "$b_url"
    lb_pid=$LAST_PID
    before=$(upstream_gets)
    rec pair cold8_s "$(clients 8 "$LB_URL$BLOB_PATH")"
    rec pair cold8_gets "$(($(upstream_gets) - before))"
    wait_settled "$TMP/a-$run"
    wait_settled "$TMP/b-$run"
    stop "$lb_pid"

    # S3 berth with the blob in its local copy: whichever replica fetched it serves hits.
    url=$a_url
    [ -n "$(find "$TMP/a-$run/cache/blobs" -type f 2>/dev/null | head -1)" ] || url=$b_url
    rec s3local hit1_mbs "$(mbps 1 "$(get "$url$BLOB_PATH")")"
    rec s3local hit8_mbs "$(mbps 8 "$(clients 8 "$url$BLOB_PATH")")"
    stop "$a_pid"
    stop "$b_pid"

    # A replica with an empty data dir: the blob only in the bucket; and the same object
    # straight from Garage, the limit of that figure.
    start_berth fresh "$TMP/fresh-$run" "run$run" false
    rec bucket hit1_mbs "$(mbps 1 "$(get "$BERTH_URL$BLOB_PATH")")"
    stop "$LAST_PID"
    rec garage get1_mbs "$(mbps 1 "$(curl -sf -o /dev/null -w '%{time_total}' \
        --aws-sigv4 aws:amz:garage:s3 --user "$KEY_ID:$SECRET" \
        -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' \
        "http://127.0.0.1:$GPORT/berth/run$run/cache/blobs/sha256/${DIGEST#sha256:}")")"
    rm -rf "$TMP/a-$run" "$TMP/b-$run" "$TMP/fresh-$run"
done

# --- the table: medians, and ratios to the one-disk berth --------------------------------------
ratio() { calc "$1 / $2"; }
D1=$(median disk hit1_mbs) D8=$(median disk hit8_mbs) DC=$(median disk cold8_s)
L1=$(median s3local hit1_mbs) L8=$(median s3local hit8_mbs) B1=$(median bucket hit1_mbs)
PC=$(median pair cold8_s) UC=$(median upstream cold8_s) LC=$(median disklb cold8_s)
OC=$(median s3one cold8_s) G1=$(median garage get1_mbs)
cat <<EOF
berth on S3 (Garage) vs berth on one disk — $SIZE_MIB MiB blob, medians of $RUNS runs, $(date -u +%F), $(nproc) cores, profile $PROFILE

| figure | one disk | S3 | S3 / one disk |
|---|---|---|---|
| cache hit, 1 client, blob in the local copy (MB/s) | $D1 | $L1 | $(ratio "$L1" "$D1") |
| cache hit, 8 clients, blob in the local copy (MB/s) | $D8 | $L8 | $(ratio "$L8" "$D8") |
| cache hit, 1 client, blob only in the bucket (MB/s) | $D1 | $B1 | $(ratio "$B1" "$D1") |
| cold, 8 concurrent GETs: wall (s) — one S3 replica | $DC | $OC | $(ratio "$OC" "$DC") |
| cold, 8 concurrent GETs: wall (s) — both behind nginx; S3: two replicas | $LC | $PC | $(ratio "$PC" "$LC") |
| cold, 8 concurrent GETs: upstream GETs of the blob (one replica / two) | $(median disk cold8_gets) | $(median s3one cold8_gets) / $(median pair cold8_gets) | |

Limits: the upstream itself served 8 concurrent GETs in $UC s; Garage served the blob to one
client at $G1 MB/s (the "only in the bucket" figure can be no faster).
EOF
