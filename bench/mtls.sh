#!/usr/bin/env bash
# mTLS benchmark (issue 7): the direct path, meshlet's mTLS pair and the floor pair
# (meshlet-floor: accept, connect, TLS 1.3 mTLS, copy) at the same fixed rates, in one
# run. See bench/README.md ("mTLS pair against the floor") for what each figure means.
#
# Topology (all inside network namespaces this script creates and always deletes):
#   direct:  mlmtls-PID-dc (loadgen) ==veth== mlmtls-PID-ds (server)
#   meshlet: mlmtls-PID-mc (loadgen, meshlet-init rules, meshlet-proxy as 1337, identity
#            bench-client/client) ==veth== mlmtls-PID-ms (server, meshlet-init rules,
#            meshlet-proxy as 1337, identity bench/server)
#   floor:   mlmtls-PID-fc / mlmtls-PID-fs: the same meshlet-init rules, with
#            meshlet-floor as 1337 on 15001 (client) and 15006 (server) instead of meshlet
# Both sidecar pairs sit behind the same iptables redirects, so the floor pays the same
# kernel hops as meshlet and the difference is the proxies' own work.
#
# Knobs (environment):
#   SCENARIOS ("direct meshlet-mtls floor": the paths measured, in this order per run),
#   RUNS ("1000:keepalive 5000:keepalive 1000:newconn": RATE:MODE, mode keepalive or
#         newconn = --new-connection-per-request),
#   DURATION (30s), WARMUP (5s), CONNECTIONS (8), PIN (1), RT (1), PROXY_THREADS (1),
#   PROFILE (release | dev), SKIP_BUILD (0), RESULTS (bench/results), LABEL (mtls),
#   IDLE_SETTLE_S (3), TLS_MODE (strict: the server sidecar refuses plaintext, so a
#   request that skipped the client sidecar fails instead of being measured).
set -euo pipefail

SCENARIOS=${SCENARIOS:-direct meshlet-mtls floor}
RUNS=${RUNS:-1000:keepalive 5000:keepalive 1000:newconn}
DURATION=${DURATION:-30s}
WARMUP=${WARMUP:-5s}
CONNECTIONS=${CONNECTIONS:-8}
PROXY_THREADS=${PROXY_THREADS:-1}
PIN=${PIN:-1}
RT=${RT:-1}
PROFILE=${PROFILE:-release}
SKIP_BUILD=${SKIP_BUILD:-0}
LABEL=${LABEL:-mtls}
IDLE_SETTLE_S=${IDLE_SETTLE_S:-3}
TLS_MODE=${TLS_MODE:-strict}
PORT=8080

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS=${RESULTS:-$ROOT/bench/results}
NAME=mtls.sh
PREFIX=mlmtls-$$
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
BIN=$(bench_bin_dir "$PROFILE")
CLIENT_IP=198.18.200.1
SERVER_IP=198.18.200.2
URL=http://$SERVER_IP:$PORT/
TD=cluster.local
SERVER_ID=spiffe://$TD/ns/bench/sa/server

for s in $SCENARIOS; do
    case $s in direct | meshlet-mtls | floor) ;; *) die "unknown scenario '$s' in SCENARIOS (direct, meshlet-mtls, floor)" ;; esac
done
bench_setup

if [[ $SKIP_BUILD != 1 ]]; then
    log "building meshlet-proxy, meshlet-init, meshlet-injector and meshlet-bench ($PROFILE)"
    (cd "$ROOT" && nice cargo build --profile "$PROFILE" -p meshlet-proxy -p meshlet-init \
        -p meshlet-injector -p meshlet-bench)
fi
for b in meshlet-proxy meshlet-init meshlet-injector meshlet-loadgen meshlet-bench-server meshlet-floor; do
    [[ -x $BIN/$b ]] || die "$BIN/$b is missing: build it (cargo build --profile $PROFILE -p ...) or unset SKIP_BUILD"
done

