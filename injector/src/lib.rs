//! meshlet-injector: the admission webhook that meshes pods, and the offline `inject`
//! command that applies the same mutation to manifests.
//!
//! The layering follows kube's admission example and linkerd's policy controller: the
//! pure [`mutate::mutate`] core turns a pod into a JSON Patch; [`webhook`] only translates
//! AdmissionReviews, [`offline`] only walks manifests, and [`serve`] only does HTTPS.
//! [`ca`] is the mesh CA that issues workload identities; [`issuer`] signs them online
//! for proxies that present a service-account token, on [`control_plane`]'s port 15012.
//! [`controller`] watches the cluster and keeps the mesh config that [`compile`] builds
//! current; [`delivery`] serves it to proxies.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod ca;
pub mod compile;
pub mod config;
pub mod control_plane;
pub mod controller;
pub mod delivery;
pub mod issuer;
pub mod mutate;
pub mod offline;
pub mod serve;
pub mod serve_config;
pub mod tls;
pub mod validate;
pub mod webhook;
pub mod yaml;

pub use config::{Defaults, DefaultsArgs};
pub use mutate::{mutate, Context, Denied, Outcome, SkipReason};
