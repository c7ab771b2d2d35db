#!/usr/bin/env bash
# Installs charts/meshlet into a real kube-apiserver (built from tools/kube, on
# loopback, with its own etcd) and checks what only a server can:
#   - every object is accepted by the API server's own validation and RBAC
#   - the webhook's selectors as the API server evaluates them: pods in a
#     labelled namespace and opted-in pods call the injector; pods opted out,
#     in unlabelled namespaces, in kube-system or in meshlet-system do not
#     (no injector runs, so "calls the injector" shows as a refusal naming the
#     webhook under failurePolicy Fail)
#   - helm upgrade reuses the webhook CA through `lookup`: caBundle unchanged,
#     equal to the Secret's ca.crt, while the upgrade's own change lands
#   - failurePolicy Ignore lets pods through; helm uninstall removes it all
# No network traffic leaves loopback: the API server resolves webhook services
# through endpoints (--enable-aggregator-routing) and the injector Service has
# none, so a webhook call fails before dialing. No kubelet, scheduler or
# controller-manager runs; pods stay Pending.
#
# Needs Go (tools/kube/build.sh: about 6 minutes cold, cached afterwards) and
# openssl. Ends with "chart-install: N passed, M failed".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/tools.sh
source "$ROOT/scripts/tools.sh"
HELM="$(ensure_helm)"
KUBE_BIN="$("$ROOT/tools/kube/build.sh")"
for b in kube-apiserver etcd kubectl; do
  [[ -x $KUBE_BIN/$b ]] || {
    echo "chart-install: $KUBE_BIN/$b is missing; rerun tools/kube/build.sh" >&2
    exit 1
  }
