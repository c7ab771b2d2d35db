#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for meshlet's tests: etcd,
# kube-apiserver and kube-controller-manager (v1.37.2, built by build.sh), run as
# root with everything (certificates, etcd data, logs, pids) under one state dir.
#
#   tools/kube/cluster.sh up       start it (idempotent); waits for /readyz and
#                                  for the default ServiceAccount
#   tools/kube/cluster.sh down     stop every process it started, remove the state dir
#   tools/kube/cluster.sh restart apiserver [SECONDS]
#                                  stop kube-apiserver, keep it down SECONDS, start it
#                                  again with the same flags (fault tests)
#   tools/kube/cluster.sh status   exit 0 when every component runs and /readyz is ok
#   tools/kube/cluster.sh env      print `export KUBECONFIG=... PATH=...` for eval
#   tools/kube/cluster.sh gateway-api [standard|experimental]
#                                  install the Gateway API CRDs pinned in tools/gateway-api
#
# State dir: $MESHLET_KUBE_DIR, default <repo>/target/kube-cluster. Ports are
# picked free at `up` (override with MESHLET_KUBE_API_PORT, MESHLET_KUBE_ETCD_PORT,
# MESHLET_KUBE_ETCD_PEER_PORT) and written to <state>/cluster.env, which the node
# agent reads. MESHLET_KUBE_GOGC sets the components' GOGC (default 50);
# MESHLET_KUBE_APISERVER_ARGS adds kube-apiserver flags (split on spaces), e.g.
# feature gates. No scheduler and no kubelet run: pods stay Pending until the
# node agent binds and runs them. All traffic stays on 127.0.0.1.
#
# How the API server reaches webhooks, aggregated APIs (metrics.k8s.io) and
# kubelets (pods/exec, logs) without leaving loopback: with
# --enable-aggregator-routing=true it resolves a Service to an EndpointSlice
# address for webhooks too (cmd/kube-apiserver/app/server.go buildServiceResolver),
# and endpoint addresses may not be loopback. So every connection of the egress
# type "cluster" is sent as HTTP CONNECT <endpoint ip>:<port> over the unix socket
# <state>/egress.sock (--egress-selector-config-file); whoever owns the pod
# network namespaces (the node agent) listens there and dials inside them. No
# listener means such calls fail at once with "connection refused" (a webhook
# with failurePolicy Fail then refuses the request, naming the webhook).
# Webhooks given by `url:` use the "controlplane" egress, which dials directly.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
STATE="${MESHLET_KUBE_DIR:-$ROOT/target/kube-cluster}"
# Absolute: the path is how `alive` recognises our processes by their command line.
STATE="$(realpath -m "$STATE")"
VERSION=v1.37.2
SERVICE_CIDR=198.19.0.0/16
# The first address of the Service range: the ClusterIP of default/kubernetes.
KUBERNETES_SVC_IP=198.19.0.1
ISSUER=https://kubernetes.default.svc.cluster.local
# The marker makes `down` refuse to delete a directory this script did not make.
MARKER=.meshlet-kube-cluster
COMPONENTS=(etcd kube-apiserver kube-controller-manager)
GRACE_SECONDS="${MESHLET_KUBE_GRACE_SECONDS:-10}"
READY_TIMEOUT_SECONDS="${MESHLET_KUBE_READY_TIMEOUT_SECONDS:-120}"

log() { echo "kube: $*" >&2; }
die() {
  log "$*"
  exit 1
}

usage() {
  cat >&2 <<EOF
usage: tools/kube/cluster.sh up|down|status|env|restart apiserver [SECONDS]|gateway-api [standard|experimental]
  state dir: $STATE (set MESHLET_KUBE_DIR to change it)
EOF
  exit 64
}