bench_cpu "$PIN" "$RT"
# A new connection per request at 1000/s for 35 s is 35000 connections from one address
# to one port: the default 28k ephemeral ports in TIME_WAIT run out and connect()
# stalls. Both settings are per network namespace.
PAIR_SYSCTLS=(net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1)

# tls_requests NS DIRECTION: the sum of meshlet_requests_total{direction, tls="true"}.
tls_requests() { requests_total "$1" "$2" 'tls="true"'; }

# --- identities (the same files for meshlet and the floor) -----------------------------

"$BIN/meshlet-injector" ca init --out "$WORK/ca" >"$WORK/ca.log" 2>&1 || die "meshlet-injector ca init failed"
"$BIN/meshlet-injector" ca issue --ca "$WORK/ca" --namespace bench-client --service-account client \
    --out "$WORK/id-client" >>"$WORK/ca.log" 2>&1 || die "meshlet-injector ca issue (client) failed"
"$BIN/meshlet-injector" ca issue --ca "$WORK/ca" --namespace bench --service-account server \
    --out "$WORK/id-server" >>"$WORK/ca.log" 2>&1 || die "meshlet-injector ca issue (server) failed"
chown -R 1337:1337 "$WORK/id-client" "$WORK/id-server"

# The server pod's IP stands in for the Service's ClusterIP: the bench has no kube-proxy,
# and the client sidecar only needs ClusterIP:port -> meshed service with identities.
jq -n --arg ip "$SERVER_IP" --arg id "$SERVER_ID" --argjson port "$PORT" '{
  services: [{name: "server", namespace: "bench", clusterIPs: [$ip],
              ports: [{port: $port, name: "http"}], meshed: true, identities: [$id],
              endpoints: [{ip: $ip, ports: {($port|tostring): $port}, ready: true,
                           podName: "server-0", identity: $id}]}]}' >"$WORK/mesh.json"
chmod 644 "$WORK/mesh.json"

has() { [[ " $SCENARIOS " == *" $1 "* ]]; }
SERVER_CMD=("${SERVER_CPU[@]}" "$BIN/meshlet-bench-server" --listen "0.0.0.0:$PORT" --body-size 100 --threads 1)
declare -A NS_C SERVER_PID
for s in $SCENARIOS; do
    short=${s:0:1}
    make_pair "$PREFIX-${short}c" "$PREFIX-${short}s"
    NS_C[$s]=$PREFIX-${short}c
    start "$PREFIX-${short}s" "server-$s" "${SERVER_CMD[@]}"
    SERVER_PID[$s]=$STARTED_PID
    if [[ $s != direct ]]; then
        for side in c s; do
            ip netns exec "$PREFIX-$short$side" "$BIN/meshlet-init" apply >"$WORK/init-$s-$side.log" 2>&1 ||
                die "meshlet-init failed in $PREFIX-$short$side"
        done
    fi
done
has direct && wait_http "${NS_C[direct]}" "$URL" "server (direct pair)"

declare -A PROXY_C PROXY_S
if has meshlet-mtls; then
    start_proxy() {
        local ns=$1 name=$2 ip=$3 podns=$4
        shift 4
        start "$ns" "meshlet-$name" "$@" "${AS_1337[@]}" \
            env MESHLET_CONFIG_PATH="$WORK/mesh.json" MESHLET_LOG=warn \
            MESHLET_WORKER_THREADS="$PROXY_THREADS" MESHLET_POD_IP="$ip" \
            MESHLET_POD_NAME="bench-$name" MESHLET_POD_NAMESPACE="$podns" \
            MESHLET_IDENTITY_DIR="$WORK/id-$name" MESHLET_TLS_MODE="$TLS_MODE" \
            "$BIN/meshlet-proxy"
    }
    start_proxy "$PREFIX-mc" client "$CLIENT_IP" bench-client "${CLIENT_CPU[@]}"
    PROXY_C[meshlet-mtls]=$STARTED_PID
    start_proxy "$PREFIX-ms" server "$SERVER_IP" bench "${SERVER_CPU[@]}"
    PROXY_S[meshlet-mtls]=$STARTED_PID
    wait_http "$PREFIX-mc" http://127.0.0.1:15020/ready "client meshlet-proxy"
    wait_http "$PREFIX-ms" http://127.0.0.1:15020/ready "server meshlet-proxy"
