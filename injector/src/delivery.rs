//! Config delivery: the control plane's `GET /v1/config` watch, which streams each proxy
//! its view of the mesh config document.
//!
//! # Wire format
//!
//! `GET /v1/config[?namespace=<ns>]` answers `200` with `Content-Type:
//! application/x-ndjson` and a body that never ends on its own (HTTP/1.1 chunked or an
//! HTTP/2 stream):
//!
//! - one line per document: the client's view of the [`MeshConfig`], compact JSON
//!   (which has no raw newline), terminated by `\n`. The first line is the document in
//!   force when the request arrives; each later line replaces the previous one whole.
//!   A document of `generation` 0 is the publisher's "not synced yet" (the config
//!   controller starts with one): it is never sent, the client waits (heartbeats
//!   only) for the first real document.
//! - an empty line (`\n` alone) is a heartbeat, sent after [`HEARTBEAT`] without a
//!   document, so both ends notice a dead connection; clients skip it. A client that
//!   hears nothing for three heartbeats should reconnect.
//! - the body ends when the server shuts down or stops publishing; the client
//!   reconnects with backoff and keeps serving its last good document meanwhile.
//!
//! # Views
//!
//! Each proxy gets ITS view: every producer route (an HTTPRoute in its Service's own
//! namespace) and only the consumer routes (an HTTPRoute in another namespace) of the
//! client's namespace, which are the only ones it may apply (GAMMA). The client's
//! namespace is the one of the verified mesh identity the TLS server put into the
//! request's extensions ([`SpiffeId`]); a `namespace` query parameter must then match
//! it (else `403`). Without an identity (identity off, plaintext test mode) the
//! `namespace` parameter names it (else `400`), unless [`Options::require_identity`]
//! refuses such clients (`401`).
//!
//! # Metrics
//!
//! `meshlet_config_watchers` (gauge: connected watches) and
//! `meshlet_config_documents_sent_total` (counter: documents written, heartbeats
//! excluded).

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::Request,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use meshlet_api::{MeshConfig, SpiffeId};
use metrics::{Counter, Gauge, Key, Metadata, Recorder};
use tokio::sync::watch;

/// The watch's path.
pub const PATH: &str = "/v1/config";
/// The query parameter that names the client's namespace.
pub const NAMESPACE_PARAM: &str = "namespace";
/// The stream's content type.
pub const CONTENT_TYPE: &str = "application/x-ndjson";
/// How long the stream may stay silent before a heartbeat line goes out.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// Gauge: connected watches.
pub const WATCHERS: &str = "meshlet_config_watchers";
/// Counter: documents sent (heartbeats excluded).
pub const DOCUMENTS_SENT: &str = "meshlet_config_documents_sent_total";

/// How the watch behaves.
#[derive(Clone, Debug)]
pub struct Options {
    /// Silence after which a heartbeat line is sent.
    pub heartbeat: Duration,
    /// Refuse clients without a verified mesh identity (`401`) instead of trusting
    /// their `namespace` parameter.
    pub require_identity: bool,
    /// Where the watch counts.
    pub metrics: DeliveryMetrics,
}

/// The watch's metric handles.
#[derive(Clone, Debug)]
pub struct DeliveryMetrics {
    watchers: Gauge,
    sent: Counter,
}

/// The views of one published document, serialised once per namespace: a thousand
/// proxies of one namespace share one serialisation.
#[derive(Default)]
struct ViewCache {
    doc: Option<Arc<MeshConfig>>,
    lines: HashMap<String, Bytes>,
}

struct State {
    rx: watch::Receiver<Arc<MeshConfig>>,
    options: Options,
    cache: Mutex<ViewCache>,
}

/// One client's stream; the gauge counts it until the body is dropped.
struct Watch {
    state: Arc<State>,
    rx: watch::Receiver<Arc<MeshConfig>>,
    namespace: String,
    last: Option<Bytes>,
    heartbeat: tokio::time::Interval,
    watchers: Gauge,
}

// === impl Options ===

impl Default for Options {
    fn default() -> Self {
        Self {
            heartbeat: HEARTBEAT,
            require_identity: false,
            metrics: DeliveryMetrics::global(),
        }
    }
}

// === impl DeliveryMetrics ===

impl DeliveryMetrics {
    /// Handles in the process-wide recorder (the injector's `/metrics`).
    pub fn global() -> Self {
        metrics::describe_gauge!(WATCHERS, "Proxies watching their mesh config");
        metrics::describe_counter!(DOCUMENTS_SENT, "Mesh config documents sent to proxies");
        Self {
            watchers: metrics::gauge!(WATCHERS),
            sent: metrics::counter!(DOCUMENTS_SENT),
        }
    }

    /// Handles in `recorder` (tests, or a program with its own registry).
    pub fn with_recorder(recorder: &impl Recorder) -> Self {
        static META: Metadata<'static> =
            Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));
        Self {
            watchers: recorder.register_gauge(&Key::from_static_name(WATCHERS), &META),
            sent: recorder.register_counter(&Key::from_static_name(DOCUMENTS_SENT), &META),
        }
    }
}

// === impl State ===

