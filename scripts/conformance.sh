#!/usr/bin/env bash
# make conformance: the Gateway API's own mesh conformance suite
# (sigs.k8s.io/gateway-api/conformance, pinned in tools/conformance/go.mod), unmodified,
# against meshlet on the project's real control plane (kube-apiserver, etcd and
# controller-manager v1.37.2 from tools/kube; meshlet-node runs the pods as
# processes in network namespaces; the chart installs meshlet as in demo-k8s).
#
# Profile MESH-HTTP with the extended features listed in FEATURES below. The
# suite's ConformanceReport goes to $CONFORMANCE_REPORT (default
# conformance/meshlet-report.yaml), its go test output to target/conformance/.
# Everything it starts is stopped and removed at the end, also on failure.
#
#   CONFORMANCE_RUN_TEST=MeshBasic   run one test of the suite only
#   CONFORMANCE_ARGS="..."           more flags for the suite (e.g. -debug)
#   MESHLET_KUBE_DIR                 control plane state (default target/kube-conformance)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

[ "$(id -u)" -eq 0 ] || { echo "conformance: run as root (network namespaces, iptables)" >&2; exit 1; }

# Why each feature is claimed: what implements it (proxy/src/route.rs is the
# matching engine; the controller compiles HTTPRoutes into the mesh config).
# Mesh and HTTPRoute are the profile's core and implied by it.
FEATURES=(
  MeshClusterIPMatching                          # routes apply to the Service's ClusterIP: the proxy routes by original destination
  MeshConsumerRoute                              # consumer routes (client's namespace) before producer routes
  MeshHTTPRouteRewritePath                       # URLRewrite full path and prefix
  MeshHTTPRouteSchemeRedirect                    # RequestRedirect scheme
  MeshHTTPRouteRedirectPort                      # RequestRedirect port
  MeshHTTPRouteRedirectPath                      # RequestRedirect path
  MeshHTTPRouteBackendRequestHeaderModification  # RequestHeaderModifier on a backendRef
  MeshHTTPRouteQueryParamMatching                # query parameter Exact and RegularExpression
  MeshHTTPRouteNamedRouteRule                    # named rules
  # HTTPRoute features that mesh tests outside the MESH-HTTP report also need:
  HTTPRouteResponseHeaderModification            # MeshFrontend, MeshPorts, MeshConsumerRoute
  HTTPRouteParentRefPort                         # MeshPorts: a route bound to one Service port
  HTTPRoute303RedirectStatusCode
  HTTPRoute307RedirectStatusCode
  HTTPRoute308RedirectStatusCode
)
# The label that turns sidecar injection on (meshlet-injector); the suite puts it on
# every namespace it creates (gateway-conformance-mesh, -mesh-consumer).
INJECT_LABEL="meshlet.io/inject=enabled"

export MESHLET_KUBE_DIR="${MESHLET_KUBE_DIR:-$root/target/kube-conformance}"
report="${CONFORMANCE_REPORT:-$root/conformance/meshlet-report.yaml}"
out="$root/target/conformance"
bin="$root/target/debug"
version=$(awk -F'"' '/^version = / { print $2; exit }' Cargo.toml)
mkdir -p "$out" "$(dirname "$report")"
work=$(mktemp -d /tmp/meshlet-conformance.XXXXXX)
node_pid=""

step() { printf '\n== %s ==\n' "$*"; }

# shellcheck disable=SC2317 # runs from the EXIT trap
cleanup() {
  local rc=$?
  set +e
  step "cleanup"
  if [ -n "$node_pid" ] && kill -0 "$node_pid" 2>/dev/null; then
    kill -TERM "$node_pid"
    for _ in $(seq 1 150); do kill -0 "$node_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$node_pid" 2>/dev/null
    wait "$node_pid" 2>/dev/null
  fi
  cp "$work/node.log" "$out/node.log" 2>/dev/null
  # An agent killed before it finished leaves its namespaces (named by its pid): ours.
  if [ -n "$node_pid" ]; then
    for ns in $(ip netns list 2>/dev/null | awk -v p="mlnode-$node_pid-" 'index($1, p) == 1 { print $1 }'); do
      for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
      ip netns del "$ns" 2>/dev/null
    done
  fi
  bash tools/kube/cluster.sh down >/dev/null 2>&1
  left=$(ip netns list 2>/dev/null | grep -c "^mlnode-${node_pid:-none}-" || true)
  rm -rf "$work"
  echo "node agent stopped, control plane down, $left network namespaces left; logs in $out"
  exit "$rc"
}
trap cleanup EXIT

step "build: meshlet binaries, meshlet-echo, the conformance suite"
for b in meshlet-node meshlet-proxy meshlet-init meshlet-injector meshlet-echo; do
  [ -x "$bin/$b" ] || { echo "conformance: $bin/$b missing: run \`make build\` (cargo build --workspace --bins)" >&2; exit 1; }
done
suite="$(bash tools/conformance/build.sh)/conformance.test"
helm=$(bash scripts/tools.sh ensure_helm)

step "control plane and the Gateway API CRDs"
bash tools/kube/cluster.sh up >"$work/up.log" 2>&1 || { cat "$work/up.log"; exit 1; }
eval "$(bash tools/kube/cluster.sh env)"
bash tools/kube/cluster.sh gateway-api standard

step "node agent (stands in for kubelet and kube-proxy)"
"$bin/meshlet-node" --cluster-env "$MESHLET_KUBE_DIR/cluster.env" --name node-1 \
  --state-dir "$work/node" >"$work/node.log" 2>&1 &
node_pid=$!
for _ in $(seq 1 300); do kubectl get node node-1 >/dev/null 2>&1 && break; sleep 0.2; done
kubectl wait --for=condition=Ready node/node-1 --timeout=60s

step "install meshlet (helm)"
"$helm" install meshlet charts/meshlet -n meshlet-system --create-namespace --wait --timeout 180s

step "the suite: MESH-HTTP, features: ${FEATURES[*]}"
features=$(IFS=,; echo "${FEATURES[*]}")
args=(
  -test.run '^TestConformance$' -test.v -test.timeout 60m
  -conformance-profiles=MESH-HTTP
  -supported-features="$features"
  -namespace-labels="$INJECT_LABEL"
  -report-output="$report"
  -organization=meshlet -project=meshlet -url=https://example.invalid/meshlet
  -version="v$version" -contact=https://example.invalid/meshlet/issues
)
[ -n "${CONFORMANCE_RUN_TEST:-}" ] && args+=(-run-test="$CONFORMANCE_RUN_TEST")
# shellcheck disable=SC2206 # extra flags are split on spaces on purpose
[ -n "${CONFORMANCE_ARGS:-}" ] && args+=($CONFORMANCE_ARGS)
set +e
# The suite reads its manifests from the binary; its working directory only
# matters for relative paths in flags.
(cd "$out" && "$suite" "${args[@]}") 2>&1 | tee "$out/suite.log"
rc=${PIPESTATUS[0]}
set -e
step "result (go test exit $rc)"
if [ -f "$report" ]; then
  sed -n '/^profiles:/,$p' "$report"
  echo "report: $report"
else
  echo "no report written (the suite stopped before its cleanup wrote one)"
fi
grep -E '^\s*--- (FAIL|PASS|SKIP): TestConformance/[A-Za-z0-9]+ ' "$out/suite.log" | grep -v SKIP || true
exit "$rc"
