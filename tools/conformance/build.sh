#!/usr/bin/env bash
# Builds the Gateway API conformance suite (sigs.k8s.io/gateway-api/conformance, the
# version pinned in go.mod beside this file), unmodified, as one test binary
# target/tools/conformance-<go.sum hash>/conformance.test, and prints that folder.
# A cache hit returns at once; a cold build takes about 3 minutes on 2 cores.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
hash=$(cat "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-12)
out="$root/target/tools/conformance-$hash"
if [ -x "$out/conformance.test" ]; then echo "$out"; exit 0; fi
command -v go >/dev/null || { echo "conformance-tools: go not found; install Go 1.26 (https://go.dev/dl)" >&2; exit 1; }
mkdir -p "$out.tmp"
cd "$here"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
echo "conformance-tools: building conformance.test (sigs.k8s.io/gateway-api/conformance)" >&2
go test -c -trimpath -o "$out.tmp/conformance.test" sigs.k8s.io/gateway-api/conformance
rm -rf "$out"; mv "$out.tmp" "$out"
echo "$out"
