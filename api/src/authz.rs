//! Authorization in the mesh config: which callers may reach a workload, compiled
//! from `AuthorizationPolicy` objects (`policy.meshlet.io/v1alpha1`, the shape of
//! Gateway API GEP-3779) and the default inbound policy of each namespace.
//!
//! The inbound proxy finds its workload by the address a connection was sent to (the
//! pod IP), so the compiler resolves every policy target (a Service's endpoints, the
//! pods a label selector picks, every pod of a namespace) to pod addresses.
//!
//! ```json
//! {"defaultPolicy": "all-allowed",
//!  "namespaces": {"payments": "deny"},
//!  "policies": [{"namespace": "shop", "name": "cart-from-frontend",
//!                "rules": [{"sources": [{"serviceAccount": {"namespace": "shop", "name": "frontend"}}],
//!                           "ports": [8080]}]}],
//!  "workloads": [{"ips": ["198.18.0.2"], "namespace": "shop", "podName": "cart-0",
//!                 "policies": ["shop/cart-from-frontend"]}]}
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use crate::SpiffeId;

/// What a workload no policy targets lets in (Linkerd's default inbound policy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultPolicy {
    /// Every caller, meshed or not.
    #[default]
    AllAllowed,
    /// Callers with a mesh identity (mTLS); plaintext callers are refused.
    MeshOnly,
    /// Nobody: only what a policy allows gets in.
    Deny,
}

/// A default inbound policy value that is none of the three.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid default inbound policy {0:?}: use all-allowed, mesh-only or deny")]
pub struct ParseDefaultPolicyError(pub String);

/// The `authorization` section of the mesh config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    /// Mesh-wide default for workloads no policy targets (chart value).
    #[serde(default)]
    pub default_policy: DefaultPolicy,
    /// Namespace -> its default (namespace annotation), overriding the mesh-wide one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespaces: BTreeMap<String, DefaultPolicy>,
    /// Every accepted policy, compiled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Policy>,
    /// Pods by address, with the policies that target them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<Workload>,
}

/// One pod: its addresses, namespace and the policies that target it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// The pod's IPs (one per family).
    pub ips: Vec<IpAddr>,
    /// The pod's namespace (whose default applies when no policy targets it).
    pub namespace: String,
    /// The pod's name, for logs and `/config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// `namespace/name` of each policy targeting it, in [`Authorization::policies`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
}

/// An ALLOW policy: a caller gets in when any rule matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// The policy's namespace.
    pub namespace: String,
    /// The policy's name.
    pub name: String,
    /// No rules: the policy allows nothing (but still makes the workload targeted).
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// A rule: all of its conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Callers it matches (any one). Absent: every caller, plaintext included;
    /// empty: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<Source>>,
    /// Destination ports on the pod it matches (any one); empty: every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// A caller identity as a rule names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Source {
    /// Exactly this SPIFFE id (the mTLS client certificate's URI SAN).
    Spiffe(String),
    /// A service account; `name` `*` is every service account of the namespace.
    ServiceAccount {
        /// Its namespace.
        namespace: String,
        /// Its name, or `*`.
        name: String,
    },
}

/// Why an `authorization` section was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("authorization: {0}")]
pub struct AuthzError(pub String);

// === impl DefaultPolicy ===

impl DefaultPolicy {
    /// The value as written in the annotation and chart.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllAllowed => "all-allowed",
            Self::MeshOnly => "mesh-only",
            Self::Deny => "deny",
        }
    }

    /// Whether a caller with (or without) a mesh identity gets in under this default.
    pub fn allows(self, meshed: bool) -> bool {
        match self {
            Self::AllAllowed => true,
            Self::MeshOnly => meshed,
            Self::Deny => false,
        }
    }
}

impl FromStr for DefaultPolicy {
    type Err = ParseDefaultPolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all-allowed" => Ok(Self::AllAllowed),
            "mesh-only" => Ok(Self::MeshOnly),
            "deny" => Ok(Self::Deny),
            other => Err(ParseDefaultPolicyError(other.to_string())),
        }
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Policy ===

