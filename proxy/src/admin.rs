//! The admin server: readiness, liveness, metrics, effective config, shutdown.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{config::Config, drain, mesh::Mesh, metrics::Metrics, tls::Identity};

mod probes;

/// What the admin endpoints report on.
pub struct Admin {
    /// Set once listeners are bound and config is loaded; cleared when draining.
    pub ready: Arc<AtomicBool>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Mesh config in force.
    pub mesh: Arc<Mesh>,
    /// The workload identity, from `MESHLET_IDENTITY_DIR` or the issuer; ready waits for it.
    pub identity: Option<Arc<Identity>>,
    /// Process config.
    pub config: Config,
    /// Starts the drain.
    pub shutdown: drain::Trigger,
}

/// Serves admin requests until the task is dropped.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let admin = admin.clone();
                async move {
                    let path = req.uri().path();
                    let rsp = if path.starts_with(APP_HEALTH_PREFIX) {
                        admin.app_health(req.method(), path).await
                    } else {
                        admin.route(&req)
                    };
                    Ok::<_, Infallible>(rsp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Where the rewritten app probes are served.
pub const APP_HEALTH_PREFIX: &str = "/app-health/";

// === impl Admin ===

impl Admin {
    /// Runs the app's original probe behind `path` and answers like the app would
    /// have: 200 when the app answered 200..399, else 503 saying what it got.
    pub async fn app_health(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        }
        let Some(probe) = self.config.app_probes.get(path) else {
            return owned_text(
                StatusCode::NOT_FOUND,
                format!("no app probe is registered at {path} (MESHLET_APP_PROBES)\n"),
            );
        };
        let target = self
            .config
            .pod_ip
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
        match probes::run(probe, target).await {
            Ok(status) if (200..400).contains(&status) => {
                owned_text(StatusCode::OK, format!("app answered {status}\n"))
            }
            Ok(status) => owned_text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("app answered {status}\n"),
            ),
            Err(error) => owned_text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("app probe failed: {error}\n"),
            ),
        }
    }

    /// Answers one request.
    pub fn route(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        self.route_parts(req.method(), req.uri().path())
    }

    fn route_parts(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        let read_only = method == Method::GET || method == Method::HEAD;
        match path {
            "/ready" | "/live" | "/metrics" | "/config" if !read_only => {
                text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
            }
            "/ready" => {
                if !self.ready.load(Ordering::Acquire) {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                } else if !self.mesh.is_loaded() {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: waiting for the first mesh config from the control plane \
                         (MESHLET_CONTROL_PLANE_ADDR)\n",
                    )
                } else if self.identity.as_ref().is_some_and(|i| !i.is_loaded()) {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: waiting for the mesh identity (MESHLET_IDENTITY_DIR or the control plane's issuer)\n",
                    )
                } else {
                    text(StatusCode::OK, "ready\n")
                }
            }
            "/live" => text(StatusCode::OK, "live\n"),
            "/metrics" => {
                self.mesh.record_ejected(&self.metrics);
                let mut rsp = Response::new(Full::new(Bytes::from(self.metrics.render())));
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                rsp
            }
            "/config" => {
                let snap = self.mesh.load();
                let doc = serde_json::json!({
                    "process": &self.config,
                    "mesh": &*snap.config,
                    "opaquePorts": snap.opaque_ports(),
                });
                let body = serde_json::to_vec_pretty(&doc).unwrap_or_default();
                let mut rsp = Response::new(Full::new(Bytes::from(body)));
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                rsp
            }
            "/shutdown" if method == Method::POST => {
                tracing::info!("shutdown requested through the admin server");
                self.shutdown.start();
                text(StatusCode::OK, "shutting down\n")
            }
            "/shutdown" => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /ready, /live, /metrics, /config or POST /shutdown\n",
            ),
        }
    }
}

fn owned_text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        let allow = if body.contains("POST") { "POST" } else { "GET" };
        rsp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin() -> (Admin, drain::Signal) {
        let (signal, _watch) = drain::channel();
        let config = Config::parse(&[][..]).unwrap();
        let a = Admin {
            ready: Arc::new(AtomicBool::new(false)),
            metrics: Metrics::new(),
            mesh: Arc::new(Mesh::new(Default::default(), None)),
            identity: None,
            config,
            shutdown: signal.trigger(),
        };
        (a, signal)
    }

    #[test]
    fn routes() {
        let (a, signal) = admin();
        assert_eq!(
            a.route_parts(&Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        a.ready.store(true, Ordering::Release);
        assert_eq!(
            a.route_parts(&Method::GET, "/ready").status(),
            StatusCode::OK
        );
        assert_eq!(
            a.route_parts(&Method::GET, "/live").status(),
            StatusCode::OK
        );
        assert_eq!(
            a.route_parts(&Method::GET, "/metrics").status(),
            StatusCode::OK
        );
        assert_eq!(
            a.route_parts(&Method::GET, "/config").status(),
            StatusCode::OK
        );
        assert_eq!(
            a.route_parts(&Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            a.route_parts(&Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            a.route_parts(&Method::GET, "/shutdown").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert!(!signal.trigger().is_started());
        assert_eq!(
            a.route_parts(&Method::POST, "/shutdown").status(),
            StatusCode::OK
        );
        assert!(signal.trigger().is_started());
    }
}
