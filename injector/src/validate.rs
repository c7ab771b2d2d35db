//! Validation of the `meshlet.io/*` pod annotations. Every value is checked before
//! anything is injected, so a typo is refused at admission with a message naming the
//! annotation, instead of surfacing later as a crash-looping init container.

use std::collections::BTreeMap;

use meshlet_api::{annotations as ann, parse};

/// A pod annotation with a value meshlet cannot use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "annotation {name} has the invalid value {value:?}: {reason}; fix or remove the annotation"
)]
pub struct BadAnnotation {
    /// Annotation name.
    pub name: String,
    /// The value as written.
    pub value: String,
    /// What is wrong and what a valid value looks like.
    pub reason: String,
}

/// The per-pod settings read from annotations; `None` means "use the default".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `*` or ports (passed to meshlet-init as written, trimmed).
    pub inbound_ports: Option<String>,
    /// Ports and ranges.
    pub exclude_inbound_ports: Option<String>,
    /// Ports and ranges.
    pub exclude_outbound_ports: Option<String>,
    /// CIDRs.
    pub exclude_outbound_cidrs: Option<String>,
    /// `*` or CIDRs.
    pub include_outbound_cidrs: Option<String>,
    /// Ports.
    pub opaque_ports: Option<String>,
    /// Proxy CPU request.
    pub proxy_cpu: Option<String>,
    /// Proxy memory request.
    pub proxy_memory: Option<String>,
    /// Proxy CPU limit.
    pub proxy_cpu_limit: Option<String>,
    /// Proxy memory limit.
    pub proxy_memory_limit: Option<String>,
    /// Proxy log level.
    pub log_level: Option<String>,
    /// Native sidecar on or off.
    pub native_sidecar: Option<bool>,
    /// `permissive` or `strict`.
    pub tls_mode: Option<String>,
}

