#!/usr/bin/env bash
# Webhook benchmark: meshlet-injector's POST /mutate over HTTPS on 127.0.0.1, fed
# AdmissionReviews of a two-container bookinfo-like pod at fixed rates, over kept-alive
# connections (as kube-apiserver calls webhooks) and with a new TCP + TLS connection per
# review. Every response must be an allowed review with a JSON Patch, and the injector's
# own counter must agree, or the run fails. See bench/README.md ("Webhook latency").
#
# Only 127.0.0.1: no namespaces; root only for RT=1 (chrt -f).
#
# Knobs (environment):
#   RUNS (RATE:MODE pairs, reviews/s and keepalive or newconn; default
#   "200:keepalive 200:newconn 1000:keepalive", plus 1000:newconn when RT=0: a full
#   RSA handshake per review at 1000/s saturates two cores, and under SCHED_FIFO that
#   would starve every other process on the machine), DURATION (30s), WARMUP (5s),
#   CONNECTIONS (4), KEY (rsa2048, what Helm's genCA/genSignedCert make,
#   as the chart does; or ec256), INJECTOR_THREADS (unset: one tokio worker per core),
#   RT (1: the injector and the load generator run under SCHED_FIFO priority 10, so
#   other work on a shared machine cannot delay them, as in run.sh; 0: normal),
#   PROFILE (release | dev), SKIP_BUILD (0), RESULTS (bench/results), LABEL (webhook),
#   GOAL_P99_MS (5), KEEP_WORK (0; 1 keeps the work directory).
set -euo pipefail

DURATION=${DURATION:-30s}
WARMUP=${WARMUP:-5s}
CONNECTIONS=${CONNECTIONS:-4}
KEY=${KEY:-rsa2048}
INJECTOR_THREADS=${INJECTOR_THREADS:-}
RT=${RT:-1}
if [[ $RT == 1 ]]; then
    RUNS_SPEC=${RUNS:-200:keepalive 200:newconn 1000:keepalive}
else
    RUNS_SPEC=${RUNS:-200:keepalive 200:newconn 1000:keepalive 1000:newconn}
fi
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
PROFILE=${PROFILE:-release}
SKIP_BUILD=${SKIP_BUILD:-0}
LABEL=${LABEL:-webhook}
GOAL_P99_MS=${GOAL_P99_MS:-5}
KEEP_WORK=${KEEP_WORK:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS=${RESULTS:-$ROOT/bench/results}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
FIXTURE=$ROOT/bench/fixtures/productpage-review.json
case $PROFILE in
release) BIN=$TARGET/release ;;
dev) BIN=$TARGET/debug ;;
*)
    echo "webhook.sh: PROFILE must be release or dev, not '$PROFILE'" >&2
    exit 64
    ;;
esac
case $KEY in
rsa2048) NEWKEY=(-newkey rsa:2048) ;;
ec256) NEWKEY=(-newkey ec -pkeyopt ec_paramgen_curve:P-256) ;;
*)
    echo "webhook.sh: KEY must be rsa2048 or ec256, not '$KEY'" >&2
    exit 64
    ;;
esac
for tool in openssl curl jq python3; do
    if ! command -v "$tool" >/dev/null; then
        echo "webhook.sh: $tool is missing: apt-get install -y openssl curl jq python3" >&2
        exit 69
    fi
done
SCHED=()
if [[ $RT == 1 ]]; then
    if ! command -v chrt >/dev/null; then
        echo "webhook.sh: RT=1 needs chrt: apt-get install -y util-linux" >&2
        exit 69
    fi
    SCHED=(chrt -f 10)
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mlwebhook-$$.XXXXXX")
INJ_PID=""
OK=0

cleanup() {
    local status=$?
    if [[ -n $INJ_PID ]] && kill -0 "$INJ_PID" 2>/dev/null; then
        kill -TERM "$INJ_PID" 2>/dev/null || true
        wait "$INJ_PID" 2>/dev/null || true
    fi
    if [[ $OK == 1 && $KEEP_WORK != 1 ]]; then
        rm -rf "$WORK"
    else
        echo "webhook.sh: work directory kept: $WORK (reports, injector.log)" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "webhook.sh: $*" >&2; }
