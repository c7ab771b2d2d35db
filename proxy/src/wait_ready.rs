//! `meshlet-proxy wait-ready [--timeout 60s]`: waits until the proxy of this pod
//! answers `GET /ready` with 200.
//!
//! The injector runs it as the classic sidecar's postStart hook: the kubelet starts
//! the app container only once the hook returns, so the app never sends traffic into
//! redirect rules with no proxy behind them. It reads only `MESHLET_ADMIN_ADDR` (a
//! bad unrelated variable must not fail the hook), needs no runtime, and never starts
//! a proxy.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use meshlet_api::env;

use crate::config::{Strings, DEFAULT_ADMIN_ADDR};

/// The subcommand's name.
pub const COMMAND: &str = "wait-ready";
/// How long it waits unless `--timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between polls.
const POLL: Duration = Duration::from_millis(100);
/// Bound of one connect or read, so a wedged admin server cannot outlast the timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// What to wait for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitReady {
    /// The admin server (unspecified addresses become loopback).
    pub admin: SocketAddr,
    /// How long to wait.
    pub timeout: Duration,
}

/// Bad arguments or environment.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct UsageError(String);

/// The proxy did not become ready in time.
#[derive(Debug, thiserror::Error)]
#[error("not ready after {timeout:?}: GET http://{admin}/ready {last}; check the meshlet-proxy container's log")]
pub struct NotReady {
    /// Where it asked.
    pub admin: SocketAddr,
    /// How long it waited.
    pub timeout: Duration,
    /// The last answer or failure.
    pub last: String,
}

// === impl WaitReady ===

impl WaitReady {
    /// Reads `[--timeout D]` (arguments after the subcommand) and `MESHLET_ADMIN_ADDR`.
    pub fn parse(args: &[String], vars: &(impl Strings + ?Sized)) -> Result<Self, UsageError> {
        let mut timeout = DEFAULT_TIMEOUT;
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let value = match arg.strip_prefix("--timeout") {
                Some("") => it.next().map(String::as_str),
                Some(v) if v.starts_with('=') => Some(&v[1..]),
                _ => {
                    return Err(UsageError(format!(
                        "unknown argument {arg:?}; usage: meshlet-proxy {COMMAND} [--timeout 60s]"
                    )))
                }
            };
            let value = value.unwrap_or_default();
            timeout = value
                .parse::<meshlet_api::Duration>()
                .ok()
                .map(|d| d.as_std())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    UsageError(format!(
                        "--timeout {value:?} is invalid; write a positive duration like 60s or 1m30s"
                    ))
                })?;
        }
        let raw = vars
            .get(env::PROXY_ADMIN_ADDR)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| DEFAULT_ADMIN_ADDR.to_string());
        let mut admin: SocketAddr = raw.parse().map_err(|_| {
            UsageError(format!(
                "{}={raw:?} is invalid: expected an IP address and port, like 0.0.0.0:15020",
                env::PROXY_ADMIN_ADDR
            ))
        })?;
        // The proxy listens on every address; ask it on loopback.
        if admin.ip().is_unspecified() {
            admin.set_ip(match admin.ip() {
                IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        Ok(Self { admin, timeout })
    }

    /// Polls until `/ready` answers 200 (returns how long that took) or the timeout.
    pub fn run(&self) -> Result<Duration, NotReady> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        loop {
            let last = match ready_status(self.admin) {
                Ok(200) => return Ok(start.elapsed()),
                Ok(status) => format!("answered {status}"),
                Err(e) => format!("failed: {e}"),
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(NotReady {
                    admin: self.admin,
                    timeout: self.timeout,
                    last,
                });
            }
            std::thread::sleep(POLL.min(deadline - now));
        }
    }
}

/// One `GET /ready`; the status code.
fn ready_status(admin: SocketAddr) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&admin, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    write!(
        s,
        "GET /ready HTTP/1.0\r\nHost: {admin}\r\nUser-Agent: meshlet-proxy-wait-ready\r\n\r\n"
    )?;
    // The status line fits in the first read of any sane answer; HTTP/1.0 closes after.
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let head = std::str::from_utf8(&buf[..n]).unwrap_or_default();
    head.strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP answer: {head:?}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_timeout_and_admin_addr() {
        let none: &[(&str, &str)] = &[];
        let w = WaitReady::parse(&[], none).unwrap();
        assert_eq!(w.admin, "127.0.0.1:15020".parse().unwrap());
        assert_eq!(w.timeout, DEFAULT_TIMEOUT);

        let vars: &[(&str, &str)] = &[(env::PROXY_ADMIN_ADDR, "[::]:9000")];
        let w = WaitReady::parse(&args(&["--timeout", "1m30s"]), vars).unwrap();
        assert_eq!(w.admin, "[::1]:9000".parse().unwrap());
        assert_eq!(w.timeout, Duration::from_secs(90));
        let w = WaitReady::parse(&args(&["--timeout=500ms"]), none).unwrap();
        assert_eq!(w.timeout, Duration::from_millis(500));

        for bad in [
            &["--timeout"][..],
            &["--timeout", "0s"],
            &["--timeout", "soon"],
        ] {
            let e = WaitReady::parse(&args(bad), none).unwrap_err();
            assert!(e.to_string().contains("positive duration"), "{bad:?}: {e}");
        }
        let e = WaitReady::parse(&args(&["--wait"]), none).unwrap_err();
        assert!(e.to_string().contains("usage"), "{e}");
        let vars: &[(&str, &str)] = &[(env::PROXY_ADMIN_ADDR, "localhost")];
        let e = WaitReady::parse(&[], vars).unwrap_err();
        assert!(e.to_string().contains("MESHLET_ADMIN_ADDR"), "{e}");
    }

    #[test]
    fn not_ready_names_the_last_answer() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let w = WaitReady {
            admin: addr,
            timeout: Duration::from_millis(250),
        };
        let start = Instant::now();
        let e = w.run().unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "overran the timeout"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("not ready after") && msg.contains("failed:"),
            "{msg}"
        );
    }
}
