# meshlet — every entry point a user or CI needs. Each target installs what it uses
# (scripts/deps.sh for system packages, scripts/tools.sh for Helm and the schema
# validator), so a fresh machine needs nothing but this checkout, Rust and Go.

SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all deps tools build release test lint unit chart-test chart-install-test kube-up kube-down kube-test demo demo-k8s conformance conformance-check bench clean-netns help

all: build

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

deps: ## install system packages (apt) the demo and tests use
	@bash scripts/deps.sh

tools: deps ## build the test tooling once (cached under target/tools): control plane, Helm, schema validator
	@bash tools/kube/build.sh >/dev/null
	@bash scripts/tools.sh ensure_helm >/dev/null
	@bash scripts/tools.sh ensure_validator >/dev/null

build: deps ## debug build of every binary
	$(CARGO) build --workspace --bins

release: deps ## release build of every binary
	$(CARGO) build --workspace --bins --release

lint: deps ## rustfmt and clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit: build tools ## unit, golden, in-process, e2e and real-control-plane tests (e2e needs root)
	$(CARGO) test --workspace

chart-test: deps ## helm lint/template, schema validation, Dockerfile and script checks
	bash scripts/test-chart.sh
	bash scripts/test-dockerfiles.sh

chart-install-test: deps ## the chart against a real kube-apiserver (builds the control plane once)
	bash scripts/test-chart-install.sh
	bash scripts/test-authz-crd.sh

test: lint unit chart-test chart-install-test kube-test conformance-check ## everything CI runs
	@echo "make test: all suites passed"

kube-up: ## start a real kube-apiserver, controller-manager and etcd on loopback (built once from source)
	bash tools/kube/cluster.sh up
	@bash tools/kube/cluster.sh env

kube-down: ## stop that control plane and remove its state
	bash tools/kube/cluster.sh down

kube-test: deps ## the control plane itself (TokenReview, CRDs, webhooks, aggregation); `unit` runs the controller's and issuer's tests against it
	bash tools/kube/test.sh

demo: build ## a mini-mesh of network namespaces on this machine (needs root)
	target/debug/meshlet-minimesh demo

demo-k8s: build tools ## the user's story against a real kube-apiserver built from source (needs root)
	bash scripts/demo-k8s.sh

conformance: build tools ## the Gateway API mesh conformance suite (MESH-HTTP), unmodified, against meshlet on the real control plane (needs root)
	@bash tools/conformance/build.sh >/dev/null
	bash scripts/conformance.sh

conformance-check: build tools ## the same suite for CI: the report goes to target/, the committed one stays as published
	@bash tools/conformance/build.sh >/dev/null
	CONFORMANCE_REPORT=$(CURDIR)/target/conformance/meshlet-report.yaml bash scripts/conformance.sh

bench: deps ## side-by-side data-path benchmark (needs root), results in bench/results
	bash bench/run.sh

clean-netns: ## remove network namespaces left by an interrupted test or demo
	@for ns in $$(ip netns list | awk '/^(mle2e|mlinit|mlbench|mldemo)-/ {print $$1}'); do ip netns del $$ns; done
