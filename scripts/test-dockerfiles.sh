#!/usr/bin/env bash
# Checks Dockerfile.proxy, Dockerfile.injector and .dockerignore without a
# container engine (none runs on CI machines, so `docker build` is not run
# here; tests/e2e/kind.sh builds the images where Docker exists):
#   - structure (scripts/dockerfile_check.py): pinned FROM tags, multi-stage,
#     manifests + cargo fetch before the sources, --release --locked, every
#     shipped binary a [[bin]] of the workspace, non-root USER, .dockerignore
#   - the checker itself fails on broken copies (latest tag, root user, an
#     unknown binary, target/ in the context)
#   - shellcheck on scripts/*.sh and tests/e2e/kind.sh
# Ends with "dockerfiles: N passed, M failed" and exits non-zero when M > 0.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/tools.sh
source "$ROOT/scripts/tools.sh"
SHELLCHECK="$(ensure_shellcheck)"
command -v cargo >/dev/null || {
  echo "dockerfiles: cargo is missing (needed for cargo metadata); install Rust 1.95" >&2
  exit 1
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/meshlet-dockerfiles.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

passed=0
failed=0
record() { # record ok|fail NAME [DETAIL]
  if [[ $1 == ok ]]; then
    passed=$((passed + 1))
    echo "ok   $2"
  else
    failed=$((failed + 1))
    echo "FAIL $2${3:+: $3}"
  fi
}

# --- structure
out="$(python3 "$ROOT/scripts/dockerfile_check.py" "$ROOT" 2>&1)" || true
while IFS= read -r line; do
  case "$line" in
    "ok "*) record ok "${line#ok }" ;;
    "FAIL "*) record fail "${line#FAIL }" ;;
    "") ;;
    *) record fail "dockerfile_check.py: $line" ;;
  esac
done <<<"$out"

# --- the checker catches real mistakes (each mutation must produce a FAIL
# naming what is wrong)
mutant() { # mutant NAME FILE SED-EXPR EXPECTED-FAIL-SUBSTRING
  local dir="$WORK/$1"
  mkdir -p "$dir"
  cp "$ROOT/Dockerfile.proxy" "$ROOT/Dockerfile.injector" "$ROOT/.dockerignore" "$dir/"
  sed -i "$3" "$dir/$2"
  local out
  out="$(python3 "$ROOT/scripts/dockerfile_check.py" "$ROOT" "$dir" 2>&1 || true)"
  if grep '^FAIL' <<<"$out" | grep -qF -- "$4"; then
    record ok "checker refuses: $1"
  else
    record fail "checker refuses: $1" "no FAIL containing '$4'"
  fi
}
mutant "latest tag" Dockerfile.proxy 's|debian:12.12-slim|debian:latest|' "is pinned by tag"
mutant "untagged image" Dockerfile.injector 's|cc-debian12:nonroot|cc-debian12|' "is pinned by tag"
mutant "root user" Dockerfile.injector 's|^USER 65532:65532|USER root|' "non-root USER"
mutant "unknown binary" Dockerfile.proxy 's|/out/meshlet-init /usr|/out/meshlet-iptables /usr|' "meshlet-iptables is a [[bin]]"
mutant "debug build" Dockerfile.injector 's|cargo build --release|cargo build|' "--release"
mutant "missing manifest" Dockerfile.proxy '/^COPY bench\/Cargo.toml/d' "every workspace manifest"
mutant "target in context" .dockerignore '/^target\/$/d' "excludes target/"

# --- shell scripts
scripts=("$ROOT"/scripts/*.sh "$ROOT/tests/e2e/kind.sh")
for s in "${scripts[@]}"; do
  rel="${s#"$ROOT"/}"
  if [[ ! -f $s ]]; then
    record fail "shellcheck $rel" "file is missing"
  elif msg="$("$SHELLCHECK" -x -P "$ROOT" "$s" 2>&1)"; then
    record ok "shellcheck $rel"
  else
    record fail "shellcheck $rel" "$(printf '\n%s' "$msg")"
  fi
done

echo "dockerfiles: $passed passed, $failed failed"
[[ $failed == 0 ]]