impl State {
    /// The line for `namespace` of `doc`, from the cache when another watcher of the
    /// namespace already made it.
    fn line(&self, doc: &Arc<MeshConfig>, namespace: &str) -> Bytes {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.doc.as_ref().is_some_and(|d| Arc::ptr_eq(d, doc)) {
            cache.doc = Some(doc.clone());
            cache.lines.clear();
        }
        if let Some(line) = cache.lines.get(namespace) {
            return line.clone();
        }
        let mut json = serde_json::to_vec(&view(doc, namespace)).unwrap_or_else(|error| {
            // MeshConfig is plain data; this cannot fail, but a client must never
            // get half a line.
            tracing::error!(%error, "cannot serialise a mesh config view");
            b"{}".to_vec()
        });
        json.push(b'\n');
        let line = Bytes::from(json);
        cache.lines.insert(namespace.to_string(), line.clone());
        line
    }
}

// === impl Watch ===

impl Watch {
    /// The next chunk of the body: the current document first, then each change of
    /// the client's view, heartbeats in between; `None` ends the body.
    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        // The first document goes out at once; later ones when `changed` (which marks
        // the value seen) says so.
        let mut changed = self.last.is_none();
        loop {
            if changed {
                let doc = self.rx.borrow_and_update().clone();
                // Generation 0 is the publisher's "not synced yet": an empty document
                // would make the proxy ready with no services, so only heartbeats go
                // out until the first real document.
                if doc.generation > 0 {
                    let line = self.state.line(&doc, &self.namespace);
                    if self.last.as_ref() != Some(&line) {
                        self.last = Some(line.clone());
                        self.heartbeat.reset();
                        self.state.options.metrics.sent.increment(1);
                        return Some((Ok(line), self));
                    }
                }
            }
            tokio::select! {
                r = self.rx.changed() => {
                    if r.is_err() {
                        // The publisher is gone (shutting down): end the body, the
                        // client reconnects.
                        return None;
                    }
                    changed = true;
                }
                _ = self.heartbeat.tick() => {
                    return Some((Ok(Bytes::from_static(b"\n")), self));
                }
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.watchers.decrement(1.0);
    }
}

/// The client's view of `doc`: producer routes stay, consumer routes only when they
/// belong to `namespace`.
pub fn view(doc: &MeshConfig, namespace: &str) -> MeshConfig {
    let mut v = doc.clone();
    for svc in &mut v.services {
        let own = &svc.namespace;
        svc.routes
            .retain(|r| r.namespace == *own || r.namespace == namespace);
    }
    v
}

/// The router serving `GET /v1/config` from `rx`.
pub fn router(rx: watch::Receiver<Arc<MeshConfig>>, options: Options) -> Router {
    let state = Arc::new(State {
        rx,
        options,
        cache: Mutex::default(),
    });
    Router::new().route(
        PATH,
        get(move |req: Request| {
            let state = state.clone();
            async move { watch_handler(state, req) }
        }),
    )
}

fn watch_handler(state: Arc<State>, req: Request) -> Response {
    let id = req.extensions().get::<SpiffeId>();
    let namespace = match client_namespace(id, req.uri().query(), state.options.require_identity) {
        Ok(ns) => ns,
        Err((status, message)) => {
            tracing::info!(?id, query = ?req.uri().query(), %message, "config watch refused");
            return (status, message).into_response();
        }
    };
    tracing::debug!(%namespace, ?id, "config watch opened");
    let heartbeat_every = state.options.heartbeat.max(Duration::from_millis(10));
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + heartbeat_every,
        heartbeat_every,
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watchers = state.options.metrics.watchers.clone();
    watchers.increment(1.0);
    let w = Watch {
        rx: state.rx.clone(),
        state,
        namespace,
        last: None,
        heartbeat,
        watchers,
    };
    let body = Body::from_stream(futures_util::stream::unfold(w, Watch::next));
    (
        [
            (header::CONTENT_TYPE, CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// Which namespace's view the client gets, or the refusal.
fn client_namespace(
    id: Option<&SpiffeId>,
    query: Option<&str>,
    require_identity: bool,
) -> Result<String, (StatusCode, String)> {
    let mut asked = None;
    for pair in query.unwrap_or_default().split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != NAMESPACE_PARAM {
            continue;
        }
        if asked.is_some() {
            return Err((
                StatusCode::BAD_REQUEST,
                "the namespace parameter is given twice; give it once\n".to_string(),
            ));
        }
        if !is_dns_label(v) {
            return Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "namespace={v:?} is not a Kubernetes namespace name (lowercase letters, \
                     digits and '-', at most 63)\n"
                ),
            ));
        }
        asked = Some(v);
    }
    match (id, asked) {
        (Some(id), Some(ns)) if ns != id.namespace() => Err((
            StatusCode::FORBIDDEN,
            format!(
                "namespace={ns} does not match the namespace of your mesh identity {id}; a \
                 proxy may only watch its own namespace's config (drop the parameter or set \
                 MESHLET_POD_NAMESPACE={})\n",
                id.namespace()
            ),
        )),
        (Some(id), _) => Ok(id.namespace().to_string()),
        (None, _) if require_identity => Err((
            StatusCode::UNAUTHORIZED,
            "this control plane serves the mesh config only to clients with a mesh \
             certificate; present the proxy's identity as the TLS client certificate\n"
                .to_string(),
        )),
        (None, Some(ns)) => Ok(ns.to_string()),
        (None, None) => Err((
            StatusCode::BAD_REQUEST,
            format!(
                "without a mesh certificate the client must name its namespace: GET \
                 {PATH}?{NAMESPACE_PARAM}=<namespace>\n"
            ),
        )),
    }
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

pub mod publish;
pub mod server;

#[cfg(test)]
mod tests;
