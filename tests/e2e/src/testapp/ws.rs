//! A hand-written RFC 6455 WebSocket echo server and client: enough of the protocol to
//! prove an HTTP/1.1 Upgrade and the framed bytes after it pass through the mesh.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use ring::digest;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{io_ctx, Error};

/// The GUID RFC 6455 section 1.3 appends to the key.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest request or response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest frame payload accepted.
const MAX_PAYLOAD: u64 = 16 * 1024 * 1024;
/// How long the client waits for any one reply.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

const OP_TEXT: u8 = 1;
const OP_CLOSE: u8 = 8;
const OP_PING: u8 = 9;
const OP_PONG: u8 = 10;

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let d = digest::digest(
        &digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{GUID}").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(d.as_ref())
}

/// One frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    /// FIN bit.
    pub fin: bool,
    /// Opcode.
    pub opcode: u8,
    /// Unmasked payload.
    pub payload: Vec<u8>,
}

/// Encodes a frame; `mask` is set for client frames.
pub fn encode(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0f));
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mbit | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(mbit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mbit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Reads one frame and unmasks it.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, Error> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h)
        .await
        .map_err(io_ctx("reading a frame header"))?;
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)
                .await
                .map_err(io_ctx("reading length"))?;
            u16::from_be_bytes(b) as u64
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)
                .await
                .map_err(io_ctx("reading length"))?;
            u64::from_be_bytes(b)
        }
        n => n as u64,
    };
    if len > MAX_PAYLOAD {
        return Err(Error::Protocol(format!("frame of {len} bytes is too big")));
    }
    let mask = if h[1] & 0x80 != 0 {
        let mut m = [0u8; 4];
        r.read_exact(&mut m).await.map_err(io_ctx("reading mask"))?;
        Some(m)
    } else {
        None
    };
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)
        .await
        .map_err(io_ctx("reading payload"))?;
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Ok(Frame {
        fin: h[0] & 0x80 != 0,
        opcode: h[0] & 0x0f,
        payload,
    })
}

/// Reads an HTTP head (up to the blank line); returns it and any bytes after it.
async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> Result<(String, Vec<u8>), Error> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(pos + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(Error::Protocol("HTTP head too long".into()));
        }
        let n = r.read(&mut chunk).await.map_err(io_ctx("reading head"))?;
        if n == 0 {
            return Err(Error::Protocol(
                "connection closed during the handshake".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Echo server; runs until killed.
pub async fn serve(port: u16) -> Result<(), Error> {
    let listener = super::bind_tcp(port).await?;
    eprintln!("testapp ws: listening on port {port} (IPv4 and IPv6)");
    loop {
        let (stream, peer) = listener.accept().await.map_err(io_ctx("accept"))?;
        tokio::spawn(async move {
            if let Err(e) = echo_conn(stream).await {
                eprintln!("testapp ws: {peer}: {e}");
            }
        });
    }
}

async fn echo_conn(mut s: TcpStream) -> Result<(), Error> {
    let (head, rest) = read_head(&mut s).await?;
    if !rest.is_empty() {
        return Err(Error::Protocol("client sent frames before the 101".into()));
    }
    let upgrade = header(&head, "upgrade").unwrap_or("");
    let Some(key) = header(&head, "sec-websocket-key") else {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await
            .map_err(io_ctx("writing 400"))?;
        return Err(Error::Protocol("not a WebSocket handshake".into()));
    };
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return Err(Error::Protocol(format!("Upgrade is {upgrade:?}")));
    }
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    );
    s.write_all(resp.as_bytes())
        .await
        .map_err(io_ctx("writing 101"))?;
    loop {
        let f = read_frame(&mut s).await?;
        let out = match f.opcode {
            OP_CLOSE => {
                s.write_all(&encode(true, OP_CLOSE, &f.payload, None))
                    .await
                    .map_err(io_ctx("writing close"))?;
                let _ = s.shutdown().await;
                return Ok(());
            }
            OP_PING => encode(true, OP_PONG, &f.payload, None),
            OP_PONG => continue,
            op => encode(f.fin, op, &f.payload, None),
        };
        s.write_all(&out).await.map_err(io_ctx("writing echo"))?;
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    // Masking keys need to be unpredictable to a proxy, not cryptographic; the clock
    // through xorshift is enough for a test client.
    let mut x = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9_7f4a_7c15)
        | 1;
    let mut out = [0u8; N];
    for b in out.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    out
}

/// Connects, upgrades, sends each message and checks the echo; prints a JSON summary.
pub async fn client(url: &str, messages: &[String]) -> Result<(), Error> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| Error::Protocol(format!("url {url:?} must start with ws://")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let started = Instant::now();
    let fut = async {
        let mut s = TcpStream::connect(authority)
            .await
            .map_err(io_ctx(format!("connecting to {authority}")))?;
        let key = base64::engine::general_purpose::STANDARD.encode(random_bytes::<16>());
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(io_ctx("writing the upgrade request"))?;
        let (head, rest) = read_head(&mut s).await?;
        let status = head.lines().next().unwrap_or("");
        if !status.contains(" 101 ") {
            return Err(Error::Protocol(format!("expected 101, got {status:?}")));
        }
        if header(&head, "sec-websocket-accept") != Some(accept_key(&key).as_str()) {
            return Err(Error::Protocol("wrong Sec-WebSocket-Accept".into()));
        }
        let mut r = std::io::Cursor::new(rest).chain(&mut s);
        let mut echoed = 0usize;
        let mut frames = Vec::new();
        for m in messages {
            frames.push(encode(
                true,
                OP_TEXT,
                m.as_bytes(),
                Some(random_bytes::<4>()),
            ));
        }
        for (m, frame) in messages.iter().zip(frames) {
            r.get_mut()
                .1
                .write_all(&frame)
                .await
                .map_err(io_ctx("writing a frame"))?;
            let f = read_frame(&mut r).await?;
            if f.opcode != OP_TEXT || f.payload != m.as_bytes() {
                return Err(Error::Protocol(format!(
                    "echo mismatch: sent {m:?}, got opcode {} {:?}",
                    f.opcode,
                    String::from_utf8_lossy(&f.payload)
                )));
            }
            echoed += 1;
        }
        let close = encode(
            true,
            OP_CLOSE,
            &1000u16.to_be_bytes(),
            Some(random_bytes::<4>()),
        );
        r.get_mut()
            .1
            .write_all(&close)
            .await
            .map_err(io_ctx("writing close"))?;
        let f = read_frame(&mut r).await?;
        if f.opcode != OP_CLOSE {
            return Err(Error::Protocol(format!(
                "expected close, got opcode {}",
                f.opcode
            )));
        }
        Ok(echoed)
    };
    let echoed = tokio::time::timeout(CLIENT_TIMEOUT, fut)
        .await
        .map_err(|_| {
            Error::Protocol(format!("no answer from {url} within {CLIENT_TIMEOUT:?}"))
        })??;
    println!(
        "{}",
        serde_json::json!({
            "ok": true,
            "echoed": echoed,
            "elapsedMs": started.elapsed().as_secs_f64() * 1000.0,
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn frames_round_trip() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let wire = encode(true, OP_TEXT, &payload, Some([1, 2, 3, 4]));
            let f = read_frame(&mut wire.as_slice()).await.unwrap();
            assert_eq!(
                f,
                Frame {
                    fin: true,
                    opcode: OP_TEXT,
                    payload
                }
            );
        }
    }
}
