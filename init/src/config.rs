//! Command line and environment: every option is a flag and a `MESHLET_*` variable
//! (the injector writes the variables), parsed as text and then validated here so that
//! a bad value produces one line that names the flag, the variable and the value.

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use meshlet_api::env as e;
use meshlet_api::parse::{self, PortRange, Selection};

/// `meshlet-init`: programs the pod's iptables redirect rules.
#[derive(Parser, Debug, Clone)]
#[command(name = "meshlet-init", version, about, long_about = None)]
pub struct Cli {
    /// What to do; `apply` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Print the iptables-restore payload(s) instead of running anything; needs no
    /// privilege. With `--ipv6 auto` both families are shown.
    #[arg(long, short = 'n', global = true)]
    pub dry_run: bool,
    /// The capture options.
    #[command(flatten)]
    pub options: RawOptions,
}

/// Subcommands.
#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Program the redirect rules, then read them back and verify them (the default).
    Apply,
    /// Remove every chain and jump meshlet-init added (both backends, both families).
    Cleanup,
    /// Only read the rules back and compare them with what the options ask for.
    Verify,
}

/// Options exactly as given (flag or env); [`RawOptions::validate`] turns them into a [`Config`].
#[derive(Args, Debug, Clone)]
pub struct RawOptions {
    /// UID of the proxy; its traffic is never redirected.
    #[arg(long, global = true, env = e::INIT_PROXY_UID, default_value_t = meshlet_api::PROXY_UID.to_string())]
    pub proxy_uid: String,
    /// GID of the proxy; its traffic is never redirected.
    #[arg(long, global = true, env = e::INIT_PROXY_GID, default_value_t = meshlet_api::PROXY_GID.to_string())]
    pub proxy_gid: String,
    /// Port outbound TCP is redirected to.
    #[arg(long, global = true, env = e::INIT_OUTBOUND_PORT, default_value_t = meshlet_api::ports::OUTBOUND.to_string())]
    pub outbound_port: String,
    /// Port inbound TCP is redirected to.
    #[arg(long, global = true, env = e::INIT_INBOUND_PORT, default_value_t = meshlet_api::ports::INBOUND.to_string())]
    pub inbound_port: String,
    /// Inbound ports to capture: `*` (all) or a comma-separated list; empty captures none.
    #[arg(long, global = true, env = e::INIT_INBOUND_PORTS, default_value = "*")]
    pub inbound_ports: String,
    /// Inbound ports or ranges (`a-b`) that bypass the proxy.
    #[arg(long, global = true, env = e::INIT_EXCLUDE_INBOUND_PORTS, default_value = "")]
    pub exclude_inbound_ports: String,
    /// Outbound destination ports or ranges (`a-b`) that bypass the proxy.
    #[arg(long, global = true, env = e::INIT_EXCLUDE_OUTBOUND_PORTS, default_value = "")]
    pub exclude_outbound_ports: String,
    /// Outbound destinations to capture: `*` (all) or comma-separated CIDRs; empty captures none.
    #[arg(long, global = true, env = e::INIT_INCLUDE_OUTBOUND_CIDRS, default_value = "*")]
    pub include_outbound_cidrs: String,
    /// Outbound destination CIDRs that bypass the proxy.
    #[arg(long, global = true, env = e::INIT_EXCLUDE_OUTBOUND_CIDRS, default_value = "")]
    pub exclude_outbound_cidrs: String,
    /// IPv6 rules: `on`, `off`, or `auto` (when the pod has a non-link-local IPv6 address).
    #[arg(long, global = true, env = e::INIT_IPV6, default_value = "auto")]
    pub ipv6: String,
    /// iptables backend: `nft`, `legacy`, or `auto` (the one that already holds rules, else nft).
    #[arg(long, global = true, env = e::INIT_BACKEND, default_value = "auto")]
    pub iptables_backend: String,
}

/// Whether to program IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Mode {
    /// Always (fails where the kernel has no IPv6).
    On,
    /// Never.
    Off,
    /// When the pod has a non-link-local IPv6 address.
    Auto,
}

/// Which iptables backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// `iptables-nft-*`.
    Nft,
    /// `iptables-legacy-*`.
    Legacy,
    /// The one that already holds rules; nft when neither does.
    Auto,
}

/// The validated capture configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// UID whose traffic is never redirected.
    pub proxy_uid: u32,
    /// GID whose traffic is never redirected.
    pub proxy_gid: u32,
    /// Outbound capture port.
    pub outbound_port: u16,
    /// Inbound capture port.
    pub inbound_port: u16,
    /// Inbound ports to capture.
    pub inbound_ports: Selection<u16>,
    /// Inbound ports that bypass the proxy (in addition to the proxy's own ports).
    pub exclude_inbound_ports: Vec<PortRange>,
    /// Outbound destination ports that bypass the proxy.
    pub exclude_outbound_ports: Vec<PortRange>,
    /// Outbound destinations to capture.
    pub include_outbound_cidrs: Selection<IpNet>,
    /// Outbound destinations that bypass the proxy.
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// IPv6 mode.
    pub ipv6: Ipv6Mode,
    /// Backend choice.
    pub backend: BackendChoice,
}

