#!/usr/bin/env bash
# Tests tools/kube/cluster.sh against the real control plane it starts:
#   - a failed `up` (a bad kube-apiserver flag) prints the failing log and leaves
#     no process and no state behind
#   - cold `up` (timed), a second `up` says it is up, `status`, `env`
#   - kubectl talks to kube-apiserver v1.37.2 with the admin certificate
#   - TokenRequest + TokenReview: a token for audience meshlet authenticates as
#     system:serviceaccount:NS:SA for that audience; one for another audience does not
#   - a Deployment gets a ReplicaSet and Pending pods (no scheduler by design) with
#     the service-account token volume; namespaces get kube-root-ca.crt
#   - the Gateway API v1.6.3 standard CRDs install and accept an HTTPRoute
#   - a webhook Service resolves to its EndpointSlice address and the API server
#     reaches it through the egress socket (a fake node agent: egress_webhook.py);
#     so do an aggregated metrics.k8s.io APIService (with the front-proxy user)
#     and a Node's kubelet port (kubectl logs of a pod bound with pods/binding;
#     kubectl exec arrives as an SPDY/3.1 upgrade)
#   - helm install of charts/meshlet (when Helm can be had): with no injector pod,
#     pods in a labelled namespace are refused naming the webhook; helm uninstall
#     leaves no MutatingWebhookConfiguration
#   - `down` stops every process and removes the state dir
# Prints the cold-start time and each component's RSS. Needs root, Go (build.sh),
# openssl, python3 and ss. Ends with "kube: N passed, M failed".
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CLUSTER="$HERE/cluster.sh"
# Our own state dir, so a developer's cluster in target/kube-cluster is untouched.
export MESHLET_KUBE_DIR="$ROOT/target/kube-test-$$"
STATE="$MESHLET_KUBE_DIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/meshlet-kube-test.XXXXXX")"
helper_pid=""

[[ $(id -u) == 0 ]] || {
  echo "kube: run as root (cluster.sh runs the control plane as root)" >&2
  exit 1
}
for tool in openssl python3 ss; do
  command -v "$tool" >/dev/null || {
    echo "kube: $tool is missing; install it with: apt-get install -y openssl python3 iproute2" >&2
    exit 1
  }
done

cleanup() {
  if [[ -n $helper_pid ]]; then
    kill "$helper_pid" 2>/dev/null || true
    wait "$helper_pid" 2>/dev/null || true
  fi
  [[ -d $STATE ]] && "$CLUSTER" down >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT

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
    printf '%s\n' "$out" | tail -n 30 | sed 's/^/     /'
  fi
}

# pids_of_state: processes whose command line names the state dir (read-only look-up).
pids_of_state() { pgrep -f -- "$STATE/" || true; }

# --- a failed up cleans up after itself
failed_up() {
  local out
  if out="$(MESHLET_KUBE_APISERVER_ARGS="--no-such-flag-meshlet" "$CLUSTER" up 2>&1)"; then
    echo "up succeeded with a bad kube-apiserver flag"
    return 1
  fi
  grep -qF "last lines of kube-apiserver's log" <<<"$out" || {
    echo "no log tail of the failing component in: $out"
    return 1
  }
  grep -qF -- "no-such-flag-meshlet" <<<"$out" || {
    echo "the log tail does not show the bad flag: $out"
    return 1
  }
  [[ ! -e $STATE ]] || {
    echo "state dir $STATE remains after a failed up"
    return 1
  }
  [[ -z "$(pids_of_state)" ]] || {
    echo "processes remain after a failed up: $(pids_of_state)"
    return 1
  }
}
check "a failed up prints the failing log and leaves no process or state" failed_up

# --- cold up
t0=$EPOCHREALTIME
if ! "$CLUSTER" up; then
  echo "FAIL cluster.sh up"
  echo "kube: $passed passed, $((failed + 1)) failed"
  exit 1
fi
COLD_UP="$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
passed=$((passed + 1))
echo "ok   cold up in $COLD_UP s"
rss() { awk '/^VmRSS:/ { printf "%d MiB", $2 / 1024 }' "/proc/$(<"$STATE/$1.pid")/status"; }
IDLE_RSS=""
for c in etcd kube-apiserver kube-controller-manager; do IDLE_RSS+=" $c $(rss "$c"),"; done
eval "$("$CLUSTER" env)"
[[ -n ${KUBECONFIG:-} ]] || {
  echo "kube: cluster.sh env printed no KUBECONFIG" >&2
  exit 1
}

