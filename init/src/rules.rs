//! The rule set (policy) and its `iptables-restore` rendering (mechanism).
//!
//! Every rule lives in a `MESHLET_*` chain of the nat table; the built-in chains only
//! get one jump each, so cleanup is "remove two jumps, drop four chains" and never
//! touches anyone else's rules. Rules are written in the exact text `iptables-save`
//! prints back (`-p tcp -m tcp --dport 80`, `-d 10.0.0.0/8`), so verifying is a plain
//! comparison of lines.

use std::fmt;

use ipnet::IpNet;
use meshlet_api::parse::{PortRange, Selection};

use crate::config::Config;

/// Inbound entry chain, jumped to from PREROUTING.
pub const INBOUND: &str = "MESHLET_INBOUND";
/// Holds the inbound REDIRECT.
pub const IN_REDIRECT: &str = "MESHLET_IN_REDIRECT";
/// Outbound entry chain, jumped to from OUTPUT.
pub const OUTPUT: &str = "MESHLET_OUTPUT";
/// Holds the outbound REDIRECT.
pub const REDIRECT: &str = "MESHLET_REDIRECT";
/// All chains meshlet-init owns, in declaration order.
pub const CHAINS: [&str; 4] = [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT];

/// IP family; each has its own binaries and restore payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// iptables.
    V4,
    /// ip6tables.
    V6,
}

/// iptables backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// nf_tables through the iptables-nft compatibility layer.
    Nft,
    /// The legacy x_tables kernel interface.
    Legacy,
}

/// One rule: `-A <chain> <spec>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Chain it is appended to.
    pub chain: String,
    /// Matches and target, in iptables-save's canonical spelling.
    pub spec: String,
}

/// Everything meshlet-init wants in one family's nat table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// Family the rules are for.
    pub family: Family,
    /// Rules inside the `MESHLET_*` chains, in order.
    pub rules: Vec<Rule>,
    /// The jumps from built-in chains, one each.
    pub jumps: Vec<Rule>,
}

/// The nat table as `iptables-save -t nat` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatState {
    /// Declared chains (`:NAME POLICY [counters]`).
    pub chains: Vec<String>,
    /// Rules, in order.
    pub rules: Vec<Rule>,
}

/// A difference between the intended rules and what the kernel holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    /// An owned chain does not exist.
    #[error("chain {0} is missing")]
    ChainMissing(String),
    /// An intended rule is absent.
    #[error("rule missing: {0}")]
    Missing(String),
    /// A rule is present that was not intended.
    #[error("unexpected rule: {0}")]
    Unexpected(String),
    /// A jump is present more than once.
    #[error("rule present {count} times, expected once: {rule}")]
    Duplicate {
        /// The rule line.
        rule: String,
        /// How often it is present.
        count: usize,
    },
    /// The right rules in the wrong order.
    #[error("rules of chain {0} are in the wrong order")]
    Order(String),
}

// === impl Family ===

impl Family {
    /// `iptables` or `ip6tables`.
    pub fn prefix(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// The loopback host route, spelled as iptables-save prints it.
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn holds(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }
}

/// `IPv4` / `IPv6`.
impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

// === impl Backend ===

impl Backend {
    /// Binary name, e.g. `ip6tables-legacy-restore` for (V6, Legacy, "restore").
    pub fn program(self, family: Family, tool: &str) -> String {
        format!("{}-{}-{tool}", family.prefix(), self)
    }
}

/// `nft` / `legacy`, as in the binary names.
impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        })
    }
}

// === impl Rule ===

impl Rule {
    fn new(chain: &str, spec: impl Into<String>) -> Self {
        Self {
            chain: chain.to_string(),
            spec: spec.into(),
        }
    }

    /// The `-A CHAIN spec` line.
    pub fn line(&self) -> String {
        format!("-A {} {}", self.chain, self.spec)
    }

    /// Whether it jumps into one of meshlet's chains from outside them.
    fn is_meshlet_jump(&self) -> bool {
        !CHAINS.contains(&self.chain.as_str())
            && CHAINS
                .iter()
                .any(|c| self.spec.ends_with(&format!("-j {c}")))
    }
}

fn dport(r: &PortRange) -> String {
    if r.start == r.end {
        format!("-p tcp -m tcp --dport {}", r.start)
    } else {
        format!("-p tcp -m tcp --dport {}:{}", r.start, r.end)
    }
}

