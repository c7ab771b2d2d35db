#!/usr/bin/env bash
# Data-path benchmark: the direct path against a plaintext meshlet sidecar pair, at the
# same fixed rate, in one run. See bench/README.md for what each figure means.
#
# Topology (all inside network namespaces this script creates and always deletes):
#   direct:  mlbench-PID-dc (loadgen) ==veth== mlbench-PID-ds (server)
#   meshlet: mlbench-PID-mc (loadgen, meshlet-init rules, meshlet-proxy as 1337)
#            ==veth== mlbench-PID-ms (server, meshlet-init rules, meshlet-proxy as 1337)
#   with ROUTES=0,1000: one meshed pair per entry instead, mlbench-PID-r0{c,s} and
#            mlbench-PID-r1000{c,s}, each pair's proxies with their own mesh config
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
#   ROUTES (unset: one meshed pair with an empty mesh config; e.g. "0,1000": one meshed
#           pair per entry, whose proxies get the mesh config `gen_routes.py --routes N`
#           compiled by `meshlet-injector compile --from-files`: the benchmark's Service
#           and 600 others, N HTTPRoutes, one of which selects every benchmark request;
#           each round measures direct and every pair, reversed in even rounds;
#           LABEL defaults to routes and routes_report.py writes the report),
#   ROUTES_ON_SERVICE (100: of the N routes, how many attach to the benchmark's Service),
#   AUTHZ_POLICIES (0; N > 0 gives the mesh config of the single meshed pair N
#   AuthorizationPolicies targeting the server pod: N-1 whose rules name service accounts
#   the plaintext loadgen does not have, then one allowing any caller on the port, so
#   every request scans them all; not together with ROUTES).
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
ROUTES=${ROUTES:-}
ROUTES_ON_SERVICE=${ROUTES_ON_SERVICE:-100}
if [[ -n $ROUTES ]]; then LABEL=${LABEL:-routes}; else LABEL=${LABEL:-datapath}; fi
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
NAME=run.sh
PREFIX=mlbench-$$
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
BIN=$(bench_bin_dir "$PROFILE")

NS_DC=$PREFIX-dc
NS_DS=$PREFIX-ds
CLIENT_IP=198.18.200.1
SERVER_IP=198.18.200.2
URL=http://$SERVER_IP:$PORT/
# The route of the generated config that every benchmark request must select.
BENCH_ROUTE=bench/server-default

# The meshed pairs: "meshlet" (empty mesh config), or one "routes-N" per ROUTES entry.
VARIANTS=()
declare -A VROUTES
if [[ -n $ROUTES ]]; then
    IFS=', ' read -r -a route_counts <<<"$ROUTES"
    for n in "${route_counts[@]}"; do
        [[ $n =~ ^[0-9]+$ ]] || die "ROUTES must list route counts like 0,1000, not '$ROUTES'"
        [[ -z ${VROUTES[routes-$n]:-} ]] || die "ROUTES lists $n twice"
        VARIANTS+=("routes-$n")
        VROUTES[routes-$n]=$n
    done
    [[ $MAXTP == 0 ]] || die "MAXTP is not supported together with ROUTES; run them separately"
else
    VARIANTS=(meshlet)
fi
[[ $AUTHZ_POLICIES =~ ^[0-9]+$ ]] || die "AUTHZ_POLICIES must be a policy count like 100, not '$AUTHZ_POLICIES'"
# The routed pairs compare route counts against each other; policies on top would blur
# what the difference measures, so each knob is benchmarked on its own.
[[ $AUTHZ_POLICIES -eq 0 || -z $ROUTES ]] ||
    die "AUTHZ_POLICIES applies to the single meshed pair and cannot be combined with ROUTES; unset one of them"

# --- preconditions, cleanup (also of namespaces left by an earlier run) ---------------

bench_setup

# --- build ----------------------------------------------------------------------------

need=(meshlet-proxy meshlet-init meshlet-loadgen meshlet-bench-server)
crates=(-p meshlet-proxy -p meshlet-init -p meshlet-bench)
if [[ -n $ROUTES ]]; then
    need+=(meshlet-injector)
    crates+=(-p meshlet-injector)