now() { echo "$EPOCHREALTIME"; }
# since START: seconds elapsed since START (an EPOCHREALTIME), one decimal.
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# alive NAME: the recorded pid runs and is ours. The state dir is in every
# command line we start, so a recycled pid of an unrelated process never matches.
alive() {
  local pidfile="$STATE/$1.pid" pid
  [[ -r $pidfile ]] || return 1
  pid="$(<"$pidfile")"
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$STATE/" || return 1
  # A zombie (exited, not yet reaped) is not running.
  [[ "$(awk '/^State:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)" != Z ]]
}

kube_bin() {
  local dir
  dir="$("$HERE/build.sh")" || die "tools/kube/build.sh failed; it needs Go 1.26 (https://go.dev/dl)"
  echo "$dir"
}

# The Helm binary scripts/tools.sh builds, if it was built (never built here).
helm_dir() {
  local sum="$ROOT/tools/helm/go.sum" dir
  [[ -r $sum ]] || return 1
  dir="$ROOT/target/tools/helm-$(sha256sum "$sum" | cut -c1-16)"
  [[ -x $dir/helm ]] && echo "$dir"
}

port_free() { ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

# A port the kernel reports free now, from the ephemeral range's neighbourhood.
free_port() {
  local p _
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    return
  fi
  for _ in $(seq 1 50); do
    p=$((20000 + RANDOM % 12000))
    if port_free "$p"; then
      echo "$p"
      return
    fi
  done
  die "found no free TCP port on 127.0.0.1 in 50 tries"
}

# pick VAR: the value of VAR if set (it must be free), else a free port.
pick_port() {
  local want="${!1:-}"
  if [[ -n $want ]]; then
    [[ $want =~ ^[0-9]+$ ]] || die "$1=$want is not a port number"
    port_free "$want" || die "$1=$want: port $want is already in use on this host; pick another or unset $1"
    echo "$want"
  else
    free_port
  fi
}

# http_ok HOST PORT PATH: plain HTTP GET answers 200 (etcd's /health), without curl.
http_ok() {
  local reply
  # shellcheck disable=SC2016 # the inner bash expands them
  reply="$(timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2" && printf "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$3" "$1" >&3 && head -1 <&3' _ "$@" 2>/dev/null)" || return 1
  [[ $reply == *" 200 "* ]]
}

# --- certificates ------------------------------------------------------------

# cert NAME CN O SANS EKU [CA]: EC P-256 key + certificate signed by CA (default ca).
cert() {
  local name="$1" cn="$2" org="$3" sans="$4" eku="$5" ca="${6:-ca}" subj ext
  local dir="$STATE/pki"
  subj="/CN=$cn"
  [[ -n $org ]] && subj="/O=$org$subj"
  ext="$dir/$name.ext"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [[ -n $sans ]] && echo "subjectAltName=$sans"
  } >"$ext"
  openssl ecparam -name prime256v1 -genkey -noout -out "$dir/$name.key" 2>/dev/null
  openssl req -new -key "$dir/$name.key" -subj "$subj" -out "$dir/$name.csr" 2>/dev/null
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/$ca.crt" -CAkey "$dir/$ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$ext" -out "$dir/$name.crt" 2>/dev/null
  rm -f "$dir/$name.csr" "$ext"
}

ca() { # ca NAME CN
  local dir="$STATE/pki"
  openssl ecparam -name prime256v1 -genkey -noout -out "$dir/$1.key" 2>/dev/null
  openssl req -x509 -new -key "$dir/$1.key" -subj "/CN=$2" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$dir/$1.crt" 2>/dev/null
}

