#!/usr/bin/env bash
# Kubernetes benchmark (issue 5): on the real control plane of tools/kube (kube-apiserver,
# kube-controller-manager, etcd v1.37.2 on loopback) with meshlet-node as the node,
#   1. pod created -> Ready, p50/p99/max over PODS pods, in a namespace labelled
#      meshlet.io/inject=enabled (the chart's webhook injects meshlet-init and the
#      meshlet-proxy sidecar) and, as the baseline in the same run, in an unlabelled one;
#   2. the webhook's admission latency as the API server measures it:
#      apiserver_admission_webhook_admission_duration_seconds from its /metrics.
# Writes bench/results/k8s.md and bench/results/<date>-k8s.json. See bench/README.md
# ("Pod start-up and admission latency on a real API server").
#
# Needs root (meshlet-node makes network namespaces), the control plane
# (bash tools/kube/build.sh), Helm (bash scripts/tools.sh ensure_helm) and
# `cargo build --workspace --bins` (debug binaries in target/debug; BIN overrides).
#
# Knobs (environment): PODS (50 per namespace), STEP (10: the Deployment is scaled
# 0 -> STEP -> 2*STEP ... -> PODS, each step waiting until every replica is Ready),
# STEP_TIMEOUT_S (300), BIN (target/debug), RESULTS (bench/results), LABEL (k8s),
# KEEP_WORK (0; 1 keeps the work directory with the watch logs and node logs).
set -euo pipefail