/// `-d net ` or nothing: iptables-save omits a /0 destination, so must we.
fn dst(net: &IpNet) -> String {
    if net.prefix_len() == 0 {
        String::new()
    } else {
        format!("-d {net} ")
    }
}

// === impl RuleSet ===

impl RuleSet {
    /// Builds one family's rules from the configuration.
    pub fn build(cfg: &Config, family: Family) -> Self {
        let mut rules = Vec::new();

        // Inbound. Exclusions come first: RETURN leaves the chain before any capture
        // rule can match, so the proxy's own ports (admin for kubelet probes and
        // Prometheus; the capture ports so redirected traffic cannot loop) and the
        // user's excluded ports always reach their listener directly.
        for r in cfg.inbound_exclusions() {
            rules.push(Rule::new(INBOUND, format!("{} -j RETURN", dport(&r))));
        }
        match &cfg.inbound_ports {
            Selection::All => rules.push(Rule::new(INBOUND, format!("-p tcp -j {IN_REDIRECT}"))),
            Selection::Only(ports) => {
                for p in ports {
                    let r = PortRange::single(*p);
                    rules.push(Rule::new(
                        INBOUND,
                        format!("{} -j {IN_REDIRECT}", dport(&r)),
                    ));
                }
            }
        }
        rules.push(Rule::new(
            IN_REDIRECT,
            format!("-p tcp -j REDIRECT --to-ports {}", cfg.inbound_port),
        ));

        // Outbound. The proxy's own traffic (UID, then GID) returns first, before any
        // inclusion can catch it: its upstream connections and its inbound forward to
        // the app on the pod IP must never be redirected back into itself.
        rules.push(Rule::new(
            OUTPUT,
            format!("-m owner --uid-owner {} -j RETURN", cfg.proxy_uid),
        ));
        rules.push(Rule::new(
            OUTPUT,
            format!("-m owner --gid-owner {} -j RETURN", cfg.proxy_gid),
        ));
        // Anything else leaving through lo is the app talking to itself (localhost or
        // its own pod IP, both routed via lo): bypass the proxy, as istio does.
        rules.push(Rule::new(OUTPUT, "-o lo -j RETURN"));
        // Belt and braces for loopback that is not routed via lo (it always is today):
        // never send localhost to the proxy, which would otherwise see itself as dst.
        rules.push(Rule::new(
            OUTPUT,
            format!("-d {} -j RETURN", family.loopback()),
        ));
        // Exclusions before inclusions: an excluded port or CIDR inside an included
        // CIDR must bypass, so its RETURN has to be reached first.
        for r in &cfg.exclude_outbound_ports {
            rules.push(Rule::new(OUTPUT, format!("{} -j RETURN", dport(r))));
        }
        for net in cfg
            .exclude_outbound_cidrs
            .iter()
            .filter(|n| family.holds(n))
        {
            rules.push(Rule::new(OUTPUT, format!("{}-j RETURN", dst(net))));
        }
        match &cfg.include_outbound_cidrs {
            Selection::All => rules.push(Rule::new(OUTPUT, format!("-j {REDIRECT}"))),
            Selection::Only(nets) => {
                for net in nets.iter().filter(|n| family.holds(n)) {
                    rules.push(Rule::new(OUTPUT, format!("{}-j {REDIRECT}", dst(net))));
                }
            }
        }
        rules.push(Rule::new(
            REDIRECT,
            format!("-p tcp -j REDIRECT --to-ports {}", cfg.outbound_port),
        ));

        // Only TCP enters meshlet's chains: UDP (DNS above all) is never captured.
        let jumps = vec![
            Rule::new("PREROUTING", format!("-p tcp -j {INBOUND}")),
            Rule::new("OUTPUT", format!("-p tcp -j {OUTPUT}")),
        ];
        Self {
            family,
            rules,
            jumps,
        }
    }

