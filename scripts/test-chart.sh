#!/usr/bin/env bash
# Tests of charts/meshlet without a cluster:
#   - helm lint --strict with the defaults and every ci/*.yaml value set
#   - helm template with every value set (plus a user-provided certificate and
#     an old cluster version), then scripts/chart_assert.py on the output
#   - every rendered object validated with kubernetes-validate --strict
#     against Kubernetes 1.29.0 and 1.33.0
#   - bad value sets must be refused, by the schema or by _validate.tpl, with
#     the expected message
#   - NOTES.txt carries the three user steps
#   - golden files of each ci/ render (charts/meshlet/golden/, generated
#     certificates masked); UPDATE_GOLDEN=1 rewrites them
#   - the real meshlet-injector (cargo build -p meshlet-injector, or
#     MESHLET_INJECTOR_BIN) started with the rendered args and certificate:
#     /readyz and /healthz over TLS for meshlet-injector.<ns>.svc, and one
#     /mutate whose sidecar must follow the values
# Installs what it needs through scripts/tools.sh (Helm 4 built from
# tools/helm, a venv with kubernetes-validate). Ends with
# "chart: N passed, M failed" and exits non-zero when M > 0.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/tools.sh
source "$ROOT/scripts/tools.sh"

CHART="$ROOT/charts/meshlet"
NS=meshlet-system
KUBE_VERSIONS=(1.29.0 1.33.0)

