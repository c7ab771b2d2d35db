//! `meshlet-echo`: the echo server and `client` that the Gateway API conformance suite
//! expects inside its mesh pods (image `registry.k8s.io/gateway-api/echo-advanced`,
//! which is Istio's echo app).
//!
//! The suite runs `client URL [--method=M] [-H k:v]... [--count=N]` in a pod through
//! pods/exec and reads stdout with the line rules of its `utils/echo/parse.go`: for
//! each `Field=` the first `Field=(.*)` on any line, `RequestHeader=`/`ResponseHeader=`
//! as `Key:value` on every line, and with `--count` one response per blank-line
//! separated block. So the server answers with one `Field=value` line per field, and
//! the client prints, per request `i`, `[i] Url=`, `[i] StatusCode=`, `[i]
//! ResponseHeader=` lines and the body as `[i body] ` lines, then a blank line.

pub mod client;
pub mod server;

use clap::{Parser, Subcommand};

/// Command line: the server flags of the echo image at the top level (as its
/// entrypoint takes them), or the `client` subcommand (as `kubectl exec` runs it).
#[derive(Debug, Parser)]
#[command(
    name = "meshlet-echo",
    about = "Echo server and client speaking the Gateway API conformance suite's echo format",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// `client`; without one the server runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The server's flags.
    #[command(flatten)]
    pub server: server::Flags,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sends requests and prints what came back in the echo format.
    Client(client::Flags),
}

/// Why the echo server or client failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket or runtime error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A flag or URL that cannot be used.
    #[error("{0}")]
    Usage(String),
    /// A request that failed (connect, timeout, protocol).
    #[error("request {id} to {url}: {reason}")]
    Request {
        /// Its index (the `[i]` of the output).
        id: usize,
        /// Its URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

pub(crate) fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Runs the server or the client to completion (the server runs until killed).
pub fn run(cli: Cli) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_ctx("building the tokio runtime"))?;
    match cli.command {
        Some(Command::Client(flags)) => {
            let out = rt.block_on(client::run(&flags))?;
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(out.as_bytes())
                .and_then(|_| stdout.flush())
                .map_err(io_ctx("writing to stdout"))
        }
        None => rt.block_on(server::serve(cli.server)),
    }
}

