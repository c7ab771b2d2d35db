//! Watches the mesh config from the control plane (`GET /v1/config`, see
//! `meshlet_injector::delivery`) instead of a file.
//!
//! The response is newline-delimited JSON: one whole document per line, blank lines
//! are heartbeats. Each document is validated and swapped in like a file reload
//! ([`Mesh::store`] keeps endpoint state); an invalid one is refused and counted
//! (`meshlet_config_reloads_total{result="error"}`) while the last good one keeps
//! serving. When the stream ends, fails or stays silent for longer than three
//! heartbeats, the watch reconnects with capped exponential backoff and jitter; the
//! proxy keeps serving the last good document all along. A control plane that answers
//! 404 (no config delivery, e.g. its controller is off) leaves the proxy on an empty
//! document, ready, asking again every `backoff_max`.

use std::{
    hash::{BuildHasher, Hasher},
    sync::Arc,
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use meshlet_api::MeshConfig;

use super::Mesh;
use crate::{
    control::{ControlError, ControlPlane},
    metrics::Metrics,
};

/// The watch's path on the control plane.
pub const PATH: &str = "/v1/config";
/// A line longer than this is refused (and the connection dropped): a document of
/// thousands of services is a few MiB; this bounds what a broken server can make the
/// proxy buffer.
pub const MAX_LINE: usize = 32 << 20;
/// How much of a refusal's body is logged.
const MAX_ERROR_BODY: usize = 4 << 10;

/// How the watch retries.
#[derive(Clone, Debug)]
pub struct Options {
    /// Silence (no document, no heartbeat) after which the connection counts as dead;
    /// three of the server's 15 s heartbeats.
    pub stall: Duration,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
}

/// Why one watch ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// No connection.
    #[error(transparent)]
    Connect(#[from] ControlError),
    /// The control plane refused the watch.
    #[error("the control plane refused the config watch with {status}: {body}")]
    Refused {
        /// The status.
        status: StatusCode,
        /// What it said.
        body: String,
    },
    /// The connection broke.
    #[error("the config watch broke: {0}")]
    Http(#[from] hyper::Error),
    /// Nothing arrived, not even a heartbeat.
    #[error("nothing from the control plane for {0:?}; reconnecting")]
    Stalled(Duration),
    /// A line without end.
    #[error("the control plane sent a line longer than {MAX_LINE} bytes; reconnecting")]
    TooLong,
    /// The server ended the stream (shutdown, restart).
    #[error("the control plane ended the config watch")]
    Ended,
}

/// Capped exponential backoff with jitter.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

// === impl Options ===

impl Default for Options {
    fn default() -> Self {
        Self {
            stall: Duration::from_secs(45),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(15),
        }
    }
}

// === impl Backoff ===

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The next delay: uniformly within the upper half of the current step, so
    /// thousands of proxies cut off at once do not come back at once.
    fn next(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(self.max);
        let half = step / 2;
        // RandomState is seeded per instance; enough randomness for a jitter.
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        half + half.mul_f64((r >> 11) as f64 / (1u64 << 53) as f64)
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Watches until the task is dropped.
pub async fn watch(
    mesh: Arc<Mesh>,
    control: ControlPlane,
    namespace: Option<String>,
    metrics: Arc<Metrics>,
    options: Options,
) {
    let path = match &namespace {
        Some(ns) => format!("{PATH}?namespace={ns}"),
        None => PATH.to_string(),
    };
    let mut backoff = Backoff::new(options.backoff_min, options.backoff_max);
    loop {
        let error = session(&mesh, &control, &path, &metrics, &options, &mut backoff).await;
        if let WatchError::Refused {
            status: StatusCode::NOT_FOUND,
            ..
        } = error
        {
            // A control plane without config delivery (its controller is off): run as
            // without a config file instead of never becoming ready, and keep asking
            // at the slowest pace in case it comes.
            if !mesh.is_loaded() {
                tracing::warn!(
                    control_plane = control.addr(),
                    "the control plane does not serve {PATH}; running with an empty mesh \
                     config (no services) and asking again"
                );
                mesh.store(MeshConfig::default());
            }
            tokio::time::sleep(options.backoff_max).await;
            continue;
        }
        let delay = backoff.next();
        tracing::warn!(
            %error,
            control_plane = control.addr(),
            retry_in = ?delay,
            serving_generation = mesh.load().config.generation,
            "mesh config watch interrupted; serving the last good config"
        );
        tokio::time::sleep(delay).await;
    }
}

/// One connection's watch, until it fails.
async fn session(
    mesh: &Mesh,
    control: &ControlPlane,
    path: &str,
    metrics: &Metrics,
    options: &Options,
    backoff: &mut Backoff,
) -> WatchError {
    let run = async {
        let mut send = control.connect::<Empty<Bytes>>().await?;
        let req = Request::get(path)
            .header(header::HOST, control.addr())
            .header(
                header::USER_AGENT,
                concat!("meshlet-proxy/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| WatchError::Refused {
                status: StatusCode::BAD_REQUEST,
                body: e.to_string(),
            })?;
        let rsp = tokio::time::timeout(options.stall, send.send_request(req))
            .await
            .map_err(|_| WatchError::Stalled(options.stall))??;
        let status = rsp.status();
        let mut body = rsp.into_body();
        if status != StatusCode::OK {
            let mut text = Vec::new();
            while let Ok(Some(Ok(f))) = tokio::time::timeout(options.stall, body.frame()).await {
                if let Ok(d) = f.into_data() {
                    text.extend_from_slice(&d);
                }
                if text.len() > MAX_ERROR_BODY {
                    break;
                }
            }
            text.truncate(MAX_ERROR_BODY);
            return Err(WatchError::Refused {
                status,
                body: String::from_utf8_lossy(&text).trim().to_string(),
            });
        }
        backoff.reset();
        tracing::info!(control_plane = control.addr(), "watching the mesh config");
        let mut buf = BytesMut::new();
        loop {
            let frame = match tokio::time::timeout(options.stall, body.frame()).await {
                Err(_) => return Err(WatchError::Stalled(options.stall)),
                Ok(None) => return Err(WatchError::Ended),
                Ok(Some(f)) => f?,
            };
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            while data.has_remaining() {
                match data.iter().position(|b| *b == b'\n') {
                    Some(i) => {
                        let rest = data.split_off(i + 1);
                        buf.extend_from_slice(&data[..i]);
                        apply(mesh, metrics, &buf);
                        buf.clear();
                        data = rest;
                    }
                    None => {
                        buf.extend_from_slice(&data);
                        data.clear();
                    }
                }
            }
            if buf.len() > MAX_LINE {
                return Err(WatchError::TooLong);
            }
        }
    };
    match run.await {
        Ok(()) => WatchError::Ended,
        Err(e) => e,
    }
}

/// Applies one line: a document, or a heartbeat when blank.
fn apply(mesh: &Mesh, metrics: &Metrics, line: &[u8]) {
    if line.trim_ascii().is_empty() {
        return;
    }
    match MeshConfig::from_json(line) {
        Ok(config) => {
            tracing::info!(
                generation = config.generation,
                services = config.services.len(),
                "mesh config received"
            );
            mesh.store(config);
            metrics.config_reload(true);
        }
        Err(error) => {
            tracing::warn!(%error, "refusing a mesh config from the control plane; keeping the last good one");
            metrics.config_reload(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let steps: Vec<Duration> = (0..6).map(|_| b.next()).collect();
        for (d, step) in steps.iter().zip([100u64, 200, 400, 800, 800, 800]) {
            let step = Duration::from_millis(step);
            assert!(
                *d >= step / 2 && *d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
        let distinct: std::collections::HashSet<Duration> = (0..20)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next())
            .collect();
        assert!(distinct.len() > 1, "no jitter: {distinct:?}");
    }

    #[test]
    fn invalid_lines_are_counted_and_refused() {
        let mesh = Mesh::pending(None);
        let metrics = Metrics::new();
        apply(&mesh, &metrics, b"  ");
        assert!(!mesh.is_loaded(), "a heartbeat is no document");
        apply(&mesh, &metrics, br#"{"generation": 4}"#);
        assert!(mesh.is_loaded());
        apply(&mesh, &metrics, br#"{"generation": 5, "bogus": 1}"#);
        assert_eq!(mesh.load().config.generation, 4, "the last good one stays");
        let text = metrics.render();
        assert!(
            text.contains(r#"meshlet_config_reloads_total{result="ok"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"meshlet_config_reloads_total{result="error"} 1"#),
            "{text}"
        );
    }
}
