//! Injection defaults: what the sidecar looks like when a pod's annotations say nothing.
//! The chart sets them as flags (or `MESHLET_INJECTOR_*` env) of `serve`; `inject`
//! takes the same flags so offline output matches what the webhook would produce.

use crate::validate;

/// Default proxy image.
pub const DEFAULT_PROXY_IMAGE: &str = "ghcr.io/meshlet/meshlet-proxy:0.1.0";
/// Default init image (the proxy image ships `meshlet-init` too).
pub const DEFAULT_INIT_IMAGE: &str = "ghcr.io/meshlet/meshlet-proxy:0.1.0";

/// Everything the sidecar template needs that is not taken from the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Defaults {
    /// Image of the `meshlet-proxy` container.
    pub proxy_image: String,
    /// Image of the `meshlet-init` container.
    pub init_image: String,
    /// `imagePullPolicy` of both injected containers; `None` leaves the cluster default.
    pub image_pull_policy: Option<String>,
    /// Proxy CPU request (`None` omits it).
    pub proxy_cpu: Option<String>,
    /// Proxy memory request.
    pub proxy_memory: Option<String>,
    /// Proxy CPU limit.
    pub proxy_cpu_limit: Option<String>,
    /// Proxy memory limit.
    pub proxy_memory_limit: Option<String>,
    /// Proxy log level (`error` .. `trace`).
    pub log_level: String,
    /// Run the proxy as a native sidecar (init container with `restartPolicy: Always`).
    pub native_sidecar: bool,
    /// Inbound TLS mode: `permissive` or `strict`.
    pub tls_mode: String,
    /// Mesh config path inside the proxy container (`MESHLET_CONFIG_PATH`); `None` omits it.
    pub mesh_config_path: Option<String>,
    /// Where proxies get their identity online; `None` (offline `inject`, identity off)
    /// leaves the proxy to `MESHLET_IDENTITY_DIR` or plaintext.
    pub identity: Option<IdentityEnv>,
}

/// What the injected proxy needs to ask the issuer for its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityEnv {
    /// `host:port` of the mesh endpoint (`MESHLET_CONTROL_PLANE_ADDR`).
    pub address: String,
    /// Name its certificate carries (`MESHLET_CONTROL_PLANE_NAME`).
    pub name: String,
    /// The mesh CA certificate, PEM (`MESHLET_TRUST_ANCHORS`).
    pub trust_anchors: String,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            proxy_image: DEFAULT_PROXY_IMAGE.to_string(),
            init_image: DEFAULT_INIT_IMAGE.to_string(),
            image_pull_policy: None,
            proxy_cpu: Some("10m".to_string()),
            proxy_memory: Some("20Mi".to_string()),
            proxy_cpu_limit: Some("1".to_string()),
            proxy_memory_limit: Some("128Mi".to_string()),
            log_level: "info".to_string(),
            native_sidecar: true,
            tls_mode: "permissive".to_string(),
            mesh_config_path: None,
            identity: None,
        }
    }
}

/// Flags shared by `serve` and `inject` that set [`Defaults`].
#[derive(Clone, Debug, clap::Args)]
pub struct DefaultsArgs {
    /// Image of the injected meshlet-proxy container.
    #[arg(long, env = "MESHLET_INJECTOR_PROXY_IMAGE", default_value = DEFAULT_PROXY_IMAGE)]
    pub proxy_image: String,
    /// Image of the injected meshlet-init container.
    #[arg(long, env = "MESHLET_INJECTOR_INIT_IMAGE", default_value = DEFAULT_INIT_IMAGE)]
    pub init_image: String,
    /// imagePullPolicy of the injected containers (Always, IfNotPresent, Never); empty leaves it unset.
    #[arg(long, env = "MESHLET_INJECTOR_IMAGE_PULL_POLICY", default_value = "")]
    pub image_pull_policy: String,
    /// Proxy CPU request; empty omits it.
    #[arg(long, env = "MESHLET_INJECTOR_PROXY_CPU", default_value = "10m")]
    pub proxy_cpu: String,
    /// Proxy memory request; empty omits it.
    #[arg(long, env = "MESHLET_INJECTOR_PROXY_MEMORY", default_value = "20Mi")]
    pub proxy_memory: String,
    /// Proxy CPU limit; empty omits it.
    #[arg(long, env = "MESHLET_INJECTOR_PROXY_CPU_LIMIT", default_value = "1")]
    pub proxy_cpu_limit: String,
    /// Proxy memory limit; empty omits it.
    #[arg(
        long,
        env = "MESHLET_INJECTOR_PROXY_MEMORY_LIMIT",
        default_value = "128Mi"
    )]
    pub proxy_memory_limit: String,
    /// Proxy log level: error, warn, info, debug or trace.
    #[arg(long, env = "MESHLET_INJECTOR_PROXY_LOG_LEVEL", default_value = "info")]
    pub proxy_log_level: String,
    /// Run the proxy as a native sidecar (Kubernetes 1.29+); false makes it the first container.
    #[arg(long, env = "MESHLET_INJECTOR_NATIVE_SIDECAR", default_value_t = true, action = clap::ArgAction::Set)]
    pub native_sidecar: bool,
    /// Default inbound TLS mode: permissive or strict.
    #[arg(
        long,
        env = "MESHLET_INJECTOR_PROXY_TLS_MODE",
        default_value = "permissive"
    )]
    pub proxy_tls_mode: String,
    /// Mesh config path the proxy reads (MESHLET_CONFIG_PATH); empty leaves it unset.
    #[arg(long, env = "MESHLET_INJECTOR_MESH_CONFIG_PATH", default_value = "")]
    pub mesh_config_path: String,
}

