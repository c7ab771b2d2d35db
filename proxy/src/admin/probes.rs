//! Runs the app's original httpGet probes from inside the pod, as kubelet would have
//! run them against the pod IP. Kubelet calls `/app-health/...` on the admin port
//! instead, so probes keep working when inbound traffic needs mesh mTLS.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use meshlet_api::probes::AppProbe;
use tokio::net::TcpStream;

/// Why a probe could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No answer within `timeoutSeconds`.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The probe's host did not resolve.
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// The connect failed.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP request failed: {0}")]
    Http(#[from] hyper::Error),
    /// A header of the probe is not valid HTTP.
    #[error("probe header {0:?} is not valid HTTP")]
    Header(String),
}

/// Runs `probe` against `pod_ip` (or its own `host`); the app's status code, or for
/// `HTTPS` probes 200 once the TCP connect succeeds (the proxy carries no TLS client
/// for apps yet; kubelet would not verify the certificate either).
pub async fn run(probe: &AppProbe, pod_ip: IpAddr) -> Result<u16, ProbeError> {
    let timeout = Duration::from_secs(probe.timeout_seconds.max(1) as u64);
    tokio::time::timeout(timeout, exchange(probe, pod_ip))
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

async fn exchange(probe: &AppProbe, pod_ip: IpAddr) -> Result<u16, ProbeError> {
    let get = &probe.http_get;
    let host = get.host.clone().unwrap_or_else(|| pod_ip.to_string());
    let addr = match host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, get.port),
        Err(_) => tokio::net::lookup_host((host.as_str(), get.port))
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| ProbeError::Resolve(host.clone()))?,
    };
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ProbeError::Connect { addr, source })?;
    if get.scheme.eq_ignore_ascii_case("https") {
        return Ok(200);
    }
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let path = if get.path.starts_with('/') {
        get.path.clone()
    } else {
        format!("/{}", get.path)
    };
    let mut req = Request::get(path)
        .body(Empty::<Bytes>::new())
        .map_err(|_| ProbeError::Header(get.path.clone()))?;
    let h = req.headers_mut();
    let authority = if addr.is_ipv6() && get.host.is_none() {
        format!("[{host}]:{}", get.port)
    } else {
        format!("{host}:{}", get.port)
    };
    // What kubelet sends; the probe's own headers may replace them.
    h.insert(
        header::HOST,
        HeaderValue::from_str(&authority).map_err(|_| ProbeError::Header(authority.clone()))?,
    );
    h.insert(
        header::USER_AGENT,
        HeaderValue::from_static("kube-probe/meshlet"),
    );
    h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    for ph in &get.http_headers {
        let name = HeaderName::from_bytes(ph.name.as_bytes())
            .map_err(|_| ProbeError::Header(ph.name.clone()))?;
        let value =
            HeaderValue::from_str(&ph.value).map_err(|_| ProbeError::Header(ph.name.clone()))?;
        h.insert(name, value);
    }
    let rsp = tx.send_request(req).await?;
    Ok(rsp.status().as_u16())
}
