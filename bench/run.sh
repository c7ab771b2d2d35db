#!/usr/bin/env bash
# Data-path benchmark: the direct path against a plaintext meshlet sidecar pair, at the
# same fixed rate, in one run. See bench/README.md for what each figure means.
#
# Topology (all inside network namespaces this script creates and always deletes):
#   direct:  mlbench-PID-dc (loadgen) ==veth== mlbench-PID-ds (server)
#   meshlet: mlbench-PID-mc (loadgen, meshlet-init rules, meshlet-proxy as 1337)
#            ==veth== mlbench-PID-ms (server, meshlet-init rules, meshlet-proxy as 1337)
# Addresses are in the benchmark range 198.18.0.0/15. Nothing touches the root
# namespace's addresses, routes or iptables.
#
# Knobs (environment):
#   RATE (1000 req/s), DURATION (30s), WARMUP (5s), CONNECTIONS (8),
#   ROUNDS (3; each round runs direct then meshlet; the report takes medians),
#   PIN (1: each pod on its own core: loadgen and client proxy on CPU 0, server and
#        server proxy on CPU 1; 0: let the scheduler place everything),
#   RT (1: loadgens, servers and proxies run under SCHED_FIFO priority 10 during the
#       fixed-rate rounds, so other work on a shared machine cannot delay them; 0: normal),
#   MAXTP (0 = skip; e.g. 10s adds a closed-loop max-throughput pass of each path under
#          normal scheduling after the rounds: it saturates the machine for that long),
#   PROXY_THREADS (1), PROXY_LINK (dynamic | static: glibc linked in, non-PIE, as
#   Dockerfile.proxy builds it:
#   -C target-feature=+crt-static -C relocation-model=static), PROFILE (release | dev), SKIP_BUILD (0),
#   RESULTS (bench/results), LABEL (datapath), IDLE_SETTLE_S (3),
#   SKIP_CLIENT_INIT (0; 1 leaves the client pod without redirect rules so that the load
#   bypasses the client sidecar: only for the test that the pass-through check fails),
#   AUTHZ_POLICIES (0; N > 0 gives the mesh config N AuthorizationPolicies targeting the
#   server pod: N-1 whose rules name service accounts the plaintext loadgen does not
#   have, then one allowing any caller on the port, so every request scans them all).
set -euo pipefail

RATE=${RATE:-1000}
DURATION=${DURATION:-30s}
WARMUP=${WARMUP:-5s}
CONNECTIONS=${CONNECTIONS:-8}
ROUNDS=${ROUNDS:-3}
PROXY_THREADS=${PROXY_THREADS:-1}
PIN=${PIN:-1}
PROFILE=${PROFILE:-release}
SKIP_BUILD=${SKIP_BUILD:-0}
LABEL=${LABEL:-datapath}
IDLE_SETTLE_S=${IDLE_SETTLE_S:-3}
MAXTP=${MAXTP:-0}
PROXY_LINK=${PROXY_LINK:-dynamic}
RT=${RT:-1}
SKIP_CLIENT_INIT=${SKIP_CLIENT_INIT:-0}
AUTHZ_POLICIES=${AUTHZ_POLICIES:-0}
PORT=8080

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS=${RESULTS:-$ROOT/bench/results}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case $PROFILE in
release) BIN=$TARGET/release ;;
dev) BIN=$TARGET/debug ;;
*)
    echo "run.sh: PROFILE must be release or dev, not '$PROFILE'" >&2
    exit 64
    ;;
esac

PREFIX=mlbench-$$
NS_DC=$PREFIX-dc
NS_DS=$PREFIX-ds
NS_MC=$PREFIX-mc
NS_MS=$PREFIX-ms
CLIENT_IP=198.18.200.1
SERVER_IP=198.18.200.2
URL=http://$SERVER_IP:$PORT/

