//! The API server's "cluster" egress: `tools/kube/cluster.sh` points
//! kube-apiserver's egress selector at a unix socket, and every connection to a
//! webhook, an aggregated API or a kubelet arrives here as `HTTP CONNECT ip:port`.
//! The agent dials it from inside the node namespace, which routes to every pod and
//! holds the node address, so no route in the host's root namespace is needed.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UnixListener, UnixStream},
};

use super::{Agent, Error};

/// Parses the request head of a CONNECT; the target must be in 198.18.0.0/15.
pub fn parse_connect(head: &str) -> Result<SocketAddr, String> {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        return Err(format!("not a CONNECT request: {line:?}"));
    };
    let addr: SocketAddr = target
        .parse()
        .map_err(|_| format!("CONNECT target {target:?} is not ip:port"))?;
    match addr {
        SocketAddr::V4(v) if v.ip().octets()[0] == 198 && v.ip().octets()[1] & 0xfe == 18 => {
            Ok(addr)
        }
        _ => Err(format!(
            "CONNECT target {addr} is outside 198.18.0.0/15, the only range this node serves"
        )),
    }
}

/// Listens on `sock` until the agent stops; the socket file is removed on exit.
pub async fn run(agent: Agent, sock: PathBuf) -> Result<(), Error> {
    if let Ok(meta) = std::fs::symlink_metadata(&sock) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(&sock);
        }
    }
    let listener = UnixListener::bind(&sock).map_err(|e| {
        Error::Other(format!(
            "listening on the egress socket {}: {e}; is another meshlet-node serving this cluster?",
            sock.display()
        ))
    })?;
    struct Unlink(PathBuf);
    impl Drop for Unlink {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _unlink = Unlink(sock.clone());
    tracing::info!(socket = %sock.display(), "serving the API server's cluster egress");
    loop {
        let (conn, _) = listener
            .accept()
            .await
            .map_err(|e| Error::Other(format!("egress accept: {e}")))?;
        tokio::spawn(serve(agent.clone(), conn));
    }
}

async fn serve(agent: Agent, mut conn: UnixStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
    let addr = match parse_connect(&String::from_utf8_lossy(&head[..end])) {
        Ok(a) => a,
        Err(e) => {
            let _ = conn
                .write_all(
                    format!(
                        "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{e}",
                        e.len()
                    )
                    .as_bytes(),
                )
                .await;
            return;
        }
    };
    let net = agent.net.clone();
    let dialed =
        tokio::task::spawn_blocking(move || net.connect(addr, Duration::from_secs(5))).await;
    let upstream = match dialed {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(%addr, error = %e, "egress dial");
            let _ = conn
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                .await;
            return;
        }
        Err(_) => return,
    };
    if upstream.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(mut upstream) = TcpStream::from_std(upstream) else {
        return;
    };
    if conn
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    // Bytes the client sent after the head belong to the tunnel.
    if head.len() > end && upstream.write_all(&head[end..]).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_test_range() {
        assert_eq!(
            parse_connect("CONNECT 198.18.7.1:4443 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap(),
            "198.18.7.1:4443".parse().unwrap()
        );
        assert!(parse_connect("CONNECT 198.19.0.10:443 HTTP/1.1\r\n\r\n").is_ok());
        assert!(parse_connect("CONNECT 127.0.0.1:6443 HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_connect("CONNECT 10.0.0.1:443 HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_connect("GET / HTTP/1.1\r\n\r\n").is_err());
    }
}
