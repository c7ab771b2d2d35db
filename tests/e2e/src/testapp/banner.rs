//! A server-first TCP protocol, shaped like SMTP or MySQL: the server speaks first.
//!
//! A proxy that waits for the client's first bytes to detect the protocol would hold
//! the greeting back until its detect timeout; the client measures exactly that.

use std::time::{Duration, Instant};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use super::{io_ctx, Error};

/// How long the client waits for the greeting and the reply.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until killed: greeting, then `250 <line>` per line, `QUIT` ends.
pub async fn serve(port: u16, name: String) -> Result<(), Error> {
    let listener = super::bind_tcp(port).await?;
    eprintln!("testapp banner {name}: listening on port {port} (IPv4 and IPv6)");
    loop {
        let (stream, peer) = listener.accept().await.map_err(io_ctx("accept"))?;
        let name = name.clone();
        tokio::spawn(async move {
            if let Err(e) = conn(stream, &name).await {
                eprintln!("testapp banner: {peer}: {e}");
            }
        });
    }
}

async fn conn(s: TcpStream, name: &str) -> Result<(), Error> {
    let (r, mut w) = s.into_split();
    w.write_all(format!("220 {name} ready\r\n").as_bytes())
        .await
        .map_err(io_ctx("writing the greeting"))?;
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await.map_err(io_ctx("reading a line"))? {
        if line.trim().eq_ignore_ascii_case("QUIT") {
            w.write_all(b"221 bye\r\n")
                .await
                .map_err(io_ctx("writing bye"))?;
            break;
        }
        w.write_all(format!("250 {}\r\n", line.trim_end()).as_bytes())
            .await
            .map_err(io_ctx("writing a reply"))?;
    }
    let _ = w.shutdown().await;
    Ok(())
}

/// Connects, times the greeting, sends one line and checks the reply; prints JSON.
///
/// With `half_close` the client ends its side with a FIN instead of `QUIT` and expects
/// the reply and then the server's own FIN: both halves must travel through a proxy.
pub async fn client(addr: &str, send: &str, half_close: bool) -> Result<(), Error> {
    let fut = async {
        let started = Instant::now();
        let s = TcpStream::connect(addr)
            .await
            .map_err(io_ctx(format!("connecting to {addr}")))?;
        let connect_ms = started.elapsed().as_secs_f64() * 1000.0;
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        let greeting = lines
            .next_line()
            .await
            .map_err(io_ctx("reading the greeting"))?
            .ok_or_else(|| Error::Protocol("closed before the greeting".into()))?;
        let greeting_ms = started.elapsed().as_secs_f64() * 1000.0;
        if !greeting.starts_with("220 ") {
            return Err(Error::Protocol(format!("greeting {greeting:?} is not 220")));
        }
        let tail = if half_close { "" } else { "QUIT\r\n" };
        w.write_all(format!("{send}\r\n{tail}").as_bytes())
            .await
            .map_err(io_ctx("writing"))?;
        if half_close {
            w.shutdown().await.map_err(io_ctx("half-closing"))?;
        }
        let reply = lines
            .next_line()
            .await
            .map_err(io_ctx("reading the reply"))?
            .unwrap_or_default();
        if reply != format!("250 {send}") {
            return Err(Error::Protocol(format!(
                "reply {reply:?} does not echo {send:?}"
            )));
        }
        let bye = lines.next_line().await.map_err(io_ctx("reading bye"))?;
        if half_close && bye.is_some() {
            return Err(Error::Protocol(format!(
                "expected EOF after the reply, got {bye:?}"
            )));
        }
        Ok(serde_json::json!({
            "halfClose": half_close,
            "greeting": greeting,
            "connectMs": connect_ms,
            "greetingMs": greeting_ms,
            "reply": reply,
            "bye": bye,
        }))
    };
    let out = tokio::time::timeout(CLIENT_TIMEOUT, fut)
        .await
        .map_err(|_| {
            Error::Protocol(format!("no greeting from {addr} within {CLIENT_TIMEOUT:?}"))
        })??;
    println!("{out}");
    Ok(())
}
