//! HTTP/1.1 between two sidecars rides one multiplexed HTTP/2 connection (mesh mTLS
//! only), marked `meshlet-orig-proto` and turned back into HTTP/1.1 for the app.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use meshlet_e2e::cluster::ClusterBuilder;

use super::{
    curl, delta, h2load_succeeded, json, metrics, sample, start, BACKEND, OPENED, REQUESTS,
};

/// A burst of 20 concurrent HTTP/1.1 client connections (h2load --h1): the backend's
/// sidecar accepts one connection for all of them (without multiplexing the client's
/// sidecar would open one per request in flight), and the app still gets HTTP/1.1 with
/// the Host and request target the client sent, and no mark.
pub fn mtls_http1_connections_multiplex_over_one_h2_connection() -> Result<()> {
    let c = start(ClusterBuilder::new(sample()).scale("backend-v2", 0))?;
    let (cb, sb) = (metrics(&c, "client")?, metrics(&c, "backend-v1")?);
    let url = format!("http://{BACKEND}/burst");
    let out = c.exec_ok(
        "client",
        &["h2load", "--h1", "-n", "400", "-c", "20", &url],
        Duration::from_secs(90),
    )?;
    let (ok, total) = h2load_succeeded(&out).with_context(|| format!("h2load:\n{out}"))?;
    ensure!(
        ok == 400 && total == 400,
        "h2load {ok}/{total} succeeded:\n{out}"
    );
    let (ca, sa) = (metrics(&c, "client")?, metrics(&c, "backend-v1")?);
    let accepted = delta(&cb, &ca, OPENED, &[("direction", "outbound")]);
    let inbound = delta(&sb, &sa, OPENED, &[("direction", "inbound")]);
    let served = delta(&sb, &sa, REQUESTS, &[("direction", "inbound")]);
    ensure!(
        accepted == 20.0 && inbound == 1.0 && served == 400.0,
        "20 client connections became {inbound} connections at the backend's sidecar \
         (client sidecar accepted {accepted}, backend served {served}); want 20, 1, 400"
    );

    let v = json(&curl(
        &c,
        "client",
        &[
            "-H",
            "meshlet-orig-proto: spoofed",
            &format!("http://{BACKEND}/mux?x=1"),
        ],
    )?)?;
    ensure!(
        v["version"] == "HTTP/1.1"
            && v["path"] == "/mux?x=1"
            && v["headers"]["host"] == BACKEND
            && v["headers"].get("meshlet-orig-proto").is_none(),
        "the request reached the app as {v}"
    );
    println!("    20 concurrent HTTP/1.1 client connections, 1 mesh connection, 400 requests");
    Ok(())
}
