//! The load generator against the bench server on loopback.

use std::{net::SocketAddr, time::Duration};

use meshlet_bench::{
    loadgen::{self, Config, Pace},
    server::{self, ServerConfig},
};

/// Starts a server on 127.0.0.1 on its own thread and returns its address.
fn start_server(cfg: ServerConfig) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            server::serve(l, cfg).await.unwrap();
        });
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap()
}

fn config(addr: SocketAddr, pace: Pace) -> Config {
    Config {
        url: format!("http://{addr}/bench").parse().unwrap(),
        pace,
        duration: Duration::from_millis(500),
        warmup: Duration::from_millis(100),
        connections: 4,
        new_connection_per_request: false,
        body_size: 0,
        timeout: Duration::from_secs(2),
        watch: vec![],
    }
}

#[test]
fn open_loop_sends_exactly_the_timetable() {
    let addr = start_server(ServerConfig::fixed(100));
    let mut cfg = config(addr, Pace::Rate(400.0));
    cfg.watch = vec![("me".into(), std::process::id())];
    let r = loadgen::run(&cfg).unwrap();
    assert_eq!(r.errors, 0, "{:?}", r.first_error);
    // 400 req/s over 0.5 s is 200 slots; float rounding may move one across an edge.
    assert!((199..=201).contains(&r.count), "count {}", r.count);
    assert!(r.latency_us.p50 > 0.0 && r.latency_us.p50 <= r.latency_us.p99);
    assert!(r.latency_us.p99 <= r.latency_us.max);
    // Latency counts from the intended time, so it can never be below service time.
    assert!(r.latency_us.p50 >= r.service_time_us.p50);
    assert_eq!(r.mode, "open-loop");
    // Warmup (0.1 s) plus window (0.5 s) at 400 req/s.
    assert!(
        (239..=241).contains(&r.requests_sent),
        "sent {}",
        r.requests_sent
    );
    let me = &r.processes[0];
    assert!(me.rss_kib_start > 0 && me.rss_kib_max >= me.rss_kib_start);
    assert!(me.error.is_none());
}

#[test]
fn slow_server_latency_includes_the_queue() {
    // The server takes 20 ms per request but one connection is asked for one request
    // every 10 ms: the backlog grows by 10 ms per request. A closed-loop tool would
    // report ~20 ms; measured from the timetable, later requests wait far longer.
    let addr = start_server(ServerConfig {
        body: bytes::Bytes::from_static(b"slow"),
        delay: Duration::from_millis(20),
    });
    let mut cfg = config(addr, Pace::Rate(100.0));
    cfg.connections = 1;
    cfg.warmup = Duration::ZERO;
    cfg.duration = Duration::from_millis(400);
    let r = loadgen::run(&cfg).unwrap();
    assert!(r.service_time_us.p50 >= 20_000.0, "{:?}", r.service_time_us);
    assert!(r.service_time_us.p99 < 100_000.0, "{:?}", r.service_time_us);
    assert!(
        r.latency_us.max > 3.0 * r.service_time_us.p50,
        "latency {:?} vs service {:?}",
        r.latency_us,
        r.service_time_us
    );
    assert!(r.send_lag_us.p99 > 100_000.0, "{:?}", r.send_lag_us);
}

#[test]
fn closed_loop_and_new_connections_succeed() {
    let addr = start_server(ServerConfig::fixed(100));
    let mut cfg = config(addr, Pace::MaxThroughput);
    cfg.connections = 2;
    cfg.body_size = 512;
    cfg.duration = Duration::from_millis(300);
    let r = loadgen::run(&cfg).unwrap();
    assert_eq!(r.errors, 0, "{:?}", r.first_error);
    assert_eq!(r.mode, "closed-loop");
    assert!(r.count > 50, "closed loop did only {} requests", r.count);
    assert_eq!(r.send_lag_us.count, 0);

    let mut cfg = config(addr, Pace::Rate(200.0));
    cfg.new_connection_per_request = true;
    let r = loadgen::run(&cfg).unwrap();
    assert_eq!(r.errors, 0, "{:?}", r.first_error);
    assert!((99..=101).contains(&r.count), "count {}", r.count);
}

#[test]
fn refused_connections_are_errors_not_latencies() {
    // Bind and drop to get a loopback port with nothing listening.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let r = loadgen::run(&config(addr, Pace::Rate(100.0))).unwrap();
    assert_eq!(r.count, 0);
    assert!(r.errors >= 49, "errors {}", r.errors);
    let e = r.first_error.unwrap();
    assert!(e.contains("connect"), "{e}");
}

#[test]
fn bad_options_are_refused_with_a_hint() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut cfg = config(addr, Pace::Rate(0.0));
    assert!(loadgen::run(&cfg)
        .unwrap_err()
        .to_string()
        .contains("--rate"));
    cfg.pace = Pace::Rate(10.0);
    cfg.url = "https://127.0.0.1:9/".parse().unwrap();
    assert!(loadgen::run(&cfg)
        .unwrap_err()
        .to_string()
        .contains("http://"));
}
