//! meshlet-init: the init container that redirects a pod's TCP through the sidecar.
//!
//! It renders the whole rule set for a family as one `iptables-restore --noflush`
//! payload and applies it atomically (so a failure, e.g. no NET_ADMIN, changes
//! nothing), then reads the nat table back and checks it. See `rules` for the rule set
//! and why each rule sits where it does, `exec` for the OS boundary.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod config;
pub mod exec;
pub mod rules;

use std::io::Write;

use config::{BackendChoice, Cli, Command, Config, ConfigError, Ipv6Mode};
use exec::{ExecError, Executor, Invocation, Real, Recording};
use rules::{Backend, Family, Mismatch, NatState, RuleSet};

/// Seconds a restore waits for the xtables lock (legacy backend) before giving up.
const LOCK_WAIT: &str = "--wait=10";

/// Everything that can stop meshlet-init; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad option value.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Flags that make no sense together.
    #[error("{0}")]
    Usage(String),
    /// iptables is not installed.
    #[error("`{program}` was not found in PATH: install iptables in the init container image (Debian/Ubuntu: apt-get install -y iptables; Alpine: apk add iptables)")]
    NoIptables {
        /// The missing binary.
        program: String,
    },
    /// The kernel refused.
    #[error("permission denied running `{program}` ({detail}): the meshlet-init container must run as root with the NET_ADMIN and NET_RAW capabilities; no rules were changed")]
    NoNetAdmin {
        /// The refused binary.
        program: String,
        /// Its first line of stderr.
        detail: String,
    },
    /// A save or restore failed for another reason.
    #[error("{source}; the {family} nat table was left as it was (the restore is atomic), see the payload with --dry-run")]
    Exec {
        /// Family being programmed.
        family: Family,
        /// The failure.
        source: ExecError,
    },
    /// The rules read back differ from the intended ones.
    #[error("{family} nat rules ({backend} backend) differ from what meshlet-init intends: {mismatch}; run `meshlet-init` again, or check what else edits the nat table")]
    Verify {
        /// Family.
        family: Family,
        /// Backend.
        backend: Backend,
        /// First difference.
        mismatch: Mismatch,
    },
    /// Cleanup ran but something of meshlet's is still there.
    #[error("cleanup left meshlet rules in the {family} nat table ({backend} backend); inspect with {}", backend.program(*family, "save"))]
    CleanupIncomplete {
        /// Family.
        family: Family,
        /// Backend.
        backend: Backend,
    },
}

impl Error {
    /// Exit status: 2 for bad input (like a usage error), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) => 2,
            _ => 1,
        }
    }

    fn exec(family: Family, err: ExecError) -> Self {
        match err {
            ExecError::NotFound { program } => Error::NoIptables { program },
            ExecError::PermissionDenied { program, detail } => {
                Error::NoNetAdmin { program, detail }
            }
            source => Error::Exec { family, source },
        }
    }
}

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Backend used.
    pub backend: Backend,
    /// Families programmed, with their rule count.
    pub families: Vec<(Family, usize)>,
    /// Whether the rules were read back and matched.
    pub verified: bool,
}

/// Runs the command line: the whole program behind the thin `main`.
pub fn run(cli: &Cli, out: &mut dyn Write) -> Result<(), Error> {
    let command = cli.command.unwrap_or(Command::Apply);
    if cli.dry_run {
        if command != Command::Apply {
            return Err(Error::Usage(
                "--dry-run only applies to `apply`: cleanup and verify read the live rules, run them without --dry-run".into(),
            ));
        }
        let cfg = cli.options.validate()?;
        // Auto means "if the pod has IPv6", unknown here, so show both payloads.
        let rec = Recording::new();
        apply(&cfg, &rec, true, false)?;
        let _ = out.write_all(rec.restore_transcript().as_bytes());
        return Ok(());
    }
    let v6 = has_global_ipv6(&std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default());
    match command {
        Command::Apply => {
            let done = apply(&cli.options.validate()?, &Real, v6, true)?;
            let _ = writeln!(out, "meshlet-init: applied and verified {}", summary(&done));
        }
        Command::Verify => {
            let done = verify(&cli.options.validate()?, &Real, v6)?;
            let _ = writeln!(out, "meshlet-init: verified {}", summary(&done));
        }
        // The options are not even validated: a bad value must never block teardown.
        Command::Cleanup => {
            let removed = cleanup(&Real)?;
            if removed.is_empty() {
                let _ = writeln!(out, "meshlet-init: nothing to clean up");
            }
            for (backend, family) in removed {
                let _ = writeln!(
                    out,
                    "meshlet-init: removed {family} rules ({backend} backend)"
                );
            }
        }
    }
    Ok(())
}

