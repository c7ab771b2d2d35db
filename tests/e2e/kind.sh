#!/usr/bin/env bash
# The user's story on a real cluster: kind + Docker.
#
#   tests/e2e/kind.sh            # create cluster, build, install, mesh, test
#   KEEP_CLUSTER=1 tests/e2e/kind.sh   # leave the cluster running afterwards
#
# NOT RUN IN CI: CI machines have no container engine. It is for developers
# with Docker, kind (>= 0.23), kubectl and either helm 3.14+/4 on PATH or Go
# (scripts/tools.sh builds Helm 4). It needs the internet for the base images,
# curl and metrics-server. The CI equivalent is the network-namespace
# mini-cluster in tests/e2e (cargo test -p meshlet-e2e).
#
# Steps: build both images (and the sample's testapp image), kind load them,
# helm install meshlet into meshlet-system, check that helm upgrade keeps the
# webhook CA, apply samples/hello.yaml unmeshed, label the namespace, rollout
# restart, check every pod got meshlet-proxy, send traffic from a client pod,
# show the sidecar's /metrics and `kubectl top pod --containers`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER="${KIND_CLUSTER:-meshlet-e2e}"
TAG="${TAG:-e2e}"
NS=hello
SYSTEM_NS=meshlet-system
CURL_IMAGE=docker.io/curlimages/curl:8.11.1
METRICS_SERVER_URL=https://github.com/kubernetes-sigs/metrics-server/releases/download/v0.7.2/components.yaml
KUBECTL=(kubectl --context "kind-$CLUSTER")

step() { printf '\n=== %s\n' "$*"; }
die() {
  echo "kind.sh: $*" >&2
  exit 1
}

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || die "$tool is missing; install it (https://kind.sigs.k8s.io/docs/user/quick-start/)"
done
HELM="${HELM:-$(command -v helm || true)}"
[[ -n $HELM ]] || HELM="$("$ROOT/scripts/tools.sh" ensure_helm)"

cleanup() {
  local rc=$?
  if [[ $rc != 0 ]]; then
    echo "kind.sh: failed (exit $rc); injector logs:" >&2
    "${KUBECTL[@]}" -n "$SYSTEM_NS" logs deploy/meshlet-injector --tail=50 >&2 || true
  fi
  if [[ ${KEEP_CLUSTER:-0} != 1 ]]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  else
    echo "cluster kind-$CLUSTER kept (KEEP_CLUSTER=1); delete it with: kind delete cluster --name $CLUSTER"
  fi
}
trap cleanup EXIT

step "cluster kind-$CLUSTER"
if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s
fi

step "build images (tag $TAG)"
docker build -f "$ROOT/Dockerfile.proxy" -t "meshlet-proxy:$TAG" "$ROOT"
docker build -f "$ROOT/Dockerfile.injector" -t "meshlet-injector:$TAG" "$ROOT"
# The sample's workloads run meshlet-testapp (tests/e2e); a throw-away image.
docker build -t "meshlet-testapp:$TAG" -f - "$ROOT" <<'DOCKERFILE'
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p meshlet-e2e --bin meshlet-testapp
FROM docker.io/library/debian:12.12-slim
COPY --from=build /src/target/release/meshlet-testapp /usr/local/bin/meshlet-testapp
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/meshlet-testapp"]
DOCKERFILE
for img in meshlet-proxy meshlet-injector meshlet-testapp; do
  kind load docker-image --name "$CLUSTER" "$img:$TAG"
done

step "helm install meshlet"
"$HELM" upgrade --install meshlet "$ROOT/charts/meshlet" \
  --kube-context "kind-$CLUSTER" -n "$SYSTEM_NS" --create-namespace \
  --set proxy.image.repository=meshlet-proxy --set proxy.image.tag="$TAG" \
  --set injector.image.repository=meshlet-injector --set injector.image.tag="$TAG" \
  --wait --timeout 5m
"${KUBECTL[@]}" -n "$SYSTEM_NS" rollout status deployment/meshlet-injector --timeout=120s

step "helm upgrade keeps the webhook CA (lookup of the existing Secret)"
ca_bundle() {
  "${KUBECTL[@]}" get mutatingwebhookconfiguration meshlet-injector \
    -o jsonpath='{.webhooks[0].clientConfig.caBundle}'
}
before="$(ca_bundle)"
"$HELM" upgrade meshlet "$ROOT/charts/meshlet" --kube-context "kind-$CLUSTER" -n "$SYSTEM_NS" \
  --reuse-values --wait --timeout 5m