second_up() {
  local out
  out="$("$CLUSTER" up 2>&1)"
  grep -qF "already up" <<<"$out" || {
    echo "second up did not say it is up: $out"
    return 1
  }
}
check "a second up says the cluster is already up" second_up
check "status exits 0 with every component running" "$CLUSTER" status

real_kubectl() { [[ "$(command -v kubectl)" == */target/tools/kube-*/kubectl ]] || command -v kubectl; }
check "env puts the built kubectl first on PATH" real_kubectl
server_version() {
  local out
  out="$(kubectl version 2>&1)"
  grep -qx "Server Version: v1.37.2" <<<"$out" || {
    echo "$out"
    return 1
  }
}
check "kubectl version shows Server Version: v1.37.2" server_version
admin_all() { [[ "$(kubectl auth can-i '*' '*' --all-namespaces)" == yes ]]; }
check "the admin certificate is system:masters (can do anything)" admin_all

# --- service-account tokens
NS=kube-test
SA=meshlet-probe
kubectl create namespace "$NS" >/dev/null
kubectl -n "$NS" create serviceaccount "$SA" >/dev/null
token_review() { # token_review TOKEN AUDIENCE: prints "authenticated username audiences"
  kubectl create -o jsonpath='{.status.authenticated} {.status.user.username} {.status.audiences}' -f - <<EOF
apiVersion: authentication.k8s.io/v1
kind: TokenReview
spec:
  token: $1
  audiences: [$2]
EOF
}
meshlet_token() {
  local token out
  token="$(kubectl -n "$NS" create token "$SA" --audience meshlet --duration 10m)"
  out="$(token_review "$token" meshlet)"
  [[ $out == "true system:serviceaccount:$NS:$SA [\"meshlet\"]" ]] || {
    echo "TokenReview said: $out"
    return 1
  }
}
check "a token for audience meshlet authenticates as system:serviceaccount:$NS:$SA" meshlet_token
other_audience() {
  local token out
  token="$(kubectl -n "$NS" create token "$SA" --audience not-meshlet --duration 10m)"
  out="$(token_review "$token" meshlet)"
  [[ $out != true* ]] || {
    echo "a not-meshlet token authenticated for meshlet: $out"
    return 1
  }
  # The same token is fine for its own audience, so the refusal above is the audience.
  out="$(token_review "$token" not-meshlet)"
  [[ $out == "true system:serviceaccount:$NS:$SA"* ]] || {
    echo "not even valid for its own audience: $out"
    return 1
  }
}
check "a token for another audience is not authenticated for meshlet" other_audience

# --- controllers: Deployment -> ReplicaSet -> Pending pods
kubectl -n "$NS" create deployment web --image registry.invalid/web:1 --replicas 2 >/dev/null
pending_pods() {
  local i phases
  for ((i = 0; i < 100; i++)); do
    phases="$(kubectl -n "$NS" get pods -l app=web -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}')"
    [[ "$(grep -c '^Pending$' <<<"$phases")" == 2 ]] && break
    sleep 0.2
  done
  [[ "$(kubectl -n "$NS" get replicasets -l app=web -o name | wc -l)" == 1 ]] || {
    echo "no ReplicaSet for deployment web"
    return 1
  }
  [[ "$(grep -c '^Pending$' <<<"$phases")" == 2 ]] || {
    echo "pods of web: ${phases:-none}"
    return 1
  }
  [[ -z "$(kubectl -n "$NS" get pods -l app=web -o jsonpath='{.items[*].spec.nodeName}')" ]] || {
    echo "pods were bound to a node, but no scheduler runs"
    return 1
  }
}
check "a Deployment makes a ReplicaSet and 2 Pending, unbound pods" pending_pods
token_volume() {
  local vols
  vols="$(kubectl -n "$NS" get pods -l app=web -o jsonpath='{.items[0].spec.volumes[*].name}')"
  [[ $vols == *kube-api-access-* ]] || {
    echo "pod volumes: $vols"
    return 1
  }
}
check "pods get the projected service-account token volume" token_volume
check "the namespace gets the kube-root-ca.crt ConfigMap" \
  bash -c "for i in \$(seq 1 50); do kubectl -n $NS get configmap kube-root-ca.crt >/dev/null 2>&1 && exit 0; sleep 0.2; done; exit 1"