fn summary(done: &Applied) -> String {
    let fams: Vec<String> = done
        .families
        .iter()
        .map(|(f, n)| format!("{n} {f} rules"))
        .collect();
    format!("{} ({} backend)", fams.join(" and "), done.backend)
}

/// Whether `/proc/net/if_inet6` lists an address that is neither link-local nor
/// loopback (scope 0x20 / 0x10): only then does the pod speak IPv6 to the world.
pub fn has_global_ipv6(if_inet6: &str) -> bool {
    if_inet6.lines().any(|l| {
        let scope = l.split_whitespace().nth(3);
        matches!(scope, Some(s) if s != "20" && s != "10")
    })
}

fn families(cfg: &Config, ipv6_present: bool) -> Vec<Family> {
    let v6 = match cfg.ipv6 {
        Ipv6Mode::On => true,
        Ipv6Mode::Off => false,
        Ipv6Mode::Auto => ipv6_present,
    };
    if v6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// Picks the backend: forced, or the one whose `iptables-save` already lists rules
/// (the node's CNI and kube-proxy chose it; mixing backends in one pod confuses
/// everyone), nft when neither does.
pub fn detect_backend(choice: BackendChoice, exec: &dyn Executor) -> Result<Backend, Error> {
    match choice {
        BackendChoice::Nft => return Ok(Backend::Nft),
        BackendChoice::Legacy => return Ok(Backend::Legacy),
        BackendChoice::Auto => {}
    }
    let mut counts = Vec::new();
    let mut missing = None;
    for backend in [Backend::Nft, Backend::Legacy] {
        let program = backend.program(Family::V4, "save");
        match exec.run(&Invocation::new(&program, &[])) {
            Ok(text) => counts.push((
                backend,
                text.lines().filter(|l| l.starts_with("-A ")).count(),
            )),
            Err(ExecError::NotFound { program }) => {
                missing.get_or_insert(program);
            }
            Err(e) => return Err(Error::exec(Family::V4, e)),
        }
    }
    // max_by_key keeps the last maximum, so ties (both empty) go to nft, listed last.
    counts.reverse();
    match counts.into_iter().max_by_key(|(_, n)| *n) {
        Some((backend, _)) => Ok(backend),
        None => Err(Error::NoIptables {
            program: missing.unwrap_or_else(|| "iptables-nft-save".into()),
        }),
    }
}

fn read_nat(
    exec: &dyn Executor,
    backend: Backend,
    family: Family,
    args: &[&str],
) -> Result<NatState, Error> {
    let inv = Invocation::new(backend.program(family, "save"), args);
    let text = exec.run(&inv).map_err(|e| Error::exec(family, e))?;
    Ok(NatState::parse(&text))
}

fn restore(
    exec: &dyn Executor,
    backend: Backend,
    family: Family,
    payload: String,
) -> Result<(), Error> {
    let inv = Invocation::new(
        backend.program(family, "restore"),
        &["--noflush", LOCK_WAIT],
    )
    .with_stdin(payload);
    exec.run(&inv).map(drop).map_err(|e| Error::exec(family, e))
}

/// Programs the rules for IPv4 and, when wanted, IPv6; with `verify`, reads them
/// back and compares. If IPv6 fails after IPv4 succeeded, IPv4 is rolled back so the
/// pod is never left half-captured.
pub fn apply(
    cfg: &Config,
    exec: &dyn Executor,
    ipv6_present: bool,
    verify_after: bool,
) -> Result<Applied, Error> {
    let backend = detect_backend(cfg.backend, exec)?;
    let mut done: Vec<(Family, usize)> = Vec::new();
    for family in families(cfg, ipv6_present) {
        let set = RuleSet::build(cfg, family);
        let result = read_nat(exec, backend, family, &["-t", "nat"])
            .and_then(|current| restore(exec, backend, family, set.restore_payload(&current)));
        if let Err(e) = result {
            for (f, _) in &done {
                // Best effort: the original error is the one worth reporting.
                let _ = cleanup_family(exec, backend, *f);
            }
            return Err(e);
        }
        done.push((family, set.rules.len() + set.jumps.len()));
    }
    if verify_after {
        verify_families(cfg, exec, backend, &done)?;
    }
    Ok(Applied {
        backend,
        families: done,
        verified: verify_after,
    })
}

fn verify_families(
    cfg: &Config,
    exec: &dyn Executor,
    backend: Backend,
    families: &[(Family, usize)],
) -> Result<(), Error> {
    for (family, _) in families {
        let actual = read_nat(exec, backend, *family, &["-t", "nat"])?;
        RuleSet::build(cfg, *family)
            .verify(&actual)
            .map_err(|mismatch| Error::Verify {
                family: *family,
                backend,
                mismatch,
            })?;
    }
    Ok(())
}

/// Checks, without changing anything, that the live rules are exactly the intended ones.
pub fn verify(cfg: &Config, exec: &dyn Executor, ipv6_present: bool) -> Result<Applied, Error> {
    let backend = detect_backend(cfg.backend, exec)?;
    let families: Vec<(Family, usize)> = families(cfg, ipv6_present)
        .into_iter()
        .map(|f| {
            let set = RuleSet::build(cfg, f);
            (f, set.rules.len() + set.jumps.len())
        })
        .collect();
    verify_families(cfg, exec, backend, &families)?;
    Ok(Applied {
        backend,
        families,
        verified: true,
    })
}

/// Removes meshlet's chains and jumps from one family of one backend; true if
/// anything was there. Reading without `-t nat` lists only existing tables, so a
/// backend that was never used is not initialised just to find it empty.
fn cleanup_family(exec: &dyn Executor, backend: Backend, family: Family) -> Result<bool, Error> {
    let state = read_nat(exec, backend, family, &[])?;
    let Some(payload) = state.cleanup_payload() else {
        return Ok(false);
    };
    restore(exec, backend, family, payload)?;
    if read_nat(exec, backend, family, &[])?.has_meshlet() {
        return Err(Error::CleanupIncomplete { family, backend });
    }
    Ok(true)
}

/// Removes everything meshlet-init added, from both backends and both families;
/// idempotent. Returns where something was removed.
pub fn cleanup(exec: &dyn Executor) -> Result<Vec<(Backend, Family)>, Error> {
    let mut removed = Vec::new();
    let mut missing = None;
    let mut found = false;
    for backend in [Backend::Nft, Backend::Legacy] {
        for family in [Family::V4, Family::V6] {
            match cleanup_family(exec, backend, family) {
                Ok(true) => removed.push((backend, family)),
                Ok(false) => {}
                Err(Error::NoIptables { program }) => {
                    missing.get_or_insert(program);
                    continue;
                }
                // A kernel without IPv6 has no IPv6 rules to remove.
                Err(Error::Exec {
                    family: Family::V6, ..
                }) => {}
                Err(e) => return Err(e),
            }
            found = true;
        }
    }
    match (found, missing) {
        (false, Some(program)) => Err(Error::NoIptables { program }),
        _ => Ok(removed),
    }
}

#[cfg(test)]
mod tests;
