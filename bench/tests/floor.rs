//! The floor pair carries bytes both ways over mTLS with identities from
//! `meshlet_injector::ca` (the files `ca issue` writes), and refuses a peer whose
//! certificate another CA signed.

use std::{net::SocketAddr, path::Path, time::Duration};

use meshlet_api::SpiffeId;
use meshlet_bench::floor;
use meshlet_injector::ca::{write_identity_dir, Ca};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const LIFETIME: Duration = Duration::from_secs(3600);

fn identity(ca: &Ca, dir: &Path, ns: &str, sa: &str) {
    let id = SpiffeId::new("cluster.local", ns, sa).expect("valid SPIFFE id");
    let issued = ca
        .issue(&id, LIFETIME)
        .expect("issue a workload certificate");
    write_identity_dir(dir, &issued).expect("write the identity directory");
}

/// An app that echoes every byte back.
async fn echo_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo app");
    let addr = l.local_addr().expect("echo app address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn half(mode: floor::Mode, upstream: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind floor half");
    let addr = l.local_addr().expect("floor half address");
    tokio::spawn(floor::serve(l, mode, upstream));
    addr
}

/// Sends `msg` to `addr` and returns what came back before EOF or the timeout.
async fn round_trip(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the floor");
    s.write_all(msg).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await {
        Ok(Ok(_)) => got,
        // EOF, reset or silence: nothing came back whole.
        _ => Vec::new(),
    }
}

#[tokio::test]
async fn pair_carries_bytes_both_ways_and_refuses_a_foreign_ca() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = Ca::generate("cluster.local", LIFETIME).expect("mesh CA");
    identity(&ca, &tmp.path().join("client"), "bench-client", "client");
    identity(&ca, &tmp.path().join("server"), "bench", "server");
    let other = Ca::generate("cluster.local", LIFETIME).expect("foreign CA");
    identity(
        &other,
        &tmp.path().join("foreign"),
        "bench-client",
        "client",
    );

    let app = echo_app().await;
    let server = half(
        floor::server_mode(&tmp.path().join("server")).expect("server half"),
        app,
    )
    .await;
    let client = half(
        floor::client_mode(&tmp.path().join("client")).expect("client half"),
        server,
    )
    .await;

    let msg = b"GET / HTTP/1.1\r\nHost: floor\r\n\r\n";
    assert_eq!(round_trip(client, msg).await, msg.to_vec());
    // Several connections in a row, each with its own handshake.
    for i in 0..3u8 {
        let m = vec![i; 4096];
        assert_eq!(round_trip(client, &m).await, m, "connection {i}");
    }

    // A client half whose certificate another CA signed gets nothing through...
    let foreign = half(
        floor::client_mode(&tmp.path().join("foreign")).expect("foreign client half"),
        server,
    )
    .await;
    assert!(round_trip(foreign, msg).await.is_empty());
    // ...and neither does plaintext sent straight to the server half.
    assert!(round_trip(server, msg).await.is_empty());
}

#[test]
fn missing_identity_says_how_to_make_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = match floor::server_mode(&tmp.path().join("nope")) {
        Ok(_) => panic!("a missing identity directory must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("ca.pem"), "{err}");
    assert!(err.contains("meshlet-injector ca issue"), "{err}");
}
