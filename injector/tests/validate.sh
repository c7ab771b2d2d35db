#!/usr/bin/env bash
# Injects every golden input and every shared-corpus manifest with the real
# meshlet-injector binary, then validates the output against the Kubernetes 1.29 and
# 1.33 schemas (strict: unknown fields fail). The same check runs in
# `cargo test -p meshlet-injector --test schema`; this script is the CLI path
# (`inject -f`) for `make test`.
#
#   injector/tests/validate.sh            # from the repo root
#   KUBERNETES_VALIDATE=/path/to/kubernetes-validate injector/tests/validate.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
CORPUS="$ROOT/../shared/corpus/manifests"

if [[ -n "${KUBERNETES_VALIDATE:-}" ]]; then
  validator="$KUBERNETES_VALIDATE"
elif [[ -x scripts/tools.sh || -f scripts/tools.sh ]]; then
  validator="$(bash scripts/tools.sh ensure_validator)"
else
  validator="$ROOT/.venv/bin/kubernetes-validate"
fi
if [[ ! -x "$validator" ]]; then
  echo "validate.sh: kubernetes-validate not found at $validator;" \
    "install it: python3 -m venv .venv && .venv/bin/pip install kubernetes-validate" >&2
  exit 1
fi
if [[ ! -d "$CORPUS" ]]; then
  echo "validate.sh: the shared corpus is missing at $CORPUS" >&2
  exit 1
fi

cargo build -q -p meshlet-injector --bin meshlet-injector
bin="$ROOT/target/debug/meshlet-injector"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

n=0
for f in injector/tests/testdata/inject/*.yaml "$CORPUS"/*.yaml "$CORPUS"/*.yml; do
  [[ -e "$f" ]] || continue
  case "$(basename "$f")" in error-*) continue ;; esac
  for mode in true false; do
    "$bin" inject --native-sidecar="$mode" -f "$f" >"$out/$mode-$(basename "$f")"
    n=$((n + 1))
  done
done

for v in 1.29.0 1.33.0; do
  "$validator" -k "$v" --strict --quiet "$out"/*
done
echo "validate.sh: $n injected manifests valid against Kubernetes 1.29.0 and 1.33.0 (strict)"