PODS=${PODS:-50}
STEP=${STEP:-10}
STEP_TIMEOUT_S=${STEP_TIMEOUT_S:-300}
LABEL=${LABEL:-k8s}
KEEP_WORK=${KEEP_WORK:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RESULTS=${RESULTS:-$ROOT/bench/results}
BIN=${BIN:-$ROOT/target/debug}
export MESHLET_KUBE_DIR="$ROOT/target/kube-bench"

die() {
    echo "k8s.sh: $*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "run as root: meshlet-node creates network namespaces and runs iptables in them"
[[ $PODS =~ ^[0-9]+$ && $STEP =~ ^[0-9]+$ && $STEP -gt 0 && $PODS -ge $STEP ]] ||
    die "PODS ($PODS) and STEP ($STEP) must be whole numbers with 0 < STEP <= PODS"
for b in meshlet-node meshlet-proxy meshlet-init meshlet-injector meshlet-testapp; do
    [[ -x $BIN/$b ]] || die "$BIN/$b is missing; run: cargo build --workspace --bins"
done
for t in python3 jq; do
    command -v "$t" >/dev/null || die "$t not found; install it (apt-get install -y python3 jq)"
done

WORK=$(mktemp -d /tmp/meshlet-bench-k8s.XXXXXX)
NODE_PID=""
WATCH_PIDS=()
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)

cleanup() {
    local rc=$? p left
    set +e
    for p in "${WATCH_PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null
    done
    if [[ -n $NODE_PID ]] && kill -0 "$NODE_PID" 2>/dev/null; then
        kill -TERM "$NODE_PID"
        for _ in $(seq 1 300); do
            kill -0 "$NODE_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$NODE_PID" 2>/dev/null
        wait "$NODE_PID" 2>/dev/null
    fi
    bash tools/kube/cluster.sh down >"$WORK/down.log" 2>&1 || cat "$WORK/down.log" >&2
    left=$(ip netns list 2>/dev/null | grep -c "^mlnode-${NODE_PID:-none}-" || true)
    echo "k8s.sh: node agent stopped, control plane down, $left network namespaces of the node left" >&2
    if [[ $KEEP_WORK == 1 || $rc -ne 0 ]]; then
        echo "k8s.sh: work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { echo "k8s.sh: $(date -u +%H:%M:%S) $*" >&2; }

log "control plane up (state $MESHLET_KUBE_DIR)"
bash tools/kube/cluster.sh up >"$WORK/up.log" 2>&1 || {
    cat "$WORK/up.log" >&2
    die "tools/kube/cluster.sh up failed (log above); build the control plane with: bash tools/kube/build.sh"
}
eval "$(bash tools/kube/cluster.sh env)"
HELM=$(bash scripts/tools.sh ensure_helm) || die "no Helm; run: bash scripts/tools.sh ensure_helm"

log "node agent up"
"$BIN/meshlet-node" --cluster-env "$MESHLET_KUBE_DIR/cluster.env" --name node-1 \
    --state-dir "$WORK/node" >"$WORK/node.log" 2>&1 &
NODE_PID=$!
# `kubectl wait` fails at once while the Node does not exist yet.
deadline=$((SECONDS + 60))
until kubectl get node node-1 >/dev/null 2>&1; do
    kill -0 "$NODE_PID" 2>/dev/null || die "meshlet-node exited; see $WORK/node.log"
    ((SECONDS < deadline)) || die "node-1 not registered in 60 s; see $WORK/node.log"
    sleep 0.2
done
kubectl wait --for=condition=Ready node/node-1 --timeout=60s >/dev/null ||
    die "node-1 not Ready in 60 s; see $WORK/node.log"

log "helm install charts/meshlet"
t0=$EPOCHREALTIME
# identity off: the committed start-up figures were measured without the issuer;
# a run with it (the chart's default) adds the first certificate to start-up.
"$HELM" install meshlet charts/meshlet -n meshlet-system --create-namespace --set identity.enabled=false --wait --timeout 180s >"$WORK/helm.log" 2>&1 || {
    cat "$WORK/helm.log" >&2
    die "helm install failed (above); the node log is $WORK/node.log"
}
HELM_INSTALL_S=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
WEBHOOK_NAMES=$(kubectl get mutatingwebhookconfigurations -o jsonpath='{range .items[*]}{range .webhooks[*]}{.name}{" "}{end}{end}')
log "installed in ${HELM_INSTALL_S}s; webhooks: $WEBHOOK_NAMES"

# A namespace with a Deployment of the test app at 0 replicas; the watch starts first
# so that it sees every pod from its ADDED event on.
setup_ns() { # setup_ns NS INJECT(yes|no)
    local ns=$1 inject=$2
    {
        echo "apiVersion: v1"
        echo "kind: Namespace"
        echo "metadata:"
        echo "  name: $ns"
        if [[ $inject == yes ]]; then
            echo "  labels: {meshlet.io/inject: enabled}"
        fi
        cat <<EOF
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: app
  namespace: $ns
spec:
  replicas: 0
  selector:
    matchLabels: {app: bench}
  template:
    metadata:
      labels: {app: bench}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
        - name: app
          image: meshlet-testapp:latest
          args: ["http", "--port", "8080"]
          ports:
            - {name: http, containerPort: 8080}
          readinessProbe:
            httpGet: {path: /, port: 8080}
            periodSeconds: 5
EOF
    } >"$WORK/$ns.yaml"
    kubectl apply -f "$WORK/$ns.yaml" >/dev/null
    # The ServiceAccount the pods need comes from the controller-manager.
    for _ in $(seq 1 100); do
        kubectl -n "$ns" get serviceaccount default >/dev/null 2>&1 && break
        sleep 0.1
    done
}

# Stamps every watch event of NS's pods with the local receive time (ms resolution,
# unlike the API's RFC 3339 timestamps, which are whole seconds).
start_watch() { # start_watch NS
    local ns=$1
    python3 -u -c '
import signal, subprocess, sys, time
ns, out = sys.argv[1], sys.argv[2]
p = subprocess.Popen(["kubectl", "get", "--raw",
    f"/api/v1/namespaces/{ns}/pods?watch=1&timeoutSeconds=1800"], stdout=subprocess.PIPE,
    stderr=open(out + ".err", "w"))
def stop(*_):
    p.terminate()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
with open(out, "w") as f:
    for line in p.stdout:
        f.write(f"{time.time():.6f}\t{line.decode().strip()}\n")
        f.flush()
' "$ns" "$WORK/watch-$ns.log" &
    WATCH_PIDS+=($!)
    # The watch must be established before the first pod is created.
    sleep 1
}

ready_count() { # ready_count NS
    kubectl -n "$1" get pods -o json |
        jq '[.items[] | select(.metadata.deletionTimestamp == null) | select(any(.status.conditions[]?; .type == "Ready" and .status == "True"))] | length'
}

STEPS_JSON="$WORK/steps.jsonl"
: >"$STEPS_JSON"
scale_up() { # scale_up NS
    local ns=$1 n t0 t1 deadline
    for ((n = STEP; n <= PODS; n += STEP)); do
        t0=$EPOCHREALTIME
        kubectl -n "$ns" scale deployment/app --replicas "$n" >/dev/null
        deadline=$((SECONDS + STEP_TIMEOUT_S))
        until [[ $(ready_count "$ns") -ge $n ]]; do
            ((SECONDS < deadline)) || die "$ns: $n pods not Ready in ${STEP_TIMEOUT_S}s; kubectl -n $ns get pods; node log $WORK/node.log"
            sleep 0.2
        done
        t1=$EPOCHREALTIME
        log "$ns: $n/$PODS Ready (step $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s)"
        printf '{"ns":"%s","replicas":%d,"scaled_at":%s,"all_ready_at":%s}\n' "$ns" "$n" "$t0" "$t1" >>"$STEPS_JSON"
    done
    kubectl -n "$ns" get pods -o json >"$WORK/pods-$ns.json"
}

scale_down() { # scale_down NS: the node's load of the previous phase must not weigh on the next
    local ns=$1 deadline
    kubectl -n "$ns" scale deployment/app --replicas 0 >/dev/null
    deadline=$((SECONDS + STEP_TIMEOUT_S))
    until [[ $(kubectl -n "$ns" get pods -o name | wc -l) -eq 0 ]]; do
        ((SECONDS < deadline)) || die "$ns: pods not gone ${STEP_TIMEOUT_S}s after scaling to 0"
        sleep 0.5
    done
}

# Baseline first, then meshed, each alone on the node.
setup_ns bench-plain no
setup_ns bench-mesh yes
start_watch bench-plain
start_watch bench-mesh

log "baseline: $PODS pods in bench-plain (no injection)"
scale_up bench-plain
scale_down bench-plain
log "meshed: $PODS pods in bench-mesh (meshlet.io/inject=enabled)"
scale_up bench-mesh

# Check that the meshed pods really carry the sidecar, and the plain ones do not.
jq -e --argjson n "$PODS" '[.items[] | select(any(.spec.initContainers[]?; .name == "meshlet-proxy") or any(.spec.containers[]; .name == "meshlet-proxy"))] | length == $n' \
    "$WORK/pods-bench-mesh.json" >/dev/null || die "not every pod in bench-mesh has the meshlet-proxy sidecar"
jq -e '[.items[] | select(any(.spec.initContainers[]?; .name == "meshlet-proxy"))] | length == 0' \
    "$WORK/pods-bench-plain.json" >/dev/null || die "pods in bench-plain were injected"

kubectl get --raw /metrics >"$WORK/apiserver-metrics.txt"
# The injector's own view of the same reviews (its review_duration histogram), through
# the API server's pod proxy: what it does not see is transport (egress socket, node
# agent, TLS, HTTP) and the API server's side of the call.
for pod in $(kubectl -n meshlet-system get pods -o jsonpath='{.items[*].metadata.name}'); do
    kubectl get --raw "/api/v1/namespaces/meshlet-system/pods/https:$pod:8443/proxy/metrics" \
        >"$WORK/injector-metrics-$pod.txt" 2>"$WORK/injector-metrics-$pod.err" ||
        echo "k8s.sh: could not read $pod's /metrics (see $WORK/injector-metrics-$pod.err); the injector-side row stays empty" >&2
done
grep -E '^apiserver_admission_webhook' "$WORK/apiserver-metrics.txt" >"$WORK/webhook-metrics.txt" || true
for p in "${WATCH_PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
done

LOADAVG_END=$(cut -d' ' -f1-3 /proc/loadavg)
mkdir -p "$RESULTS"
python3 "$ROOT/bench/k8s_report.py" \
    --work "$WORK" --results "$RESULTS" --label "$LABEL" --date "$DATE" \
    --commit "$(git rev-parse --short HEAD)" --pods "$PODS" --step "$STEP" \
    --bin "$BIN" --helm-install-s "$HELM_INSTALL_S" --webhooks "$WEBHOOK_NAMES" \
    --loadavg-start "$LOADAVG_START" --loadavg-end "$LOADAVG_END" \
    --kube-version "$(kubectl version -o json | jq -r .serverVersion.gitVersion)" \
    --helm-version "$("$HELM" version --short 2>/dev/null || echo unknown)"
log "wrote $RESULTS/$LABEL.md and $RESULTS/${DATE%%T*}-$LABEL.json"
