//! The OS boundary: everything meshlet-init does to the system is one `iptables-*-save`
//! or `iptables-*-restore` run through an [`Executor`]. [`Real`] runs the binaries;
//! [`Recording`] records what would run and answers saves from canned text, which is
//! what `--dry-run` and the golden tests use (one code path for both, as istio's stub).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::process::{Command, Stdio};

/// One program run: name (looked up in `PATH`), arguments and optional stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// Program name, e.g. `iptables-nft-restore`.
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Text fed to stdin (the restore payload), if any.
    pub stdin: Option<String>,
}

/// Why a program run failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The binary is not installed.
    #[error("`{program}` was not found in PATH")]
    NotFound {
        /// Program name.
        program: String,
    },
    /// The kernel refused: no CAP_NET_ADMIN (or not root).
    #[error("`{program}` was refused permission: {detail}")]
    PermissionDenied {
        /// Program name.
        program: String,
        /// First line of its stderr.
        detail: String,
    },
    /// Any other non-zero exit.
    #[error("`{program}` failed ({status}): {detail}")]
    Failed {
        /// Program name.
        program: String,
        /// Exit status as text.
        status: String,
        /// First lines of its stderr, joined on one line.
        detail: String,
    },
    /// Spawning or talking to the process failed.
    #[error("could not run `{program}`: {source}")]
    Io {
        /// Program name.
        program: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Runs programs at the OS boundary.
pub trait Executor {
    /// Runs `inv` to completion and returns its stdout.
    fn run(&self, inv: &Invocation) -> Result<String, ExecError>;
}

/// Runs the real binaries.
#[derive(Debug, Default, Clone, Copy)]
pub struct Real;

/// Records invocations instead of running them; saves answer from canned output.
#[derive(Debug, Default)]
pub struct Recording {
    log: RefCell<Vec<Invocation>>,
    outputs: HashMap<String, String>,
    failures: RefCell<HashMap<String, ExecError>>,
}

// === impl Invocation ===

impl Invocation {
    /// An invocation without stdin.
    pub fn new(program: impl Into<String>, args: &[&str]) -> Self {
        Self {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            stdin: None,
        }
    }

    /// Adds stdin text.
    pub fn with_stdin(mut self, stdin: String) -> Self {
        self.stdin = Some(stdin);
        self
    }
}

/// Renders as the command line, e.g. `iptables-nft-restore --noflush --wait=10`.
impl fmt::Display for Invocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.program)?;
        for a in &self.args {
            write!(f, " {a}")?;
        }
        Ok(())
    }
}

// === impl Real ===

/// Keeps error reports to one line: the first non-empty lines of stderr, joined.
fn one_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(2)
        .collect();
    if lines.is_empty() {
        "no error output".to_string()
    } else {
        lines.join(" / ")
    }
}

/// Whether stderr says the kernel refused for lack of privilege. nft says "Permission
/// denied (you must be root)"; legacy without CAP_NET_ADMIN only says it is "unable to
/// initialize table".
fn is_permission_error(stderr: &str) -> bool {
    [
        "Permission denied",
        "Operation not permitted",
        "you must be root",
    ]
    .iter()
    .any(|p| stderr.contains(p))
        || stderr.contains("unable to initialize table")
}

impl Executor for Real {
    fn run(&self, inv: &Invocation) -> Result<String, ExecError> {
        let io = |source| ExecError::Io {
            program: inv.program.clone(),
            source,
        };
        let mut child = match Command::new(&inv.program)
            .args(&inv.args)
            .stdin(if inv.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ExecError::NotFound {
                    program: inv.program.clone(),
                })
            }
            Err(e) => return Err(io(e)),
        };
        if let (Some(text), Some(mut stdin)) = (&inv.stdin, child.stdin.take()) {
            // Dropping stdin at the end of this block closes it, so restore sees EOF.
            stdin.write_all(text.as_bytes()).map_err(io)?;
        }
        let out = child.wait_with_output().map_err(io)?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let raw = String::from_utf8_lossy(&out.stderr);
        let detail = one_line(&out.stderr);
        if is_permission_error(&raw) {
            return Err(ExecError::PermissionDenied {
                program: inv.program.clone(),
                detail,
            });
        }
        Err(ExecError::Failed {
            program: inv.program.clone(),
            status: out.status.to_string(),
            detail,
        })
    }
}