/// A default flag has a value the pods would be refused for.
#[derive(Debug, thiserror::Error)]
#[error("flag --{flag} has the invalid value {value:?}: {reason}")]
pub struct InvalidDefault {
    flag: &'static str,
    value: String,
    reason: String,
}

impl DefaultsArgs {
    /// Checks every value with the same rules as the pod annotations.
    pub fn to_defaults(&self) -> Result<Defaults, InvalidDefault> {
        let bad = |flag: &'static str, value: &str, reason: String| InvalidDefault {
            flag,
            value: value.to_string(),
            reason,
        };
        let quantity =
            |flag: &'static str, value: &str| -> Result<Option<String>, InvalidDefault> {
                if value.is_empty() {
                    return Ok(None);
                }
                validate::quantity(value).map_err(|e| bad(flag, value, e))?;
                Ok(Some(value.to_string()))
            };
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        if self.proxy_image.is_empty() {
            return Err(bad("proxy-image", "", "an image is required".into()));
        }
        if self.init_image.is_empty() {
            return Err(bad("init-image", "", "an image is required".into()));
        }
        if !matches!(
            self.image_pull_policy.as_str(),
            "" | "Always" | "IfNotPresent" | "Never"
        ) {
            return Err(bad(
                "image-pull-policy",
                &self.image_pull_policy,
                "expected Always, IfNotPresent or Never".into(),
            ));
        }
        validate::log_level(&self.proxy_log_level)
            .map_err(|e| bad("proxy-log-level", &self.proxy_log_level, e))?;
        validate::tls_mode(&self.proxy_tls_mode)
            .map_err(|e| bad("proxy-tls-mode", &self.proxy_tls_mode, e))?;
        let d = Defaults {
            proxy_image: self.proxy_image.clone(),
            init_image: self.init_image.clone(),
            image_pull_policy: nonempty(&self.image_pull_policy),
            proxy_cpu: quantity("proxy-cpu", &self.proxy_cpu)?,
            proxy_memory: quantity("proxy-memory", &self.proxy_memory)?,
            proxy_cpu_limit: quantity("proxy-cpu-limit", &self.proxy_cpu_limit)?,
            proxy_memory_limit: quantity("proxy-memory-limit", &self.proxy_memory_limit)?,
            log_level: self.proxy_log_level.clone(),
            native_sidecar: self.native_sidecar,
            tls_mode: self.proxy_tls_mode.clone(),
            mesh_config_path: nonempty(&self.mesh_config_path),
            identity: None,
        };
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        d: DefaultsArgs,
    }

    fn parse(args: &[&str]) -> Result<Defaults, InvalidDefault> {
        let mut argv = vec!["x"];
        argv.extend_from_slice(args);
        Cli::parse_from(argv).d.to_defaults()
    }

    #[test]
    fn flag_defaults_match_the_library_defaults() {
        // Offline `inject` and library users (tests, e2e) must see the same sidecar.
        assert_eq!(parse(&[]).unwrap(), Defaults::default());
    }

    #[test]
    fn empty_values_omit_resources() {
        let d = parse(&["--proxy-cpu-limit=", "--proxy-memory-limit="]).unwrap();
        assert_eq!(d.proxy_cpu_limit, None);
        assert_eq!(d.proxy_memory_limit, None);
        assert_eq!(d.proxy_cpu.as_deref(), Some("10m"));
    }

    #[test]
    fn bad_flags_name_the_flag() {
        for (args, flag) in [
            (&["--proxy-memory=lots"][..], "--proxy-memory"),
            (&["--proxy-log-level=loud"][..], "--proxy-log-level"),
            (&["--proxy-tls-mode=on"][..], "--proxy-tls-mode"),
            (
                &["--image-pull-policy=Sometimes"][..],
                "--image-pull-policy",
            ),
            (&["--proxy-image="][..], "--proxy-image"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
    }
}
