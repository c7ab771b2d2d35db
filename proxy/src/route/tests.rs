use super::*;

/// A producer route `shop/<name>` whose rules are the given JSON.
fn route(name: &str, ns: &str, created: &str, rules: &str) -> HttpRoute {
    serde_json::from_str(&format!(
        r#"{{"name": "{name}", "namespace": "{ns}", "creationTimestamp": "{created}", "rules": {rules}}}"#
    ))
    .unwrap()
}

/// A rule sending its matches to backend `to`.
fn rule(matches: &str, to: &str) -> String {
    format!(
        r#"{{"matches": {matches}, "backendRefs": [{{"name": "{to}", "namespace": "shop", "port": 80}}]}}"#
    )
}

struct Req {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    port: u16,
    ns: Option<&'static str>,
}

fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Req {
    let mut h = HeaderMap::new();
    for (n, v) in headers {
        h.append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h.entry(header::HOST)
        .or_insert(HeaderValue::from_static("web.shop:80"));
    Req {
        method: method.parse().unwrap(),
        uri: uri.parse().unwrap(),
        headers: h,
        port: 80,
        ns: Some("shop"),
    }
}

impl Req {
    fn info(&self) -> RequestInfo<'_> {
        RequestInfo {
            method: &self.method,
            uri: &self.uri,
            headers: &self.headers,
            port: self.port,
            client_namespace: self.ns,
        }
    }
}

fn routes(rs: Vec<HttpRoute>) -> Routes {
    Routes::new("shop", &rs).unwrap()
}

/// Which backend a request goes to, or `None` without a match.
fn to(rs: &Routes, r: &Req) -> Option<String> {
    match rs.decide(&r.info(), 0)?.action {
        Action::Forward(f) => Some(f.backend.name.clone()),
        a => panic!("not forwarded: {a:?}"),
    }
}

fn get(rs: &Routes, uri: &str) -> Option<String> {
    to(rs, &req("GET", uri, &[]))
}

const T0: &str = "2026-01-01T00:00:00Z";
const T1: &str = "2026-01-02T00:00:00Z";

#[test]
fn path_prefix_matches_whole_elements() {
    let rs = routes(vec![route(
        "r",
        "shop",
        T0,
        &format!(
            "[{}]",
            rule(
                r#"[{"path": {"type": "PathPrefix", "value": "/abc"}}]"#,
                "a"
            )
        ),
    )]);
    for hit in ["/abc", "/abc/", "/abc/def", "/abc?x=1"] {
        assert_eq!(get(&rs, hit).as_deref(), Some("a"), "{hit}");
    }
    for miss in ["/abcd", "/ab", "/", "/x/abc"] {
        assert_eq!(get(&rs, miss), None, "{miss}");
    }
    // A trailing slash on the prefix is ignored.
    let rs = routes(vec![route(
        "r",
        "shop",
        T0,
        &format!(
            "[{}]",
            rule(
                r#"[{"path": {"type": "PathPrefix", "value": "/abc/"}}]"#,
                "a"
            )
        ),
    )]);
    assert_eq!(get(&rs, "/abc").as_deref(), Some("a"));
    assert_eq!(get(&rs, "/abc/x").as_deref(), Some("a"));
    assert_eq!(get(&rs, "/abcx"), None);
}

#[test]
fn no_matches_means_prefix_slash_and_no_route_means_none() {
    let rs = routes(vec![route(
        "r",
        "shop",
        T0,
        &format!("[{}]", rule("[]", "a")),
    )]);
    assert_eq!(get(&rs, "/anything/at/all").as_deref(), Some("a"));
    assert!(routes(vec![])
        .decide(&req("GET", "/", &[]).info(), 0)
        .is_none());
}

