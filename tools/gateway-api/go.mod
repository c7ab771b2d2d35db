// Test tooling only, never shipped: pins the Gateway API release whose CRDs
// (config/crd/standard) the kube cluster tests install.
module meshlet.io/tools/gateway-api

go 1.26.0

require sigs.k8s.io/gateway-api v1.6.3