impl Policy {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

// === impl Source ===

impl Source {
    /// Whether the verified client identity `peer` (a SPIFFE id string) matches.
    pub fn matches(&self, peer: &str) -> bool {
        match self {
            Self::Spiffe(id) => id == peer,
            Self::ServiceAccount { namespace, name } => {
                // spiffe://<td>/ns/<ns>/sa/<sa>: the trust domain was already checked
                // by the TLS verifier against the mesh's trust anchor.
                let Some(path) = peer
                    .strip_prefix("spiffe://")
                    .and_then(|r| r.split_once('/'))
                    .map(|(_, p)| p)
                else {
                    return false;
                };
                let Some(sa) = path
                    .strip_prefix("ns/")
                    .and_then(|p| p.strip_prefix(namespace.as_str()))
                    .and_then(|p| p.strip_prefix("/sa/"))
                else {
                    return false;
                };
                !sa.is_empty() && !sa.contains('/') && (name == "*" || sa == name)
            }
        }
    }
}

// === impl Rule ===

impl Rule {
    /// Whether a caller (`peer`: its verified identity, `None` for plaintext) to
    /// `port` matches.
    pub fn matches(&self, peer: Option<&str>, port: u16) -> bool {
        if !self.ports.is_empty() && !self.ports.contains(&port) {
            return false;
        }
        match (&self.sources, peer) {
            (None, _) => true,
            (Some(sources), Some(peer)) => sources.iter().any(|s| s.matches(peer)),
            // Plaintext callers have no identity and match no identity rule.
            (Some(_), None) => false,
        }
    }
}

// === impl Authorization ===

impl Authorization {
    /// Checks what serde cannot: unique policies and addresses, references that
    /// resolve, ports non-zero, SPIFFE sources in SPIFFE form.
    pub fn validate(&self) -> Result<(), AuthzError> {
        let err = |m: String| Err(AuthzError(m));
        let mut ids = BTreeSet::new();
        for p in &self.policies {
            if p.namespace.is_empty() || p.name.is_empty() {
                return err("every policy needs a namespace and a name".into());
            }
            let id = p.id();
            if !ids.insert(id.clone()) {
                return err(format!("policy {id} is listed twice; list each once"));
            }
            for (ri, r) in p.rules.iter().enumerate() {
                if r.ports.contains(&0) {
                    return err(format!(
                        "policy {id}: rules[{ri}] names port 0; use ports 1 to 65535"
                    ));
                }
                for s in r.sources.iter().flatten() {
                    match s {
                        Source::Spiffe(v) if !v.starts_with("spiffe://") => {
                            return err(format!(
                                "policy {id}: rules[{ri}]: source {v:?} is no SPIFFE id; \
                                 write spiffe://<trust-domain>/<path>"
                            ))
                        }
                        Source::ServiceAccount { namespace, name }
                            if namespace.is_empty() || name.is_empty() =>
                        {
                            return err(format!(
                                "policy {id}: rules[{ri}]: a serviceAccount source needs a \
                                 namespace and a name (or *)"
                            ))
                        }
                        _ => {}
                    }
                }
            }
        }
        let mut ips = BTreeSet::new();
        for w in &self.workloads {
            if w.namespace.is_empty() || w.ips.is_empty() {
                return err("every workload needs a namespace and at least one IP".into());
            }
            for ip in &w.ips {
                if !ips.insert(*ip) {
                    return err(format!(
                        "workload address {ip} is listed twice; list each pod address once"
                    ));
                }
            }
            for p in &w.policies {
                if !ids.contains(p) {
                    return err(format!(
                        "workload {} names policy {p}, which is not in policies",
                        w.ips[0]
                    ));
                }
            }
        }
        Ok(())
    }

    /// The default that applies in `namespace`.
    pub fn default_for(&self, namespace: Option<&str>) -> DefaultPolicy {
        namespace
            .and_then(|ns| self.namespaces.get(ns))
            .copied()
            .unwrap_or(self.default_policy)
    }