fi
if [[ $SKIP_BUILD != 1 ]]; then
    log "building ${crates[*]} ($PROFILE)"
    (cd "$ROOT" && nice cargo build --profile "$PROFILE" "${crates[@]}")
fi
for b in "${need[@]}"; do
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

# --- mesh configs ---------------------------------------------------------------------

# config_of VARIANT: writes the variant's mesh config to $WORK/mesh-VARIANT.json (readable
# by UID 1337) and echoes a JSON object describing it.
config_of() {
    local v=$1 out=$WORK/mesh-$1.json
    if [[ $v == meshlet && $AUTHZ_POLICIES -gt 0 ]]; then
        python3 - "$AUTHZ_POLICIES" "$SERVER_IP" "$PORT" >"$out" <<'PY' || die "generating $AUTHZ_POLICIES authorization policies failed"
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
        chmod 644 "$out"
        jq -nc --argjson n "$AUTHZ_POLICIES" --argjson bytes "$(stat -c %s "$out")" \
            '{source: "inline generator: N AuthorizationPolicies on the server pod", authz_policies: $n, json_bytes: $bytes}'
        return
    fi
    if [[ $v == meshlet ]]; then
        echo '{}' >"$out"
        chmod 644 "$out"
        echo '{"source": "{}"}'
        return
    fi
    local n=${VROUTES[$v]} dir=$WORK/manifests-$v gen
    gen=$(python3 "$ROOT/bench/gen_routes.py" --routes "$n" --on-service "$ROUTES_ON_SERVICE" \
        --server-ip "$SERVER_IP" --port "$PORT" --out "$dir") || die "gen_routes.py --routes $n failed"
    # The real compiler; a route it leaves out would make the variant lighter than
    # its name says, so any problem it reports fails the run.
    "$BIN/meshlet-injector" compile --from-files "$dir" --out "$out" 2>"$WORK/compile-$v.log" ||
        die "meshlet-injector compile --from-files $dir failed: $(cat "$WORK/compile-$v.log")"
    [[ ! -s $WORK/compile-$v.log ]] || die "meshlet-injector compile left routes out: $(head -3 "$WORK/compile-$v.log")"
    chmod 644 "$out"
    local got on_server
    got=$(jq '[.services[].routes | length] | add // 0' "$out")
    on_server=$(jq '[.services[] | select(.namespace == "bench" and .name == "server") | .routes | length] | add // 0' "$out")
    [[ $got -eq $n ]] || die "the compiled config of $v has $got routes, not $n"
    jq -c --argjson gen "$gen" --argjson routes "$got" --argjson on "$on_server" \
        --argjson bytes "$(stat -c %s "$out")" --argjson yaml "$(stat -c %s "$dir/mesh.yaml")" \
        --argjson services "$(jq '.services | length' "$out")" \
        --arg route "$BENCH_ROUTE" \
        '{source: "gen_routes.py | meshlet-injector compile --from-files", routes: $routes,
          routes_on_bench_service: $on, services: $services, json_bytes: $bytes,
          yaml_bytes: $yaml, generator: $gen, bench_route: (if $routes > 0 then $route else null end)}' <<<'{}'
}
declare -A CONFIG_FACTS
for v in "${VARIANTS[@]}"; do
    CONFIG_FACTS[$v]=$(config_of "$v")
done

# --- pinning and namespaces -------------------------------------------------------------

bench_cpu "$PIN" "$RT"
MAXTP_CPU=("${CLIENT_PIN[@]}")

declare -A NS_C NS_S
for v in "${VARIANTS[@]}"; do
    if [[ $v == meshlet ]]; then short=m; else short=r${VROUTES[$v]}; fi
    NS_C[$v]=$PREFIX-${short}c
    NS_S[$v]=$PREFIX-${short}s
done
make_pair "$NS_DC" "$NS_DS"
for v in "${VARIANTS[@]}"; do
    make_pair "${NS_C[$v]}" "${NS_S[$v]}"
done

