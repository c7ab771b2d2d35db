#!/usr/bin/env bash
# Installs the system packages meshlet's demo, tests and benchmarks use, on a fresh
# Debian machine. Idempotent and quick when everything is there: apt runs only for
# packages that are missing.
set -euo pipefail

# command -> Debian package
declare -A want=(
  [iptables]=iptables
  [ip]=iproute2
  [curl]=curl
  [dig]=dnsutils
  [h2load]=nghttp2-client
  [setpriv]=util-linux
  [shellcheck]=shellcheck
  [tcpdump]=tcpdump
  [jq]=jq
  [openssl]=openssl
  [ss]=iproute2
  [chrt]=util-linux
)

missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}")
done
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps: missing ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "deps: cargo not found; install Rust with rustup (https://rustup.rs) and rerun" >&2
  exit 1
fi
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$comp"
  fi
done
