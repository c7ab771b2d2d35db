#!/usr/bin/env bash
# The AuthorizationPolicy CRD (charts/meshlet/crds/) against a real kube-apiserver
# (v1.37.2 from tools/kube): it installs and becomes Established; valid policies of
# every target kind are accepted; each invalid policy is refused by the schema or a CEL
# rule with the message a user acts on; the Accepted printer column reads the status.
# Needs root and the control plane binaries (tools/kube/build.sh builds them once).
#
#   scripts/test-authz-crd.sh          (MESHLET_KUBE_DIR picks the state dir)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export MESHLET_KUBE_DIR="${MESHLET_KUBE_DIR:-$ROOT/target/authz-crd-$$}"
CRD="$ROOT/charts/meshlet/crds/authorizationpolicies.policy.meshlet.io.yaml"
passed=0
failed=0

[[ "$(id -u)" == 0 ]] || { echo "authz-crd: run as root (tools/kube/cluster.sh runs the control plane)" >&2; exit 1; }
cleanup() { tools/kube/cluster.sh down >/dev/null 2>&1 || echo "authz-crd: cluster.sh down failed; state in $MESHLET_KUBE_DIR" >&2; }
trap cleanup EXIT

tools/kube/cluster.sh up >/dev/null
eval "$(tools/kube/cluster.sh env)"

ok() { passed=$((passed + 1)); echo "ok   $1"; }
bad() { failed=$((failed + 1)); echo "FAIL $1"; printf '%s\n' "${2:-}" | tail -n 20 | sed 's/^/     /'; }

policy() { # name, spec (YAML lines, indented 2)
  printf 'apiVersion: policy.meshlet.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: %s, namespace: shop}\nspec:\n%s\n' "$1" "$2"
}
accepts() { # name, spec
  local out
  if out="$(policy "$1" "$2" | kubectl apply -f - 2>&1)"; then ok "accepts $1"; else bad "accepts $1" "$out"; fi
}
refuses() { # name, expected message, spec
  local out
  if out="$(policy "$1" "$3" | kubectl apply -f - 2>&1)"; then
    bad "refuses $1" "accepted: $out"
  elif grep -qF -- "$2" <<<"$out"; then
    ok "refuses $1: $2"
  else
    bad "refuses $1 (message)" "$out"
  fi
}

if out="$(kubectl apply -f "$CRD" 2>&1 && kubectl wait --for=condition=Established crd/authorizationpolicies.policy.meshlet.io --timeout=60s 2>&1)"; then
  ok "CRD installs and is Established"
else
  bad "CRD installs" "$out"
fi
kubectl create namespace shop >/dev/null

accepts service-target '  targetRefs: [{group: "", kind: Service, name: cart}]
  action: ALLOW
  rules:
    - sources:
        - {type: ServiceAccount, serviceAccount: {name: frontend}}
        - {type: ServiceAccount, serviceAccount: {namespace: ops, name: "*"}}
        - {type: SPIFFE, spiffe: "spiffe://cluster.local/ns/shop/sa/web"}
      networkAttributes: {ports: [8080, 9090]}'
accepts namespace-target '  targetRefs: [{kind: Namespace}]
  action: ALLOW
  rules: [{}]'
accepts pod-selector '  targetRefs: [{kind: Pod, selector: {matchLabels: {app: cart}, matchExpressions: [{key: tier, operator: NotIn, values: [canary]}]}}]
  action: ALLOW'
accepts all-pods '  targetRefs: [{kind: Pod, selector: {}}]
  action: ALLOW
  rules: [{sources: []}]'

refuses deny-action 'Unsupported value: "DENY"' '  targetRefs: [{kind: Namespace}]
  action: DENY'
refuses no-targets 'spec.targetRefs: Invalid value' '  targetRefs: []
  action: ALLOW'
refuses selector-on-service 'Selector may only be set when targeting Pods.' '  targetRefs: [{kind: Service, name: cart, selector: {}}]
  action: ALLOW'
refuses pod-without-selector 'a Pod target needs a selector' '  targetRefs: [{kind: Pod}]
  action: ALLOW'
refuses pod-with-others 'a Pod target must be the only entry of targetRefs' '  targetRefs: [{kind: Pod, selector: {}}, {kind: Namespace}]
  action: ALLOW'
refuses service-without-name 'a Service target needs the name of a Service' '  targetRefs: [{kind: Service}]
  action: ALLOW'
refuses other-namespace 'a Namespace target is the policy'"'"'s own namespace' '  targetRefs: [{kind: Namespace, name: kube-system}]
  action: ALLOW'
refuses gateway-kind 'kind must be Service, Namespace or Pod' '  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: g}]
  action: ALLOW'
refuses spiffe-without-path 'spiffe source must start with spiffe:// and include at least /' '  targetRefs: [{kind: Namespace}]
  action: ALLOW
  rules: [{sources: [{type: SPIFFE, spiffe: "spiffe://cluster.local"}]}]'
refuses mixed-source 'type SPIFFE needs the spiffe field' '  targetRefs: [{kind: Namespace}]
  action: ALLOW
  rules: [{sources: [{type: SPIFFE, serviceAccount: {name: web}}]}]'
refuses bad-sa-name 'serviceAccount.name must be a service account name' '  targetRefs: [{kind: Namespace}]
  action: ALLOW
  rules: [{sources: [{type: ServiceAccount, serviceAccount: {name: "Web_1"}}]}]'
refuses port-zero 'should be greater than or equal to 1' '  targetRefs: [{kind: Namespace}]
  action: ALLOW
  rules: [{networkAttributes: {ports: [0]}}]'
refuses in-without-values 'operators In and NotIn need values' '  targetRefs: [{kind: Pod, selector: {matchExpressions: [{key: app, operator: In}]}}]
  action: ALLOW'

# What a controller writes: the Accepted condition shows in `kubectl get`.
if out="$(kubectl -n shop patch authorizationpolicy service-target --subresource=status --type=merge \
  -p '{"status":{"conditions":[{"type":"Accepted","status":"False","reason":"TargetNotFound","message":"spec.targetRefs[0]: Service shop/cart does not exist","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}' 2>&1)" &&
  out="$(kubectl -n shop get authorizationpolicy service-target 2>&1)" && grep -Eq 'service-target +ALLOW +False' <<<"$out"; then
  ok "status subresource and printer columns"
else
  bad "status subresource and printer columns" "$out"
fi

echo "authz-crd: $passed passed, $failed failed"
[[ $failed == 0 ]]