fi
if has floor; then
    start "$PREFIX-fc" floor-client "${CLIENT_CPU[@]}" "${AS_1337[@]}" "$BIN/meshlet-floor" --mode client \
        --listen 0.0.0.0:15001 --upstream "$SERVER_IP:$PORT" --identity-dir "$WORK/id-client"
    PROXY_C[floor]=$STARTED_PID
    start "$PREFIX-fs" floor-server "${SERVER_CPU[@]}" "${AS_1337[@]}" "$BIN/meshlet-floor" --mode server \
        --listen 0.0.0.0:15006 --upstream "127.0.0.1:$PORT" --identity-dir "$WORK/id-server"
    PROXY_S[floor]=$STARTED_PID
fi

# Idle RSS: after /ready and a rest, before any request crossed either pair.
sleep "$IDLE_SETTLE_S"
IDLE="{}"
IDLE_SPLIT="{}"
for s in meshlet-mtls floor; do
    has "$s" || continue
    for side in client server; do
        [[ $side == client ]] && pid=${PROXY_C[$s]} || pid=${PROXY_S[$s]}
        check_1337 "$pid" "$s $side proxy"
        IDLE=$(jq -c --arg s "$s" --arg side "$side" --argjson k "$(rss_kib "$pid")" '.[$s][$side] = $k' <<<"$IDLE")
        IDLE_SPLIT=$(jq -c --arg s "$s" --arg side "$side" --argjson k "$(rss_split "$pid")" '.[$s][$side] = $k' <<<"$IDLE_SPLIT")
    done
done
log "idle RSS (KiB): $IDLE"
# Through both halves of each pair (the client pod's redirect to 15001, the server pod's
# to 15006), so a pair that cannot carry a request fails here, not in the measurement.
has floor && wait_http "$PREFIX-fc" "$URL" "floor pair"
has meshlet-mtls && wait_http "$PREFIX-mc" "$URL" "meshlet mTLS pair"

COUNTS="[]"
for run in $RUNS; do
    rate=${run%%:*}
    mode=${run#*:}
    extra=()
    case $mode in
    keepalive) ;;
    newconn) extra=(--new-connection-per-request) ;;
    *) die "RUNS entry '$run': mode must be keepalive or newconn" ;;
    esac
    for s in $SCENARIOS; do
        watch=(--watch "server=${SERVER_PID[$s]}")
        if [[ $s != direct ]]; then
            watch+=(--watch "client-proxy=${PROXY_C[$s]}" --watch "server-proxy=${PROXY_S[$s]}")
        fi
        out="$WORK/run-$rate-$mode-$s.json"
        if [[ $s == meshlet-mtls ]]; then
            ob=$(tls_requests "$PREFIX-mc" outbound)
            ib=$(tls_requests "$PREFIX-ms" inbound)
        fi
        log "$s at $rate req/s, $mode, for $DURATION (+$WARMUP warmup)"
        ip netns exec "${NS_C[$s]}" "${CLIENT_CPU[@]}" "$BIN/meshlet-loadgen" "$URL" --rate "$rate" \
            --duration "$DURATION" --warmup "$WARMUP" --connections "$CONNECTIONS" "${extra[@]}" \
            "${watch[@]}" -o "$out" 2>>"$WORK/loadgen.log" || die "loadgen ($s, $rate, $mode) failed"
        jq -e '.errors == 0' "$out" >/dev/null ||
            die "$s at $rate req/s ($mode) had errors: $(jq -r '.first_error' "$out")"
        if [[ $s == meshlet-mtls ]]; then
            od=$(($(tls_requests "$PREFIX-mc" outbound) - ob))
            id=$(($(tls_requests "$PREFIX-ms" inbound) - ib))
            sent=$(jq -r .requests_sent "$out")
            # Every request must have crossed the pair over mTLS, or the run measured
            # something else.
            [[ $od -eq $sent && $id -eq $sent ]] ||
                die "not every request crossed meshlet's pair over mTLS: loadgen sent $sent, client counted $od outbound tls=\"true\", server $id inbound tls=\"true\""
            log "both meshlet proxies counted all $sent requests with tls=\"true\""
            COUNTS=$(jq -c --arg r "$run" --argjson s "$sent" --argjson o "$od" --argjson i "$id" \
                '. + [{run: $r, loadgen_sent: $s, client_outbound_tls: $o, server_inbound_tls: $i}]' <<<"$COUNTS")
        fi
    done