make_pki() {
  local dir="$STATE/pki"
  mkdir -p "$dir"
  chmod 700 "$dir"
  ca ca meshlet-kube-ca
  ca front-proxy-ca meshlet-kube-front-proxy-ca
  cert apiserver kube-apiserver "" \
    "IP:127.0.0.1,IP:$KUBERNETES_SVC_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
    serverAuth
  # The API server's client certificate towards kubelets (pods/exec, logs, metrics).
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters "" clientAuth
  # The aggregation layer's client certificate towards extension API servers;
  # its CN must be in --requestheader-allowed-names.
  cert front-proxy-client front-proxy-client "" "" clientAuth front-proxy-ca
  cert admin meshlet-admin system:masters "" clientAuth
  cert controller-manager system:kube-controller-manager "" "" clientAuth
  # Service-account tokens: RS256, which every verifier understands.
  openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
  rm -f "$dir"/*.srl
}

# kubeconfig FILE CERTNAME
kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: meshlet
    cluster:
      server: https://127.0.0.1:$API_PORT
      certificate-authority: $STATE/pki/ca.crt
users:
  - name: $2
    user:
      client-certificate: $STATE/pki/$2.crt
      client-key: $STATE/pki/$2.key
contexts:
  - name: meshlet
    context: {cluster: meshlet, user: $2}
current-context: meshlet
EOF
}

# --- processes ---------------------------------------------------------------

# start NAME MEMLIMIT CMD...: in its own session, so that it outlives this script and
# a Ctrl-C in the caller's terminal. A soft Go heap limit and GOGC=50 keep RSS
# modest: measured with the Gateway API CRDs loaded, kube-apiserver holds 294 MiB
# instead of 332 MiB at GOGC=100 for the same CPU; GOGC=25 saves 25 MiB more
# but costs 50 % more CPU and 2 s of start-up.
start() {
  local name="$1" mem="$2"
  shift 2
  # 9>&-: the lock must not outlive this script in the children.
  GOMEMLIMIT="$mem" GOGC="${MESHLET_KUBE_GOGC:-50}" setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$STATE/$name.pid"
}

# stop NAME: SIGTERM, then SIGKILL after the grace period.
stop() {
  local name="$1" pid i
  alive "$name" || {
    rm -f "$STATE/$name.pid"
    return 0
  }
  pid="$(<"$STATE/$name.pid")"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < GRACE_SECONDS * 10; i++)); do
    alive "$name" || break
    sleep 0.1
  done
  if alive "$name"; then
    log "$name (pid $pid) ignored SIGTERM for ${GRACE_SECONDS}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      alive "$name" || break
      sleep 0.1
    done
  fi
  rm -f "$STATE/$name.pid"
}

stop_all() {
  local i
  # Reverse start order: clients before the store they write to.
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    stop "${COMPONENTS[i]}"
  done
}

remove_state() {
  [[ -d $STATE ]] || return 0
  [[ -e $STATE/$MARKER ]] || die "$STATE exists but was not made by cluster.sh (no $MARKER); remove it yourself or set MESHLET_KUBE_DIR"
  rm -rf "$STATE"
}

# wait_for NAME WHAT CHECK...: poll CHECK every 0.2 s while NAME runs, up to the timeout.
wait_for() {
  local name="$1" what="$2" deadline
  shift 2
  deadline=$((SECONDS + READY_TIMEOUT_SECONDS))
  while ((SECONDS < deadline)); do
    # A subshell: a signal trapped while a function check runs with its output
    # silenced would otherwise silence the cleanup's messages too.
    ("$@") >/dev/null 2>&1 && return 0
    alive "$name" || {
      FAILED="$name"
      die "$name exited while waiting for $what"
    }
    sleep 0.2
  done
  FAILED="$name"
  die "timed out after ${READY_TIMEOUT_SECONDS}s waiting for $what"
}

all_alive() {
  local c
  for c in "${COMPONENTS[@]}"; do alive "$c" || return 1; done
}

kctl() { "$KUBE_BIN/kubectl" --kubeconfig "$STATE/kubeconfig" "$@"; }

# --- commands ----------------------------------------------------------------

FAILED=""
UP_DONE=0
on_up_exit() {
  local rc=$?
  ((UP_DONE == 1)) && return 0
  local c show=("${COMPONENTS[@]}")
  [[ -n $FAILED ]] && show=("$FAILED")
  # Interrupted: the logs hold no error worth showing.
  ((rc == 130 || rc == 143)) && show=()
  for c in "${show[@]}"; do
    if [[ -s $STATE/$c.log ]]; then
      log "last lines of $c's log ($STATE/$c.log):"
      tail -n 25 "$STATE/$c.log" | sed 's/^/    /' >&2
    fi
  done
  log "up failed (exit $rc); stopping what was started and removing $STATE"
  stop_all
  remove_state || true
}

# start_apiserver: kube-apiserver with the ports of cluster.env (also on `restart`).
start_apiserver() {
  local pki="$STATE/pki" extra=()
  read -ra extra <<<"${APISERVER_ARGS:-}"
  start kube-apiserver 256MiB "$KUBE_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --secure-port "$API_PORT" --advertise-address 127.0.0.1 \
    --endpoint-reconciler-type none --cert-dir "$STATE/apiserver-certs" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --service-account-issuer "$ISSUER" --api-audiences "$ISSUER" \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged=true \
    --enable-aggregator-routing=true \
    --requestheader-client-ca-file "$pki/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$pki/front-proxy-client.crt" --proxy-client-key-file "$pki/front-proxy-client.key" \
    --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP,Hostname \
    --egress-selector-config-file "$STATE/egress-selector.yaml" \
    --max-requests-inflight 200 --max-mutating-requests-inflight 100 --profiling=false \
    "${extra[@]}"
}

cmd_up() {
  local t0 t
  t0="$(now)"
  KUBE_BIN="$(kube_bin)"
  if [[ -d $STATE ]]; then
    if all_alive && kctl get --raw /readyz >/dev/null 2>&1; then
      # shellcheck disable=SC1091
      source "$STATE/cluster.env"
      log "cluster is already up at $API_URL (state $STATE)"
      return 0
    fi
    log "stale state in $STATE (a component is down); cleaning it up first"
    stop_all
    remove_state
  fi
  [[ $(id -u) == 0 ]] || die "run as root (the node agent that joins this cluster needs root for network namespaces)"
  command -v openssl >/dev/null || die "openssl is missing; install it with: apt-get install -y openssl"
  command -v ss >/dev/null || die "ss is missing; install it with: apt-get install -y iproute2"

  # sun_path holds 108 bytes; the node agent could not bind a longer socket path.
  ((${#STATE} + 12 <= 107)) || die "state dir path $STATE is too long for a unix socket in it; set a shorter MESHLET_KUBE_DIR"
  mkdir -p "$STATE"
  touch "$STATE/$MARKER"
  trap on_up_exit EXIT
  # Turn signals into an exit, so that the EXIT trap cleans up on Ctrl-C too.
  trap 'exit 130' INT
  trap 'exit 143' TERM

  APISERVER_ARGS="${MESHLET_KUBE_APISERVER_ARGS:-}"
  ETCD_PORT="$(pick_port MESHLET_KUBE_ETCD_PORT)"
  ETCD_PEER_PORT="$(pick_port MESHLET_KUBE_ETCD_PEER_PORT)"
  API_PORT="$(pick_port MESHLET_KUBE_API_PORT)"
  API_URL="https://127.0.0.1:$API_PORT"
  [[ $ETCD_PORT != "$ETCD_PEER_PORT" && $ETCD_PORT != "$API_PORT" && $ETCD_PEER_PORT != "$API_PORT" ]] ||
    die "ports collide: etcd $ETCD_PORT, etcd peer $ETCD_PEER_PORT, apiserver $API_PORT"

  t="$(now)"
  make_pki
  log "certificates in $STATE/pki ($(since "$t") s)"
  kubeconfig "$STATE/kubeconfig" admin
  kubeconfig "$STATE/controller-manager.kubeconfig" controller-manager
  cat >"$STATE/egress-selector.yaml" <<EOF
apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
  - name: cluster
    connection:
      proxyProtocol: HTTPConnect
      transport:
        uds:
          udsName: $STATE/egress.sock
  - name: controlplane
    connection:
      proxyProtocol: Direct
  - name: etcd
    connection:
      proxyProtocol: Direct
EOF
  cat >"$STATE/cluster.env" <<EOF
# Written by tools/kube/cluster.sh up; KEY=VALUE, one a line, no quoting.
KUBE_VERSION=$VERSION
KUBE_BIN=$KUBE_BIN
API_URL=$API_URL
API_PORT=$API_PORT
ETCD_URL=http://127.0.0.1:$ETCD_PORT
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
KUBECONFIG=$STATE/kubeconfig
CA_CERT=$STATE/pki/ca.crt
CA_KEY=$STATE/pki/ca.key
FRONT_PROXY_CA_CERT=$STATE/pki/front-proxy-ca.crt
KUBELET_CLIENT_CERT=$STATE/pki/apiserver-kubelet-client.crt
SA_PUBLIC_KEY=$STATE/pki/sa.pub
SA_ISSUER=$ISSUER
SERVICE_CIDR=$SERVICE_CIDR
KUBERNETES_SVC_IP=$KUBERNETES_SVC_IP
EGRESS_SOCKET=$STATE/egress.sock
EOF
  # Kept for `restart`, outside cluster.env: flags may hold spaces.
  printf '%s\n' "$APISERVER_ARGS" >"$STATE/apiserver.args"

  t="$(now)"
  # fsync off: a test store, thrown away on `down`, on a shared 2-core machine.
  start etcd 128MiB "$KUBE_BIN/etcd" --name meshlet --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "meshlet=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --quota-backend-bytes $((512 * 1024 * 1024)) --log-level warn
  wait_for etcd "etcd /health on 127.0.0.1:$ETCD_PORT" http_ok 127.0.0.1 "$ETCD_PORT" /health
  log "etcd healthy on 127.0.0.1:$ETCD_PORT ($(since "$t") s)"

  t="$(now)"
  start_apiserver
  wait_for kube-apiserver "kube-apiserver /readyz on $API_URL" kctl get --raw /readyz
  log "kube-apiserver ready on $API_URL ($(since "$t") s after start)"
  local pki="$STATE/pki"

  t="$(now)"
  start kube-controller-manager 128MiB "$KUBE_BIN/kube-controller-manager" \
    --kubeconfig "$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
    --cluster-name meshlet --service-cluster-ip-range "$SERVICE_CIDR" \
    --controllers '*,-node-lifecycle-controller,-taint-eviction-controller,-device-taint-eviction-controller,-node-ipam-controller'
  wait_for kube-controller-manager "the default ServiceAccount in namespace default" \
    kctl -n default get serviceaccount default
  log "kube-controller-manager made default/default ($(since "$t") s)"

  UP_DONE=1
  trap - EXIT INT TERM
  log "cluster up in $(since "$t0") s: $API_URL, state $STATE"
  log "use it with: eval \"\$(tools/kube/cluster.sh env)\""
}

# restart apiserver [SECONDS]: stop kube-apiserver (SIGTERM, as a rolling
# upgrade does), keep it down SECONDS (default 0), start it again with the same
# flags and wait for /readyz. etcd and the controller-manager keep running.
cmd_restart() {
  local what="${1:-}" down="${2:-0}" t
  [[ $what == apiserver ]] || die "restart: only 'apiserver' can be restarted, not '$what'"
  [[ $down =~ ^[0-9]+$ ]] || die "restart apiserver SECONDS: '$down' is not a whole number of seconds"
  [[ -r $STATE/cluster.env ]] || die "no cluster in $STATE; run: tools/kube/cluster.sh up"
  KUBE_BIN="$(kube_bin)"
  # shellcheck disable=SC1091
  source "$STATE/cluster.env"
  APISERVER_ARGS="$(cat "$STATE/apiserver.args" 2>/dev/null || true)"
  t="$(now)"
  # A loaded machine can take longer than the usual grace to drain watches; a
  # SIGKILLed server may also hold its port for a moment, and the new one would
  # exit at once on "address already in use".
  GRACE_SECONDS="${MESHLET_KUBE_RESTART_GRACE_SECONDS:-30}" stop kube-apiserver
  log "kube-apiserver stopped ($(since "$t") s)"
  local i
  for ((i = 0; i < 100; i++)); do
    ss -Htln "sport = :$API_PORT" 2>/dev/null | grep -q . || break
    sleep 0.1
  done
  sleep "$down"
  t="$(now)"
  start_apiserver
  wait_for kube-apiserver "kube-apiserver /readyz on $API_URL" kctl get --raw /readyz
  log "kube-apiserver ready again on $API_URL ($(since "$t") s after start)"
}

cmd_down() {
  if [[ ! -d $STATE ]]; then
    log "no cluster state in $STATE; nothing to stop"
    return 0
  fi
  stop_all
  remove_state
  # Under the lock we hold; a waiter that already opened it still gets it.
  rm -f "$STATE.lock"
  log "cluster down; removed $STATE"
}

cmd_status() {
  local c rc=0 pid
  if [[ ! -d $STATE ]]; then
    log "down (no state in $STATE)"
    return 1
  fi
  for c in "${COMPONENTS[@]}"; do
    if alive "$c"; then
      pid="$(<"$STATE/$c.pid")"
      echo "$c: running, pid $pid, rss $(awk '/^VmRSS:/ { printf "%d MiB", $2 / 1024 }' "/proc/$pid/status")"
    else
      echo "$c: not running (log: $STATE/$c.log)"
      rc=1
    fi
  done
  KUBE_BIN="$(kube_bin)"
  if kctl get --raw /readyz >/dev/null 2>&1; then
    echo "readyz: ok ($(grep '^API_URL=' "$STATE/cluster.env" | cut -d= -f2-))"
  else
    echo "readyz: failing"
    rc=1
  fi
  return "$rc"
}

# The Gateway API CRDs of the release pinned in tools/gateway-api (the Go module
# holds them; `go mod download` fetches it once into the module cache).
cmd_gateway_api() {
  local channel="${1:-standard}" dir
  [[ $channel == standard || $channel == experimental ]] || die "channel must be standard or experimental, not '$channel'"
  [[ -d $STATE ]] || die "no cluster in $STATE; run: tools/kube/cluster.sh up"
  command -v go >/dev/null || die "go not found; install Go 1.26 (https://go.dev/dl) to fetch the Gateway API module"
  dir="$(cd "$ROOT/tools/gateway-api" && GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod download -json sigs.k8s.io/gateway-api |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -d $dir/config/crd/$channel ]] || die "go mod download of sigs.k8s.io/gateway-api gave no config/crd/$channel (dir '$dir')"
  KUBE_BIN="$(kube_bin)"
  # Server-side: the CRDs are too big for client-side apply's annotation.
  kctl apply --server-side --force-conflicts -f "$dir/config/crd/$channel" >&2
  local crds
  mapfile -t crds < <(kctl get crd -o name | grep -F .gateway.networking.k8s.io)
  kctl wait --for condition=Established --timeout 60s "${crds[@]}" >&2
  log "Gateway API ${dir##*@} $channel CRDs established"
}

cmd_env() {
  local path hd
  path="$(kube_bin)"
  if hd="$(helm_dir)"; then path="$path:$hd"; fi
  echo "export MESHLET_KUBE_DIR=$STATE"
  echo "export KUBECONFIG=$STATE/kubeconfig"
  echo "export PATH=$path:\$PATH"
}

# Serialises up and down of one state dir (two test runs sharing the default dir).
with_lock() {
  mkdir -p "$(dirname "$STATE")"
  exec 9>"$STATE.lock"
  flock -w 300 9 || die "another cluster.sh holds $STATE.lock for over 300 s"
  "$@"
}

case "${1:-}" in
  up) with_lock cmd_up ;;
  down) with_lock cmd_down ;;
  restart) with_lock cmd_restart "${2:-}" "${3:-0}" ;;
  status) cmd_status ;;
  env) cmd_env ;;
  gateway-api) cmd_gateway_api "${2:-standard}" ;;
  *) usage ;;
esac