after="$(ca_bundle)"
secret_ca="$("${KUBECTL[@]}" -n "$SYSTEM_NS" get secret meshlet-injector-tls -o jsonpath='{.data.ca\.crt}')"
[[ -n $before && $before == "$after" ]] || die "caBundle changed on helm upgrade"
[[ $after == "$secret_ca" ]] || die "caBundle differs from ca.crt in Secret meshlet-injector-tls"
echo "caBundle unchanged and equal to the Secret's ca.crt"

step "sample app, not meshed yet"
# kind's Service CIDR is not the sample's 198.19.0.0/16, so the fixed
# ClusterIPs go; the namespace starts opted out so that the label step below
# is the one that turns injection on, as it would for a user.
sed -e '/^  clusterIP: /d' \
  -e "s|meshlet-testapp:latest|meshlet-testapp:$TAG|" \
  -e 's|meshlet.io/inject: enabled|meshlet.io/inject: disabled|' \
  "$ROOT/samples/hello.yaml" | "${KUBECTL[@]}" apply -f -
"${KUBECTL[@]}" -n "$NS" rollout status deployment --timeout=180s

step "1. label the namespace"
"${KUBECTL[@]}" label namespace "$NS" meshlet.io/inject=enabled --overwrite

step "2. rollout restart"
"${KUBECTL[@]}" rollout restart deployment -n "$NS"
"${KUBECTL[@]}" rollout status deployment -n "$NS" --timeout=300s

step "3. every pod has meshlet-proxy"
containers="$("${KUBECTL[@]}" get pods -n "$NS" --field-selector=status.phase=Running \
  -o jsonpath='{range .items[*]}{.metadata.name}{"\t"}{.spec.initContainers[*].name} {.spec.containers[*].name}{"\n"}{end}')"
echo "$containers"
if grep -v 'meshlet-proxy' <<<"$containers" | grep -q .; then
  die "pods without meshlet-proxy (see above)"
fi

step "traffic from a client pod"
"${KUBECTL[@]}" -n "$NS" delete pod curl --ignore-not-found --wait=true
"${KUBECTL[@]}" -n "$NS" run curl --image="$CURL_IMAGE" --restart=Never --command -- sleep 600
"${KUBECTL[@]}" -n "$NS" wait --for=condition=Ready pod/curl --timeout=120s
# shellcheck disable=SC2016 # the loop is expanded by the pod's shell
codes="$("${KUBECTL[@]}" -n "$NS" exec curl -c curl -- sh -c \
  'for i in $(seq 1 50); do curl -sS -m 5 -o /dev/null -w "%{http_code}\n" http://backend.hello.svc/; done')"
sort <<<"$codes" | uniq -c
ok="$(grep -c '^200$' <<<"$codes" || true)"
[[ $ok == 50 ]] || die "only $ok of 50 requests returned 200"

step "sidecar /metrics (backend-v1)"
pod="$("${KUBECTL[@]}" -n "$NS" get pods -l app=backend,version=v1 -o jsonpath='{.items[0].metadata.name}')"
metrics="$("${KUBECTL[@]}" get --raw "/api/v1/namespaces/$NS/pods/$pod:15020/proxy/metrics")"
grep -E '^meshlet_(requests_total|request_duration_seconds_count|tcp_connections_opened_total)' <<<"$metrics" | head -20
grep -q '^meshlet_requests_total' <<<"$metrics" || die "the sidecar exports no meshlet_requests_total"

step "kubectl top pod --containers (metrics-server)"
if ! "${KUBECTL[@]}" get apiservice v1beta1.metrics.k8s.io >/dev/null 2>&1; then
  "${KUBECTL[@]}" apply -f "$METRICS_SERVER_URL"
  # kind's kubelets serve self-signed certificates.
  "${KUBECTL[@]}" -n kube-system patch deployment metrics-server --type=json \
    -p '[{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--kubelet-insecure-tls"}]'
  "${KUBECTL[@]}" -n kube-system rollout status deployment/metrics-server --timeout=180s
fi
# The first scrape takes up to a minute; bounded retries.
for _ in $(seq 1 12); do
  if "${KUBECTL[@]}" top pod -n "$NS" --containers 2>/dev/null; then
    break
  fi
  sleep 10
done

step "done: meshlet works on kind-$CLUSTER"