#[test]
fn exact_beats_longer_prefix_beats_shorter_prefix_beats_regex() {
    let rules = [
        rule(
            r#"[{"path": {"type": "RegularExpression", "value": "/foo.*"}}]"#,
            "regex",
        ),
        rule(
            r#"[{"path": {"type": "PathPrefix", "value": "/"}}]"#,
            "root",
        ),
        rule(
            r#"[{"path": {"type": "PathPrefix", "value": "/foo"}}]"#,
            "prefix",
        ),
        rule(
            r#"[{"path": {"type": "PathPrefix", "value": "/foo/bar"}}]"#,
            "longer",
        ),
        rule(
            r#"[{"path": {"type": "Exact", "value": "/foo/bar"}}]"#,
            "exact",
        ),
    ];
    let rs = routes(vec![route(
        "r",
        "shop",
        T0,
        &format!("[{}]", rules.join(",")),
    )]);
    assert_eq!(get(&rs, "/foo/bar").as_deref(), Some("exact"));
    assert_eq!(get(&rs, "/foo/bar/baz").as_deref(), Some("longer"));
    assert_eq!(get(&rs, "/foo/x").as_deref(), Some("prefix"));
    assert_eq!(
        get(&rs, "/foox").as_deref(),
        Some("root"),
        "prefix / beats the regex"
    );
    let only_regex = routes(vec![route("r", "shop", T0, &format!("[{}]", rules[0]))]);
    assert_eq!(get(&only_regex, "/foox").as_deref(), Some("regex"));
    assert_eq!(
        get(&only_regex, "/x/foo"),
        None,
        "regex matches the whole path"
    );
}

