#!/usr/bin/env bash
# Route propagation benchmark (issue 8): on the real control plane of tools/kube with
# meshlet-node as the node, the time from an HTTPRoute change (`kubectl apply`) to the
# first request the client pod's sidecar routes by it. A prober in the meshed client pod
# sends a request with the header `probe: on` to Service backend every PERIOD_MS (a new
# connection each, through the sidecar) and logs when each answer arrived and which pod
# gave it; the route `probe` flips its backendRef between backend-v1 and backend-v2
# CHANGES times. METHOD=api (default) makes each change one JSON merge patch straight to
# the API server (curl with the kubeconfig's client certificate: the write's time is
# known to ~10 ms); METHOD=kubectl runs `kubectl apply` (what a user waits, including
# kubectl's own start-up and discovery). Latency = first answer from the new backend -
# the change's start, and - the change's return (the API has it). Writes
# bench/results/<label>.md and bench/results/<date>-<label>.json.
#
# Needs root, the control plane (bash tools/kube/build.sh), Go (Gateway API CRDs), Helm
# (bash scripts/tools.sh ensure_helm) and `cargo build --workspace --bins` (debug
# binaries in target/debug; BIN overrides). Knobs: CHANGES (20), PERIOD_MS (10),
# METHOD (api|kubectl), RESULTS (bench/results), LABEL (route), KEEP_WORK (0).
set -euo pipefail

