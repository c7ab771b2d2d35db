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
}