HELM="$(ensure_helm)"
PY="$(ensure_python)"
KV="$(ensure_validator)"
command -v openssl >/dev/null || {
  echo "chart: openssl is missing; install it with: apt-get install -y openssl" >&2
  exit 1
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/meshlet-chart.XXXXXX")"
INJ_PID=""
cleanup() {
  if [[ -n $INJ_PID ]]; then
    kill "$INJ_PID" 2>/dev/null || true
    wait "$INJ_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

passed=0
failed=0

# Runs a command; its output is shown only when it fails.
check() {
  local name="$1"
  shift
  local out
  if out="$("$@" 2>&1)"; then
    passed=$((passed + 1))
    echo "ok   $name"
  else
    failed=$((failed + 1))
    echo "FAIL $name"
    printf '%s\n' "$out" | sed 's/^/     /'
  fi
}

render() { # render OUT [helm template args...]
  local out="$1"
  shift
  "$HELM" template meshlet "$CHART" --namespace "$NS" "$@" >"$out"
}

# kubernetes-validate only warns about kinds it has no schema for; the only
# such kinds the chart may render are cert-manager's, which chart_assert.py
# checks instead. Any other warning (a misspelt apiVersion) is a failure.
validate() { # validate FILE KUBE_VERSION
  local out rc=0
  out="$("$KV" --strict --quiet -k "$2" "$1" 2>&1)" || rc=$?
  printf '%s\n' "$out"
  [[ $rc == 0 ]] || return 1
  if printf '%s\n' "$out" | grep -v "Couldn't find schema for kind \(Certificate\|Issuer\) with api version cert-manager.io/v1" | grep -q .; then
    echo "unexpected validator output (see above)"
    return 1
  fi
}

expect_refused() { # expect_refused "MESSAGE" [helm template args...]
  local want="$1" out
  shift
  if out="$("$HELM" template meshlet "$CHART" --namespace "$NS" "$@" 2>&1)"; then
    echo "rendered although it should have been refused with: $want"
    return 1
  fi
  if ! grep -qF -- "$want" <<<"$out"; then
    printf 'refused, but without the expected message %q:\n%s\n' "$want" "$out"
    return 1
  fi
}

# --- values.yaml and schema agree, every key documented
check "values.yaml keys match values.schema.json, carry '# --' docs and are in README.md" "$PY" "$ROOT/scripts/chart_assert.py" values "$CHART"

# --- lint
check "helm lint --strict (defaults)" "$HELM" lint --strict --namespace "$NS" "$CHART"
for f in "$CHART"/ci/*.yaml; do
  check "helm lint --strict -f ci/$(basename "$f")" "$HELM" lint --strict --namespace "$NS" -f "$f" "$CHART"
done

# --- a user-provided certificate (generated here: keys are never committed)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
  -subj /CN=test-ca -keyout "$WORK/ca.key" -out "$WORK/ca.crt" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=meshlet-injector.$NS.svc \
  -keyout "$WORK/tls.key" -out "$WORK/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:meshlet-injector.%s.svc\nextendedKeyUsage=serverAuth\n' "$NS" >"$WORK/ext.cnf"
openssl x509 -req -in "$WORK/tls.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" -CAcreateserial \
  -days 30 -extfile "$WORK/ext.cnf" -out "$WORK/tls.crt" 2>/dev/null
printf 'webhook:\n  tls:\n    caCert: |\n%s\n    cert: |\n%s\n    key: |\n%s\n' \
  "$(sed 's/^/      /' "$WORK/ca.crt")" "$(sed 's/^/      /' "$WORK/tls.crt")" "$(sed 's/^/      /' "$WORK/tls.key")" \
  >"$WORK/user-tls-values.yaml"
# An old cluster: native sidecars must be off under nativeSidecar=auto.
printf '{}\n' >"$WORK/old-cluster-values.yaml"

# --- render, assert, validate
for f in "$CHART"/ci/*.yaml "$WORK/user-tls-values.yaml" "$WORK/old-cluster-values.yaml"; do
  name="$(basename "$f" .yaml)"
  kube=1.33.0
  [[ $name == old-cluster-values ]] && kube=1.28.0
  out="$WORK/$name.rendered.yaml"
  if ! check "helm template -f $name (kube $kube)" render "$out" -f "$f" --kube-version "$kube"; then
    continue
  fi
  check "assertions on $name" "$PY" "$ROOT/scripts/chart_assert.py" render "$CHART" "$out" "$f" --kube-version "$kube"
  if [[ $f == "$CHART"/ci/* ]]; then
    check "golden render of $name (UPDATE_GOLDEN=1 rewrites)" \
      "$PY" "$ROOT/scripts/chart_assert.py" golden "$out" "$CHART/golden/$name.yaml"
  fi
  [[ $name == old-cluster-values ]] && continue
  for k in "${KUBE_VERSIONS[@]}"; do
    # Render for the version it is validated against (nativeSidecar=auto and
    # anything else that reads Capabilities follow it).
    out_k="$WORK/$name.$k.yaml"
    render "$out_k" -f "$f" --kube-version "$k"
    n="$(grep -c '^kind:' "$out_k")"
    check "kubernetes-validate --strict -k $k: $name ($n objects)" validate "$out_k" "$k"
  done
done

# The validator must catch an unknown field, or the checks above prove nothing.
sed 's/^  revisionHistoryLimit: 3$/  revisionHistoryLimit: 3\n  replicaz: 2/' "$WORK/default-values.1.33.0.yaml" >"$WORK/bad-field.yaml"
validator_refuses() {
  grep -q replicaz "$1" && ! "$KV" --strict --quiet -k 1.33.0 "$1" >/dev/null 2>&1
}
check "kubernetes-validate --strict refuses an unknown Deployment field" validator_refuses "$WORK/bad-field.yaml"

# Two renders without a cluster generate two different CAs (lookup finds no
# Secret); on a real upgrade lookup returns the stored one (tests/e2e/kind.sh).
differ() { ! cmp -s <(grep "ca.crt:" "$1") <(grep "ca.crt:" "$2"); }
check "each render without a cluster generates a fresh CA" \
  differ "$WORK/default-values.1.29.0.yaml" "$WORK/default-values.1.33.0.yaml"

# --- bad values are refused with a message that says what to fix
check "schema refuses injector.replicas=0" expect_refused "at '/injector/replicas': minimum" --set injector.replicas=0
check "_validate refuses injector.replicas=0 without the schema" \
  expect_refused "injector.replicas is 0; it must be at least 1" --set injector.replicas=0 --skip-schema-validation
check "schema refuses an unknown key" expect_refused "additional properties 'replica' not allowed" --set injector.replica=2
check "schema refuses failurePolicy=Sometimes" expect_refused "/webhook/failurePolicy" --set webhook.failurePolicy=Sometimes
check "schema refuses timeoutSeconds=31" expect_refused "/webhook/timeoutSeconds" --set webhook.timeoutSeconds=31
check "schema refuses tlsMode=mutual" expect_refused "/proxy/tlsMode" --set proxy.tlsMode=mutual
check "schema refuses nativeSidecar=maybe" expect_refused "/proxy/nativeSidecar" --set proxy.nativeSidecar=maybe
check "schema refuses defaultInboundPolicy=open" expect_refused "/defaultInboundPolicy" --set defaultInboundPolicy=open
check "_validate refuses certManager together with a user CA" \
  expect_refused "webhook.certManager.enabled=true and webhook.tls.* are both set" \
  --set webhook.certManager.enabled=true -f "$WORK/user-tls-values.yaml"
check "_validate refuses a partial user certificate" \
  expect_refused "webhook.tls needs all of caCert, cert and key" --set-file webhook.tls.cert="$WORK/tls.crt"
check "_validate refuses a CA that is not PEM" \
  expect_refused "webhook.tls.caCert is not a PEM certificate" -f "$WORK/user-tls-values.yaml" --set webhook.tls.caCert=oops
check "_validate refuses a PDB that blocks drains (replicas=1)" \
  expect_refused "injector.podDisruptionBudget.minAvailable (1) must be lower than injector.replicas (1)" --set injector.replicas=1
check "_validate refuses a ClusterIssuer without a name" \
  expect_refused "issuerRef.kind=ClusterIssuer needs webhook.certManager.issuerRef.name" \
  --set webhook.certManager.enabled=true --set webhook.certManager.issuerRef.kind=ClusterIssuer
check "replicas=1 renders once the PDB is off" render "$WORK/single.yaml" --set injector.replicas=1 --set injector.podDisruptionBudget.enabled=false

# --- the real meshlet-injector, started with the args and the certificate the
# chart renders: the flags exist, the certificate serves the Service's DNS name
# and verifies against the Secret's CA (= caBundle), the probe paths answer, and
# a pod gets the sidecar the values describe.
INJECTOR_BIN="${MESHLET_INJECTOR_BIN:-$ROOT/target/debug/meshlet-injector}"
injector_built() {
  [[ -n ${MESHLET_INJECTOR_BIN:-} ]] || (cd "$ROOT" && cargo build -q -p meshlet-injector)
  [[ -x $INJECTOR_BIN ]]
}
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
injector_serves() { # injector_serves RENDERED VALUES KUBE_VERSION
  local dir port host=meshlet-injector.$NS.svc uid args=() ok=0
  dir="$(mktemp -d "$WORK/inj.XXXXXX")"
  port="$(free_port)"
  mapfile -d '' args < <("$PY" "$ROOT/scripts/chart_assert.py" args "$1" "$dir" "$port")
  "$INJECTOR_BIN" "${args[@]}" >"$dir/log" 2>&1 &
  INJ_PID=$!
  local curl_tls=(curl -sS --fail -m 5 --cacert "$dir/ca.crt" --resolve "$host:$port:127.0.0.1")
  for _ in $(seq 1 100); do
    if "${curl_tls[@]}" -o /dev/null "https://$host:$port/readyz" 2>/dev/null; then
      ok=1
      break
    fi
    kill -0 "$INJ_PID" 2>/dev/null || break
    sleep 0.1
  done
  if [[ $ok == 1 ]] && "${curl_tls[@]}" -o /dev/null "https://$host:$port/healthz"; then
    uid="$("$PY" -c 'import uuid; print(uuid.uuid4())')"
    printf '%s' '{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"'"$uid"'",
      "kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},
      "namespace":"demo","operation":"CREATE","userInfo":{"username":"test"},
      "object":{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web","namespace":"demo"},
      "spec":{"containers":[{"name":"app","image":"registry.invalid/app:1","ports":[{"containerPort":8080}]}]}}}}' \
      >"$dir/review.json"
    if "${curl_tls[@]}" -H 'content-type: application/json' --data-binary "@$dir/review.json" \
      -o "$dir/response.json" "https://$host:$port/mutate"; then
      "$PY" "$ROOT/scripts/chart_assert.py" mutate "$CHART" "$dir/response.json" "$2" "$uid" --kube-version "$3" || ok=0
    else
      ok=0
    fi
  else
    echo "meshlet-injector did not serve /readyz and /healthz over TLS for $host; its output:"
    ok=0
  fi
  kill "$INJ_PID" 2>/dev/null || true
  wait "$INJ_PID" 2>/dev/null || true
  INJ_PID=""
  [[ $ok == 1 ]] || {
    sed 's/^/  injector: /' "$dir/log"
    return 1
  }
}
if check "meshlet-injector builds (cargo build -p meshlet-injector)" injector_built; then
  check "meshlet-injector runs with the chart's args: default values" \
    injector_serves "$WORK/default-values.1.33.0.yaml" "$CHART/ci/default-values.yaml" 1.33.0
  check "meshlet-injector runs with the chart's args: custom values" \
    injector_serves "$WORK/custom-values.1.33.0.yaml" "$CHART/ci/custom-values.yaml" 1.33.0
  check "meshlet-injector runs with the chart's args: kube 1.28 (no native sidecar)" \
    injector_serves "$WORK/old-cluster-values.rendered.yaml" "$WORK/old-cluster-values.yaml" 1.28.0
fi

# --- NOTES.txt: the three user steps (install --dry-run=client needs no cluster)
notes() {
  local out
  out="$(KUBECONFIG=/nonexistent "$HELM" install meshlet "$CHART" --namespace "$NS" --dry-run=client 2>&1)"
  for want in "kubectl label namespace NS meshlet.io/inject=enabled" \
    "kubectl rollout restart deployment -n NS" \
    "kubectl get pods -n NS -o jsonpath=" \
    "kubectl top pod -n NS --containers"; do
    grep -qF -- "$want" <<<"$out" || {
      printf 'NOTES lack %q:\n%s\n' "$want" "$out"
      return 1
    }
  done
}
check "NOTES.txt lists label, rollout restart and check steps" notes

echo "chart: $passed passed, $failed failed"
[[ $failed == 0 ]]