CHANGES=${CHANGES:-20}
PERIOD_MS=${PERIOD_MS:-10}
METHOD=${METHOD:-api}
LABEL=${LABEL:-route}
KEEP_WORK=${KEEP_WORK:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RESULTS=${RESULTS:-$ROOT/bench/results}
BIN=${BIN:-$ROOT/target/debug}
export MESHLET_KUBE_DIR="$ROOT/target/kube-bench-route"

die() {
    echo "route.sh: $*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "run as root: meshlet-node creates network namespaces and runs iptables in them"
[[ $CHANGES =~ ^[0-9]+$ && $CHANGES -gt 0 && $PERIOD_MS =~ ^[0-9]+$ && $PERIOD_MS -gt 0 ]] ||
    die "CHANGES ($CHANGES) and PERIOD_MS ($PERIOD_MS) must be whole numbers > 0"
for b in meshlet-node meshlet-proxy meshlet-init meshlet-injector meshlet-testapp; do
    [[ -x $BIN/$b ]] || die "$BIN/$b is missing; run: cargo build --workspace --bins"
done
[[ $METHOD == api || $METHOD == kubectl ]] || die "METHOD must be api or kubectl, not '$METHOD'"
for t in python3 curl; do
    command -v "$t" >/dev/null || die "$t not found; install it (apt-get install -y python3 curl)"
done

WORK=$(mktemp -d /tmp/meshlet-bench-route.XXXXXX)
NODE_PID=""
PROBE_PID=""
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)

cleanup() {
    local rc=$? left
    set +e
    [[ -n $PROBE_PID ]] && kill -TERM "$PROBE_PID" 2>/dev/null && wait "$PROBE_PID" 2>/dev/null
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
    echo "route.sh: node agent stopped, control plane down, $left network namespaces of the node left" >&2
    if [[ $KEEP_WORK == 1 || $rc -ne 0 ]]; then
        echo "route.sh: work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { echo "route.sh: $(date -u +%H:%M:%S) $*" >&2; }

log "control plane up (state $MESHLET_KUBE_DIR), Gateway API CRDs"
bash tools/kube/cluster.sh up >"$WORK/up.log" 2>&1 || {
    cat "$WORK/up.log" >&2
    die "tools/kube/cluster.sh up failed (log above); build the control plane with: bash tools/kube/build.sh"
}
eval "$(bash tools/kube/cluster.sh env)"
bash tools/kube/cluster.sh gateway-api standard >"$WORK/crds.log" 2>&1 || {
    cat "$WORK/crds.log" >&2
    die "installing the Gateway API CRDs failed (above); it needs Go 1.26"
}
HELM=$(bash scripts/tools.sh ensure_helm) || die "no Helm; run: bash scripts/tools.sh ensure_helm"

log "node agent up"
"$BIN/meshlet-node" --cluster-env "$MESHLET_KUBE_DIR/cluster.env" --name node-1 \
    --state-dir "$WORK/node" >"$WORK/node.log" 2>&1 &
NODE_PID=$!
deadline=$((SECONDS + 60))
until kubectl get node node-1 >/dev/null 2>&1; do
    kill -0 "$NODE_PID" 2>/dev/null || die "meshlet-node exited; see $WORK/node.log"
    ((SECONDS < deadline)) || die "node-1 not registered in 60 s; see $WORK/node.log"
    sleep 0.2
done
kubectl wait --for=condition=Ready node/node-1 --timeout=60s >/dev/null ||
    die "node-1 not Ready in 60 s; see $WORK/node.log"

log "helm install charts/meshlet, kubectl apply samples/hello.yaml"
"$HELM" install meshlet charts/meshlet -n meshlet-system --create-namespace \
    --set injector.service.clusterIP=198.19.0.12 --wait --timeout 180s >"$WORK/helm.log" 2>&1 || {
    cat "$WORK/helm.log" >&2
    die "helm install failed (above); the node log is $WORK/node.log"
}
kubectl apply -f samples/hello.yaml >/dev/null
deadline=$((SECONDS + 180))
until [[ $(kubectl -n hello get pods -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null | grep -c True) -eq 6 ]]; do
    ((SECONDS < deadline)) || die "hello's 6 pods not Ready in 180 s; see $WORK/node.log"
    sleep 0.5
done
client=$(kubectl -n hello get pods -l app=client -o jsonpath='{.items[0].metadata.name}')
NETNS="mlnode-$NODE_PID-hello.$client"

route() {
    cat <<YAML
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: probe, namespace: hello}
spec:
  parentRefs: [{group: "", kind: Service, name: backend, port: 80}]
  rules:
    - matches: [{headers: [{name: probe, value: "on"}]}]
      backendRefs: [{name: backend-$1, port: 80}]
YAML
}

# patch WANT: the route's backendRef to backend-WANT, as one merge patch to the API.
kcfg() { kubectl config view --raw --minify -o jsonpath="$1"; }
API=$(kcfg '{.clusters[0].cluster.server}')
API_CA=$(kcfg '{.clusters[0].cluster.certificate-authority}')
API_CERT=$(kcfg '{.users[0].user.client-certificate}')
API_KEY=$(kcfg '{.users[0].user.client-key}')
patch() {
    curl -sSf -o /dev/null --cacert "$API_CA" --cert "$API_CERT" --key "$API_KEY" -X PATCH \
        -H 'Content-Type: application/merge-patch+json' \
        --data '{"spec":{"rules":[{"matches":[{"headers":[{"name":"probe","value":"on"}]}],"backendRefs":[{"name":"backend-'"$1"'","port":80}]}]}}' \
        "$API/apis/gateway.networking.k8s.io/v1/namespaces/hello/httproutes/probe"
}

# first_after START WANT: waits (up to 15 s) until the probe log has an answer from
# backend-WANT received after START; prints its time.
first_after() {
    local start=$1 want=$2 deadline=$((SECONDS + 15)) t
    while ((SECONDS < deadline)); do
        t=$(awk -v s="$start" -v w="backend-$want-" '$1 >= s && $2 == 200 && index($3, w) == 1 { print $1; exit }' "$WORK/probe.log")
        [[ -n $t ]] && { echo "$t"; return 0; }
        sleep 0.05
    done
    return 1
}

log "route probe -> backend-v1; prober in $client every ${PERIOD_MS} ms"
route v1 | kubectl apply -f - >/dev/null
ip netns exec "$NETNS" python3 bench/route_probe.py --url http://198.19.0.10/ \
    --header probe:on --period-ms "$PERIOD_MS" >"$WORK/probe.log" 2>"$WORK/probe.err" &
PROBE_PID=$!
# Without the route both versions answer: wait until the last 100 answers (1 s) are all
# backend-v1, i.e. the route is in force, before the first change.
deadline=$((SECONDS + 60))
until [[ $(tail -n 100 "$WORK/probe.log" | awk '$2 == 200 && index($3, "backend-v1-") == 1' | wc -l) -eq 100 ]]; do
    ((SECONDS < deadline)) || die "route probe -> backend-v1 not in force within 60 s; see $WORK/probe.log $WORK/probe.err"
    sleep 0.2
done

: >"$WORK/changes.tsv"
want=v1
for i in $(seq 1 "$CHANGES"); do
    if [[ $want == v1 ]]; then want=v2; else want=v1; fi
    # Not in step with the prober's period.
    sleep "0.$((300 + RANDOM % 400))"
    start=$EPOCHREALTIME
    if [[ $METHOD == api ]]; then
        patch "$want" || die "change $i: PATCH of HTTPRoute probe failed"
    else
        route "$want" | kubectl apply -f - >/dev/null
    fi
    applied=$EPOCHREALTIME
    seen=$(first_after "$start" "$want") || die "change $i: no answer from backend-$want within 15 s of the apply"
    printf '%s\t%s\t%s\t%s\t%s\n' "$i" "$want" "$start" "$applied" "$seen" >>"$WORK/changes.tsv"
    log "change $i -> backend-$want: routed $(awk -v a="$start" -v b="$seen" 'BEGIN { printf "%.0f", (b - a) * 1000 }') ms after the change started ($METHOD)"
done
kill -TERM "$PROBE_PID" 2>/dev/null
wait "$PROBE_PID" 2>/dev/null || true
PROBE_PID=""

mkdir -p "$RESULTS"
python3 bench/route_report.py --changes "$WORK/changes.tsv" --probe "$WORK/probe.log" \
    --results "$RESULTS" --label "$LABEL" --date "$DATE" --period-ms "$PERIOD_MS" --method "$METHOD" \
    --loadavg-start "$LOADAVG_START" --loadavg-end "$(cut -d' ' -f1-3 /proc/loadavg)" \
    --commit "$(git rev-parse --short HEAD)" --bin "${BIN#"$ROOT"/}" \
    --kube-version "$(kubectl version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')"
log "wrote $RESULTS/$LABEL.md and $RESULTS/${DATE%%T*}-$LABEL.json"
