//! Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, so a proxy
//! consumes them instead of forwarding them.

use http::{header, HeaderMap, HeaderValue, Request, Version};

/// Headers that are always connection-specific.
const HOP_BY_HOP: [&str; 4] = [
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// The verified SPIFFE id of a mesh mTLS client, set by the server-side proxy on
/// requests to its app. Never trusted from outside: every hop removes what it got.
pub const CLIENT_ID: &str = "meshlet-client-id";

/// Removes any `meshlet-client-id` and, with `id`, sets it to that value.
pub fn set_client_id(headers: &mut HeaderMap, id: Option<HeaderValue>) {
    headers.remove(CLIENT_ID);
    if let Some(id) = id {
        headers.insert(CLIENT_ID, id);
    }
}

/// Marks an HTTP/1.1 request that one sidecar carried over HTTP/2 to another (as
/// Linkerd's `l5d-orig-proto`); the receiving sidecar turns it back into HTTP/1.1.
/// Trusted only on a verified mesh mTLS connection, removed everywhere else.
pub const ORIG_PROTO: &str = "meshlet-orig-proto";
const ORIG_HTTP11: &str = "HTTP/1.1";

/// Client side: turns an HTTP/1.1 request in origin form (`GET /path` with a Host
/// header) into one that can travel over HTTP/2 to a meshed sidecar, marked with
/// [`ORIG_PROTO`]. Leaves `req` alone and returns false when it cannot be restored
/// exactly on the other side (HTTP/1.0, absolute or asterisk form, no usable Host).
pub fn to_mesh_h2<B>(req: &mut Request<B>) -> bool {
    req.headers_mut().remove(ORIG_PROTO);
    if req.version() != Version::HTTP_11
        || req.uri().scheme().is_some()
        || req.uri().authority().is_some()
        || !req.uri().path().starts_with('/')
    {
        return false;
    }
    let Some(host) = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
    else {
        return false;
    };
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let Ok(uri) = http::Uri::builder()
        .scheme("http")
        .authority(host)
        .path_and_query(pq)
        .build()
    else {
        return false;
    };
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    req.headers_mut()
        .insert(ORIG_PROTO, HeaderValue::from_static(ORIG_HTTP11));
    true
}

/// Server side: removes [`ORIG_PROTO`]; when `trusted` (a verified mesh peer) and it
/// marks an HTTP/1.1 request, restores that request (origin form, Host, version) for
/// the app and returns true.
pub fn from_mesh_h2<B>(req: &mut Request<B>, trusted: bool) -> bool {
    let Some(orig) = req.headers_mut().remove(ORIG_PROTO) else {
        return false;
    };
    if !trusted || orig != ORIG_HTTP11 || req.version() != Version::HTTP_2 {
        return false;
    }
    if !req.headers().contains_key(header::HOST) {
        if let Some(v) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *req.uri_mut() = http::Uri::from(pq);
    *req.version_mut() = Version::HTTP_11;
    true
}

/// Whether `req` asks for an HTTP/1.1 protocol upgrade (`Connection: upgrade` plus
/// an `Upgrade` header), e.g. WebSocket.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers. With `upgrade`, `Upgrade` and `Connection: upgrade`
/// stay, because the upgrade handshake must reach the other end. `TE: trailers`
/// stays too: it is end-to-end in meaning (gRPC needs it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        // Names listed in Connection are hop-by-hop as well.
        let listed: Vec<header::HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| header::HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            if upgrade && name == header::UPGRADE {
                continue;
            }
            headers.remove(&name);
        }
        headers.remove(header::CONNECTION);
    }
    for name in HOP_BY_HOP {
        if upgrade && name == "upgrade" {
            continue;
        }
        headers.remove(name);
    }
    if let Some(te) = headers.get(header::TE) {
        if te.as_bytes() != b"trailers" {
            headers.remove(header::TE);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_fixed_and_listed_headers() {
        let mut h = map(&[
            ("host", "web.shop:80"),
            ("connection", "keep-alive, X-Trace-Hop"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("x-trace-hop", "1"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "h2c"),
            ("trailer", "x-checksum"),
            ("x-app", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        left.sort();
        assert_eq!(left, ["host", "trailer", "x-app"]);
        assert_eq!(h["host"], "web.shop:80", "Host is forwarded exactly");
    }

    #[test]
    fn client_id_is_replaced_never_passed_on() {
        let mut h = map(&[
            ("meshlet-client-id", "spiffe://cluster.local/ns/x/sa/admin"),
            ("Meshlet-Client-Id", "spiffe://evil/ns/x/sa/y"),
            ("x-app", "kept"),
        ]);
        set_client_id(&mut h, None);
        assert!(!h.contains_key(CLIENT_ID), "spoofed values are dropped");
        assert_eq!(h["x-app"], "kept");

        let mut h = map(&[("meshlet-client-id", "spiffe://cluster.local/ns/x/sa/admin")]);
        let real = HeaderValue::from_static("spiffe://cluster.local/ns/shop/sa/web");
        set_client_id(&mut h, Some(real.clone()));
        let all: Vec<_> = h.get_all(CLIENT_ID).iter().collect();
        assert_eq!(all, vec![&real], "exactly the verified id");
    }

    #[test]
    fn keeps_te_trailers() {
        let mut h = map(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn keeps_upgrade_handshake() {
        let req = Request::builder()
            .header("connection", "Upgrade, keep-alive")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "abc")
            .body(())
            .unwrap();
        assert!(is_upgrade(&req));
        let mut h = req.headers().clone();
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["sec-websocket-key"], "abc");
        assert!(!h.contains_key("keep-alive"));
    }

    #[test]
    fn upgrade_needs_both_headers_and_http1() {
        let only_upgrade = Request::builder()
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(!is_upgrade(&only_upgrade));
        let h2 = Request::builder()
            .version(Version::HTTP_2)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(!is_upgrade(&h2));
    }

    #[test]
    fn http1_round_trips_through_mesh_h2() {
        let mut req = Request::get("/a/b?c=d")
            .version(Version::HTTP_11)
            .header("host", "web.shop:8080")
            .header(ORIG_PROTO, "spoofed")
            .header("x-app", "kept")
            .body(())
            .unwrap();
        assert!(to_mesh_h2(&mut req));
        assert_eq!(req.uri(), "http://web.shop:8080/a/b?c=d");
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.headers()[ORIG_PROTO], "HTTP/1.1");
        assert_eq!(req.headers().get_all(ORIG_PROTO).iter().count(), 1);

        assert!(from_mesh_h2(&mut req, true));
        assert_eq!(req.uri(), "/a/b?c=d");
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()["host"], "web.shop:8080");
        assert_eq!(req.headers()["x-app"], "kept");
        assert!(!req.headers().contains_key(ORIG_PROTO));
    }

    #[test]
    fn mesh_h2_only_for_what_restores_exactly_and_only_from_the_mesh() {
        for (uri, version, host) in [
            ("/x", Version::HTTP_10, Some("a")),
            ("http://a/x", Version::HTTP_11, Some("a")),
            ("*", Version::HTTP_11, Some("a")),
            ("/x", Version::HTTP_11, None),
            ("/x", Version::HTTP_11, Some("bad host")),
        ] {
            let mut b = Request::builder().uri(uri).version(version);
            if let Some(h) = host {
                b = b.header("host", h);
            }
            let mut req = b.body(()).unwrap();
            let before = (req.uri().clone(), req.version());
            assert!(!to_mesh_h2(&mut req), "{uri} {version:?} {host:?}");
            assert_eq!((req.uri().clone(), req.version()), before);
        }
        // From outside the mesh the mark is dropped and the request left as it is.
        let mut req = Request::get("http://a/x")
            .version(Version::HTTP_2)
            .header(ORIG_PROTO, "HTTP/1.1")
            .body(())
            .unwrap();
        assert!(!from_mesh_h2(&mut req, false));
        assert!(!req.headers().contains_key(ORIG_PROTO));
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.uri(), "http://a/x");
    }
}