/// A header name as Go's `http.CanonicalHeaderKey` writes it (`x-header-set` ->
/// `X-Header-Set`), which is how the echo image prints names; names with bytes Go
/// would not touch (spaces, `_`, non-ASCII) stay as they are.
pub fn canonical_key(name: &str) -> String {
    let ok = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^`|~".contains(c);
    if name.is_empty() || !name.chars().all(ok) {
        return name.to_string();
    }
    let mut out = String::with_capacity(name.len());
    let mut upper = true;
    for c in name.chars() {
        out.push(if upper {
            c.to_ascii_uppercase()
        } else {
            c.to_ascii_lowercase()
        });
        upper = c == '-';
    }
    out
}

/// Parses a Go duration as the echo client's `--timeout` takes it (`5s`, `500ms`,
/// `1m30s`, `1.5s`).
pub fn go_duration(s: &str) -> Option<std::time::Duration> {
    let mut rest = s.trim();
    if rest == "0" {
        return Some(std::time::Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    Some(std::time::Duration::from_secs_f64(total))
}

#[cfg(test)]
pub(crate) mod parse_rules {
    //! The field rules of the suite's `utils/echo/parse.go`, restated as tests need
    //! them: what the suite would read from our output.

    use std::collections::BTreeMap;

    /// What the suite reads from one response.
    #[derive(Debug, Default)]
    pub struct Parsed {
        pub fields: BTreeMap<&'static str, String>,
        /// Request headers by lower-case name (the suite compares case-insensitively),
        /// values in order.
        pub request_headers: BTreeMap<String, Vec<String>>,
        /// Response headers by lower-case name, last value wins (`Header.Set`).
        pub response_headers: BTreeMap<String, String>,
        /// `[i body] k=v` lines: the body map.
        pub body: BTreeMap<String, String>,
    }

    const FIELDS: [&str; 12] = [
        "ServiceVersion",
        "ServicePort",
        "StatusCode",
        "Host",
        "Hostname",
        "URL",
        "Cluster",
        "IP",
        "Method",
        "Proto",
        "Alpn",
        "X-Request-Id",
    ];

    /// The first `NAME=(.*)` match anywhere in `out` (Go's unanchored regexp; `.`
    /// stops at a newline).
    pub fn first(out: &str, name: &str) -> Option<String> {
        let pat = format!("{name}=");
        let i = if name == "X-Request-Id" {
            out.to_ascii_lowercase().find(&pat.to_ascii_lowercase())?
        } else {
            out.find(&pat)?
        };
        let rest = &out[i + pat.len()..];
        Some(rest.split('\n').next().unwrap_or("").to_string())
    }

    fn all(out: &str, name: &str) -> Vec<String> {
        let pat = format!("{name}=");
        let mut v = Vec::new();
        let mut rest = out;
        while let Some(i) = rest.find(&pat) {
            let after = &rest[i + pat.len()..];
            let line = after.split('\n').next().unwrap_or("");
            v.push(line.to_string());
            rest = &after[line.len()..];
        }
        v
    }

    pub fn parse(out: &str) -> Parsed {
        let mut p = Parsed::default();
        for f in FIELDS {
            if let Some(v) = first(out, f) {
                p.fields.insert(f, v);
            }
        }
        for kv in all(out, "RequestHeader") {
            if let Some((k, v)) = kv.split_once(':') {
                p.request_headers
                    .entry(k.to_ascii_lowercase())
                    .or_default()
                    .push(v.to_string());
            }
        }
        for kv in all(out, "ResponseHeader") {
            if let Some((k, v)) = kv.split_once(':') {
                p.response_headers
                    .insert(k.to_ascii_lowercase(), v.to_string());
            }
        }
        for line in out.split('\n') {
            let parts: Vec<&str> = line.split("body] ").collect();
            if parts.len() != 2 {
                continue;
            }
            if let Some((k, v)) = parts[1].split_once('=') {
                p.body.insert(k.to_string(), v.to_string());
            }
        }
        p
    }

    /// Batch output: blocks split on a blank line, kept when they have a Hostname or
    /// a StatusCode.
    pub fn parse_many(out: &str) -> Vec<Parsed> {
        out.split("\n\n")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(parse)
            .filter(|p| p.fields.contains_key("Hostname") || p.fields.contains_key("StatusCode"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_keys_as_go_writes_them() {
        assert_eq!(canonical_key("x-header-set"), "X-Header-Set");
        assert_eq!(canonical_key("USER-AGENT"), "User-Agent");
        assert_eq!(canonical_key("version"), "Version");
        assert_eq!(canonical_key("x_under"), "x_under");
        assert_eq!(canonical_key(""), "");
    }

    #[test]
    fn go_durations() {
        use std::time::Duration;
        assert_eq!(go_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("5"), None);
        assert_eq!(go_duration("5x"), None);
    }

    #[test]
    fn parse_rules_take_the_first_match_per_line() {
        let out = "[0] Url=http://echo/a\n[0] StatusCode=302\n[0 body] Host=echo\n[0 body] Hostname=echo-v1-abc-def\n";
        let p = parse_rules::parse(out);
        assert_eq!(p.fields["StatusCode"], "302");
        // `Host=` is not a prefix of `Hostname=`, and the client's `Url=` is not `URL=`.
        assert_eq!(p.fields["Host"], "echo");
        assert_eq!(p.fields["Hostname"], "echo-v1-abc-def");
        assert!(!p.fields.contains_key("URL"));
        assert_eq!(p.body["Host"], "echo");
    }

    #[test]
    fn cli_takes_the_suites_command_lines() {
        let cli = Cli::try_parse_from([
            "meshlet-echo",
            "client",
            "http://echo/v2",
            "--method=GET",
            "-H",
            "Version:two",
            "--count=500",
        ])
        .unwrap();
        let Some(Command::Client(f)) = cli.command else {
            panic!("not the client: {cli:?}")
        };
        assert_eq!(f.url, "http://echo/v2");
        assert_eq!(f.method.as_deref(), Some("GET"));
        assert_eq!(f.headers, vec!["Version:two".to_string()]);
        assert_eq!(f.count, 500);

        // The image's entrypoint flags, as the suite's mesh manifests pass them.
        let cli = Cli::try_parse_from([
            "meshlet-echo",
            "--tcp=9090",
            "--port=8080",
            "--grpc=7070",
            "--port=8443",
            "--tls=8443",
            "--crt=/cert.crt",
            "--key=/cert.key",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.server.port, vec![8080, 8443]);
        assert_eq!(cli.server.tls, vec![8443]);
        assert_eq!(cli.server.tcp, vec![9090]);
        assert_eq!(cli.server.grpc, vec![7070]);
    }
}