# --- servers (one per pair, identical) ----------------------------------------------

SERVER_CMD=("${SERVER_CPU[@]}" "$BIN/meshlet-bench-server" --listen "0.0.0.0:$PORT" --body-size 100 --threads 1)
declare -A SERVER_PID
start "$NS_DS" server-direct "${SERVER_CMD[@]}"
SERVER_PID[direct]=$STARTED_PID
for v in "${VARIANTS[@]}"; do
    start "${NS_S[$v]}" "server-$v" "${SERVER_CMD[@]}"
    SERVER_PID[$v]=$STARTED_PID
done
wait_http "$NS_DC" "$URL" "server (direct pair)"

# --- meshlet: init rules and proxies in both pods of each meshed pair ------------------

INIT_CMD=("$BIN/meshlet-init" apply)
# start_proxy NS NAME POD_IP CONFIG CPU-PREFIX...
start_proxy() {
    local ns=$1 name=$2 ip=$3 config=$4
    shift 4
    start "$ns" "proxy-$name" "$@" "${AS_1337[@]}" \
        env MESHLET_CONFIG_PATH="$config" MESHLET_LOG=warn \
        MESHLET_WORKER_THREADS="$PROXY_THREADS" MESHLET_POD_IP="$ip" \
        MESHLET_POD_NAME="bench-$name" MESHLET_POD_NAMESPACE=bench \
        "$PROXY_BIN"
}
declare -A PROXY_C PROXY_S
for v in "${VARIANTS[@]}"; do
    if [[ $SKIP_CLIENT_INIT != 1 ]]; then
        ip netns exec "${NS_C[$v]}" "${INIT_CMD[@]}" >"$WORK/init-client-$v.log" 2>&1 || die "meshlet-init failed in ${NS_C[$v]}"
    fi
    ip netns exec "${NS_S[$v]}" "${INIT_CMD[@]}" >"$WORK/init-server-$v.log" 2>&1 || die "meshlet-init failed in ${NS_S[$v]}"
    start_proxy "${NS_C[$v]}" "client-$v" "$CLIENT_IP" "$WORK/mesh-$v.json" "${CLIENT_CPU[@]}"
    PROXY_C[$v]=$STARTED_PID
    start_proxy "${NS_S[$v]}" "server-$v" "$SERVER_IP" "$WORK/mesh-$v.json" "${SERVER_CPU[@]}"
    PROXY_S[$v]=$STARTED_PID
done
for v in "${VARIANTS[@]}"; do
    wait_http "${NS_C[$v]}" http://127.0.0.1:15020/ready "client proxy ($v)"
    wait_http "${NS_S[$v]}" http://127.0.0.1:15020/ready "server proxy ($v)"
    for pid in "${PROXY_C[$v]}" "${PROXY_S[$v]}"; do
        [[ $(cat "/proc/$pid/comm") == meshlet-proxy ]] || die "PID $pid is not meshlet-proxy"
        check_1337 "$pid" "meshlet-proxy ($v)"
    done
done

# The proxies have served nothing yet: this is their idle footprint.
sleep "$IDLE_SETTLE_S"
declare -A RSS_FACTS
for v in "${VARIANTS[@]}"; do
    RSS_FACTS[$v]=$(jq -nc --argjson ic "$(rss_kib "${PROXY_C[$v]}")" --argjson is "$(rss_kib "${PROXY_S[$v]}")" \
        --argjson sc "$(rss_split "${PROXY_C[$v]}")" --argjson ss "$(rss_split "${PROXY_S[$v]}")" \
        '{client: {idle: $ic, idle_split: $sc}, server: {idle: $is, idle_split: $ss}}')
    log "idle RSS ($v): $(jq -c '{client: .client.idle, server: .server.idle}' <<<"${RSS_FACTS[$v]}") KiB"
done

# --- rounds ---------------------------------------------------------------------------

LOADGEN=("${CLIENT_CPU[@]}" "$BIN/meshlet-loadgen" "$URL" --rate "$RATE" --duration "$DURATION"
    --warmup "$WARMUP" --connections "$CONNECTIONS")