    /// The `iptables-restore --noflush` input that makes the nat table hold exactly
    /// this rule set, given what it holds now. Declaring a chain in a restore payload
    /// flushes it even with `--noflush`, so the `MESHLET_*` chains are rebuilt from
    /// scratch in the same transaction; jumps are added only when absent, surplus
    /// copies and stale jumps (from an older version) are deleted, so a rerun leaves
    /// exactly one copy of everything.
    pub fn restore_payload(&self, current: &NatState) -> String {
        let mut out = String::from("*nat\n");
        for c in CHAINS {
            out.push_str(&format!(":{c} - [0:0]\n"));
        }
        for r in &self.rules {
            out.push_str(&r.line());
            out.push('\n');
        }
        for existing in current.rules.iter().filter(|r| r.is_meshlet_jump()) {
            if !self.jumps.contains(existing) {
                out.push_str(&format!("-D {} {}\n", existing.chain, existing.spec));
            }
        }
        for jump in &self.jumps {
            let present = current.count(jump);
            for _ in 1..present {
                out.push_str(&format!("-D {} {}\n", jump.chain, jump.spec));
            }
            if present == 0 {
                out.push_str(&jump.line());
                out.push('\n');
            }
        }
        out.push_str("COMMIT\n");
        out
    }

    /// Compares with what the kernel holds; the first difference is returned.
    pub fn verify(&self, actual: &NatState) -> Result<(), Mismatch> {
        for chain in CHAINS {
            if !actual.chains.iter().any(|c| c == chain) {
                return Err(Mismatch::ChainMissing(chain.to_string()));
            }
            let want: Vec<&Rule> = self.rules.iter().filter(|r| r.chain == chain).collect();
            let have: Vec<&Rule> = actual.rules.iter().filter(|r| r.chain == chain).collect();
            if want == have {
                continue;
            }
            if let Some(r) = want.iter().find(|r| !have.contains(r)) {
                return Err(Mismatch::Missing(r.line()));
            }
            if let Some(r) = have.iter().find(|r| !want.contains(r)) {
                return Err(Mismatch::Unexpected(r.line()));
            }
            if let Some(r) = want.iter().find(|r| actual.count(r) > 1) {
                return Err(Mismatch::Duplicate {
                    rule: r.line(),
                    count: actual.count(r),
                });
            }
            return Err(Mismatch::Order(chain.to_string()));
        }
        for jump in &self.jumps {
            match actual.count(jump) {
                1 => {}
                0 => return Err(Mismatch::Missing(jump.line())),
                count => {
                    return Err(Mismatch::Duplicate {
                        rule: jump.line(),
                        count,
                    })
                }
            }
        }
        if let Some(stale) = actual
            .rules
            .iter()
            .find(|r| r.is_meshlet_jump() && !self.jumps.contains(r))
        {
            return Err(Mismatch::Unexpected(stale.line()));
        }
        Ok(())
    }
}

// === impl NatState ===

impl NatState {
    /// Parses the `*nat` section of `iptables-save` output; other tables are ignored.
    pub fn parse(save: &str) -> Self {
        let mut state = NatState::default();
        let mut in_nat = false;
        for line in save.lines().map(str::trim) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
            } else if !in_nat || line.starts_with('#') {
                continue;
            } else if line == "COMMIT" {
                in_nat = false;
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    state.chains.push(name.to_string());
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                state.rules.push(Rule::new(chain, spec));
            }
        }
        state
    }

    /// How many copies of `rule` the table holds.
    pub fn count(&self, rule: &Rule) -> usize {
        self.rules.iter().filter(|r| *r == rule).count()
    }

    /// Whether anything of meshlet's is present (a chain or a jump into one).
    pub fn has_meshlet(&self) -> bool {
        self.chains.iter().any(|c| CHAINS.contains(&c.as_str()))
            || self.rules.iter().any(Rule::is_meshlet_jump)
    }

    /// How many rules meshlet's chains hold, for reports.
    pub fn meshlet_rule_count(&self) -> usize {
        self.rules
            .iter()
            .filter(|r| CHAINS.contains(&r.chain.as_str()))
            .count()
    }

    /// The restore input that removes every jump into meshlet's chains, then the
    /// chains themselves (flushed first, since a chain must be empty to be deleted
    /// and they reference each other), or `None` when there is nothing to remove.
    pub fn cleanup_payload(&self) -> Option<String> {
        if !self.has_meshlet() {
            return None;
        }
        let mut out = String::from("*nat\n");
        for r in self.rules.iter().filter(|r| r.is_meshlet_jump()) {
            out.push_str(&format!("-D {} {}\n", r.chain, r.spec));
        }
        let present: Vec<&str> = CHAINS
            .into_iter()
            .filter(|c| self.chains.iter().any(|x| x == c))
            .collect();
        for c in &present {
            out.push_str(&format!(":{c} - [0:0]\n"));
        }
        for c in &present {
            out.push_str(&format!("-X {c}\n"));
        }
        out.push_str("COMMIT\n");
        Some(out)
    }
}
