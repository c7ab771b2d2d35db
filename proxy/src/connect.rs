//! Connects to destinations, bounded by `timeouts.connect`.

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

use crate::errors::ProxyError;

/// Opens a TCP connection to `dst` with TCP_NODELAY.
pub async fn connect(dst: SocketAddr, timeout: Duration) -> Result<TcpStream, ProxyError> {
    match tokio::time::timeout(timeout, TcpStream::connect(dst)).await {
        Err(_) => Err(ProxyError::ConnectTimeout { dst, timeout }),
        Ok(Err(source)) => Err(ProxyError::Connect { dst, source }),
        Ok(Ok(stream)) => {
            // Small request/response exchanges must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}
