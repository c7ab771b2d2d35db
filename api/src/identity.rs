//! SPIFFE identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.

use std::{fmt, str::FromStr};

/// Audience of the projected service-account token a proxy presents to the issuer;
/// the issuer's TokenReview accepts no other.
pub const TOKEN_AUDIENCE: &str = "meshlet";
/// Default DNS name of the control plane's mesh endpoint (its certificate carries it).
pub const CONTROL_PLANE_NAME: &str = "meshlet-injector.meshlet-system.svc";

/// A workload identity in the Kubernetes SPIFFE form meshlet issues.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// A string that is not a meshlet SPIFFE id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid SPIFFE id {value:?}: {reason} (expected spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>)")]
pub struct ParseSpiffeIdError {
    value: String,
    reason: &'static str,
}

impl SpiffeId {
    /// Builds an id, checking each part as a DNS label would be checked.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, ParseSpiffeIdError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl FromStr for SpiffeId {
    type Err = ParseSpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseSpiffeIdError {
            value: s.to_string(),
            reason,
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("it does not start with spiffe://"))?;
        let mut parts = rest.split('/');
        let td = parts.next().unwrap_or_default();
        if !valid_segment(td) {
            return Err(err("bad trust domain"));
        }
        if parts.next() != Some("ns") {
            return Err(err("missing /ns/"));
        }
        let ns = parts.next().unwrap_or_default();
        if !valid_segment(ns) {
            return Err(err("bad namespace"));
        }
        if parts.next() != Some("sa") {
            return Err(err("missing /sa/"));
        }
        let sa = parts.next().unwrap_or_default();
        if !valid_segment(sa) {
            return Err(err("bad service account"));
        }
        if parts.next().is_some() {
            return Err(err("trailing path segments"));
        }
        Ok(Self {
            trust_domain: td.to_string(),
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/reviews"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "reviews");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/reviews"
        );
        assert_eq!(
            SpiffeId::new("cluster.local", "default", "reviews").unwrap(),
            id
        );
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns//sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} parsed");
        }
    }
}