#[test]
fn method_then_header_count_then_query_count() {
    let rules = [
        rule(
            r#"[{"queryParams": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]}]"#,
            "q2",
        ),
        rule(r#"[{"headers": [{"name": "x", "value": "1"}]}]"#, "h1"),
        rule(
            r#"[{"headers": [{"name": "x", "value": "1"}, {"name": "y", "value": "2"}]}]"#,
            "h2",
        ),
        rule(r#"[{"method": "POST"}]"#, "post"),
        rule(
            r#"[{"headers": [{"name": "x", "value": "1"}], "queryParams": [{"name": "a", "value": "1"}]}]"#,
            "h1q1",
        ),
    ];
    let rs = routes(vec![route(
        "r",
        "shop",
        T0,
        &format!("[{}]", rules.join(",")),
    )]);
    let all = [("x", "1"), ("y", "2")];
    assert_eq!(
        to(&rs, &req("POST", "/?a=1&b=2", &all)).as_deref(),
        Some("post"),
        "method first"
    );
    assert_eq!(
        to(&rs, &req("GET", "/?a=1&b=2", &all)).as_deref(),
        Some("h2"),
        "most headers"
    );
    assert_eq!(
        to(&rs, &req("GET", "/?a=1&b=2", &all[..1])).as_deref(),
        Some("h1q1"),
        "then most query params"
    );
    assert_eq!(
        to(&rs, &req("GET", "/?b=2", &all[..1])).as_deref(),
        Some("h1")
    );
    assert_eq!(
        to(&rs, &req("GET", "/?a=1&b=2", &[])).as_deref(),
        Some("q2")
    );
    assert_eq!(to(&rs, &req("GET", "/?a=1", &[])), None);
}

#[test]
fn path_precedes_method_and_headers() {
    let rules = [
        rule(
            r#"[{"method": "GET", "headers": [{"name": "x", "value": "1"}]}]"#,
            "headers",
        ),
        rule(
            r#"[{"path": {"type": "PathPrefix", "value": "/api"}}]"#,
            "path",
        ),
    ];
    let rs = routes(vec![route(
        "r",
        "shop",
        T0,
        &format!("[{}]", rules.join(",")),
    )]);
    assert_eq!(
        to(&rs, &req("GET", "/api/x", &[("x", "1")])).as_deref(),
        Some("path")
    );
}

#[test]
fn ties_go_to_the_oldest_route_then_by_name_then_rule_order() {
    let m = r#"[{"path": {"type": "PathPrefix", "value": "/"}}]"#;
    let newer = route("a-newer", "shop", T1, &format!("[{}]", rule(m, "newer")));
    let older = route("z-older", "shop", T0, &format!("[{}]", rule(m, "older")));
    assert_eq!(
        get(&routes(vec![newer.clone(), older.clone()]), "/").as_deref(),
        Some("older")
    );
    let b = route("b", "shop", T0, &format!("[{}]", rule(m, "b")));
    let a = route("a", "shop", T0, &format!("[{}]", rule(m, "a")));
    assert_eq!(
        get(&routes(vec![b, a]), "/").as_deref(),
        Some("a"),
        "alphabetical on equal age"
    );
    let two = route(
        "r",
        "shop",
        T0,
        &format!("[{},{}]", rule(m, "first"), rule(m, "second")),
    );
    assert_eq!(get(&routes(vec![two]), "/").as_deref(), Some("first"));
}

#[test]
fn headers_case_insensitive_names_exact_values_and_regex() {
    let rules = [rule(
        r#"[{"headers": [{"name": "Version", "value": "v2"}, {"type": "RegularExpression", "name": "user", "value": "(jason|ann)"}]}]"#,
        "v2",
    )];
    let rs = routes(vec![route(
        "r",
        "shop",
        T0,
        &format!("[{}]", rules.join(",")),
    )]);
    assert_eq!(
        to(&rs, &req("GET", "/", &[("version", "v2"), ("user", "ann")])).as_deref(),
        Some("v2")
    );
    assert_eq!(
        to(&rs, &req("GET", "/", &[("version", "V2"), ("user", "ann")])),
        None,
        "values are exact"
    );
    assert_eq!(
        to(
            &rs,
            &req("GET", "/", &[("version", "v2"), ("user", "annie")])
        ),
        None,
        "regex is anchored"
    );
    assert_eq!(
        to(&rs, &req("GET", "/", &[("version", "v2")])),
        None,
        "all conditions must hold"
    );
}

#[test]
fn query_params_exact_and_regex_case_sensitive_names() {
    let rules = [rule(
        r#"[{"queryParams": [{"name": "animal", "value": "whale"}, {"type": "RegularExpression", "name": "n", "value": "[0-9]+"}]}]"#,
        "q",
    )];
    let rs = routes(vec![route(
        "r",
        "shop",
        T0,
        &format!("[{}]", rules.join(",")),
    )]);
    assert_eq!(get(&rs, "/?animal=whale&n=42").as_deref(), Some("q"));
    assert_eq!(get(&rs, "/?n=42&x&animal=whale").as_deref(), Some("q"));
    assert_eq!(get(&rs, "/?ANIMAL=whale&n=42"), None);
    assert_eq!(get(&rs, "/?animal=whale&n=4x"), None);
}

#[test]
fn consumer_routes_apply_to_their_namespace_first() {
    let m = r#"[{"path": {"type": "PathPrefix", "value": "/"}}]"#;
    let exact = r#"[{"path": {"type": "Exact", "value": "/x"}}]"#;
    let producer = route("p", "shop", T0, &format!("[{}]", rule(exact, "producer")));
    let consumer = route("c", "client", T1, &format!("[{}]", rule(m, "consumer")));
    let rs = routes(vec![producer, consumer]);
    let mut r = req("GET", "/x", &[]);
    r.ns = Some("client");
    assert_eq!(
        to(&rs, &r).as_deref(),
        Some("consumer"),
        "even over a more precise producer match"
    );
    r.ns = Some("other");
    assert_eq!(to(&rs, &r).as_deref(), Some("producer"));
    r.ns = None;
    assert_eq!(to(&rs, &r).as_deref(), Some("producer"));
    r.ns = Some("other");
    r.uri = "/y".parse().unwrap();
    assert_eq!(
        to(&rs, &r),
        None,
        "another namespace's consumer route does not apply"
    );
}

#[test]
fn parent_port_limits_a_route_to_that_port() {
    let mut r = route("r", "shop", T0, &format!("[{}]", rule("[]", "a")));
    r.port = Some(8080);
    let rs = routes(vec![r]);
    let mut q = req("GET", "/", &[]);
    assert_eq!(to(&rs, &q), None);
    q.port = 8080;
    assert_eq!(to(&rs, &q).as_deref(), Some("a"));
}

fn weighted(weights: &[(&str, u32)]) -> Routes {
    let refs: Vec<String> = weights
        .iter()
        .map(|(n, w)| {
            format!(r#"{{"name": "{n}", "namespace": "shop", "port": 80, "weight": {w}}}"#)
        })
        .collect();
    routes(vec![route(
        "r",
        "shop",
        T0,
        &format!(r#"[{{"backendRefs": [{}]}}]"#, refs.join(",")),
    )])
}

#[test]
fn backends_by_weight_and_weight_zero_gets_nothing() {
    let rs = weighted(&[("v1", 80), ("v2", 20), ("v3", 0)]);
    let r = req("GET", "/", &[]);
    let mut counts = std::collections::BTreeMap::new();
    for random in 0..1000u32 {
        let Action::Forward(f) = rs
            .decide(&r.info(), random.wrapping_mul(2_654_435_761))
            .unwrap()
            .action
        else {
            panic!("not forwarded")
        };
        *counts.entry(f.backend.name.clone()).or_insert(0) += 1;
    }
    assert_eq!(counts.get("v3"), None, "{counts:?}");
    let v1 = counts["v1"];
    assert!((750..=850).contains(&v1), "80/20 split gave {counts:?}");
    assert_eq!(v1 + counts["v2"], 1000);
}

#[test]
fn no_weight_or_no_backend_answers_500() {
    let rs = weighted(&[("v1", 0)]);
    assert_eq!(
        rs.decide(&req("GET", "/", &[]).info(), 7).unwrap().action,
        Action::Respond(500)
    );
    let rs = routes(vec![route("r", "shop", T0, r#"[{"matches": []}]"#)]);
    assert_eq!(
        rs.decide(&req("GET", "/", &[]).info(), 7).unwrap().action,
        Action::Respond(500)
    );
}

fn with_filters(matches: &str, filters: &str, backend_filters: &str) -> Routes {
    routes(vec![route(
        "r",
        "shop",
        T0,
        &format!(
            r#"[{{"name": "main", "matches": {matches}, "filters": {filters},
                 "backendRefs": [{{"name": "b", "namespace": "shop", "port": 80, "filters": {backend_filters}}}]}}]"#
        ),
    )])
}

fn forward_parts(rs: &Routes, r: &Req) -> http::request::Parts {
    let d = rs.decide(&r.info(), 0).unwrap();
    let Action::Forward(f) = d.action else {
        panic!("not forwarded")
    };
    let mut b = http::Request::builder()
        .method(r.method.clone())
        .uri(r.uri.clone());
    for (n, v) in &r.headers {
        b = b.header(n, v);
    }
    let (mut parts, ()) = b.body(()).unwrap().into_parts();
    f.apply_request(&mut parts);
    parts
}

#[test]
fn request_header_modifier_set_add_remove_rule_then_backend() {
    let rs = with_filters(
        "[]",
        r#"[{"type": "RequestHeaderModifier", "set": [{"name": "X-Set", "value": "new"}],
             "add": [{"name": "x-add", "value": "two"}], "remove": ["x-gone"]}]"#,
        r#"[{"type": "RequestHeaderModifier", "set": [{"name": "x-backend", "value": "b"}]}]"#,
    );
    let r = req(
        "GET",
        "/",
        &[
            ("x-set", "old"),
            ("x-set", "older"),
            ("x-add", "one"),
            ("x-gone", "1"),
            ("x-keep", "k"),
        ],
    );
    let p = forward_parts(&rs, &r);
    let all = |n: &str| {
        p.headers
            .get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(all("x-set"), ["new"], "set replaces every value");
    assert_eq!(all("x-add"), ["one", "two"], "add appends");
    assert!(all("x-gone").is_empty());
    assert_eq!(all("x-keep"), ["k"]);
    assert_eq!(all("x-backend"), ["b"]);
}

#[test]
fn response_header_modifiers_are_handed_back_in_order() {
    let rs = with_filters(
        "[]",
        r#"[{"type": "ResponseHeaderModifier", "set": [{"name": "x-r", "value": "rule"}]}]"#,
        r#"[{"type": "ResponseHeaderModifier", "set": [{"name": "x-r", "value": "backend"}], "remove": ["server"]}]"#,
    );
    let d = rs.decide(&req("GET", "/", &[]).info(), 0).unwrap();
    assert_eq!(d.rule.name.as_deref(), Some("main"));
    let Action::Forward(f) = d.action else {
        panic!()
    };
    let mut h = HeaderMap::new();
    h.insert("server", HeaderValue::from_static("app"));
    for m in &f.response_headers {
        apply_headers(m, &mut h);
    }
    assert_eq!(
        h.get("x-r").unwrap(),
        "backend",
        "the backend's filter runs last"
    );
    assert!(h.get("server").is_none());
}

#[test]
fn url_rewrite_hostname_and_full_path_keep_the_query() {
    let rs = with_filters(
        "[]",
        r#"[{"type": "URLRewrite", "hostname": "reviews.internal", "path": {"type": "ReplaceFullPath", "value": "/new"}}]"#,
        "[]",
    );
    let p = forward_parts(&rs, &req("GET", "/old/path?a=1", &[]));
    assert_eq!(p.uri, "/new?a=1");
    assert_eq!(p.headers[header::HOST], "reviews.internal");
    // Absolute form (h2 :authority) is rewritten as well.
    let p = forward_parts(&rs, &req("GET", "http://web.shop/old", &[]));
    assert_eq!(p.uri, "http://reviews.internal/new");
}

#[test]
fn replace_prefix_match_per_the_gateway_api_table() {
    // (request path, prefix match, replacement, expected) from HTTPPathModifier's docs.
    let table = [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
    ];
    for (path, prefix, with, want) in table {
        let rs = with_filters(
            &format!(r#"[{{"path": {{"type": "PathPrefix", "value": "{prefix}"}}}}]"#),
            &format!(
                r#"[{{"type": "URLRewrite", "path": {{"type": "ReplacePrefixMatch", "value": "{with}"}}}}]"#
            ),
            "[]",
        );
        let p = forward_parts(&rs, &req("GET", path, &[]));
        assert_eq!(p.uri.path(), want, "{path} with prefix {prefix} -> {with}");
    }
}

fn redirect_of(filter: &str, r: &Req) -> (u16, String) {
    let rs = routes(vec![route(
        "r",
        "shop",
        T0,
        &format!(
            r#"[{{"matches": [{{"path": {{"type": "PathPrefix", "value": "/old"}}}}], "filters": [{filter}]}}]"#
        ),
    )]);
    match rs.decide(&r.info(), 0).unwrap().action {
        Action::Redirect { status, location } => (status, location),
        a => panic!("not a redirect: {a:?}"),
    }
}

#[test]
fn redirects_scheme_host_port_path_and_status() {
    let r = req("GET", "/old/x?q=1", &[("host", "web.shop:80")]);
    let cases = [
        (
            r#"{"type": "RequestRedirect"}"#,
            302,
            "http://web.shop/old/x?q=1",
        ),
        (
            r#"{"type": "RequestRedirect", "scheme": "https", "statusCode": 301}"#,
            301,
            "https://web.shop/old/x?q=1",
        ),
        (
            r#"{"type": "RequestRedirect", "hostname": "example.org", "statusCode": 303}"#,
            303,
            "http://example.org/old/x?q=1",
        ),
        (
            r#"{"type": "RequestRedirect", "port": 8443, "scheme": "https", "statusCode": 307}"#,
            307,
            "https://web.shop:8443/old/x?q=1",
        ),
        (
            r#"{"type": "RequestRedirect", "port": 80, "statusCode": 308}"#,
            308,
            "http://web.shop/old/x?q=1",
        ),
        (
            r#"{"type": "RequestRedirect", "path": {"type": "ReplaceFullPath", "value": "/new"}}"#,
            302,
            "http://web.shop/new?q=1",
        ),
        (
            r#"{"type": "RequestRedirect", "path": {"type": "ReplacePrefixMatch", "value": "/new"}}"#,
            302,
            "http://web.shop/new/x?q=1",
        ),
    ];
    for (filter, status, location) in cases {
        assert_eq!(
            redirect_of(filter, &r),
            (status, location.to_string()),
            "{filter}"
        );
    }
}

#[test]
fn redirect_port_defaults_to_the_service_port_unless_a_scheme_is_set() {
    let mut r = req("GET", "/old", &[("host", "web.shop:8080")]);
    r.port = 8080;
    let f = r#"{"type": "RequestRedirect", "hostname": "b.shop"}"#;
    assert_eq!(
        redirect_of(f, &r).1,
        "http://b.shop:8080/old",
        "listener (Service) port"
    );
    let f = r#"{"type": "RequestRedirect", "scheme": "http"}"#;
    assert_eq!(
        redirect_of(f, &r).1,
        "http://web.shop/old",
        "the scheme's well-known port"
    );
    let f = r#"{"type": "RequestRedirect", "scheme": "https"}"#;
    assert_eq!(redirect_of(f, &r).1, "https://web.shop/old");
}

#[test]
fn decision_carries_timeouts_and_retry() {
    let rs = routes(vec![route(
        "r",
        "shop",
        T0,
        r#"[{"backendRefs": [{"name": "b", "namespace": "shop", "port": 80}],
             "timeouts": {"request": "3s", "backendRequest": "1s"},
             "retry": {"codes": [502, 503], "attempts": 3, "backoff": "50ms"}}]"#,
    )]);
    let d = rs.decide(&req("GET", "/", &[]).info(), 0).unwrap();
    let t = d.rule.timeouts.as_ref().unwrap();
    assert_eq!(t.request, Some(meshlet_api::Duration::from_secs(3)));
    assert_eq!(d.rule.retry.as_ref().unwrap().codes, [502, 503]);
    assert_eq!(d.route.id(), "shop/r");
    assert_eq!(d.rule_index, 0);
}

#[test]
fn refuses_an_invalid_route() {
    let bad = route(
        "bad",
        "shop",
        T0,
        &format!(
            "[{}]",
            rule(
                r#"[{"path": {"type": "RegularExpression", "value": "(/x"}}]"#,
                "a"
            )
        ),
    );
    let e = Routes::new("shop", &[bad]).unwrap_err();
    assert_eq!(e.route, "shop/bad");
    assert_eq!(e.field, "rules[0].matches[0].path.value");
}

/// The injector's golden output for `injector/tests/testdata/compile`, decided here: the
/// compiler and the engine agree on the document.
#[test]
fn decides_on_the_compilers_golden_document() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../injector/tests/testdata/compile-golden/mesh.json"
    );
    let cfg = meshlet_api::MeshConfig::from_json(&std::fs::read(path).unwrap()).unwrap();
    let svc = cfg.services.iter().find(|s| s.name == "reviews").unwrap();
    let rs = Routes::new(&svc.namespace, &svc.routes).unwrap();
    let mut r = req("GET", "/reviews/1", &[("version", "v2")]);
    r.port = 9080;
    r.ns = Some("bookinfo");
    assert_eq!(
        to(&rs, &r).as_deref(),
        Some("reviews-v2"),
        "canary by header"
    );
    let mut v1 = 0;
    r.headers.remove("version");
    for random in 0..100 {
        if let Action::Forward(f) = rs.decide(&r.info(), random).unwrap().action {
            v1 += usize::from(f.backend.name == "reviews-v1");
        }
    }
    assert_eq!(v1, 80, "80/20 split");
    r.uri = "/old/page".parse().unwrap();
    assert_eq!(
        rs.decide(&r.info(), 0).unwrap().action,
        Action::Redirect {
            status: 301,
            location: "http://web.shop:9080/new/page".into()
        },
        "redirect keeps the Service port; Host comes from the request"
    );
    // The consumer route of frontend wins for its clients, header or not.
    r.uri = "/reviews/1".parse().unwrap();
    r.headers.insert("version", HeaderValue::from_static("v2"));
    r.ns = Some("frontend");
    let d = rs.decide(&r.info(), 0).unwrap();
    assert_eq!(d.route.id(), "frontend/reviews-from-frontend");
    let t = d.rule.timeouts.as_ref().unwrap().request;
    assert_eq!(t, Some(meshlet_api::Duration::from_secs(3)));
    assert_eq!(to(&rs, &r).as_deref(), Some("reviews-v1"));
}

