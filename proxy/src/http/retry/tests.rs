use std::{
    collections::VecDeque,
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::BodyExt;
use tower::{Layer, ServiceExt};

use super::*;
use crate::{
    errors::ERROR_HEADER,
    http::route::tests::{routed, routed_with, OkBody},
    retry_budget::RetryBudget,
    route::table::RetryPolicy,
    test_util::ChannelBody,
};

/// What the mock upstream answers, attempt by attempt (then 200).
#[derive(Clone, Copy, Debug)]
enum Answer {
    Status(u16),
    Refused,
}

/// Method and body of each attempt the mock upstream received.
type Log = Arc<Mutex<Vec<(Method, Bytes)>>>;

fn upstream<B>(
    answers: &[Answer],
    log: Log,
) -> impl tower::Service<
    Request<ReplayBody<B>>,
    Response = Response<Either<OkBody, Full<Bytes>>>,
    Error = ProxyError,
    Future = impl Send,
> + Clone
       + Send
       + 'static
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let answers = Arc::new(Mutex::new(answers.iter().copied().collect::<VecDeque<_>>()));
    tower::service_fn(move |req: Request<ReplayBody<B>>| {
        let answers = answers.clone();
        let log = log.clone();
        async move {
            let answer = answers.lock().unwrap().pop_front();
            if let Some(Answer::Refused) = answer {
                // Like a connect failure: the body is never read.
                return Err(ProxyError::Connect {
                    dst: "198.18.0.2:80".parse().unwrap(),
                    source: io::Error::from(io::ErrorKind::ConnectionRefused),
                });
            }
            let method = req.method().clone();
            let body = req.into_body().collect().await.map(|c| c.to_bytes());
            log.lock().unwrap().push((
                method,
                body.unwrap_or_else(|_| Bytes::from_static(b"<error>")),
            ));
            let status = match answer {
                Some(Answer::Status(s)) => s,
                _ => 200,
            };
            let mut rsp = Response::new(Either::Left(Full::new(Bytes::new())));
            *rsp.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok(rsp)
        }
    })
}

fn policy(retries: u32) -> Option<RetryPolicy> {
    Some(RetryPolicy {
        codes: vec![503],
        retries,
        backoff: Duration::from_millis(20),
    })
}

fn request<B>(method: Method, body: B, routed: Routed) -> Request<B> {
    let mut r = Request::new(body);
    *r.method_mut() = method;
    r.extensions_mut().insert(routed);
    r
}

fn full(b: &'static [u8]) -> Full<Bytes> {
    Full::new(Bytes::from_static(b))
}

#[tokio::test]
async fn retries_retryable_codes_with_backoff() {
    let log = Log::default();
    let svc = RetryLayer::default().layer(upstream(
        &[Answer::Status(503), Answer::Status(503)],
        log.clone(),
    ));
    let start = tokio::time::Instant::now();
    let rsp = svc
        .oneshot(request(
            Method::GET,
            full(b""),
            routed(None, None, policy(2)),
        ))
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(log.lock().unwrap().len(), 3);
    assert!(start.elapsed() >= Duration::from_millis(40), "two backoffs");
}

#[tokio::test]
async fn gives_up_after_the_attempts_with_the_last_answer() {
    let log = Log::default();
    let svc = RetryLayer::default().layer(upstream(&[Answer::Status(503); 5], log.clone()));
    let rsp = svc
        .oneshot(request(
            Method::GET,
            full(b""),
            routed(None, None, policy(2)),
        ))
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(log.lock().unwrap().len(), 3, "one attempt and two retries");

    let log = Log::default();
    let svc = RetryLayer::default().layer(upstream(&[Answer::Status(500)], log.clone()));
    let rsp = svc
        .oneshot(request(
            Method::GET,
            full(b""),
            routed(None, None, policy(2)),
        ))
        .await
        .unwrap();
    assert_eq!(
        rsp.status(),
        StatusCode::INTERNAL_SERVER_ERROR,
        "500 is not listed"
    );
    assert_eq!(log.lock().unwrap().len(), 1);

    let log = Log::default();
    let svc = RetryLayer::default().layer(upstream(&[Answer::Status(503)], log.clone()));
    let rsp = svc
        .oneshot(request(Method::GET, full(b""), routed(None, None, None)))
        .await
        .unwrap();
    assert_eq!(
        rsp.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "no retry policy"
    );
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn buffered_post_is_replayed_whole() {
    let log = Log::default();
    let svc = RetryLayer::new(1024).layer(upstream(&[Answer::Status(503)], log.clone()));
    let rsp = svc
        .oneshot(request(
            Method::POST,
            full(b"order=1"),
            routed(None, None, policy(1)),
        ))
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 2);
    assert!(log
        .iter()
        .all(|(m, b)| m == Method::POST && &b[..] == b"order=1"));
}

#[tokio::test]
async fn post_beyond_the_buffer_is_sent_once_intact() {
    let log = Log::default();
    let svc = RetryLayer::new(16).layer(upstream(&[Answer::Status(503)], log.clone()));
    let (tx, body) = ChannelBody::new();
    let feed = tokio::spawn(async move {
        for _ in 0..8 {
            tx.send(http_body::Frame::data(Bytes::from_static(b"0123456789")))
                .await
                .unwrap();
        }
    });
    let rsp = svc
        .oneshot(request(Method::POST, body, routed(None, None, policy(3))))
        .await
        .unwrap();
    feed.await.unwrap();
    assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE, "not retried");
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].1.len(), 80, "the whole body, streamed");
}