SCENARIOS=(direct "${VARIANTS[@]}")
COUNTS="[]"
LOADS="[]"
for ((round = 1; round <= ROUNDS; round++)); do
    # With several meshed pairs every other round runs in reverse (ABBA), so a slow
    # drift of the machine (other work starting or ending) over an even number of rounds
    # weighs on every scenario alike.
    order=("${SCENARIOS[@]}")
    if [[ ${#VARIANTS[@]} -gt 1 && $((round % 2)) -eq 0 ]]; then
        order=()
        for ((k = ${#SCENARIOS[@]} - 1; k >= 0; k--)); do order+=("${SCENARIOS[k]}"); done
    fi
    for s in "${order[@]}"; do
        out=$WORK/round-$round-$s.json
        LOADS=$(jq -c --argjson r "$round" --arg s "$s" --arg l "$(cut -d' ' -f1-3 /proc/loadavg)" \
            '. + [{round: $r, scenario: $s, loadavg: $l}]' <<<"$LOADS")
        if [[ $s == direct ]]; then
            log "round $round/$ROUNDS: direct at $RATE req/s for $DURATION (+$WARMUP warmup)"
            ip netns exec "$NS_DC" "${LOADGEN[@]}" --watch "server=${SERVER_PID[direct]}" \
                -o "$out" 2>>"$WORK/loadgen.log" || die "loadgen (direct) failed"
        else
            log "round $round/$ROUNDS: meshlet pair ($s) at $RATE req/s for $DURATION (+$WARMUP warmup)"
            nc=${NS_C[$s]}
            out_before=$(requests_total "$nc" outbound)
            in_before=$(requests_total "${NS_S[$s]}" inbound)
            routed_before=$(requests_total "$nc" outbound 'route="')
            ip netns exec "$nc" "${LOADGEN[@]}" --watch "client-proxy=${PROXY_C[$s]}" \
                --watch "server-proxy=${PROXY_S[$s]}" --watch "server=${SERVER_PID[$s]}" \
                -o "$out" 2>>"$WORK/loadgen.log" || die "loadgen ($s) failed"
            out_delta=$(($(requests_total "$nc" outbound) - out_before))
            in_delta=$(($(requests_total "${NS_S[$s]}" inbound) - in_before))
            routed_delta=$(($(requests_total "$nc" outbound 'route="') - routed_before))
            sent=$(jq -r .requests_sent "$out")
            # The benchmark must not silently measure the direct path: both sidecars must
            # have counted every request the load generator sent.
            [[ $out_delta -eq $sent && $in_delta -eq $sent ]] ||
                die "requests did not all pass through both proxies ($s): loadgen sent $sent, client proxy counted $out_delta outbound, server proxy $in_delta inbound"
            # Nor measure the unrouted path for a routed variant: every request must have
            # selected the benchmark's route (and none any route without routes).
            expect_routed=0
            if [[ $s != meshlet && ${VROUTES[$s]} -gt 0 ]]; then
                expect_routed=$sent
                bench_routed=$(requests_total "$nc" outbound "route=\"$BENCH_ROUTE\"")
                [[ $bench_routed -ge $routed_delta ]] ||
                    die "requests of $s selected other routes than $BENCH_ROUTE"
            fi
            [[ $routed_delta -eq $expect_routed ]] ||
                die "routing check failed ($s): loadgen sent $sent, client proxy counted $routed_delta requests with a route label, expected $expect_routed"
            log "round $round: both proxies counted all $sent requests ($routed_delta routed)"
            COUNTS=$(jq -c --argjson r "$round" --arg v "$s" --argjson s "$sent" --argjson o "$out_delta" \
                --argjson i "$in_delta" --argjson rt "$routed_delta" \
                '. + [{round: $r, variant: $v, loadgen_sent: $s, client_proxy_outbound: $o, server_proxy_inbound: $i, client_proxy_routed: $rt}]' <<<"$COUNTS")
        fi
        jq -e '.errors == 0' "$out" >/dev/null ||
            log "WARNING: $s round $round had errors: $(jq -r '.first_error' "$out")"
    done
done
if [[ $AUTHZ_POLICIES -gt 0 ]]; then
    # Every request was authorized, by the last of the policies (so all were scanned).
    allowed=$(ip netns exec "${NS_S[meshlet]}" curl -s http://127.0.0.1:15020/metrics |
        awk '/^meshlet_authz_decisions_total\{/ && /policy="bench\/zz-any"/ && /result="allow"/ {s += $NF} END {print s + 0}')
    inbound=$(jq '[.[] | select(.variant == "meshlet") | .server_proxy_inbound] | add // 0' <<<"$COUNTS")
    [[ $inbound -gt 0 ]] || die "the server proxy of the meshlet pair served no requests: nothing to check the authorization counts against"
    [[ $allowed -ge $inbound ]] ||
        die "the server proxy authorized $allowed requests by bench/zz-any, fewer than the $inbound it served"
    log "server proxy: $allowed requests allowed after scanning $AUTHZ_POLICIES policies"
fi
for v in "${VARIANTS[@]}"; do
    RSS_FACTS[$v]=$(jq -c --argjson ac "$(rss_kib "${PROXY_C[$v]}")" --argjson asv "$(rss_kib "${PROXY_S[$v]}")" \
        --argjson sc "$(rss_split "${PROXY_C[$v]}")" --argjson ss "$(rss_split "${PROXY_S[$v]}")" \
        '.client.after_load = $ac | .client.after_load_split = $sc | .server.after_load = $asv | .server.after_load_split = $ss' \
        <<<"${RSS_FACTS[$v]}")
done

if [[ $MAXTP != 0 ]]; then
    if [[ $RT == 1 ]]; then
        # A closed loop under SCHED_FIFO would starve everything else on the machine.
        for pid in "${SERVER_PID[direct]}" "${SERVER_PID[meshlet]}" "${PROXY_C[meshlet]}" "${PROXY_S[meshlet]}"; do
            chrt -a -o -p 0 "$pid" >/dev/null || die "cannot return PID $pid to normal scheduling"
        done
    fi
    MAXTP_CMD=("${MAXTP_CPU[@]}" "$BIN/meshlet-loadgen" "$URL" --max-throughput --duration "$MAXTP"
        --warmup 1s --connections "$CONNECTIONS")
    log "max throughput (closed loop, $MAXTP): direct"
    ip netns exec "$NS_DC" "${MAXTP_CMD[@]}" --watch "server=${SERVER_PID[direct]}" \
        -o "$WORK/maxtp-direct.json" 2>>"$WORK/loadgen.log" || die "loadgen (max throughput, direct) failed"
    log "max throughput (closed loop, $MAXTP): meshlet pair"
    out_before=$(requests_total "${NS_C[meshlet]}" outbound)
    ip netns exec "${NS_C[meshlet]}" "${MAXTP_CMD[@]}" --watch "client-proxy=${PROXY_C[meshlet]}" \
        --watch "server-proxy=${PROXY_S[meshlet]}" --watch "server=${SERVER_PID[meshlet]}" \
        -o "$WORK/maxtp-meshlet.json" 2>>"$WORK/loadgen.log" || die "loadgen (max throughput, meshlet) failed"
    out_delta=$(($(requests_total "${NS_C[meshlet]}" outbound) - out_before))
    sent=$(jq -r .requests_sent "$WORK/maxtp-meshlet.json")
    [[ $out_delta -eq $sent ]] ||
        die "max-throughput requests did not all pass through the client proxy: sent $sent, counted $out_delta"
fi

# --- facts and report -----------------------------------------------------------------

VFACTS="{}"
for v in "${VARIANTS[@]}"; do
    VFACTS=$(jq -c --arg v "$v" --argjson c "${CONFIG_FACTS[$v]}" --argjson r "${RSS_FACTS[$v]}" \
        --argjson n "${VROUTES[$v]:-0}" '.[$v] = {routes: $n, config: $c, proxy_rss_kib: $r}' <<<"$VFACTS")
done
if [[ -n $ROUTES ]]; then
    config_desc="mesh-routes-N.json (gen_routes.py --routes N --on-service $ROUTES_ON_SERVICE | meshlet-injector compile --from-files)"
elif [[ $AUTHZ_POLICIES -gt 0 ]]; then
    config_desc="mesh-meshlet.json($AUTHZ_POLICIES AuthorizationPolicies on the server pod)"
else
    config_desc="mesh.json({})"
fi
jq -n \
    --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --arg nproc "$(nproc)" --arg kernel "$(uname -r)" --arg cpu "$(cpu_model)" \
    --arg mem "$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)" \
    --arg load "$LOAD_AT_START" --arg loadend "$(cut -d' ' -f1-3 /proc/loadavg)" \
    --arg rate "$RATE" --arg duration "$DURATION" --arg warmup "$WARMUP" \
    --arg conns "$CONNECTIONS" --arg rounds "$ROUNDS" --arg threads "$PROXY_THREADS" \
    --arg pin "$PIN" --arg rt "$RT" --arg profile "$PROFILE" --arg link "$PROXY_LINK" \
    --arg authz "$AUTHZ_POLICIES" \
    --arg pbytes "$(stat -c %s "$PROXY_BIN")" \
    --arg loadgen "meshlet-loadgen $URL --rate $RATE --duration $DURATION --warmup $WARMUP --connections $CONNECTIONS --watch NAME=PID" \
    --arg server "meshlet-bench-server --listen 0.0.0.0:$PORT --body-size 100 --threads 1" \
    --arg proxy "setpriv --reuid 1337 --regid 1337 --clear-groups env MESHLET_CONFIG_PATH=$config_desc MESHLET_LOG=warn MESHLET_WORKER_THREADS=$PROXY_THREADS MESHLET_POD_IP=<pod ip> MESHLET_POD_NAMESPACE=bench meshlet-proxy" \
    --arg init "meshlet-init apply (defaults: all inbound ports, all outbound CIDRs, UID/GID 1337 exempt)" \
    --argjson counts "$COUNTS" --argjson variants "$VFACTS" --arg routes "$ROUTES" --argjson loads "$LOADS" \
    '{
      date: $date, git_commit: $commit,
      machine: {nproc: ($nproc|tonumber), kernel: $kernel, cpu_model: $cpu,
                mem_total_kib: ($mem|tonumber), loadavg_at_start: $load, loadavg_at_end: $loadend},
      settings: {rate: ($rate|tonumber), duration: $duration, warmup: $warmup,
                 connections: ($conns|tonumber), rounds: ($rounds|tonumber),
                 proxy_worker_threads: ($threads|tonumber), pinned: ($pin == "1"),
                 realtime: ($rt == "1"), authz_policies: ($authz|tonumber),
                 profile: $profile, proxy_link: $link, proxy_binary_bytes: ($pbytes|tonumber),
                 network: "two netns per pair joined by one veth (198.18.200.0/24)",
                 protocol: "HTTP/1.1 keep-alive, GET, 100-byte response", tls: false},
      commands: {loadgen: $loadgen, server: $server, proxy: $proxy, init: $init},
      proxy_request_counts: $counts, loadavg_per_run: $loads
    }
    + if $routes == "" then {proxy_rss_kib: $variants.meshlet.proxy_rss_kib}
      else {variants: $variants, scenario_order: "direct, then each variant by route count; reversed in even rounds"} end' >"$WORK/facts.json"

mkdir -p "$RESULTS"
# The project venv, when it has matplotlib, adds a plot; plain python3 writes the rest.
PY=python3
if [[ -x $ROOT/.venv/bin/python3 ]] && "$ROOT/.venv/bin/python3" -c 'import matplotlib' 2>/dev/null; then
    PY=$ROOT/.venv/bin/python3
fi
if [[ -n $ROUTES ]]; then
    "$PY" "$ROOT/bench/routes_report.py" --work "$WORK" --results "$RESULTS" --label "$LABEL"
else
    "$PY" "$ROOT/bench/report.py" --work "$WORK" --results "$RESULTS" --label "$LABEL"
fi