log() { printf 'run.sh: %s\n' "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

# --- preconditions ------------------------------------------------------------------

[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, iptables inside them); run it with sudo"
for cmd in ip iptables setpriv curl jq python3 taskset; do
    command -v "$cmd" >/dev/null ||
        die "'$cmd' is missing: apt-get install -y iproute2 iptables util-linux curl jq python3"
done

# --- cleanup (also of namespaces left by an earlier run that was killed) ---------------

PIDS=()
NAMESPACES=()
WORK=$(mktemp -d "/tmp/$PREFIX.XXXXXX")
# The proxies run as UID 1337 and must read their config file here.
chmod 755 "$WORK"

cleanup() {
    local rc=$?
    local pid ns
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    for ns in "${NAMESPACES[@]}"; do
        ip netns del "$ns" 2>/dev/null || true
    done
    if [[ $rc -ne 0 ]]; then
        log "logs kept in $WORK"
        for f in "$WORK"/*.log; do
            [[ -s $f ]] || continue
            log "--- tail of $f"
            tail -n 20 "$f" >&2 || true
        done
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

while read -r ns _; do
    [[ $ns =~ ^mlbench-([0-9]+)-(dc|ds|mc|ms)$ ]] || continue
    if ! kill -0 "${BASH_REMATCH[1]}" 2>/dev/null; then
        log "removing stale namespace $ns of an earlier run"
        ip netns del "$ns" 2>/dev/null || true
    fi
done < <(ip netns list)

# --- build ----------------------------------------------------------------------------

if [[ $SKIP_BUILD != 1 ]]; then
    log "building meshlet-proxy, meshlet-init and meshlet-bench ($PROFILE)"
    (cd "$ROOT" && nice cargo build --profile "$PROFILE" -p meshlet-proxy -p meshlet-init -p meshlet-bench)
fi
for b in meshlet-proxy meshlet-init meshlet-loadgen meshlet-bench-server; do
    [[ -x $BIN/$b ]] || die "$BIN/$b is missing: build it (cargo build --profile $PROFILE -p ...) or unset SKIP_BUILD"
done
PROXY_BIN=$BIN/meshlet-proxy
case $PROXY_LINK in
dynamic) ;;
static)
    # An explicit --target keeps RUSTFLAGS off build scripts and puts the artifacts in
    # their own directory, so the dynamic build above stays valid.
    host=$(rustc -vV | sed -n 's/^host: //p')
    PROXY_BIN=$TARGET/$host/${BIN##*/}/meshlet-proxy
    if [[ $SKIP_BUILD != 1 ]]; then
        log "building a statically linked meshlet-proxy ($PROFILE, $host)"
        (cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" nice cargo build \
            --profile "$PROFILE" -p meshlet-proxy --target "$host")
    fi
    [[ -x $PROXY_BIN ]] || die "$PROXY_BIN is missing: unset SKIP_BUILD to build it"
    ;;
*) die "PROXY_LINK must be dynamic or static, not '$PROXY_LINK'" ;;
esac

# --- pinning ----------------------------------------------------------------------------

CLIENT_CPU=()
SERVER_CPU=()
if [[ $PIN == 1 ]]; then
    CLIENT_CPU=(taskset -c 0)
    SERVER_CPU=(taskset -c 1)
fi
MAXTP_CPU=("${CLIENT_CPU[@]}")
if [[ $RT == 1 ]]; then
    command -v chrt >/dev/null || die "'chrt' is missing: apt-get install -y util-linux"
    CLIENT_CPU+=(chrt -f 10)
    SERVER_CPU+=(chrt -f 10)
fi

# --- namespaces ---------------------------------------------------------------------

# make_pair CLIENT_NS SERVER_NS: two "pods" joined by one veth pair. The veth is created
# inside the client namespace with its peer moved straight into the server namespace,
# so no interface ever exists in the root namespace.
make_pair() {
    local c=$1 s=$2
    ip netns add "$c"
    NAMESPACES+=("$c")
    ip netns add "$s"
    NAMESPACES+=("$s")
    ip -n "$c" link add eth0 type veth peer name eth0 netns "$s"
    ip -n "$c" addr add "$CLIENT_IP/24" dev eth0
    ip -n "$s" addr add "$SERVER_IP/24" dev eth0
    local ns
    for ns in "$c" "$s"; do
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    done
}

make_pair "$NS_DC" "$NS_DS"
make_pair "$NS_MC" "$NS_MS"

# wait_http NS URL WHAT: bounded wait (10 s) until URL answers 2xx inside NS.
wait_http() {
    local ns=$1 url=$2 what=$3 i
    for ((i = 0; i < 100; i++)); do
        if ip netns exec "$ns" curl -sf -o /dev/null --max-time 1 "$url"; then
            return 0
        fi
        sleep 0.1
    done
    die "$what did not answer $url within 10 s"
}

# start NS LOGNAME CMD...: runs CMD in NS in the background; sets STARTED_PID.
# `ip netns exec`, `setpriv` and `env` all exec, so the PID is the program's own.
start() {
    local ns=$1 name=$2
    shift 2
    ip netns exec "$ns" "$@" >"$WORK/$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# rss_split PID: {"anon": KiB, "file": KiB} (RssAnon, RssFile): heap and stacks versus
# mapped code and data of the binary and its shared libraries.
rss_split() {
    awk '/^RssAnon:/ {a = $2} /^RssFile:/ {f = $2} END {printf "{\"anon\": %d, \"file\": %d}\n", a, f}' "/proc/$1/status"
}

# requests_total NS DIRECTION: the sum of meshlet_requests_total over all label sets.
requests_total() {
    ip netns exec "$1" curl -sf --max-time 2 "http://127.0.0.1:15020/metrics" |
        awk -v d="direction=\"$2\"" \
            '/^meshlet_requests_total\{/ && index($0, d) { s += $NF } END { printf "%d\n", s }'
}

# --- servers (one per pair, identical) ----------------------------------------------

SERVER_CMD=("${SERVER_CPU[@]}" "$BIN/meshlet-bench-server" --listen "0.0.0.0:$PORT" --body-size 100 --threads 1)
start "$NS_DS" server-direct "${SERVER_CMD[@]}"
SERVER_DIRECT=$STARTED_PID
start "$NS_MS" server-meshlet "${SERVER_CMD[@]}"
SERVER_MESHLET=$STARTED_PID
wait_http "$NS_DC" "$URL" "server (direct pair)"

# --- meshlet: init rules and proxies in both pods of the meshed pair -----------------

if [[ $AUTHZ_POLICIES -gt 0 ]]; then
    python3 - "$AUTHZ_POLICIES" "$SERVER_IP" "$PORT" >"$WORK/mesh.json" <<'PY'
import json, sys
n, ip, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
sa = lambda i: {"serviceAccount": {"namespace": "bench", "name": f"caller-{i}"}}
policies = [{"namespace": "bench", "name": f"p{i:03}",
             "rules": [{"sources": [sa(i), sa(i + n)], "ports": [port]}]} for i in range(n - 1)]
policies.append({"namespace": "bench", "name": "zz-any", "rules": [{"ports": [port]}]})
print(json.dumps({"authorization": {
    "policies": policies,
    "workloads": [{"ips": [ip], "namespace": "bench",
                   "policies": [f"{p['namespace']}/{p['name']}" for p in policies]}]}}))
PY
else
    echo '{}' >"$WORK/mesh.json"
fi
chmod 644 "$WORK/mesh.json"
INIT_CMD=("$BIN/meshlet-init" apply)
if [[ $SKIP_CLIENT_INIT != 1 ]]; then
    ip netns exec "$NS_MC" "${INIT_CMD[@]}" >"$WORK/init-client.log" 2>&1 || die "meshlet-init failed in $NS_MC"
fi
ip netns exec "$NS_MS" "${INIT_CMD[@]}" >"$WORK/init-server.log" 2>&1 || die "meshlet-init failed in $NS_MS"

# start_proxy NS NAME POD_IP CPU-PREFIX...
start_proxy() {
    local ns=$1 name=$2 ip=$3
    shift 3
    start "$ns" "proxy-$name" "$@" setpriv --reuid 1337 --regid 1337 --clear-groups \
        env MESHLET_CONFIG_PATH="$WORK/mesh.json" MESHLET_LOG=warn \
        MESHLET_WORKER_THREADS="$PROXY_THREADS" MESHLET_POD_IP="$ip" \
        MESHLET_POD_NAME="bench-$name" MESHLET_POD_NAMESPACE=bench \
        "$PROXY_BIN"
}
start_proxy "$NS_MC" client "$CLIENT_IP" "${CLIENT_CPU[@]}"
PROXY_CLIENT=$STARTED_PID
start_proxy "$NS_MS" server "$SERVER_IP" "${SERVER_CPU[@]}"
PROXY_SERVER=$STARTED_PID
wait_http "$NS_MC" http://127.0.0.1:15020/ready "client proxy"
wait_http "$NS_MS" http://127.0.0.1:15020/ready "server proxy"
for pid in "$PROXY_CLIENT" "$PROXY_SERVER"; do
    [[ $(cat "/proc/$pid/comm") == meshlet-proxy ]] || die "PID $pid is not meshlet-proxy"
    awk '/^Uid:/ { exit !($2 == 1337) }' "/proc/$pid/status" || die "meshlet-proxy $pid does not run as UID 1337"
done

# The proxies have served nothing yet: this is their idle footprint.
sleep "$IDLE_SETTLE_S"
RSS_IDLE_CLIENT=$(rss_kib "$PROXY_CLIENT")
RSS_IDLE_SERVER=$(rss_kib "$PROXY_SERVER")
SPLIT_IDLE_CLIENT=$(rss_split "$PROXY_CLIENT")
SPLIT_IDLE_SERVER=$(rss_split "$PROXY_SERVER")
log "idle RSS: client proxy ${RSS_IDLE_CLIENT} KiB, server proxy ${RSS_IDLE_SERVER} KiB"

# --- rounds ---------------------------------------------------------------------------

LOADGEN=("${CLIENT_CPU[@]}" "$BIN/meshlet-loadgen" "$URL" --rate "$RATE" --duration "$DURATION"
    --warmup "$WARMUP" --connections "$CONNECTIONS")
COUNTS="[]"
for ((round = 1; round <= ROUNDS; round++)); do
    log "round $round/$ROUNDS: direct at $RATE req/s for $DURATION (+$WARMUP warmup)"
    ip netns exec "$NS_DC" "${LOADGEN[@]}" --watch "server=$SERVER_DIRECT" \
        -o "$WORK/round-$round-direct.json" 2>>"$WORK/loadgen.log" ||
        die "loadgen (direct) failed"

    log "round $round/$ROUNDS: meshlet pair at $RATE req/s for $DURATION (+$WARMUP warmup)"
    out_before=$(requests_total "$NS_MC" outbound)
    in_before=$(requests_total "$NS_MS" inbound)
    ip netns exec "$NS_MC" "${LOADGEN[@]}" --watch "client-proxy=$PROXY_CLIENT" \
        --watch "server-proxy=$PROXY_SERVER" --watch "server=$SERVER_MESHLET" \
        -o "$WORK/round-$round-meshlet.json" 2>>"$WORK/loadgen.log" ||
        die "loadgen (meshlet) failed"
    out_delta=$(($(requests_total "$NS_MC" outbound) - out_before))
    in_delta=$(($(requests_total "$NS_MS" inbound) - in_before))
    sent=$(jq -r .requests_sent "$WORK/round-$round-meshlet.json")
    # The benchmark must not silently measure the direct path: both sidecars must have
    # counted every request the load generator sent.
    [[ $out_delta -eq $sent && $in_delta -eq $sent ]] ||
        die "requests did not all pass through both proxies: loadgen sent $sent, client proxy counted $out_delta outbound, server proxy $in_delta inbound"
    log "round $round: both proxies counted all $sent requests"
    COUNTS=$(jq -c --argjson r "$round" --argjson s "$sent" --argjson o "$out_delta" \
        --argjson i "$in_delta" '. + [{round: $r, loadgen_sent: $s, client_proxy_outbound: $o, server_proxy_inbound: $i}]' <<<"$COUNTS")
    for s in direct meshlet; do
        jq -e '.errors == 0' "$WORK/round-$round-$s.json" >/dev/null ||
            log "WARNING: $s round $round had errors: $(jq -r '.first_error' "$WORK/round-$round-$s.json")"
    done
done
if [[ $AUTHZ_POLICIES -gt 0 ]]; then
    # Every request was authorized, by the last of the policies (so all were scanned).
    allowed=$(ip netns exec "$NS_MS" curl -s http://127.0.0.1:15020/metrics |
        awk '/^meshlet_authz_decisions_total\{/ && /policy="bench\/zz-any"/ && /result="allow"/ {s += $NF} END {print s + 0}')
    inbound=$(jq '[.[].server_proxy_inbound] | add' <<<"$COUNTS")
    [[ $allowed -ge $inbound ]] ||
        die "the server proxy authorized $allowed requests by bench/zz-any, fewer than the $inbound it served"
    log "server proxy: $allowed requests allowed after scanning $AUTHZ_POLICIES policies"
fi
RSS_AFTER_CLIENT=$(rss_kib "$PROXY_CLIENT")
RSS_AFTER_SERVER=$(rss_kib "$PROXY_SERVER")
SPLIT_AFTER_CLIENT=$(rss_split "$PROXY_CLIENT")
SPLIT_AFTER_SERVER=$(rss_split "$PROXY_SERVER")

if [[ $MAXTP != 0 ]]; then
    if [[ $RT == 1 ]]; then
        # A closed loop under SCHED_FIFO would starve everything else on the machine.
        for pid in "$SERVER_DIRECT" "$SERVER_MESHLET" "$PROXY_CLIENT" "$PROXY_SERVER"; do
            chrt -a -o -p 0 "$pid" >/dev/null || die "cannot return PID $pid to normal scheduling"
        done
    fi
    MAXTP_CMD=("${MAXTP_CPU[@]}" "$BIN/meshlet-loadgen" "$URL" --max-throughput --duration "$MAXTP"
        --warmup 1s --connections "$CONNECTIONS")
    log "max throughput (closed loop, $MAXTP): direct"
    ip netns exec "$NS_DC" "${MAXTP_CMD[@]}" --watch "server=$SERVER_DIRECT" \
        -o "$WORK/maxtp-direct.json" 2>>"$WORK/loadgen.log" || die "loadgen (max throughput, direct) failed"
    log "max throughput (closed loop, $MAXTP): meshlet pair"
    out_before=$(requests_total "$NS_MC" outbound)
    ip netns exec "$NS_MC" "${MAXTP_CMD[@]}" --watch "client-proxy=$PROXY_CLIENT" \
        --watch "server-proxy=$PROXY_SERVER" --watch "server=$SERVER_MESHLET" \
        -o "$WORK/maxtp-meshlet.json" 2>>"$WORK/loadgen.log" || die "loadgen (max throughput, meshlet) failed"
    out_delta=$(($(requests_total "$NS_MC" outbound) - out_before))
    sent=$(jq -r .requests_sent "$WORK/maxtp-meshlet.json")
    [[ $out_delta -eq $sent ]] ||
        die "max-throughput requests did not all pass through the client proxy: sent $sent, counted $out_delta"
fi

# --- facts and report -----------------------------------------------------------------

cpu_model=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
[[ -n $cpu_model ]] || cpu_model=$(lscpu 2>/dev/null | awk -F': *' '/^Model name/ {print $2; exit}')
jq -n \
    --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --arg nproc "$(nproc)" --arg kernel "$(uname -r)" --arg cpu "$cpu_model" \
    --arg mem "$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)" \
    --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
    --arg rate "$RATE" --arg duration "$DURATION" --arg warmup "$WARMUP" \
    --arg conns "$CONNECTIONS" --arg rounds "$ROUNDS" --arg threads "$PROXY_THREADS" \
    --arg pin "$PIN" --arg rt "$RT" --arg profile "$PROFILE" --arg link "$PROXY_LINK" \
    --arg authz "$AUTHZ_POLICIES" \
    --arg pbytes "$(stat -c %s "$PROXY_BIN")" \
    --arg loadgen "meshlet-loadgen $URL --rate $RATE --duration $DURATION --warmup $WARMUP --connections $CONNECTIONS --watch NAME=PID" \
    --arg server "meshlet-bench-server --listen 0.0.0.0:$PORT --body-size 100 --threads 1" \
    --arg proxy "setpriv --reuid 1337 --regid 1337 --clear-groups env MESHLET_CONFIG_PATH=mesh.json({}) MESHLET_LOG=warn MESHLET_WORKER_THREADS=$PROXY_THREADS MESHLET_POD_IP=<pod ip> meshlet-proxy" \
    --arg init "meshlet-init apply (defaults: all inbound ports, all outbound CIDRs, UID/GID 1337 exempt)" \
    --argjson ric "$RSS_IDLE_CLIENT" --argjson ris "$RSS_IDLE_SERVER" \
    --argjson rac "$RSS_AFTER_CLIENT" --argjson ras "$RSS_AFTER_SERVER" \
    --argjson counts "$COUNTS" \
    --argjson sic "$SPLIT_IDLE_CLIENT" --argjson sis "$SPLIT_IDLE_SERVER" \
    --argjson sac "$SPLIT_AFTER_CLIENT" --argjson sas "$SPLIT_AFTER_SERVER" \
    '{
      date: $date, git_commit: $commit,
      machine: {nproc: ($nproc|tonumber), kernel: $kernel, cpu_model: $cpu,
                mem_total_kib: ($mem|tonumber), loadavg_at_start: $load},
      settings: {rate: ($rate|tonumber), duration: $duration, warmup: $warmup,
                 connections: ($conns|tonumber), rounds: ($rounds|tonumber),
                 proxy_worker_threads: ($threads|tonumber), pinned: ($pin == "1"),
                 realtime: ($rt == "1"), authz_policies: ($authz|tonumber),
                 profile: $profile, proxy_link: $link, proxy_binary_bytes: ($pbytes|tonumber),
                 network: "two netns per pair joined by one veth (198.18.200.0/24)",
                 protocol: "HTTP/1.1 keep-alive, GET, 100-byte response", tls: false},
      commands: {loadgen: $loadgen, server: $server, proxy: $proxy, init: $init},
      proxy_rss_kib: {client: {idle: $ric, after_load: $rac, idle_split: $sic, after_load_split: $sac},
                      server: {idle: $ris, after_load: $ras, idle_split: $sis, after_load_split: $sas}},
      proxy_request_counts: $counts
    }' >"$WORK/facts.json"

mkdir -p "$RESULTS"
# The project venv, when it has matplotlib, adds a plot; plain python3 writes the rest.
PY=python3
if [[ -x $ROOT/.venv/bin/python3 ]] && "$ROOT/.venv/bin/python3" -c 'import matplotlib' 2>/dev/null; then
    PY=$ROOT/.venv/bin/python3
fi
"$PY" "$ROOT/bench/report.py" --work "$WORK" --results "$RESULTS" --label "$LABEL"