#[tokio::test]
async fn unsent_requests_are_always_retried() {
    let log = Log::default();
    let svc = RetryLayer::new(16).layer(upstream(&[Answer::Refused], log.clone()));
    let (tx, body) = ChannelBody::new();
    let feed = tokio::spawn(async move {
        for _ in 0..4 {
            tx.send(http_body::Frame::data(Bytes::from_static(b"0123456789")))
                .await
                .unwrap();
        }
    });
    let rsp = svc
        .oneshot(request(Method::POST, body, routed(None, None, policy(1))))
        .await
        .unwrap();
    feed.await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 1, "the refused attempt never reached the app");
    assert_eq!(log[0].1.len(), 40);
}

#[tokio::test]
async fn spent_budget_answers_503() {
    // No floor and no requests yet: the first retry is refused.
    let budget: meshlet_api::config::RetryConstraint =
        serde_json::from_str(r#"{"budget": {"percent": 0}, "minRetryRate": {"count": 0}}"#)
            .unwrap();
    let budget = Arc::new(RetryBudget::new(Some(&budget)));
    let log = Log::default();
    let svc = RetryLayer::default().layer(upstream(&[Answer::Status(503); 3], log.clone()));
    let rsp = svc
        .oneshot(request(
            Method::GET,
            full(b""),
            routed_with(None, None, policy(2), budget),
        ))
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(rsp.headers()[ERROR_HEADER], "retry-budget-exhausted");
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn budget_bounds_retries_of_a_failing_backend() {
    let c: meshlet_api::config::RetryConstraint =
        serde_json::from_str(r#"{"budget": {"percent": 20}, "minRetryRate": {"count": 5}}"#)
            .unwrap();
    let budget = Arc::new(RetryBudget::new(Some(&c)));
    let log = Log::default();
    let svc = RetryLayer::default().layer(upstream(&[Answer::Status(503); 10_000], log.clone()));
    let n = 500;
    for _ in 0..n {
        let quick = Some(RetryPolicy {
            codes: vec![503],
            retries: 3,
            backoff: Duration::ZERO,
        });
        let r = routed_with(None, None, quick, budget.clone());
        svc.clone()
            .oneshot(request(Method::GET, full(b""), r))
            .await
            .unwrap();
    }
    let attempts = log.lock().unwrap().len();
    // 500 requests within one budget window: 20% of them plus the floor of 5.
    assert!(attempts >= n + n / 5, "the budget is used: {attempts}");
    assert!(attempts <= n + n / 5 + 5, "{attempts}");
}

#[tokio::test]
async fn attempt_timeouts_are_retried_and_the_request_timeout_bounds_all() {
    use crate::http::timeout::{AttemptTimeoutLayer, RequestTimeoutLayer};
    // The first attempt hangs; the attempt timeout cuts it and the retry answers.
    let calls = Arc::new(Mutex::new(0u32));
    let c = calls.clone();
    let upstream = tower::service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
        let n = {
            let mut c = c.lock().unwrap();
            *c += 1;
            *c
        };
        async move {
            if n == 1 {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok::<_, ProxyError>(Response::new(Either::<OkBody, Full<Bytes>>::Left(
                Full::new(Bytes::new()),
            )))
        }
    });
    let svc = tower::ServiceBuilder::new()
        .layer(RequestTimeoutLayer)
        .layer(RetryLayer::default())
        .layer(AttemptTimeoutLayer)
        .service(upstream);
    let on_504 = Some(RetryPolicy {
        codes: vec![504],
        retries: 1,
        backoff: Duration::ZERO,
    });
    let start = std::time::Instant::now();
    let r = routed(
        Some(Duration::from_secs(2)),
        Some(Duration::from_millis(50)),
        on_504,
    );
    let rsp = svc
        .clone()
        .oneshot(request(Method::GET, full(b""), r))
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(*calls.lock().unwrap(), 2);
    assert!(start.elapsed() < Duration::from_secs(1));

    // Retries that keep failing stop at the request timeout, backoffs included.
    let log = Log::default();
    let svc = tower::ServiceBuilder::new()
        .layer(RequestTimeoutLayer)
        .layer(RetryLayer::default())
        .service(upstream_always_503(log.clone()));
    let slow_retries = Some(RetryPolicy {
        codes: vec![503],
        retries: 10,
        backoff: Duration::from_millis(100),
    });
    let start = std::time::Instant::now();
    let r = routed(Some(Duration::from_millis(150)), None, slow_retries);
    let rsp = svc
        .oneshot(request(Method::GET, full(b""), r))
        .await
        .unwrap();
    let took = start.elapsed();
    assert_eq!(rsp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(rsp.headers()[ERROR_HEADER], "request-timeout");
    assert!(took < Duration::from_millis(400), "{took:?}");
    let attempts = log.lock().unwrap().len();
    assert!(
        (1..=2).contains(&attempts),
        "{attempts} attempts; at most two fit 150 ms with 100 ms backoffs"
    );
}

fn upstream_always_503(
    log: Log,
) -> impl tower::Service<
    Request<ReplayBody<Full<Bytes>>>,
    Response = Response<Either<OkBody, Full<Bytes>>>,
    Error = ProxyError,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    upstream(&[Answer::Status(503); 100], log)
}