# --- Gateway API CRDs
gateway_crds() {
  "$CLUSTER" gateway-api standard
  kubectl get crd httproutes.gateway.networking.k8s.io >/dev/null
  [[ "$(kubectl get crd httproutes.gateway.networking.k8s.io \
    -o jsonpath='{.metadata.annotations.gateway\.networking\.k8s\.io/bundle-version}')" == v1.6.3 ]] || {
    echo "the HTTPRoute CRD is not from Gateway API v1.6.3"
    return 1
  }
  kubectl -n "$NS" create service clusterip web --tcp 80:8080 >/dev/null
  # A GAMMA route: parentRef is a Service.
  kubectl -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      timeouts: {request: 2s}
      backendRefs: [{name: web, port: 80}]
EOF
  [[ "$(kubectl -n "$NS" get httproute web -o jsonpath='{.spec.rules[0].timeouts.request}')" == 2s ]]
}
check "cluster.sh gateway-api: v1.6.3 standard CRDs established; an HTTPRoute on a Service is accepted" gateway_crds
cluster_ip() {
  local ip
  ip="$(kubectl -n "$NS" get service web -o jsonpath='{.spec.clusterIP}')"
  [[ $ip == 198.19.* ]] || {
    echo "ClusterIP $ip is outside 198.19.0.0/16"
    return 1
  }
}
check "ClusterIPs come from 198.19.0.0/16" cluster_ip

# --- webhooks through the egress socket
HOOK_NS=kube-test-hook
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/hook-ca.key"
openssl req -x509 -new -key "$WORK/hook-ca.key" -subj /CN=hook-ca -days 1 -out "$WORK/hook-ca.crt" 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/hook.key"
openssl req -new -key "$WORK/hook.key" -subj "/CN=hook.$HOOK_NS.svc" -out "$WORK/hook.csr" 2>/dev/null
printf 'subjectAltName=DNS:hook.%s.svc\nextendedKeyUsage=serverAuth\n' "$HOOK_NS" >"$WORK/hook.ext"
openssl x509 -req -in "$WORK/hook.csr" -CA "$WORK/hook-ca.crt" -CAkey "$WORK/hook-ca.key" -CAcreateserial \
  -days 1 -extfile "$WORK/hook.ext" -out "$WORK/hook.crt" 2>/dev/null
python3 "$HERE/egress_webhook.py" "$STATE/egress.sock" "$WORK/hook.crt" "$WORK/hook.key" \
  "$WORK/connects.log" 2>"$WORK/egress.log" &
helper_pid=$!
for _ in $(seq 1 50); do
  [[ -S $STATE/egress.sock ]] && break
  sleep 0.1
done
kubectl create namespace "$HOOK_NS" >/dev/null
kubectl label namespace "$HOOK_NS" kube-test/hook=on >/dev/null
# A Service without selector and an EndpointSlice at a pod address that exists
# nowhere on this host: only the egress socket can deliver the call.
kubectl -n "$HOOK_NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: hook}
spec:
  ports: [{name: https, port: 443, targetPort: 8443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: hook-1
  labels: {kubernetes.io/service-name: hook}
addressType: IPv4
ports: [{name: https, port: 8443, protocol: TCP}]
endpoints: [{addresses: [198.18.250.10], conditions: {ready: true}}]
---
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: kube-test-hook}
webhooks:
  - name: hook.kube-test.meshlet.io
    admissionReviewVersions: [v1]
    sideEffects: None
    failurePolicy: Fail
    timeoutSeconds: 5
    clientConfig:
      service: {name: hook, namespace: $HOOK_NS, port: 443}
      caBundle: $(base64 -w0 <"$WORK/hook-ca.crt")
    rules: [{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods]}]
    namespaceSelector: {matchLabels: {kube-test/hook: "on"}}
EOF
webhook_via_egress() {
  local i label=""
  # The API server's informers see the new EndpointSlice a moment later.
  for ((i = 0; i < 25; i++)); do
    kubectl -n "$HOOK_NS" delete pod p --ignore-not-found --wait=false >/dev/null 2>&1
    if kubectl -n "$HOOK_NS" run p --image registry.invalid/app:1 --restart Never >/dev/null 2>&1; then
      label="$(kubectl -n "$HOOK_NS" get pod p -o jsonpath='{.metadata.labels}')"
      break
    fi
    sleep 0.2
  done
  [[ $label == *'"meshlet-test/mutated":"yes"'* ]] || {
    echo "pod not mutated (labels '$label'); egress helper log:"
    cat "$WORK/egress.log"
    return 1
  }
  grep -qx "198.18.250.10:8443" "$WORK/connects.log" || {
    echo "the API server did not CONNECT to the EndpointSlice address; it asked for:"
    cat "$WORK/connects.log"
    return 1
  }
}
check "a webhook Service resolves to its endpoint and is reached via the egress socket" webhook_via_egress
kubectl delete mutatingwebhookconfiguration kube-test-hook >/dev/null

