#!/usr/bin/env bash
# The webhook against a real kube-apiserver (v1.37.2 from tools/kube): registers
# `meshlet-injector serve` by URL, applies the shared corpus in labelled namespaces and
# checks that every pod the controllers create carries meshlet-init and meshlet-proxy,
# that a refused pod names the reason, that opt-out and dry-run behave, and that the
# API server accepts the patch encoding. Needs root, Go (tools/kube/build.sh builds the
# control plane once), openssl and python3. Not part of `cargo test`: run it by hand or
# from CI after tools/kube is built.
#
#   injector/tests/apiserver.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
CORPUS="$ROOT/../shared/corpus/manifests"
TESTDATA="$ROOT/injector/tests/testdata/inject"
export MESHLET_KUBE_DIR="$ROOT/target/injector-apiserver-$$"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/meshlet-injector-apiserver.XXXXXX")"
injector_pid=""
failures=0

log() { echo "injector-apiserver: $*" >&2; }
fail() {
  log "FAIL: $*"
  failures=$((failures + 1))
}
cleanup() {
  if [[ -n "$injector_pid" ]]; then kill "$injector_pid" 2>/dev/null || true; fi
  if ! timeout 20 tools/kube/cluster.sh down >/dev/null 2>&1; then
    # cluster.sh's daemons can inherit its lock fd, so `down` may wait for a lock they
    # hold. Stop the components this run started (their pid files), then retry.
    # The API server before etcd, as it needs etcd to shut down cleanly.
    for c in kube-controller-manager kube-apiserver etcd; do
      local f="$MESHLET_KUBE_DIR/$c.pid" p
      [[ -e "$f" ]] || continue
      p="$(cat "$f")"
      kill "$p" 2>/dev/null || continue
      for _ in $(seq 40); do
        kill -0 "$p" 2>/dev/null || break
        sleep 0.5
      done
      if kill -0 "$p" 2>/dev/null; then kill -9 "$p" 2>/dev/null || true; fi
    done
    timeout 30 tools/kube/cluster.sh down >/dev/null 2>&1 || log "cluster.sh down failed; state in $MESHLET_KUBE_DIR"
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

[[ "$(id -u)" == 0 ]] || { log "needs root (tools/kube/cluster.sh runs etcd and kube-apiserver)"; exit 1; }
[[ -d "$CORPUS" ]] || { log "the shared corpus is missing at $CORPUS"; exit 1; }
command -v openssl >/dev/null || { log "openssl is missing: apt-get install -y openssl"; exit 1; }

cargo build -q -p meshlet-injector --bin meshlet-injector
tools/kube/cluster.sh up
eval "$(tools/kube/cluster.sh env)"

# Serving certificate for 127.0.0.1 from a throw-away CA.
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$WORK/ca.key" -out "$WORK/ca.crt" \
  -days 1 -subj "/CN=meshlet-injector test CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout "$WORK/tls.key" -out "$WORK/tls.csr" \
  -subj "/CN=127.0.0.1" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' >"$WORK/ext.cnf"
openssl x509 -req -in "$WORK/tls.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" \
  -CAcreateserial -out "$WORK/tls.crt" -days 1 -extfile "$WORK/ext.cnf" 2>/dev/null

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
target/debug/meshlet-injector serve --addr "127.0.0.1:$port" \
  --tls-cert "$WORK/tls.crt" --tls-key "$WORK/tls.key" >"$WORK/injector.log" 2>&1 &
injector_pid=$!
for _ in $(seq 50); do
  curl -sf --cacert "$WORK/ca.crt" "https://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 0.1
done

kubectl apply -f - <<EOF2
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: meshlet-injector-apiserver-test
webhooks:
- name: inject.meshlet.io
  admissionReviewVersions: ["v1"]
  sideEffects: None
  failurePolicy: Fail
  timeoutSeconds: 5
  reinvocationPolicy: IfNeeded
  clientConfig:
    url: https://127.0.0.1:$port/mutate
    caBundle: $(base64 -w0 "$WORK/ca.crt")
  namespaceSelector:
    matchLabels: {meshlet.io/inject: enabled}
  objectSelector:
    matchExpressions:
    - {key: meshlet.io/inject, operator: NotIn, values: ["disabled"]}
  rules:
  - operations: ["CREATE"]
    apiGroups: [""]
    apiVersions: ["v1"]
    resources: ["pods"]
    scope: Namespaced
EOF2

expected=0
for f in "$CORPUS"/*.yaml "$CORPUS"/*.yml; do
  [[ -e "$f" ]] || continue
  ns="$(basename "$f" | tr '_.' '--' | tr '[:upper:]' '[:lower:]' | cut -c1-50 | sed 's/-*$//')"
  # Manifests that name their own namespace (emojivoto) get it labelled up front.
  own="$(awk '/^kind: Namespace/{n=1} n&&/^  name:/{print $2; exit}' "$f")"
  [[ -n "$own" ]] && ns="$own"
  kubectl create namespace "$ns" >/dev/null
  kubectl label namespace "$ns" meshlet.io/inject=enabled >/dev/null
  kubectl -n "$ns" apply -f "$f" >/dev/null
  n="$(grep -cE '^kind: (Deployment|StatefulSet|DaemonSet|Pod)$' "$f")"
  expected=$((expected + n))
done

# No scheduler runs: the controllers create Pending pods, which is all we need.
got=0
for _ in $(seq 60); do
  got="$(kubectl get pods -A -o name | wc -l)"
  [[ "$got" -ge "$expected" ]] && break
  sleep 0.5
done
[[ "$got" -ge "$expected" ]] || fail "only $got of $expected pods were created (see $WORK/injector.log)"
while read -r ns name inits; do
  [[ "$ns" == kube-system ]] && continue
  [[ "$inits" == meshlet-init,meshlet-proxy* ]] || fail "pod $ns/$name has init containers '$inits'"
done < <(kubectl get pods -A -o jsonpath='{range .items[*]}{.metadata.namespace} {.metadata.name} {range .spec.initContainers[*]}{.name},{end}{"\n"}{end}')

kubectl create namespace refusals >/dev/null
kubectl label namespace refusals meshlet.io/inject=enabled >/dev/null
if out="$(kubectl -n refusals create -f "$TESTDATA/error-reserved-port.yaml" 2>&1)"; then
  fail "a pod using port 15001 was admitted"
else
  [[ "$out" == *"uses port 15001"* ]] || fail "refusal does not name the port: $out"
fi
kubectl -n refusals create -f "$TESTDATA/skip-opt-out.yaml" >/dev/null
dry="$(kubectl -n refusals run dry --image=busybox --dry-run=server -o jsonpath='{.spec.initContainers[1].restartPolicy}')"
[[ "$dry" == Always ]] || fail "server-side dry run was not injected (got '$dry')"
for _ in $(seq 20); do
  legacy="$(kubectl -n refusals get pods -l app=legacy -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)"
  [[ -n "$legacy" ]] && break
  sleep 0.5
done
inits="$(kubectl -n refusals get pod "$legacy" -o jsonpath='{.spec.initContainers}')"
[[ -z "$inits" ]] || fail "opted-out pod was injected: $inits"

# Offline output: `inject -f` prints what kubectl applies as is (server-side dry run in
# unlabelled namespaces, so only the API server's own validation is involved).
mkdir -p "$WORK/offline"
for f in "$TESTDATA"/*.yaml "$CORPUS"/*.yaml "$CORPUS"/*.yml; do
  [[ -e "$f" ]] || continue
  case "$(basename "$f")" in error-* | emojivoto*) continue ;; esac
  out="$WORK/offline/$(basename "$f")"
  target/debug/meshlet-injector inject -f "$f" >"$out"
  while read -r ns; do
    kubectl create namespace "$ns" >/dev/null 2>&1 || true
  done < <(awk '$1 == "namespace:" {print $2}' "$out" | sort -u)
  kubectl create namespace offline >/dev/null 2>&1 || true
  nsflag=(-n offline)
  grep -q '^  namespace:' "$out" && nsflag=()
  # create rather than apply: apply refuses generateName.
  if ! res="$(kubectl "${nsflag[@]}" create --dry-run=server -f "$out" 2>&1)"; then
    fail "kubectl refused the offline output of $(basename "$f"): $res"
  fi
done

curl -s --cacert "$WORK/ca.crt" "https://127.0.0.1:$port/metrics" | grep '^meshlet_injector_reviews_total' >&2 || true
if [[ "$failures" -gt 0 ]]; then
  log "$failures failure(s); injector log: $(tail -5 "$WORK/injector.log")"
  exit 1
fi
log "ok: $got pods injected by a real kube-apiserver, refusal, opt-out, dry run and offline output checked"
