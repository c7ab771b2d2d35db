//! `meshlet-testapp`: the workload the e2e pods run.
//!
//! One binary with a subcommand per protocol the mesh must carry unchanged: HTTP/1.1
//! and h2c, WebSocket, a server-first TCP protocol and UDP DNS. Servers answer with
//! their own name so a test can tell which backend answered; clients print one JSON
//! line and exit non-zero when what came back is not what was sent.

pub mod banner;
pub mod dns;
pub mod http;
pub mod http_load;
pub mod load;
pub mod pattern;
pub mod ws;

use std::net::Ipv4Addr;

use clap::{Parser, Subcommand};

/// Command line of `meshlet-testapp`.
#[derive(Debug, Parser)]
#[command(
    name = "meshlet-testapp",
    about = "Test workload for meshlet's e2e mini-mesh"
)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// HTTP/1.1 + h2c server: echo, /bytes/N, /upload, /slow?ms=N, /status/N, /count.
    Http {
        /// TCP port to listen on (all addresses).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Name the server answers with (header `x-testapp-name`, JSON field `name`).
        #[arg(long, env = "TESTAPP_NAME", default_value = "testapp")]
        name: String,
        /// Ignore SIGTERM (only SIGKILL stops it), to test grace periods.
        #[arg(long)]
        ignore_sigterm: bool,
        /// Answer every N-th request 503 (after reading its body); 0 never.
        #[arg(long, default_value_t = 0)]
        fail_every: u64,
    },
    /// HTTP/1.1 load client: sends requests one after another on keep-alive
    /// connections and prints a JSON summary (statuses, answering servers, latencies).
    Load(load::Args),
    /// WebSocket echo server (RFC 6455).
    Ws {
        /// TCP port to listen on.
        #[arg(long, default_value_t = 8081)]
        port: u16,
    },
    /// WebSocket client: sends messages, checks each echo, prints a JSON summary.
    WsClient {
        /// Server URL, `ws://HOST:PORT/PATH`.
        #[arg(long)]
        url: String,
        /// Messages to send (repeat the flag for several).
        #[arg(long = "message", default_value = "hello meshlet")]
        messages: Vec<String>,
    },
    /// Server-first TCP protocol: writes a greeting at once, then answers lines.
    Banner {
        /// TCP port to listen on.
        #[arg(long, default_value_t = 3306)]
        port: u16,
        /// Name in the greeting.
        #[arg(long, env = "TESTAPP_NAME", default_value = "testapp")]
        name: String,
    },
    /// Client of `banner`: measures the time from connect to the greeting.
    BannerClient {
        /// Server address, `HOST:PORT`.
        #[arg(long)]
        addr: String,
        /// A line to send after the greeting.
        #[arg(long, default_value = "PING")]
        send: String,
        /// End with a FIN (shutdown of the write half) instead of QUIT, and expect the
        /// reply and then EOF.
        #[arg(long)]
        half_close: bool,
    },
    /// Requests to one URL over one connection, one after another; prints who
    /// answered each (`byName`, `byStatus`, `records` of `[unixMs, status, name]`).
    HttpLoad {
        /// `http://HOST[:PORT]/PATH`.
        #[arg(long)]
        url: String,
        /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
        #[arg(long)]
        h2: bool,
        /// Stop after this many requests.
        #[arg(long, default_value_t = 1000)]
        requests: u64,
        /// Stop after this many milliseconds.
        #[arg(long, default_value_t = 60_000)]
        duration_ms: u64,
        /// Pause after each answer, in milliseconds.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// Writes the first N bytes of the `/bytes/N` pattern to stdout (upload input).
    Pattern {
        /// How many bytes.
        #[arg(long)]
        bytes: u64,
    },
    /// UDP DNS server that answers every A query with one fixed address.
    UdpDns {
        /// UDP port to listen on.
        #[arg(long, default_value_t = 53)]
        port: u16,
        /// The address every A query gets.
        #[arg(long)]
        answer: Ipv4Addr,
    },
}

/// Why the test app failed.
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
    /// The peer broke the protocol or echoed something else.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Adds context to an I/O error.
pub(crate) fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Listens on `[::]:port` (which also accepts IPv4), or on `0.0.0.0:port` where the
/// namespace has no IPv6.
pub(crate) async fn bind_tcp(port: u16) -> Result<tokio::net::TcpListener, Error> {
    match tokio::net::TcpListener::bind(("::", port)).await {
        Ok(l) => Ok(l),
        Err(_) => tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .map_err(io_ctx(format!("binding port {port}"))),
    }
}

/// Runs the selected subcommand to completion (servers run until killed).
pub fn run(cli: Cli) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_ctx("building the tokio runtime"))?;
    match cli.command {
        Command::Http {
            port,
            name,
            ignore_sigterm,
            fail_every,
        } => rt.block_on(async {
            if ignore_sigterm {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .map_err(io_ctx("installing a SIGTERM handler"))?;
                tokio::spawn(async move {
                    while term.recv().await.is_some() {
                        eprintln!("testapp: ignoring SIGTERM");
                    }
                });
            }
            http::serve(port, name, fail_every).await
        }),
        Command::Load(args) => rt.block_on(load::run(args)),
        Command::Ws { port } => rt.block_on(ws::serve(port)),
        Command::WsClient { url, messages } => rt.block_on(ws::client(&url, &messages)),
        Command::Banner { port, name } => rt.block_on(banner::serve(port, name)),
        Command::BannerClient {
            addr,
            send,
            half_close,
        } => rt.block_on(banner::client(&addr, &send, half_close)),
        Command::HttpLoad {
            url,
            h2,
            requests,
            duration_ms,
            interval_ms,
        } => rt.block_on(http_load::run(
            &url,
            h2,
            http_load::Limits {
                requests,
                duration: std::time::Duration::from_millis(duration_ms),
                interval: std::time::Duration::from_millis(interval_ms),
            },
        )),
        Command::UdpDns { port, answer } => dns::serve(port, answer),
        Command::Pattern { bytes } => write_pattern(bytes),
    }
}

fn write_pattern(len: u64) -> Result<(), Error> {
    use std::io::Write;
    let mut p = pattern::Pattern::new(len);
    let mut out = std::io::stdout().lock();
    while let Some(c) = p.next_chunk() {
        out.write_all(&c)
            .map_err(io_ctx("writing the pattern to stdout"))?;
    }
    out.flush().map_err(io_ctx("flushing stdout"))
}