/// A bad option value; always exit status 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?} for --{flag} ({env}): {reason}")]
pub struct ConfigError {
    /// Flag name without dashes.
    pub flag: &'static str,
    /// The matching environment variable.
    pub env: &'static str,
    /// The offending value (the bad list item, not the whole list).
    pub value: String,
    /// What is wrong and what is accepted.
    pub reason: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            proxy_uid: meshlet_api::PROXY_UID,
            proxy_gid: meshlet_api::PROXY_GID,
            outbound_port: meshlet_api::ports::OUTBOUND,
            inbound_port: meshlet_api::ports::INBOUND,
            inbound_ports: Selection::All,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_outbound_cidrs: Selection::All,
            exclude_outbound_cidrs: Vec::new(),
            ipv6: Ipv6Mode::Auto,
            backend: BackendChoice::Auto,
        }
    }
}

impl Config {
    /// Ports inbound capture never touches: the proxy's own listeners (the admin port
    /// must stay reachable for kubelet probes and Prometheus), then the user's list,
    /// without duplicates.
    pub fn inbound_exclusions(&self) -> Vec<PortRange> {
        let mut out: Vec<PortRange> = Vec::new();
        let own = [
            self.inbound_port,
            self.outbound_port,
            meshlet_api::ports::ADMIN,
        ];
        for r in own
            .into_iter()
            .map(PortRange::single)
            .chain(self.exclude_inbound_ports.iter().copied())
        {
            if !out.contains(&r) {
                out.push(r);
            }
        }
        out
    }
}

// === impl RawOptions ===

fn bad(flag: &'static str, env: &'static str, err: parse::ParseError) -> ConfigError {
    ConfigError {
        flag,
        env,
        value: err.item,
        reason: err.reason.to_string(),
    }
}

impl RawOptions {
    /// Validates every option; the first bad one is reported.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let id = |flag, env, v: &str| {
            v.trim().parse::<u32>().map_err(|_| ConfigError {
                flag,
                env,
                value: v.trim().to_string(),
                reason: "must be a numeric id 0-4294967295".to_string(),
            })
        };
        let port = |flag, env, v: &str| parse::parse_port(v).map_err(|x| bad(flag, env, x));
        let proxy_uid = id("proxy-uid", e::INIT_PROXY_UID, &self.proxy_uid)?;
        let proxy_gid = id("proxy-gid", e::INIT_PROXY_GID, &self.proxy_gid)?;
        let outbound_port = port("outbound-port", e::INIT_OUTBOUND_PORT, &self.outbound_port)?;
        let inbound_port = port("inbound-port", e::INIT_INBOUND_PORT, &self.inbound_port)?;
        if inbound_port == outbound_port {
            return Err(ConfigError {
                flag: "inbound-port",
                env: e::INIT_INBOUND_PORT,
                value: inbound_port.to_string(),
                reason: "must differ from --outbound-port, or redirected traffic would loop"
                    .to_string(),
            });
        }
        let inbound_ports = parse::parse_port_selection(&self.inbound_ports)
            .map_err(|x| bad("inbound-ports", e::INIT_INBOUND_PORTS, x))?;
        let exclude_inbound_ports = parse::parse_port_ranges(&self.exclude_inbound_ports)
            .map_err(|x| bad("exclude-inbound-ports", e::INIT_EXCLUDE_INBOUND_PORTS, x))?;
        let exclude_outbound_ports = parse::parse_port_ranges(&self.exclude_outbound_ports)
            .map_err(|x| bad("exclude-outbound-ports", e::INIT_EXCLUDE_OUTBOUND_PORTS, x))?;
        let include_outbound_cidrs = parse::parse_cidr_selection(&self.include_outbound_cidrs)
            .map_err(|x| bad("include-outbound-cidrs", e::INIT_INCLUDE_OUTBOUND_CIDRS, x))?;
        let exclude_outbound_cidrs = parse::parse_cidr_list(&self.exclude_outbound_cidrs)
            .map_err(|x| bad("exclude-outbound-cidrs", e::INIT_EXCLUDE_OUTBOUND_CIDRS, x))?;
        let ipv6 = match self.ipv6.trim().to_ascii_lowercase().as_str() {
            "on" | "true" => Ipv6Mode::On,
            "off" | "false" => Ipv6Mode::Off,
            "auto" | "" => Ipv6Mode::Auto,
            other => {
                return Err(ConfigError {
                    flag: "ipv6",
                    env: e::INIT_IPV6,
                    value: other.to_string(),
                    reason: "must be on, off or auto".to_string(),
                })
            }
        };
        let backend = match self.iptables_backend.trim().to_ascii_lowercase().as_str() {
            "nft" => BackendChoice::Nft,
            "legacy" => BackendChoice::Legacy,
            "auto" | "" => BackendChoice::Auto,
            other => {
                return Err(ConfigError {
                    flag: "iptables-backend",
                    env: e::INIT_BACKEND,
                    value: other.to_string(),
                    reason: "must be nft, legacy or auto".to_string(),
                })
            }
        };
        Ok(Config {
            proxy_uid,
            proxy_gid,
            outbound_port,
            inbound_port,
            inbound_ports,
            exclude_inbound_ports,
            exclude_outbound_ports,
            include_outbound_cidrs,
            exclude_outbound_cidrs,
            ipv6,
            backend,
        })
    }
}
