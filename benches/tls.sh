#!/usr/bin/env bash
# Benchmark: cache hits over TLS 1.3 against plain HTTP, berth beside nginx with the same
# certificate, and the CPU each server spends per GB.
#
#   bash benches/tls.sh [--rounds N] [--size MIB] [--profile dist|release]
#
# One blob (default 256 MiB) cached in berth (fetched once from a local distribution registry)
# and served by nginx as a static file; each figure is the median of N rounds (default 5) of one
# client (HTTP/1.1, then HTTP/2) and of 8 concurrent clients (HTTP/1.1), curl discarding the
# body. Server CPU is read from /proc before and after each measurement. A benchmark, not a
# test: nothing fails on a slow figure.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
HELPER="python3 $ROOT/benches/mirror.py"

ROUNDS=5
SIZE_MIB=256
PROFILE=dist
while [ $# -gt 0 ]; do
    case "$1" in
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
need_tools docker-registry nginx curl python3
log "cargo build --profile $PROFILE"
cargo build --profile "$PROFILE" >&2
BERTH=$ROOT/target/$PROFILE/berth

start_upstream
chmod 755 "$TMP"

seed_big_blob keep

"$BERTH" certs --host 127.0.0.1 --out "$TMP/certs" >/dev/null
chmod 644 "$TMP/certs/"*
CA=$TMP/certs/ca.crt

# berth, plain and TLS listeners, with the blob cached.
BPORT=$(free_port) BTLS=$(free_port)
spawn "$TMP/berth.out" "$TMP/berth.err" env BERTH_LOG=warn "$BERTH" serve \
    --listen "127.0.0.1:$BPORT" --tls-listen "127.0.0.1:$BTLS" \
    --tls-cert "$TMP/certs/server.crt" --tls-key "$TMP/certs/server.key" \
    --data-dir "$TMP/berth" --upstream "$UPSTREAM"
BERTH_PID=$LAST_PID
wait_ready "http://127.0.0.1:$BPORT/v2/" "$BERTH_PID" berth
curl -sf -o /dev/null "http://127.0.0.1:$BPORT$BLOB_PATH" || die "berth: the first GET"
for i in $(seq 100); do [ -z "$(ls -A "$TMP/berth/tmp")" ] && break; sleep 0.1; done

# nginx, the same blob as a static file, plain and TLS (the same certificate).
NPORT=$(free_port) NTLS=$(free_port)
mkdir -p "$TMP/nginx/root/v2/bench/big/blobs"
ln "$TMP/big" "$TMP/nginx/root$BLOB_PATH"
chmod -R 755 "$TMP/nginx"
cat >"$TMP/nginx/nginx.conf" <<EOF
daemon off; pid $TMP/nginx/nginx.pid; error_log $TMP/nginx/error.log;
worker_processes auto;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    client_body_temp_path $TMP/nginx/body; proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi; uwsgi_temp_path $TMP/nginx/uwsgi; scgi_temp_path $TMP/nginx/scgi;
    server {
        listen 127.0.0.1:$NPORT;
        listen 127.0.0.1:$NTLS ssl http2;
        ssl_certificate $TMP/certs/server.crt;
        ssl_certificate_key $TMP/certs/server.key;
        ssl_protocols TLSv1.3;
        root $TMP/nginx/root;
        location = /v2/ { return 200 "{}"; }
    }
}
EOF
spawn "$TMP/nginx/out" "$TMP/nginx/err" nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf"
NGINX_PID=$LAST_PID
wait_ready "http://127.0.0.1:$NPORT/v2/" "$NGINX_PID" nginx

# server_cpu PID: CPU seconds of a process and its children (nginx's workers).
server_cpu() {
    local total=0 p
    for p in $1 $(pgrep -P "$1" || true); do total=$(calc "$total + $(cpu_s "$p")"); done
    echo "$total"
}

# measure WHO PID NAME N URL [CURL ARGS...]: N concurrent GETs; records MB/s and CPU s/GB.
measure() {
    local who=$1 pid=$2 name=$3 n=$4 url=$5 cpu0 start wall i pids=()
    shift 5
    cpu0=$(server_cpu "$pid")
    start=$(now)
    for i in $(seq "$n"); do
        curl -sf -o /dev/null --cacert "$CA" "$@" "$url" &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || die "$who $name: a GET failed"; done
    wall=$(since "$start")
    rec "$who" "${name}_mbs" "$(calc "$SIZE_MIB * 1.048576 * $n / $wall")"
    rec "$who" "${name}_cpu_s_per_gb" "$(calc "($(server_cpu "$pid") - $cpu0) * 1024 / ($SIZE_MIB * $n)")"
}

for round in $(seq "$ROUNDS"); do
    log "round $round of $ROUNDS"
    for who in berth nginx; do
        if [ "$who" = berth ]; then pid=$BERTH_PID plain=$BPORT tls=$BTLS; else pid=$NGINX_PID plain=$NPORT tls=$NTLS; fi
        measure "$who" "$pid" plain1 1 "http://127.0.0.1:$plain$BLOB_PATH"
        measure "$who" "$pid" tls1_h1 1 "https://127.0.0.1:$tls$BLOB_PATH" --http1.1
        measure "$who" "$pid" tls1_h2 1 "https://127.0.0.1:$tls$BLOB_PATH" --http2
        measure "$who" "$pid" plain8 8 "http://127.0.0.1:$plain$BLOB_PATH"
        measure "$who" "$pid" tls8_h1 8 "https://127.0.0.1:$tls$BLOB_PATH" --http1.1
    done
done

echo "cache hits over TLS 1.3 and plain HTTP — $SIZE_MIB MiB blob, medians of $ROUNDS rounds, $(date -u +%F), $(nproc) cores, berth profile $PROFILE"
echo
echo "| figure | berth MB/s | nginx MB/s | berth / nginx | berth CPU s/GB | nginx CPU s/GB |"
echo "|---|---|---|---|---|---|"
for name in plain1 tls1_h1 tls1_h2 plain8 tls8_h1; do
    b=$(median berth "${name}_mbs") n=$(median nginx "${name}_mbs")
    echo "| $name | $b | $n | $(calc "$b / $n") | $(median berth "${name}_cpu_s_per_gb") | $(median nginx "${name}_cpu_s_per_gb") |"
done