/// The routes `meshlet-injector compile` made of the GRPCRoutes in its test manifests
/// (its golden output, which `cargo test -p meshlet-injector --test compile` pins).
fn compiled_greeter_routes() -> Routes {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../injector/tests/testdata/compile-golden/mesh.json");
    let doc = meshlet_api::MeshConfig::from_json(&std::fs::read(&path).unwrap()).unwrap();
    let svc = doc
        .services
        .iter()
        .find(|s| s.namespace == "rpc" && s.name == "greeter")
        .expect("the golden document has Service rpc/greeter");
    Routes::new("rpc", &svc.routes).unwrap()
}

/// A gRPC call: `POST path` over h2 with `content-type: application/grpc`.
fn grpc_call(path: &str, headers: &[(&str, &str)], port: u16) -> Req {
    let mut all = vec![("content-type", "application/grpc"), ("te", "trailers")];
    all.extend_from_slice(headers);
    let mut r = req("POST", path, &all);
    r.port = port;
    r.ns = Some("rpc");
    r
}

#[test]
fn compiled_grpc_routes_send_each_call_by_gep_1016_precedence() {
    let rs = compiled_greeter_routes();
    // (path, headers, rule that must win, backend)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: [Case<'_>; 8] = [
        // Service and method, with its header: the most specific.
        (
            "/pkg.Greeter/SayHello",
            &[("x-canary", "1")],
            "exact",
            "greeter-v2",
        ),
        // Without the header: the service-only rule.
        ("/pkg.Greeter/SayHello", &[], "service", "greeter-v1"),
        (
            "/pkg.Greeter/SayHello",
            &[("x-canary", "2")],
            "service",
            "greeter-v1",
        ),
        // A service beats a method: pkg.Greeter/Check is not the method-only rule's.
        ("/pkg.Greeter/Check", &[], "service", "greeter-v1"),
        // A method beats no method at all, though its path is a regex and the
        // match-all's a prefix (which HTTPRoute ranking would put first).
        (
            "/grpc.health.v1.Health/Check",
            &[],
            "method-only",
            "greeter-v2",
        ),
        // A regex service beats a method-only match and the match-all.
        ("/pkg.v3.Greeter/SayHi", &[], "regex", "greeter-v2"),
        // Among matches naming nothing, the one with a header wins.
        (
            "/other.Svc/Call",
            &[("x-tenant", "green")],
            "header-only",
            "greeter-v2",
        ),
        ("/other.Svc/Call", &[], "default", "greeter-v1"),
    ];
    for (path, headers, rule, backend) in cases {
        let call = grpc_call(path, headers, 50051);
        let d = rs
            .decide(&call.info(), 0)
            .unwrap_or_else(|| panic!("{path}: no rule"));
        assert_eq!(d.route.kind, RouteKind::Grpc);
        assert_eq!(d.rule.name.as_deref(), Some(rule), "{path} {headers:?}");
        match d.action {
            Action::Forward(f) => assert_eq!(f.backend.name, backend, "{path} {headers:?}"),
            a => panic!("{path}: not forwarded: {a:?}"),
        }
    }
}