/// Reads and validates every `meshlet.io/*` annotation the injector understands.
pub fn overrides(annotations: &BTreeMap<String, String>) -> Result<Overrides, BadAnnotation> {
    let get = |name: &str| annotations.get(name).map(|v| v.trim().to_string());
    // Each check returns the value in canonical form (`22, 80` becomes `22,80`), so
    // meshlet-init and the proxy receive exactly what was validated.
    let check = |name: &str,
                 f: &dyn Fn(&str) -> Result<String, String>|
     -> Result<Option<String>, BadAnnotation> {
        match annotations.get(name) {
            None => Ok(None),
            Some(raw) => f(raw.trim()).map(Some).map_err(|reason| BadAnnotation {
                name: name.to_string(),
                value: raw.clone(),
                reason,
            }),
        }
    };
    let nonempty = |v: &str| -> Result<(), String> {
        if v.is_empty() {
            Err("the value is empty".to_string())
        } else {
            Ok(())
        }
    };
    // An empty capture list would silently turn capture off; require `*` or ports.
    let port_selection = |v: &str| -> Result<String, String> {
        nonempty(v)?;
        parse::parse_port_selection(v)
            .map(|sel| selection(&sel))
            .map_err(|e| format!("{e}; expected `*` or ports such as 8080,9090"))
    };
    let port_ranges = |v: &str| -> Result<String, String> {
        parse::parse_port_ranges(v)
            .map(|l| join(&l))
            .map_err(|e| format!("{e}; expected ports or ranges such as 22,8000-8100"))
    };
    let port_list = |v: &str| -> Result<String, String> {
        parse::parse_port_list(v)
            .map(|l| join(&l))
            .map_err(|e| format!("{e}; expected ports such as 3306,6379"))
    };
    let cidr_list = |v: &str| -> Result<String, String> {
        parse::parse_cidr_list(v)
            .map(|l| join(&l))
            .map_err(|e| format!("{e}; expected CIDRs such as 10.0.0.0/8,fd00::/8"))
    };
    let cidr_selection = |v: &str| -> Result<String, String> {
        nonempty(v)?;
        parse::parse_cidr_selection(v)
            .map(|sel| selection(&sel))
            .map_err(|e| format!("{e}; expected `*` or CIDRs such as 10.0.0.0/8"))
    };
    let q = |v: &str| quantity(v).map(|_| v.to_string());
    let text = |f: fn(&str) -> Result<(), String>| move |v: &str| f(v).map(|()| v.to_string());

    let native_sidecar = match get(ann::NATIVE_SIDECAR) {
        None => None,
        Some(v) if v == "true" => Some(true),
        Some(v) if v == "false" => Some(false),
        Some(_) => {
            return Err(BadAnnotation {
                name: ann::NATIVE_SIDECAR.to_string(),
                value: annotations[ann::NATIVE_SIDECAR].clone(),
                reason: "expected \"true\" or \"false\"".to_string(),
            })
        }
    };

    let o = Overrides {
        inbound_ports: check(ann::INBOUND_PORTS, &port_selection)?,
        exclude_inbound_ports: check(ann::EXCLUDE_INBOUND_PORTS, &port_ranges)?,
        exclude_outbound_ports: check(ann::EXCLUDE_OUTBOUND_PORTS, &port_ranges)?,
        exclude_outbound_cidrs: check(ann::EXCLUDE_OUTBOUND_CIDRS, &cidr_list)?,
        include_outbound_cidrs: check(ann::INCLUDE_OUTBOUND_CIDRS, &cidr_selection)?,
        opaque_ports: check(ann::OPAQUE_PORTS, &port_list)?,
        proxy_cpu: check(ann::PROXY_CPU, &q)?,
        proxy_memory: check(ann::PROXY_MEMORY, &q)?,
        proxy_cpu_limit: check(ann::PROXY_CPU_LIMIT, &q)?,
        proxy_memory_limit: check(ann::PROXY_MEMORY_LIMIT, &q)?,
        log_level: check(ann::LOG_LEVEL, &text(log_level))?,
        native_sidecar,
        tls_mode: check(ann::TLS_MODE, &text(tls_mode))?,
    };
    Ok(o)
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

fn selection<T: std::fmt::Display>(sel: &parse::Selection<T>) -> String {
    match sel {
        parse::Selection::All => "*".to_string(),
        parse::Selection::Only(items) => join(items),
    }
}

/// Accepts the proxy log levels.
pub fn log_level(v: &str) -> Result<(), String> {
    match v {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(()),
        _ => Err("expected one of error, warn, info, debug, trace".to_string()),
    }
}

/// Accepts the inbound TLS modes.
pub fn tls_mode(v: &str) -> Result<(), String> {
    match v {
        "permissive" | "strict" => Ok(()),
        _ => Err("expected permissive or strict".to_string()),
    }
}

/// Parses a Kubernetes resource quantity (`100m`, `0.5`, `128Mi`, `1e3`) into its value,
/// refusing negative numbers, because the API server would refuse the pod anyway with a
/// message that does not name the annotation.
pub fn quantity(v: &str) -> Result<f64, String> {
    const HINT: &str = "expected a quantity such as 100m, 0.5, 64Mi or 1Gi";
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(split);
    let num = num.strip_prefix('+').unwrap_or(num);
    let well_formed = !num.is_empty()
        && num != "."
        && num.bytes().filter(|b| *b == b'.').count() <= 1
        && num.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if !well_formed {
        return Err(HINT.to_string());
    }
    let n: f64 = num.parse().map_err(|_| HINT.to_string())?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s if s.starts_with(['e', 'E']) => {
            let exp = &s[1..];
            let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HINT.to_string());
            }
            let e: i32 = exp.parse().map_err(|_| HINT.to_string())?;
            10f64.powi(e)
        }
        _ => return Err(HINT.to_string()),
    };
    Ok(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anns(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity("100m").unwrap(), 0.1);
        assert_eq!(quantity("1").unwrap(), 1.0);
        assert_eq!(quantity("128Mi").unwrap(), 128.0 * 1024.0 * 1024.0);
        assert_eq!(quantity("1e3").unwrap(), 1000.0);
        assert_eq!(quantity(".5").unwrap(), 0.5);
        for bad in ["", "-1", "abc", "1..2", "10mb", "1e", "Mi", ".", "1 Gi"] {
            assert!(quantity(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn valid_annotations_pass_through_trimmed() {
        let o = overrides(&anns(&[
            (ann::INBOUND_PORTS, "*"),
            (ann::EXCLUDE_INBOUND_PORTS, " 22, 8000-8100 "),
            (ann::EXCLUDE_OUTBOUND_CIDRS, "198.18.0.0/15"),
            (ann::NATIVE_SIDECAR, "false"),
            (ann::TLS_MODE, "strict"),
            (ann::PROXY_MEMORY, "64Mi"),
        ]))
        .unwrap();
        assert_eq!(o.inbound_ports.as_deref(), Some("*"));
        assert_eq!(o.exclude_inbound_ports.as_deref(), Some("22,8000-8100"));
        assert_eq!(o.native_sidecar, Some(false));
        assert_eq!(o.tls_mode.as_deref(), Some("strict"));
        assert_eq!(o.proxy_memory.as_deref(), Some("64Mi"));
        assert_eq!(o.log_level, None);
    }

    #[test]
    fn bad_values_name_the_annotation_and_value() {
        let cases = [
            (ann::INBOUND_PORTS, "http"),
            (ann::INBOUND_PORTS, ""),
            (ann::EXCLUDE_INBOUND_PORTS, "70000"),
            (ann::EXCLUDE_OUTBOUND_PORTS, "9-1"),
            (ann::EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/33"),
            (ann::INCLUDE_OUTBOUND_CIDRS, "*,10.0.0.0/8"),
            (ann::OPAQUE_PORTS, "3306-3310"),
            (ann::PROXY_CPU, "lots"),
            (ann::PROXY_MEMORY_LIMIT, "-1Gi"),
            (ann::LOG_LEVEL, "verbose"),
            (ann::NATIVE_SIDECAR, "yes"),
            (ann::TLS_MODE, "STRICT"),
        ];
        for (name, value) in cases {
            let err = overrides(&anns(&[(name, value)])).unwrap_err();
            assert_eq!(err.name, name);
            assert_eq!(err.value, value);
            let msg = err.to_string();
            assert!(
                msg.contains(name) && msg.contains(&format!("{value:?}")),
                "{msg}"
            );
        }
    }
}
