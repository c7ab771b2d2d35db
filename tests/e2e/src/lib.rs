//! meshlet's end-to-end harness: a mini-cluster of network namespaces.
//!
//! [`testapp`] is the workload the pods run; [`echo`] the echo server and client the
//! Gateway API conformance suite's mesh pods run. [`cluster`] builds the mini-cluster: a
//! node namespace that routes, one namespace per pod (CNI ptp style), ClusterIPs as
//! kube-proxy DNAT rules in the node, and each pod started from a Kubernetes Pod spec
//! with its meshlet-init and meshlet-proxy containers.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod cluster;
pub mod demo;
pub mod echo;
pub mod node;
pub mod testapp;