    /// Every exact SPIFFE id a rule names (service-account sources included), for a
    /// bounded metrics label.
    pub fn named_identities(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for s in self
            .policies
            .iter()
            .flat_map(|p| &p.rules)
            .flat_map(|r| r.sources.iter().flatten())
        {
            match s {
                Source::Spiffe(id) => {
                    out.insert(id.clone());
                }
                Source::ServiceAccount { namespace, name } if name != "*" => {
                    if let Ok(id) = SpiffeId::new(crate::DEFAULT_TRUST_DOMAIN, namespace, name) {
                        out.insert(id.to_string());
                    }
                }
                Source::ServiceAccount { .. } => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"defaultPolicy": "mesh-only", "namespaces": {"pay": "deny"},
        "policies": [{"namespace": "shop", "name": "cart",
            "rules": [{"sources": [{"serviceAccount": {"namespace": "shop", "name": "frontend"}},
                                   {"spiffe": "spiffe://other.org/ns/x/sa/y"}],
                       "ports": [8080]},
                      {"sources": [{"serviceAccount": {"namespace": "ops", "name": "*"}}]}]},
                     {"namespace": "shop", "name": "nothing"}],
        "workloads": [{"ips": ["198.18.0.2"], "namespace": "shop", "policies": ["shop/cart"]}]}"#;

    fn doc() -> Authorization {
        let a: Authorization = serde_json::from_str(DOC).unwrap();
        a.validate().unwrap();
        a
    }

    #[test]
    fn parses_defaults() {
        let a = doc();
        assert_eq!(a.default_for(Some("pay")), DefaultPolicy::Deny);
        assert_eq!(a.default_for(Some("shop")), DefaultPolicy::MeshOnly);
        assert_eq!(a.default_for(None), DefaultPolicy::MeshOnly);
        assert_eq!("deny".parse(), Ok(DefaultPolicy::Deny));
        let e = "allow".parse::<DefaultPolicy>().unwrap_err();
        assert!(e.to_string().contains("use all-allowed, mesh-only or deny"));
        assert!(DefaultPolicy::MeshOnly.allows(true) && !DefaultPolicy::MeshOnly.allows(false));
        assert!(!DefaultPolicy::Deny.allows(true) && DefaultPolicy::AllAllowed.allows(false));
        let empty: Authorization = serde_json::from_str("{}").unwrap();
        assert_eq!(empty.default_policy, DefaultPolicy::AllAllowed);
    }

    #[test]
    fn rules_match_identity_and_port() {
        let a = doc();
        let r = &a.policies[0].rules;
        let fe = "spiffe://cluster.local/ns/shop/sa/frontend";
        assert!(r[0].matches(Some(fe), 8080));
        assert!(!r[0].matches(Some(fe), 8081), "port not named");
        assert!(!r[0].matches(None, 8080), "plaintext matches no identity");
        assert!(!r[0].matches(Some("spiffe://cluster.local/ns/shop/sa/frontendx"), 8080));
        assert!(!r[0].matches(Some("spiffe://cluster.local/ns/shopx/sa/frontend"), 8080));
        assert!(r[0].matches(Some("spiffe://other.org/ns/x/sa/y"), 8080));
        assert!(r[1].matches(Some("spiffe://cluster.local/ns/ops/sa/anyone"), 1));
        assert!(!r[1].matches(Some("spiffe://cluster.local/ns/ops/sa/a/b"), 1));
        let any = Rule::default();
        assert!(any.matches(None, 1), "no sources: every caller");
        let none = Rule {
            sources: Some(vec![]),
            ports: vec![],
        };
        assert!(!none.matches(Some(fe), 1), "empty sources: nobody");
        assert!(a.policies[1].rules.is_empty());
    }

    #[test]
    fn named_identities_are_exact_ones() {
        let ids = doc().named_identities();
        assert_eq!(
            ids.into_iter().collect::<Vec<_>>(),
            vec![
                "spiffe://cluster.local/ns/shop/sa/frontend".to_string(),
                "spiffe://other.org/ns/x/sa/y".to_string()
            ]
        );
    }

    #[test]
    fn refuses_bad_sections() {
        let bad = |from: &str, to: &str, want: &str| {
            let a: Authorization = serde_json::from_str(&DOC.replacen(from, to, 1)).unwrap();
            let e = a.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        bad("\"ports\": [8080]", "\"ports\": [0]", "port 0");
        bad("spiffe://other.org", "other.org", "no SPIFFE id");
        bad("\"shop/cart\"", "\"shop/gone\"", "names policy shop/gone");
        bad(
            "\"name\": \"nothing\"",
            "\"name\": \"cart\"",
            "listed twice",
        );
        bad(
            "\"policies\": [\"shop/cart\"]}",
            "\"policies\": [\"shop/cart\"]}, {\"ips\": [\"198.18.0.2\"], \"namespace\": \"x\"}",
            "198.18.0.2 is listed twice",
        );
        assert!(serde_json::from_str::<Authorization>(&DOC.replace("mesh-only", "open")).is_err());
    }
}