# The aggregation layer: an APIService for metrics.k8s.io behind a Service whose
# endpoint, again, only the egress socket can reach.
kubectl -n "$HOOK_NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: metrics}
spec:
  ports: [{name: https, port: 443, targetPort: 4443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: metrics-1
  labels: {kubernetes.io/service-name: metrics}
addressType: IPv4
ports: [{name: https, port: 4443, protocol: TCP}]
endpoints: [{addresses: [198.18.250.11], conditions: {ready: true}}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1beta1.metrics.k8s.io}
spec:
  group: metrics.k8s.io
  version: v1beta1
  service: {name: metrics, namespace: $HOOK_NS, port: 443}
  insecureSkipTLSVerify: true
  groupPriorityMinimum: 100
  versionPriority: 100
EOF
aggregated_metrics() {
  local i avail="" out
  for ((i = 0; i < 100; i++)); do
    avail="$(kubectl get apiservice v1beta1.metrics.k8s.io -o jsonpath='{.status.conditions[?(@.type=="Available")].status}')"
    [[ $avail == True ]] && break
    sleep 0.2
  done
  [[ $avail == True ]] || {
    kubectl get apiservice v1beta1.metrics.k8s.io -o jsonpath='{.status.conditions}'
    return 1
  }
  out="$(kubectl get --raw /apis/metrics.k8s.io/v1beta1)"
  [[ $out == *PodMetrics* ]] || {
    echo "discovery of metrics.k8s.io/v1beta1 said: $out"
    return 1
  }
  grep -qx "198.18.250.11:4443" "$WORK/connects.log" || {
    echo "no CONNECT to the metrics endpoint; connects: $(tr '\n' ' ' <"$WORK/connects.log")"
    return 1
  }
  grep -qF "get: /apis/metrics.k8s.io/v1beta1 user=meshlet-admin" "$WORK/egress.log" || {
    echo "the front proxy did not pass the user in X-Remote-User:"
    cat "$WORK/egress.log"
    return 1
  }
}
check "metrics.k8s.io via the aggregation layer: Available, served through the egress socket" aggregated_metrics

# A kubelet: a Node with an InternalIP and kubelet port, a pod bound to it (what
# the node agent does), then `kubectl logs` reaches the node through the socket.
kubelet_logs() {
  local out
  kubectl create -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata: {name: kube-test-node, labels: {kubernetes.io/hostname: kube-test-node}}
EOF
  kubectl patch node kube-test-node --subresource status --type merge -p \
    '{"status":{"addresses":[{"type":"InternalIP","address":"198.18.250.12"}],"daemonEndpoints":{"kubeletEndpoint":{"Port":10250}}}}' >/dev/null
  kubectl -n "$NS" run lp --image registry.invalid/app:1 --restart Never >/dev/null
  kubectl create -f - >/dev/null <<EOF
apiVersion: v1
kind: Binding
metadata: {name: lp, namespace: $NS}
target: {apiVersion: v1, kind: Node, name: kube-test-node}
EOF
  [[ "$(kubectl -n "$NS" get pod lp -o jsonpath='{.spec.nodeName}')" == kube-test-node ]] || {
    echo "the Binding did not set spec.nodeName"
    return 1
  }
  out="$(kubectl -n "$NS" logs lp 2>&1)"
  [[ $out == "hello from the fake kubelet" ]] || {
    echo "kubectl logs said: $out"
    return 1
  }
  grep -qx "198.18.250.12:10250" "$WORK/connects.log" || {
    echo "no CONNECT to the node's InternalIP:10250; connects: $(tr '\n' ' ' <"$WORK/connects.log")"
    return 1
  }
}
check "pods/binding to a Node, then kubectl logs reaches its kubelet port via the egress socket" kubelet_logs
# kubectl speaks WebSocket to the API server, which asks the kubelet for SPDY/3.1
# with the channel protocols: what the node agent's exec server must accept.
exec_upgrade() {
  local out
  if out="$(kubectl -n "$NS" exec lp -- echo hi 2>&1)"; then
    echo "exec succeeded against a fake kubelet that refuses it: $out"
    return 1
  fi
  grep -qF "post: /exec/$NS/lp/lp upgrade=SPDY/3.1 protocols=v5.channel.k8s.io,v4.channel.k8s.io" "$WORK/egress.log" || {
    echo "the kubelet did not get the SPDY exec upgrade; kubectl said: $out"
    cat "$WORK/egress.log"
    return 1
  }
}
check "kubectl exec reaches the node as POST /exec/NS/POD/CONTAINER, Upgrade SPDY/3.1, v5.channel.k8s.io" exec_upgrade
kill "$helper_pid" 2>/dev/null || true
wait "$helper_pid" 2>/dev/null || true
helper_pid=""

# --- the chart, if Helm can be had
HELM=""
if [[ -r $ROOT/scripts/tools.sh && -d $ROOT/charts/meshlet ]]; then
  HELM="$(bash "$ROOT/scripts/tools.sh" ensure_helm 2>"$WORK/helm.log")" || HELM=""
fi
if [[ -n $HELM ]]; then
  check "helm install charts/meshlet" "$HELM" install meshlet "$ROOT/charts/meshlet" \
    -n meshlet-system --create-namespace
  kubectl create namespace kube-test-meshed >/dev/null
  kubectl label namespace kube-test-meshed meshlet.io/inject=enabled >/dev/null
  refused_by_webhook() {
    local out
    if out="$(kubectl -n kube-test-meshed run p --image registry.invalid/app:1 --restart Never 2>&1)"; then
      echo "pod created in a labelled namespace with no injector running"
      return 1
    fi
    grep -qF 'failed calling webhook "namespace.inject.meshlet.io"' <<<"$out" || {
      echo "refused, but not naming the webhook: $out"
      return 1
    }
  }
  check "no injector pod: a pod in a labelled namespace is refused naming the webhook" refused_by_webhook
  uninstalled() {
    "$HELM" uninstall meshlet -n meshlet-system >/dev/null
    [[ -z "$(kubectl get mutatingwebhookconfigurations -o name)" ]] || {
      kubectl get mutatingwebhookconfigurations
      return 1
    }
    # The API server drops the webhook from its informer a moment later.
    local i
    for ((i = 0; i < 25; i++)); do
      kubectl -n kube-test-meshed run p --image registry.invalid/app:1 --restart Never >/dev/null 2>&1 && return 0
      sleep 0.2
    done
    kubectl -n kube-test-meshed run p --image registry.invalid/app:1 --restart Never
  }
  check "helm uninstall leaves no MutatingWebhookConfiguration; pods are admitted again" uninstalled
else
  echo "skip helm cases: no Helm ($(tail -1 "$WORK/helm.log" 2>/dev/null || echo 'scripts/tools.sh missing'))"
fi

# --- measurements
echo "kube: cold up $COLD_UP s"
echo "kube: RSS right after up:${IDLE_RSS%,}"
busy=""
for c in etcd kube-apiserver kube-controller-manager; do busy+=" $c $(rss "$c"),"; done
echo "kube: RSS after the cases above (CRDs, chart):${busy%,}"

# --- down
started="$(pids_of_state | tr '\n' ' ')"
ports="$(grep -E '^(API|ETCD|ETCD_PEER)_PORT=' "$STATE/cluster.env" | cut -d= -f2 | tr '\n' ' ')"
all_gone() {
  local pid p
  "$CLUSTER" down
  for pid in $started; do
    # A zombie waiting for its new parent to reap it has exited.
    [[ ! -d /proc/$pid || "$(awk '/^State:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)" == Z ]] || {
      echo "pid $pid still runs: $(tr '\0' ' ' <"/proc/$pid/cmdline")"
      return 1
    }
  done
  [[ -z "$(pids_of_state)" ]] || {
    echo "processes naming $STATE remain: $(pids_of_state)"
    return 1
  }
  [[ ! -e $STATE ]] || {
    echo "$STATE remains"
    return 1
  }
  for p in $ports; do
    ! ss -Hltn "sport = :$p" | grep -q . || {
      echo "port $p still listens"
      return 1
    }
  done
}
check "down stops every process (${started% }), frees the ports and removes the state dir" all_gone
check "status after down exits non-zero" bash -c "! '$CLUSTER' status"

echo "kube: $passed passed, $failed failed"
[[ $failed == 0 ]]
