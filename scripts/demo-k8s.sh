#!/usr/bin/env bash
# make demo-k8s: the user's story against a real Kubernetes control plane on this
# machine. Real: kube-apiserver, kube-controller-manager and etcd v1.37.2 (built from
# source by tools/kube), admission webhooks, TokenRequest, the aggregation layer,
# kubectl and Helm 4. Standing in: meshlet-node (tests/e2e) does the kubelet's and
# kube-proxy's work, running each pod in its own network namespace and each
# container as a process. Everything it starts is stopped and removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

[ "$(id -u)" -eq 0 ] || { echo "demo-k8s: run as root (network namespaces, iptables)" >&2; exit 1; }

export MESHLET_KUBE_DIR="$root/target/kube-demo"
bin="$root/target/debug"
work=$(mktemp -d /tmp/meshlet-demo-k8s.XXXXXX)
node_pid=""

step() { printf '\n== %s ==\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

cleanup() {
  set +e
  step "cleanup"
  if [ -n "$node_pid" ] && kill -0 "$node_pid" 2>/dev/null; then
    kill -TERM "$node_pid"
    for _ in $(seq 1 100); do kill -0 "$node_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$node_pid" 2>/dev/null
  fi
  bash tools/kube/cluster.sh down >/dev/null 2>&1
  left=$(ip netns list 2>/dev/null | grep -c "^mlnode-${node_pid:-none}-" || true)
  rm -rf "$work"
  echo "node agent stopped, control plane down, $left network namespaces left"
}
trap cleanup EXIT

step "control plane (real kube-apiserver, controller-manager, etcd)"
bash tools/kube/cluster.sh up >"$work/up.log" 2>&1 || { cat "$work/up.log"; exit 1; }
eval "$(bash tools/kube/cluster.sh env)"
helm=$(bash scripts/tools.sh ensure_helm)
show kubectl version | grep -i server
# The Gateway API CRDs (pinned in tools/gateway-api): HTTPRoutes on Services steer the mesh.
bash tools/kube/cluster.sh gateway-api standard >"$work/crds.log" 2>&1 || { cat "$work/crds.log"; exit 1; }

step "node agent (stands in for kubelet and kube-proxy)"
"$bin/meshlet-node" --cluster-env "$MESHLET_KUBE_DIR/cluster.env" --name node-1 \
  --state-dir "$work/node" >"$work/node.log" 2>&1 &
node_pid=$!
# kubectl wait fails at once on a Node that does not exist yet: wait for it first.
for _ in $(seq 1 300); do kubectl get node node-1 >/dev/null 2>&1 && break; sleep 0.2; done
kubectl wait --for=condition=Ready node/node-1 --timeout=60s >/dev/null
show kubectl get nodes -o wide

step "1. install meshlet"
# No DNS here: the injector Service gets a pinned ClusterIP, which the chart
# hands to the proxies as the identity issuer's address.
show "$helm" install meshlet charts/meshlet -n meshlet-system --create-namespace --set injector.service.clusterIP=198.19.0.12 --wait --timeout 120s
show kubectl -n meshlet-system get pods

step "2. a namespace labelled meshlet.io/inject=enabled, and the sample app"
show kubectl apply -f samples/hello.yaml
kubectl -n hello wait --for=condition=Ready pod --all --timeout=120s >/dev/null
show kubectl -n hello get pods -o custom-columns='POD:.metadata.name,INIT:.spec.initContainers[*].name,CONTAINERS:.spec.containers[*].name,IP:.status.podIP'

step "identities: each sidecar made its key, sent a CSR with its projected token, and the injector signed it after a TokenReview"
show kubectl -n meshlet-system get secret meshlet-identity-ca
for p in $(kubectl -n hello get pods -l 'app!=legacy' -o jsonpath='{.items[*].metadata.name}'); do
  printf '  %s: ' "$p"
  kubectl -n hello logs "$p" -c meshlet-proxy | grep -m1 'mesh identity loaded' | grep -o 'id=[^ ]*' || echo "(no identity)"
done

step "3. rollout restart: new pods are injected again by the webhook"
show kubectl -n hello rollout restart deployment/backend-v1
show kubectl -n hello rollout status deployment/backend-v1 --timeout=120s

step "traffic from the client pod to the backend Service, through both sidecars"
client=$(kubectl -n hello get pods -l app=client -o jsonpath='{.items[0].metadata.name}')
svc_ip=$(kubectl -n hello get svc backend -o jsonpath='{.spec.clusterIP}')
echo "(no kubectl exec yet: the request is sent from inside the client pod's network namespace)"
for i in $(seq 1 20); do
  ip netns exec "mlnode-$node_pid-hello.$client" curl -sS -m 5 -o /dev/null -w '%{http_code} ' "http://$svc_ip/demo/$i"
done
echo
backend=$(kubectl -n hello get pods -l app=backend -o jsonpath='{.items[0].status.podIP}')
echo "what one backend's sidecar counted (GET $backend:15020/metrics, requests by status):"
ip netns exec "mlnode-$node_pid-hello.$client" curl -sS -m 5 "http://$backend:15020/metrics" |
  grep '^meshlet_requests_total' | sed 's/^/  /' || echo "  (none yet: the round robin sent this pod nothing)"

step "4. an HTTPRoute on Service backend: 'version: v2' to backend-v2, the rest to backend-v1 (no restart)"
show kubectl apply -f samples/hello-route.yaml
ask() { ip netns exec "mlnode-$node_pid-hello.$client" curl -sS -m 5 -o /dev/null -w '%header{x-testapp-name} ' "$@" "http://$svc_ip/"; }
# The sidecars get the route from the controller within a second or so: wait for it.
for _ in $(seq 1 100); do ask -H 'version: v2' | grep -q backend-v2 && break; sleep 0.1; done
printf 'version: v2 -> '; for i in 1 2 3 4 5; do ask -H 'version: v2'; done; echo
printf 'no header   -> '; for i in 1 2 3 4 5; do ask; done; echo
kubectl wait -n hello httproute/backend-by-version --for=condition=ResolvedRefs=True --timeout=30s >/dev/null 2>&1 || true
echo '$ kubectl -n hello get httproute backend-by-version -o yaml   (status)'
kubectl -n hello get httproute backend-by-version -o jsonpath='{range .status.parents[*]}controllerName: {.controllerName}{"\n"}{range .conditions[*]}  {.type}={.status} reason={.reason} observedGeneration={.observedGeneration}{"\n"}{end}{end}'
echo "a route to a Service that does not exist is accepted, its refs are not resolved:"
printf 'apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: backend-missing, namespace: hello}\nspec:\n  parentRefs: [{group: "", kind: Service, name: backend, port: 80}]\n  rules: [{matches: [{headers: [{name: version, value: v3}]}], backendRefs: [{name: backend-v3, port: 80}]}]\n' | kubectl apply -f -
kubectl wait -n hello httproute/backend-missing --for=condition=ResolvedRefs=False --timeout=30s >/dev/null 2>&1 || true
kubectl -n hello get httproute backend-missing -o jsonpath='{range .status.parents[0].conditions[*]}  {.type}={.status} reason={.reason}: {.message}{"\n"}{end}'
show kubectl -n hello delete httproute backend-by-version backend-missing
for _ in $(seq 1 100); do ask | grep -q backend-v2 && break; sleep 0.1; done
printf 'no header after delete -> '; for i in 1 2 3 4 5 6; do ask; done; echo

step "5. helm upgrade keeps the webhook's CA and the identity CA"
ca_before=$(kubectl get mutatingwebhookconfigurations -o jsonpath='{.items[*].webhooks[0].clientConfig.caBundle}' | sha256sum | cut -c1-16)
id_before=$(kubectl -n meshlet-system get secret meshlet-identity-ca -o jsonpath='{.data.tls\.crt}' | sha256sum | cut -c1-16)
show "$helm" upgrade meshlet charts/meshlet -n meshlet-system --reuse-values --set injector.logLevel=debug --wait --timeout 120s | grep -E '^(\$|Release|STATUS|REVISION)'
ca_after=$(kubectl get mutatingwebhookconfigurations -o jsonpath='{.items[*].webhooks[0].clientConfig.caBundle}' | sha256sum | cut -c1-16)
id_after=$(kubectl -n meshlet-system get secret meshlet-identity-ca -o jsonpath='{.data.tls\.crt}' | sha256sum | cut -c1-16)
echo "webhook caBundle sha256 $ca_before -> $ca_after; identity CA sha256 $id_before -> $id_after"
show kubectl -n hello rollout restart deployment/backend-v2
show kubectl -n hello rollout status deployment/backend-v2 --timeout=120s
show kubectl -n hello get pods -l version=v2 -o custom-columns='POD:.metadata.name,INIT:.spec.initContainers[*].name,INJECTED:.metadata.annotations.meshlet\.io/status'

step "kubectl top pod --containers (app vs meshlet-proxy)"
for _ in $(seq 1 30); do
  if kubectl -n hello top pod --containers >"$work/top" 2>/dev/null && grep -q meshlet-proxy "$work/top"; then break; fi
  sleep 1
done
cat "$work/top"

step "helm uninstall leaves no webhook behind"
show "$helm" uninstall meshlet -n meshlet-system --wait
show kubectl get mutatingwebhookconfigurations
