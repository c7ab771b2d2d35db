#!/usr/bin/env bash
# Installs (once) and locates the tools the chart and Dockerfile tests use.
#
#   scripts/tools.sh ensure_helm        # prints the path of a Helm 4 binary
#   scripts/tools.sh ensure_validator   # prints the path of kubernetes-validate
#   scripts/tools.sh ensure_python      # prints the venv's python3 (has PyYAML)
#   scripts/tools.sh ensure_shellcheck  # prints the path of shellcheck
#
# It can also be sourced; the functions then print the same paths. Everything is
# cached: Helm under target/tools/helm-<sha256(go.sum)>/ (a new go.sum means a new
# build, an old cache is never reused for other sources), the validator in the
# repo's .venv. Progress goes to stderr so that stdout is just the path.
set -euo pipefail

TOOLS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Pinned so that a rerun on a new machine validates against the same schemas.
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"

tools_log() { echo "tools.sh: $*" >&2; }

# Builds Helm from tools/helm (go.mod pins the version) unless the binary for the
# current go.sum is already cached. A flock serialises concurrent callers so that
# two test runs never build at the same time on a shared 2-core machine.
ensure_helm() {
  local mod="$TOOLS_ROOT/tools/helm" hash dir version
  if ! command -v go >/dev/null 2>&1; then
    tools_log "go is not installed; install Go >= 1.26 (https://go.dev/dl) to build Helm"
    return 1
  fi
  hash="$(sha256sum "$mod/go.sum" | cut -c1-16)"
  dir="$TOOLS_ROOT/target/tools/helm-$hash"
  if [[ -x "$dir/helm" ]]; then
    echo "$dir/helm"
    return 0
  fi
  mkdir -p "$dir"
  (
    flock 9
    if [[ ! -x "$dir/helm" ]]; then
      version="$(cd "$mod" && GOTOOLCHAIN=local go list -m -f '{{.Version}}' helm.sh/helm/v4)"
      tools_log "building Helm $version into $dir (about 3 minutes on 2 cores, once)"
      (cd "$mod" && GOTOOLCHAIN=local CGO_ENABLED=0 nice -n 10 go build -trimpath \
        -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$version" \
        -o "$dir/helm.tmp" helm.sh/helm/v4/cmd/helm)
      mv "$dir/helm.tmp" "$dir/helm"
    fi
  ) 9>"$dir/.lock"
  echo "$dir/helm"
}

# A venv at the repo root holds kubernetes-validate (its schemas ship offline in
# the wheel) and PyYAML, which the chart assertions use.
ensure_python() {
  local venv="$TOOLS_ROOT/.venv"
  if [[ ! -x "$venv/bin/kubernetes-validate" ]] || ! "$venv/bin/python3" -c 'import yaml' 2>/dev/null; then
    tools_log "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into $venv"
    if [[ ! -x "$venv/bin/python3" ]]; then
      python3 -m venv "$venv" || {
        tools_log "python3 -m venv failed; install it with: apt-get install -y python3-venv"
        return 1
      }
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "pyyaml==6.0.4" >&2
  fi
  echo "$venv/bin/python3"
}

ensure_validator() {
  ensure_python >/dev/null
  echo "$TOOLS_ROOT/.venv/bin/kubernetes-validate"
}

ensure_shellcheck() {
  if ! command -v shellcheck >/dev/null 2>&1; then
    tools_log "installing shellcheck with apt-get"
    if [[ "$(id -u)" != 0 ]]; then
      tools_log "shellcheck is missing and we are not root; run: sudo apt-get install -y shellcheck"
      return 1
    fi
    # Quiet, but a failure still shows apt's own message on stderr.
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >&2
  fi
  command -v shellcheck
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  case "${1:-}" in
    ensure_helm | ensure_validator | ensure_python | ensure_shellcheck) "$1" ;;
    *)
      echo "usage: $0 ensure_helm|ensure_validator|ensure_python|ensure_shellcheck" >&2
      exit 64
      ;;
  esac
fi
