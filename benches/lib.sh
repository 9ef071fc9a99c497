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
