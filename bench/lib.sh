# shellcheck shell=bash disable=SC2034,SC2153
# Shared parts of the namespace benchmarks (run.sh, mtls.sh): logging, preconditions,
# cleanup, pinning, pod pairs, process start and /proc readings. Sourced, not run.
#
# The sourcing script sets NAME (its name in messages) and PREFIX (namespace and work
# directory prefix, `<area>-$$`) before calling bench_setup.

log() { printf '%s: %s\n' "$NAME" "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

# bench_bin_dir PROFILE: the target directory of a cargo profile.
bench_bin_dir() {
    local target=${CARGO_TARGET_DIR:-$ROOT/target}
    case $1 in
    release) echo "$target/release" ;;
    dev) echo "$target/debug" ;;
    *)
        echo "$NAME: PROFILE must be release or dev, not '$1'" >&2
        exit 64
        ;;
    esac
}

# bench_setup: checks root and tools, makes WORK, installs the cleanup trap and removes
# namespaces of earlier runs of the same script whose PID is gone.
bench_setup() {
    [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, iptables inside them); run it with sudo"
    local cmd
    for cmd in ip iptables setpriv curl jq python3 taskset; do
        command -v "$cmd" >/dev/null ||
            die "'$cmd' is missing: apt-get install -y iproute2 iptables util-linux curl jq python3"
    done
    # Other work on a shared machine moves the tails: the reports show the load.
    LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
    PIDS=()
    NAMESPACES=()
    WORK=$(mktemp -d "/tmp/$PREFIX.XXXXXX")
    # The proxies run as UID 1337 and must read their config files here.
    chmod 755 "$WORK"
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
    local base=${PREFIX%-*} ns
    while read -r ns _; do
        [[ $ns =~ ^$base-([0-9]+)-[a-z0-9]+$ ]] || continue
        if ! kill -0 "${BASH_REMATCH[1]}" 2>/dev/null; then
            log "removing stale namespace $ns of an earlier run"
            ip netns del "$ns" 2>/dev/null || true
        fi
    done < <(ip netns list)
}

# Stops every process started by `start`, deletes every namespace made by `make_pair`,
# and removes WORK (kept, with the tails of its logs shown, when the run failed).
bench_cleanup() {
    local rc=$?
    local pid ns f
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    if [[ $rc -ne 0 ]]; then
        log "logs kept in $WORK"
        for f in "$WORK"/*.log; do
            [[ -s $f ]] || continue
            log "--- tail of $f"
            tail -n 20 "$f" >&2 || true
        done
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}

# bench_cpu PIN RT: sets CLIENT_CPU and SERVER_CPU, the command prefixes of the client
# and the server pod (taskset to one core each with PIN=1; SCHED_FIFO 10 with RT=1), and
# CLIENT_PIN (the client pod's pinning alone, for closed loops under normal scheduling).
bench_cpu() {
    CLIENT_CPU=()
    SERVER_CPU=()
    if [[ $1 == 1 ]]; then
        CLIENT_CPU=(taskset -c 0)
        SERVER_CPU=(taskset -c 1)
    fi
    CLIENT_PIN=("${CLIENT_CPU[@]}")
    if [[ $2 == 1 ]]; then
        command -v chrt >/dev/null || die "'chrt' is missing: apt-get install -y util-linux"
        CLIENT_CPU+=(chrt -f 10)
        SERVER_CPU+=(chrt -f 10)
    fi
}

# make_pair CLIENT_NS SERVER_NS: two "pods" joined by one veth pair (CLIENT_IP and
# SERVER_IP on a /24). The veth is created inside the client namespace with its peer
# moved straight into the server namespace, so no interface ever exists in the root
# namespace. PAIR_SYSCTLS (array), when set, is applied in both namespaces.
make_pair() {
    local c=$1 s=$2 ns
    ip netns add "$c"
    NAMESPACES+=("$c")
    ip netns add "$s"
    NAMESPACES+=("$s")
    ip -n "$c" link add eth0 type veth peer name eth0 netns "$s"
    ip -n "$c" addr add "$CLIENT_IP/24" dev eth0
    ip -n "$s" addr add "$SERVER_IP/24" dev eth0
    for ns in "$c" "$s"; do
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        if [[ ${#PAIR_SYSCTLS[@]} -gt 0 ]]; then
            ip netns exec "$ns" sysctl -q -w "${PAIR_SYSCTLS[@]}"
        fi
    done
}
PAIR_SYSCTLS=()

# wait_http NS URL WHAT: bounded wait (10 s) until URL answers 2xx inside NS.
wait_http() {
    local ns=$1 url=$2 what=$3 i
    for ((i = 0; i < 100; i++)); do
        if ip netns exec "$ns" curl -sf -o /dev/null --max-time 1 "$url"; then
            return 0
        fi
        sleep 0.1
    done
    die "$what did not answer $url within 10 s"
}

# start NS LOGNAME CMD...: runs CMD in NS in the background; sets STARTED_PID.
# `ip netns exec`, `setpriv` and `env` all exec, so the PID is the program's own.
start() {
    local ns=$1 name=$2
    shift 2
    ip netns exec "$ns" "$@" >"$WORK/$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

AS_1337=(setpriv --reuid 1337 --regid 1337 --clear-groups)

# check_1337 PID WHAT: the process runs as UID 1337 (else the init rules would loop it).
check_1337() {
    awk '/^Uid:/ { exit !($2 == 1337) }' "/proc/$1/status" || die "$2 ($1) does not run as UID 1337"
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# rss_split PID: {"anon": KiB, "file": KiB} (RssAnon, RssFile): heap and stacks versus
# mapped code and data of the binary and its shared libraries.
rss_split() {
    awk '/^RssAnon:/ {a = $2} /^RssFile:/ {f = $2} END {printf "{\"anon\": %d, \"file\": %d}\n", a, f}' "/proc/$1/status"
}

# requests_total NS DIRECTION [LABEL=\"VALUE\"]: the sum of meshlet_requests_total of a
# sidecar's admin endpoint over the label sets with that direction (and that label).
requests_total() {
    ip netns exec "$1" curl -sf --max-time 2 "http://127.0.0.1:15020/metrics" |
        awk -v d="direction=\"$2\"" -v x="${3:-}" \
            '/^meshlet_requests_total\{/ && index($0, d) && (x == "" || index($0, x)) { s += $NF } END { printf "%d\n", s }'
}

# cpu_model: the CPU's name for the machine facts.
cpu_model() {
    local m
    m=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
    [[ -n $m ]] || m=$(lscpu 2>/dev/null | awk -F': *' '/^Model name/ {print $2; exit}')
    echo "$m"
}