# A command line for the report, with the throw-away work directory written as $WORK.
printable() {
    local s="$*"
    echo "${s//"$WORK"/\$WORK}"
}

# --- build ---
if [[ $SKIP_BUILD != 1 ]]; then
    log "building meshlet-injector and meshlet-bench ($PROFILE)"
    (cd "$ROOT" && nice cargo build --profile "$PROFILE" -p meshlet-injector -p meshlet-bench)
fi
for b in meshlet-injector meshlet-webhook-bench; do
    if [[ ! -x $BIN/$b ]]; then
        echo "webhook.sh: $BIN/$b is missing; build it (drop SKIP_BUILD=1)" >&2
        exit 66
    fi
done

# --- a CA and a serving certificate for 127.0.0.1, as the chart's would be ---
log "making a $KEY CA and serving certificate"
openssl req -x509 "${NEWKEY[@]}" -nodes -days 1 -sha256 \
    -subj "/CN=meshlet-webhook-bench CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$WORK/ca.key" -out "$WORK/ca.crt" 2>"$WORK/openssl.log"
openssl req -new "${NEWKEY[@]}" -nodes \
    -subj "/CN=meshlet-injector.meshlet-system.svc" \
    -keyout "$WORK/tls.key" -out "$WORK/tls.csr" 2>>"$WORK/openssl.log"
cat >"$WORK/leaf.ext" <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:meshlet-injector.meshlet-system.svc
EOF
openssl x509 -req -in "$WORK/tls.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" \
    -CAcreateserial -days 1 -sha256 -extfile "$WORK/leaf.ext" \
    -out "$WORK/tls.crt" 2>>"$WORK/openssl.log"

# --- the injector ---
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=https://127.0.0.1:$PORT
ENVS=(RUST_LOG=warn)
if [[ -n $INJECTOR_THREADS ]]; then
    ENVS+=("TOKIO_WORKER_THREADS=$INJECTOR_THREADS")
fi
INJ_CMD=(env "${ENVS[@]}" "${SCHED[@]}" "$BIN/meshlet-injector" serve --addr "127.0.0.1:$PORT"
    --tls-cert "$WORK/tls.crt" --tls-key "$WORK/tls.key")
log "starting ${INJ_CMD[*]}"
"${INJ_CMD[@]}" >"$WORK/injector.log" 2>&1 &
INJ_PID=$!
ready=0
for _ in $(seq 100); do
    if curl -fsS --max-time 1 --cacert "$WORK/ca.crt" "$URL/readyz" >/dev/null 2>&1; then
        ready=1
        break
    fi
    if ! kill -0 "$INJ_PID" 2>/dev/null; then
        break
    fi
    sleep 0.1
done
if [[ $ready != 1 ]]; then
    echo "webhook.sh: the injector did not become ready at $URL/readyz; its log:" >&2
    cat "$WORK/injector.log" >&2
    exit 1
fi
sleep 1
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$INJ_PID/status"; }
RSS_IDLE=$(rss_kib)
log "injector pid $INJ_PID ready at $URL, idle RSS $RSS_IDLE KiB"

# The injector's own view: reviews it injected, and the sum/count of its decision time.
metric() {
    curl -fsS --max-time 2 --cacert "$WORK/ca.crt" "$URL/metrics" | awk -v want="$1" '
        $1 == want || index($1, want "{") == 1 { v += $2; found = 1 }
        END { if (found) printf "%.9f\n", v; else print 0 }'
}
injected_counter() {
    curl -fsS --max-time 2 --cacert "$WORK/ca.crt" "$URL/metrics" |
        awk '/^meshlet_injector_reviews_total\{.*result="injected"/ { v += $2 } END { print v + 0 }'
}