done
AFTER="{}"
for s in meshlet-mtls floor; do
    has "$s" || continue
    AFTER=$(jq -c --arg s "$s" --argjson c "$(rss_kib "${PROXY_C[$s]}")" --argjson v "$(rss_kib "${PROXY_S[$s]}")" \
        '.[$s] = {client: $c, server: $v}' <<<"$AFTER")
done

jq -n \
    --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --arg nproc "$(nproc)" --arg kernel "$(uname -r)" --arg cpu "$(cpu_model)" \
    --arg load "$LOAD_AT_START" --arg loadend "$(cut -d' ' -f1-3 /proc/loadavg)" \
    --arg scenarios "$SCENARIOS" --arg runs "$RUNS" --arg duration "$DURATION" --arg warmup "$WARMUP" \
    --arg conns "$CONNECTIONS" --arg threads "$PROXY_THREADS" --arg pin "$PIN" --arg rt "$RT" \
    --arg profile "$PROFILE" --arg tlsmode "$TLS_MODE" \
    --argjson idle "$IDLE" --argjson idlesplit "$IDLE_SPLIT" --argjson after "$AFTER" --argjson counts "$COUNTS" \
    '{
      date: $date, git_commit: $commit,
      machine: {nproc: ($nproc|tonumber), kernel: $kernel, cpu_model: $cpu, loadavg_at_start: $load, loadavg_at_end: $loadend},
      settings: {scenarios: ($scenarios | split(" ") | map(select(. != ""))),
                 runs: ($runs | split(" ") | map(select(. != ""))),
                 duration: $duration, warmup: $warmup, connections: ($conns|tonumber),
                 proxy_worker_threads: ($threads|tonumber), pinned: ($pin == "1"),
                 realtime: ($rt == "1"), profile: $profile, meshlet_tls_mode: $tlsmode,
                 network: "two netns per pair joined by one veth (198.18.200.0/24); meshlet and floor pairs behind the same meshlet-init redirects",
                 protocol: "HTTP/1.1, GET, 100-byte response"},
      commands: {
        meshlet: "setpriv --reuid 1337 env MESHLET_IDENTITY_DIR=id-{client,server} MESHLET_TLS_MODE=\($tlsmode) MESHLET_WORKER_THREADS=\($threads) MESHLET_CONFIG_PATH=mesh.json meshlet-proxy",
        floor: "setpriv --reuid 1337 meshlet-floor --mode client --listen 0.0.0.0:15001 --upstream 198.18.200.2:8080 --identity-dir id-client | --mode server --listen 0.0.0.0:15006 --upstream 127.0.0.1:8080 --identity-dir id-server",
        identities: "meshlet-injector ca init --out ca; ca issue --ca ca --namespace bench-client --service-account client; ca issue --namespace bench --service-account server"},
      rss_kib: {idle: $idle, idle_split: $idlesplit, after_load: $after},
      meshlet_tls_request_counts: $counts
    }' >"$WORK/facts.json"

mkdir -p "$RESULTS"
python3 "$ROOT/bench/mtls_report.py" --work "$WORK" --results "$RESULTS" --label "$LABEL"