#[test]
fn compiled_grpc_header_modifiers_apply_and_http_routes_keep_their_own_port() {
    let rs = compiled_greeter_routes();
    let call = grpc_call("/pkg.Greeter/SayHello", &[("x-canary", "1")], 50051);
    let Some(Decision {
        action: Action::Forward(f),
        ..
    }) = rs.decide(&call.info(), 0)
    else {
        panic!("not forwarded")
    };
    let (mut parts, ()) = http::Request::post("/pkg.Greeter/SayHello")
        .body(())
        .unwrap()
        .into_parts();
    f.apply_request(&mut parts);
    assert_eq!(parts.headers["x-route"], "exact");
    assert_eq!(
        parts.uri.path(),
        "/pkg.Greeter/SayHello",
        "the path is kept"
    );
    let mut resp = HeaderMap::new();
    for m in &f.response_headers {
        apply_headers(m, &mut resp);
    }
    assert_eq!(resp["x-served-by"], "v2");

    // Port 8080 has the HTTPRoute greeter-web only (no GRPCRoute there).
    let web = grpc_call("/pkg.Greeter/SayHello", &[("x-canary", "1")], 8080);
    let d = rs.decide(&web.info(), 0).unwrap();
    assert_eq!(
        (d.route.name.as_str(), d.route.kind),
        ("greeter-web", RouteKind::Http)
    );
}
