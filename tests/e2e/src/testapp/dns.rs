//! A tiny UDP DNS server: every A query gets one fixed address, anything else an empty
//! NOERROR answer. Enough to prove UDP is not captured by the sidecar.

use std::net::{Ipv4Addr, UdpSocket};

use super::{io_ctx, Error};

/// TTL of the answers, in seconds.
const TTL: u32 = 30;

/// Serves until killed.
pub fn serve(port: u16, answer: Ipv4Addr) -> Result<(), Error> {
    // Dual-stack where the namespace has IPv6, IPv4 only otherwise.
    let sock = UdpSocket::bind(("::", port))
        .or_else(|_| UdpSocket::bind(("0.0.0.0", port)))
        .map_err(io_ctx(format!("binding udp {port}")))?;
    eprintln!("testapp udp-dns: answering A queries on udp port {port} with {answer}");
    let mut buf = [0u8; 1500];
    loop {
        let (n, peer) = sock.recv_from(&mut buf).map_err(io_ctx("recv"))?;
        match respond(&buf[..n], answer) {
            Some(resp) => {
                if let Err(e) = sock.send_to(&resp, peer) {
                    eprintln!("testapp udp-dns: reply to {peer}: {e}");
                }
            }
            None => eprintln!("testapp udp-dns: malformed query from {peer}"),
        }
    }
}

/// Builds the response to one query, or `None` when it cannot be parsed.
pub fn respond(q: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // Walk the question name to find where the question ends.
    let mut i = 12;
    loop {
        let l = *q.get(i)? as usize;
        if l == 0 {
            i += 1;
            break;
        }
        if l & 0xc0 != 0 {
            return None;
        }
        i += 1 + l;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let qend = i + 4;
    if q.len() < qend {
        return None;
    }
    let is_a = qtype == 1;
    let mut r = Vec::with_capacity(qend + 16);
    r.extend_from_slice(&q[0..2]);
    // QR=1, opcode copied, AA=1, RD copied, RA=1, RCODE=0.
    r.push(0x80 | (q[2] & 0x79) | 0x04);
    r.push(0x80);
    r.extend_from_slice(&[0, 1, 0, is_a as u8, 0, 0, 0, 0]);
    r.extend_from_slice(&q[12..qend]);
    if is_a {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        r.extend_from_slice(&TTL.to_be_bytes());
        r.extend_from_slice(&[0, 4]);
        r.extend_from_slice(&answer.octets());
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_a_query() {
        // id 0xabcd, RD, one question: backend.default IN A
        let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x07backend\x07default\x00\x00\x01\x00\x01");
        let r = respond(&q, Ipv4Addr::new(198, 19, 0, 1)).unwrap();
        assert_eq!(&r[0..2], &[0xab, 0xcd]);
        assert_eq!(r[2] & 0x80, 0x80, "QR set");
        assert_eq!(r[2] & 0x01, 0x01, "RD copied");
        assert_eq!(&r[6..8], &[0, 1], "one answer");
        assert_eq!(&r[r.len() - 4..], &[198, 19, 0, 1]);
        assert!(respond(&q[..10], Ipv4Addr::LOCALHOST).is_none());
    }
}