# --- the runs ---
RUNS=()
for spec in $RUNS_SPEC; do
    rate=${spec%%:*}
    mode=${spec#*:}
    if [[ ! $rate =~ ^[0-9]+$ ]]; then
        echo "webhook.sh: RUNS takes RATE:MODE pairs like 200:keepalive, not '$spec'" >&2
        exit 64
    fi
    case $mode in
    keepalive) extra=() ;;
    newconn) extra=(--new-connection-per-request) ;;
    *)
        echo "webhook.sh: a RUNS mode is keepalive or newconn, not '$mode'" >&2
        exit 64
        ;;
    esac
    name=rate-$rate-$mode
    before=$(injected_counter)
    sum_before=$(metric meshlet_injector_review_duration_seconds_sum)
    cnt_before=$(metric meshlet_injector_review_duration_seconds_count)
    cmd=("$BIN/meshlet-webhook-bench" "$URL/mutate" --cacert "$WORK/ca.crt"
        --body-file "$FIXTURE" --rate "$rate" --duration "$DURATION" --warmup "$WARMUP"
        -c "$CONNECTIONS" "${extra[@]}" --watch "injector=$INJ_PID" -o "$WORK/$name.json")
    log "$name: ${cmd[*]}"
    if ! "${SCHED[@]}" "${cmd[@]}" 2>"$WORK/$name.log"; then
        cat "$WORK/$name.log" >&2
        echo "webhook.sh: $name: not every review came back allowed with a JSON Patch" >&2
        exit 1
    fi
    cat "$WORK/$name.log" >&2
    after=$(injected_counter)
    sum_after=$(metric meshlet_injector_review_duration_seconds_sum)
    cnt_after=$(metric meshlet_injector_review_duration_seconds_count)
    sent=$(jq .requests_sent "$WORK/$name.json")
    injected=$(jq .injected_total "$WORK/$name.json")
    counted=$((after - before))
    # Every review sent (warmup included) was answered with a patch, and the
    # injector itself counted exactly that many injections: nothing else reached it.
    if [[ $injected != "$sent" || $counted != "$sent" ]] ||
        ! jq -e '.errors == 0 and .not_injected == 0 and .count > 0' "$WORK/$name.json" >/dev/null; then
        echo "webhook.sh: $name: sent $sent, answered with a patch $injected," \
            "injector counted $counted injections; see $WORK/$name.json" >&2
        exit 1
    fi
    jq -n --arg name "$name" --arg mode "$mode" --argjson rate "$rate" \
        --argjson counted "$counted" \
        --argjson sum "$(python3 -c "print($sum_after - $sum_before)")" \
        --argjson cnt "$(python3 -c "print(int($cnt_after - $cnt_before))")" \
        --arg cmd "$(printable "${SCHED[@]}" "${cmd[@]}")" \
        '{name: $name, mode: $mode, rate: $rate, injector_counted_injected: $counted,
          injector_decision_s_sum: $sum, injector_decision_count: $cnt, command: $cmd}' \
        >"$WORK/$name.meta.json"
    RUNS+=("$name")
done
RSS_AFTER=$(rss_kib)

# --- facts and report ---
jq -n \
    --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --arg kernel "$(uname -r)" \
    --arg cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
    --argjson cores "$(nproc)" \
    --arg loadavg "$LOADAVG_START" --arg loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)" \
    --arg rustc "$(rustc --version 2>/dev/null || echo unknown)" \
    --arg openssl "$(openssl version)" \
    --arg profile "$PROFILE" --arg key "$KEY" --arg rt "$RT" \
    --arg threads "${INJECTOR_THREADS:-one per core}" \
    --arg duration "$DURATION" --arg warmup "$WARMUP" --argjson connections "$CONNECTIONS" \
    --argjson rss_idle "$RSS_IDLE" --argjson rss_after "$RSS_AFTER" \
    --argjson goal "$GOAL_P99_MS" --arg lbl "$LABEL" \
    --arg injector "$(printable "${INJ_CMD[@]}")" \
    --arg fixture "bench/fixtures/$(basename "$FIXTURE")" \
    '{date: $date, commit: $commit, "label": $lbl,
      machine: {cpu: $cpu, cores: $cores, kernel: $kernel, loadavg_at_start: $loadavg,
               loadavg_at_end: $loadavg_end},
      toolchain: {rustc: $rustc, openssl: $openssl},
      settings: {profile: $profile, key: $key, rt: ($rt == "1"), injector_threads: $threads,
                 duration: $duration, warmup: $warmup, connections: $connections,
                 fixture: $fixture, goal_p99_ms: $goal},
      injector: {command: $injector, rss_kib_idle: $rss_idle, rss_kib_after_all_load: $rss_after}}' \
    >"$WORK/facts.json"
python3 "$ROOT/bench/webhook_report.py" --work "$WORK" --results "$RESULTS" "${RUNS[@]}"
OK=1