// === impl Recording ===

impl Recording {
    /// A recorder whose saves all print nothing (a namespace without rules).
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `program` print `stdout` (e.g. an `iptables-nft-save` snapshot).
    pub fn with_output(mut self, program: &str, stdout: &str) -> Self {
        self.outputs.insert(program.to_string(), stdout.to_string());
        self
    }

    /// Makes the next run of `program` fail with `err`.
    pub fn fail_next(&self, program: &str, err: ExecError) {
        self.failures.borrow_mut().insert(program.to_string(), err);
    }

    /// Every invocation so far, in order.
    pub fn invocations(&self) -> Vec<Invocation> {
        self.log.borrow().clone()
    }

    /// The restore runs only, each as a `# <command line>` header followed by its
    /// payload: what `--dry-run` prints and what the golden files hold.
    pub fn restore_transcript(&self) -> String {
        let mut out = String::new();
        for inv in self.log.borrow().iter() {
            if let Some(stdin) = &inv.stdin {
                out.push_str(&format!("# {inv}\n{stdin}"));
            }
        }
        out
    }
}

impl Executor for Recording {
    fn run(&self, inv: &Invocation) -> Result<String, ExecError> {
        self.log.borrow_mut().push(inv.clone());
        if let Some(err) = self.failures.borrow_mut().remove(&inv.program) {
            return Err(err);
        }
        Ok(self.outputs.get(&inv.program).cloned().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_reports_missing_binary() {
        let err = Real
            .run(&Invocation::new("meshlet-init-no-such-binary", &[]))
            .unwrap_err();
        assert!(matches!(err, ExecError::NotFound { .. }), "{err:?}");
    }

    #[test]
    fn real_feeds_stdin_and_classifies_failures() {
        let inv = Invocation::new("cat", &[]).with_stdin("*nat\nCOMMIT\n".into());
        assert_eq!(Real.run(&inv).unwrap(), "*nat\nCOMMIT\n");
        let denied = Invocation::new(
            "sh",
            &[
                "-c",
                "echo 'x: Permission denied (you must be root)' >&2; exit 4",
            ],
        );
        assert!(matches!(
            Real.run(&denied),
            Err(ExecError::PermissionDenied { .. })
        ));
        let failed = Invocation::new(
            "sh",
            &[
                "-c",
                "printf 'line one\\n\\nline two\\nthree\\n' >&2; exit 3",
            ],
        );
        match Real.run(&failed) {
            Err(ExecError::Failed { detail, .. }) => assert_eq!(detail, "line one / line two"),
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn recording_answers_and_records() {
        let rec = Recording::new().with_output("iptables-nft-save", "*nat\nCOMMIT\n");
        let save = Invocation::new("iptables-nft-save", &["-t", "nat"]);
        assert_eq!(rec.run(&save).unwrap(), "*nat\nCOMMIT\n");
        rec.fail_next(
            "iptables-nft-restore",
            ExecError::NotFound {
                program: "iptables-nft-restore".into(),
            },
        );
        let restore =
            Invocation::new("iptables-nft-restore", &["--noflush"]).with_stdin("P\n".into());
        assert!(rec.run(&restore).is_err());
        assert!(rec.run(&restore).is_ok());
        assert_eq!(rec.invocations().len(), 3);
        assert_eq!(
            rec.restore_transcript(),
            "# iptables-nft-restore --noflush\nP\n# iptables-nft-restore --noflush\nP\n"
        );
    }
}