done
command -v openssl >/dev/null || {
  echo "chart-install: openssl is missing; install it with: apt-get install -y openssl" >&2
  exit 1
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/meshlet-chart-install.XXXXXX")"
pids=()
# Stops what this script started, newest first: the API server must go before
# etcd, or its shutdown waits on etcd for minutes. Bounded: SIGKILL after 10 s.
cleanup() {
  local i pid
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid="${pids[i]}"
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- control plane on loopback
ETCD_PORT="$(free_port)"
PEER_PORT="$(free_port)"
API_PORT="$(free_port)"
"$KUBE_BIN/etcd" --name meshlet-chart --data-dir "$WORK/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
  --initial-cluster "meshlet-chart=http://127.0.0.1:$PEER_PORT" --log-level error >"$WORK/etcd.log" 2>&1 &
pids+=($!)

openssl genrsa -out "$WORK/sa.key" 2048 2>/dev/null
openssl rsa -in "$WORK/sa.key" -pubout -out "$WORK/sa.pub" 2>/dev/null
TOKEN="$(openssl rand -hex 16)"
echo "$TOKEN,meshlet-test-admin,meshlet-test-admin,system:masters" >"$WORK/tokens.csv"
"$KUBE_BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
  --endpoint-reconciler-type none --cert-dir "$WORK/certs" \
  --token-auth-file "$WORK/tokens.csv" --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc \
  --service-account-key-file "$WORK/sa.pub" --service-account-signing-key-file "$WORK/sa.key" \
  --service-cluster-ip-range 198.19.0.0/16 \
  --enable-aggregator-routing=true >"$WORK/apiserver.log" 2>&1 &
pids+=($!)

cat >"$WORK/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: test
    cluster:
      server: https://127.0.0.1:$API_PORT
      insecure-skip-tls-verify: true
users:
  - name: admin
    user:
      token: $TOKEN
contexts:
  - name: test
    context: {cluster: test, user: admin}
current-context: test
EOF
export KUBECONFIG="$WORK/kubeconfig"
kubectl() { "$KUBE_BIN/kubectl" "$@"; }

ready=0
for _ in $(seq 1 120); do
  if kubectl get --raw /readyz >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.5
done
if [[ $ready != 1 ]]; then
  echo "chart-install: kube-apiserver did not become ready in 60 s; its log ends with:" >&2
  tail -20 "$WORK/apiserver.log" >&2
  exit 1
fi

passed=0
failed=0
check() {
  local name="$1" out
  shift
  if out="$("$@" 2>&1)"; then
    passed=$((passed + 1))
    echo "ok   $name"
  else
    failed=$((failed + 1))
    echo "FAIL $name"
    printf '%s\n' "$out" | sed 's/^/     /'
  fi
}

NS=meshlet-system
helm() { "$HELM" "$@"; }
ca_bundles() {
  kubectl get mutatingwebhookconfiguration meshlet-injector \
    -o jsonpath='{range .webhooks[*]}{.clientConfig.caBundle}{"\n"}{end}'
}
secret_ca() { kubectl -n "$NS" get secret meshlet-injector-tls -o jsonpath='{.data.ca\.crt}'; }

check "helm install (server-side validation of every object)" \
  helm install meshlet "$ROOT/charts/meshlet" -n "$NS" --create-namespace
check "injector objects exist" kubectl -n "$NS" get deployment/meshlet-injector service/meshlet-injector \
  secret/meshlet-injector-tls configmap/meshlet-config pdb/meshlet-injector role/meshlet-injector

bundle_matches_secret() {
  local ca
  ca="$(secret_ca)"
  [[ -n $ca ]] && [[ "$(ca_bundles | sort -u)" == "$ca" ]]
}
check "caBundle of both webhooks equals the Secret's ca.crt" bundle_matches_secret
before="$(ca_bundles)"

# --- selectors, as the API server evaluates them
pod() { # pod NS NAME [LABEL=VALUE]
  local labels=""
  [[ -n ${3:-} ]] && labels="  labels: {${3%%=*}: ${3#*=}}"
  kubectl create -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $2
  namespace: $1
$labels
spec:
  containers:
    - {name: app, image: registry.invalid/app:1}
EOF
}
# Namespaces get kubernetes.io/metadata.name from the API server; the default
# ServiceAccount comes from the controller-manager, which is not running.
for ns in meshed plain optout; do
  kubectl create namespace "$ns" >/dev/null
  kubectl -n "$ns" create serviceaccount default >/dev/null
done
for ns in kube-system "$NS"; do
  kubectl -n "$ns" create serviceaccount default >/dev/null 2>&1 || true
done
kubectl label namespace meshed meshlet.io/inject=enabled >/dev/null
kubectl label namespace optout meshlet.io/inject=disabled >/dev/null

calls() { # calls WEBHOOK NS NAME [LABEL] : creation is refused by that webhook
  local out
  if out="$(pod "$2" "$3" "${4:-}" 2>&1)"; then
    echo "pod $2/$3 was created, so the webhook $1 was not called"
    return 1
  fi
  grep -qF "failed calling webhook \"$1\"" <<<"$out" || {
    echo "refused, but not by $1: $out"
    return 1
  }
}
skips() { # skips NS NAME [LABEL] : created without calling any webhook
  pod "$@" >/dev/null
}
check "labelled namespace: pod goes to namespace.inject.meshlet.io" calls namespace.inject.meshlet.io meshed p1
check "labelled namespace: pod labelled disabled is skipped" skips meshed p2 meshlet.io/inject=disabled
check "unlabelled namespace: pod is skipped" skips plain p3
check "unlabelled namespace: pod labelled enabled goes to object.inject.meshlet.io" \
  calls object.inject.meshlet.io plain p4 meshlet.io/inject=enabled
check "namespace labelled disabled: pod labelled enabled is skipped" skips optout p5 meshlet.io/inject=enabled
kubectl label namespace kube-system "$NS" meshlet.io/inject=enabled --overwrite >/dev/null
check "kube-system is never injected, even labelled" skips kube-system p6 meshlet.io/inject=enabled
check "meshlet-system is never injected, even labelled" skips "$NS" p7 meshlet.io/inject=enabled

# --- upgrade keeps the CA and applies the change
check "helm upgrade --set webhook.failurePolicy=Ignore" \
  helm upgrade meshlet "$ROOT/charts/meshlet" -n "$NS" --reuse-values --set webhook.failurePolicy=Ignore
same_ca() {
  local after
  after="$(ca_bundles)"
  [[ -n $before && $after == "$before" ]] || {
    echo "caBundle changed on upgrade"
    return 1
  }
  bundle_matches_secret || {
    echo "caBundle differs from the Secret after upgrade"
    return 1
  }
}
check "helm upgrade reuses the webhook CA (lookup): caBundle unchanged" same_ca
policies() { [[ "$(kubectl get mutatingwebhookconfiguration meshlet-injector -o jsonpath='{.webhooks[*].failurePolicy}')" == "Ignore Ignore" ]]; }
check "the upgrade applied failurePolicy Ignore" policies
check "failurePolicy Ignore: pod in a labelled namespace starts unmeshed" skips meshed p8

# --- rotation: deleting the Secret makes the next upgrade issue a new CA
rotated() {
  kubectl -n "$NS" delete secret meshlet-injector-tls >/dev/null
  helm upgrade meshlet "$ROOT/charts/meshlet" -n "$NS" --reuse-values >/dev/null
  [[ "$(ca_bundles | sort -u)" != "$(sort -u <<<"$before")" ]] || {
    echo "caBundle unchanged after deleting the Secret"
    return 1
  }
  bundle_matches_secret
}
check "deleting the Secret + helm upgrade rotates the CA consistently" rotated

gone() {
  helm uninstall meshlet -n "$NS" >/dev/null
  ! kubectl get mutatingwebhookconfiguration meshlet-injector >/dev/null 2>&1 &&
    ! kubectl get clusterrole meshlet-injector >/dev/null 2>&1 &&
    ! kubectl -n "$NS" get secret meshlet-injector-tls >/dev/null 2>&1
}
check "helm uninstall removes the webhook, RBAC and Secret" gone

echo "chart-install: $passed passed, $failed failed"
[[ $failed == 0 ]]
