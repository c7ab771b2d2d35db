//! Failures of the proxy itself, and the synthetic HTTP responses they become.
//!
//! One place decides which failure is a 502 and which a 504, so every response the
//! proxy makes up looks the same: a short plain-text body that says what failed and
//! a `meshlet-proxy-error` header for scripts.

use std::{io, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// Header naming the proxy failure behind a synthetic response.
pub const ERROR_HEADER: &str = "meshlet-proxy-error";

/// Why the proxy could not forward a request or connection.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The destination refused or reset the connect.
    #[error("connect to {dst} failed: {source}")]
    Connect {
        /// The destination.
        dst: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The connect took longer than `timeouts.connect`.
    #[error("connect to {dst} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The destination.
        dst: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// The HTTP handshake with the destination failed.
    #[error("HTTP handshake with {dst} failed: {source}")]
    Handshake {
        /// The destination.
        dst: SocketAddr,
        /// Why.
        source: hyper::Error,
    },
    /// The mesh mTLS handshake with a meshed destination failed (for instance the
    /// server presented an identity the mesh config does not list for it).
    #[error("mTLS handshake with {dst} failed: {reason}")]
    Tls {
        /// The destination.
        dst: SocketAddr,
        /// Why, in words.
        reason: String,
    },
    /// The destination broke off the exchange.
    #[error("request to {dst} failed: {source}")]
    Upstream {
        /// The destination.
        dst: SocketAddr,
        /// Why.
        source: hyper::Error,
    },
}

// === impl ProxyError ===

impl ProxyError {
    /// The status a client sees for this failure.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::ConnectTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Connect { .. }
            | Self::Handshake { .. }
            | Self::Tls { .. }
            | Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// A short machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect-failed",
            Self::ConnectTimeout { .. } => "connect-timeout",
            Self::Handshake { .. } => "handshake-failed",
            Self::Tls { .. } => "tls-failed",
            Self::Upstream { .. } => "upstream-failed",
        }
    }
}

/// The synthetic response for `error`.
pub fn respond(error: &ProxyError) -> Response<Full<Bytes>> {
    let body = format!("meshlet-proxy: {error}\n");
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = error.status();
    let h = rsp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(ERROR_HEADER, HeaderValue::from_static(error.kind()));
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn maps_failures_to_statuses() {
        let dst: SocketAddr = "198.19.0.1:80".parse().unwrap();
        let refused = ProxyError::Connect {
            dst,
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        let rsp = respond(&refused);
        assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(rsp.headers()[ERROR_HEADER], "connect-failed");
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        let body = std::str::from_utf8(&body).unwrap();
        assert!(
            body.starts_with("meshlet-proxy: connect to 198.19.0.1:80 failed"),
            "{body}"
        );

        let slow = ProxyError::ConnectTimeout {
            dst,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(respond(&slow).status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(respond(&slow).headers()[ERROR_HEADER], "connect-timeout");
    }
}
