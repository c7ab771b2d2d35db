#!/usr/bin/env python3
"""Writes the Kubernetes manifests of a mesh with many HTTPRoutes, for bench/run.sh ROUTES.

The output is one multi-document YAML file that `meshlet-injector compile --from-files`
turns into the proxies' mesh config, so the benchmark exercises the real compiler:

- the benchmark's server: Service `bench/server`, ClusterIP = the server pod's IP (the
  bench has no kube-proxy; the client sidecar only needs ClusterIP:port -> Service), and
  a canary Service `bench/server-v2`;
- with ROUTES > 0, the route every benchmark request selects: `bench/server-default`,
  `PathPrefix /` -> `server:PORT`. A catch-all ranks below every longer prefix, exact path,
  method and header match, so each request is checked against the other rules of
  `bench/server` before it reaches this one, as a default route is in real meshes;
- `--on-service` routes in all attached to `bench/server` (the default one included):
  header matches on `/`, path prefixes, exact paths, method and query matches, a few
  regexes, consumer routes from another namespace; none of them matches the benchmark's
  `GET /` without extra headers;
- the rest spread over `--namespaces` x `--services` other Services (each with a `-v2`
  canary), 1 to 3 rules each, with header modifiers, rewrites, weighted splits,
  timeouts and retries.

Deterministic (seeded). Standard library only.
"""

import argparse
import json
import os
import random
import sys

TS0 = 1767225600  # 2026-01-01T00:00:00Z: creationTimestamps count up from here.


def scalar(v):
    if isinstance(v, (dict, list)):
        return "{}" if isinstance(v, dict) else "[]"
    return json.dumps(v)


def emit(v, ind=0):
    """Block-style YAML of dicts, lists and scalars (strings JSON-quoted)."""
    pad = " " * ind
    out = []
    if isinstance(v, dict):
        for k, x in v.items():
            if isinstance(x, (dict, list)) and x:
                out.append(f"{pad}{k}:")
                out += emit(x, ind + 2)
            else:
                out.append(f"{pad}{k}: {scalar(x)}")
    else:
        for x in v:
            if isinstance(x, (dict, list)) and x:
                sub = emit(x, ind + 2)
                sub[0] = f"{pad}- {sub[0][ind + 2:]}"
                out += sub
            else:
                out.append(f"{pad}- {scalar(x)}")
    return out


def ts(i):
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(TS0 + i))


def cluster_ip(i):
    # 198.19.0.0/16: the benchmark range's "ClusterIPs"; 250 per /24.
    return f"198.19.{1 + i // 250}.{1 + i % 250}"


def service(ns, name, ip, port):
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "clusterIP": ip,
            "selector": {"app": name},
            "ports": [{"name": "http", "port": port, "targetPort": port}],
        },
    }


def route(ns, name, i, parent_ns, parent, port, rules):
    parent_ref = {"group": "", "kind": "Service", "name": parent, "port": port}
    if parent_ns != ns:
        parent_ref["namespace"] = parent_ns
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": ts(i)},
        "spec": {"parentRefs": [parent_ref], "rules": rules},
    }


def backend(name, port, weight=None):
    b = {"name": name, "port": port}
    if weight is not None:
        b["weight"] = weight
    return b


def server_rule(rng, j, port):
    """A rule on bench/server that the benchmark's `GET /` (no extra headers) never
    selects: every match needs a header, a longer path, a method or a query parameter."""
    kind = j % 6
    if kind == 0:
        m = {"path": {"type": "PathPrefix", "value": "/"},
             "headers": [{"name": "x-tenant", "value": f"tenant-{j}"}]}
    elif kind == 1:
        m = {"path": {"type": "PathPrefix", "value": f"/api/v{1 + j % 3}/items-{j}"},
             "method": "GET"}
    elif kind == 2:
        m = {"path": {"type": "Exact", "value": f"/internal/status-{j}"}}
    elif kind == 3:
        m = {"path": {"type": "PathPrefix", "value": "/"}, "method": "POST",
             "headers": [{"name": "x-client", "value": f"batch-{j}"}]}
    elif kind == 4:
        m = {"path": {"type": "PathPrefix", "value": "/"},
             "queryParams": [{"name": "debug", "value": str(j)}]}
    else:
        # A regex now and then, as real routes have (user ids, versions).
        m = {"path": {"type": "PathPrefix", "value": "/"},
             "headers": [{"type": "RegularExpression", "name": "x-user",
                          "value": f"u{j}-[0-9]+"}]}
    rule = {"matches": [m]}
    if rng.random() < 0.5:
        rule["backendRefs"] = [backend("server", port, 90), backend("server-v2", port, 10)]
    else:
        rule["backendRefs"] = [backend("server-v2", port)]
    if rng.random() < 0.3:
        rule["filters"] = [{"type": "RequestHeaderModifier",
                            "requestHeaderModifier": {"set": [{"name": "x-route",
                                                               "value": f"r{j}"}]}}]
    if rng.random() < 0.2:
        rule["timeouts"] = {"request": "10s", "backendRequest": "2s"}
    return rule


def other_rule(rng, j, svc, port):
    """A rule on one of the other Services: path prefixes and headers, canary splits."""
    m = {"path": {"type": "PathPrefix", "value": f"/{svc}/v{1 + j % 4}/res-{j % 17}"}}
    if rng.random() < 0.4:
        m["headers"] = [{"name": "x-env", "value": rng.choice(["prod", "staging", "dev"])}]
    if rng.random() < 0.15:
        m["method"] = rng.choice(["GET", "POST", "PUT"])
    if rng.random() < 0.03:
        m["path"] = {"type": "RegularExpression", "value": f"/{svc}/[a-z]+/{j}"}
    rule = {"matches": [m]}
    if rng.random() < 0.3:
        w = rng.choice([5, 10, 25, 50])
        rule["backendRefs"] = [backend(svc, port, 100 - w), backend(f"{svc}-v2", port, w)]
    else:
        rule["backendRefs"] = [backend(svc, port)]
    f = []
    if rng.random() < 0.25:
        f.append({"type": "RequestHeaderModifier",
                  "requestHeaderModifier": {"add": [{"name": "x-via", "value": svc}]}})
    if rng.random() < 0.1 and m["path"]["type"] == "PathPrefix":
        f.append({"type": "URLRewrite",
                  "urlRewrite": {"path": {"type": "ReplacePrefixMatch",
                                          "replacePrefixMatch": "/"}}})
    if f:
        rule["filters"] = f
    if rng.random() < 0.2:
        rule["timeouts"] = {"request": "5s"}
    if rng.random() < 0.15:
        rule["retry"] = {"codes": [503], "attempts": 2, "backoff": "100ms"}
    return rule


def generate(args):
    rng = random.Random(args.seed)
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}]
    docs.append(service("bench", "server", args.server_ip, args.port))
    ip = 0
    docs.append(service("bench", "server-v2", cluster_ip(ip), args.port))
    ip += 1
    n = args.routes
    on_service = min(args.on_service, n)
    others = n - on_service
    namespaces = [f"team-{k:02d}" for k in range(args.namespaces)]
    svcs = []
    for ns in namespaces:
        docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        for k in range(args.services):
            name = f"svc-{k:02d}"
            port = rng.choice([80, 8080, 9080])
            docs.append(service(ns, name, cluster_ip(ip), port))
            docs.append(service(ns, f"{name}-v2", cluster_ip(ip + 1), port))
            ip += 2
            svcs.append((ns, name, port))
    routes = []
    if n > 0:
        routes.append(route("bench", "server-default", 0, "bench", "server", args.port,
                            [{"name": "default",
                              "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                              "backendRefs": [backend("server", args.port)]}]))
    consumers = min(args.consumers, max(on_service - 1, 0))
    for j in range(1, on_service):
        if j <= consumers:
            # A consumer route: applies only to clients in its own namespace, so the
            # benchmark's client (namespace bench) skips it.
            ns, svc, port = svcs[j % len(svcs)]
            rules = [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                      "backendRefs": [backend(svc, port)]}]
            routes.append(route(ns, f"server-consumer-{j}", j, "bench", "server", args.port,
                                rules))
            continue
        rules = [server_rule(rng, j * 3 + r, args.port) for r in range(1 + j % 3)]
        routes.append(route("bench", f"server-{j:04d}", j, "bench", "server", args.port, rules))
    for j in range(others):
        ns, svc, port = svcs[j % len(svcs)]
        rules = [other_rule(rng, j * 3 + r, svc, port) for r in range(1 + rng.randrange(3))]
        routes.append(route(ns, f"{svc}-r{j // len(svcs):03d}", on_service + j, ns, svc,
                            port, rules))
    docs += routes
    return docs, {"routes": len(routes), "on_server": on_service,
                  "services": 2 + 2 * len(svcs), "namespaces": 1 + len(namespaces)}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routes", type=int, required=True, help="HTTPRoutes in all")
    ap.add_argument("--out", required=True, help="directory to write mesh.yaml into")
    ap.add_argument("--server-ip", default="198.18.200.2")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--on-service", type=int, default=100,
                    help="routes attached to bench/server, the default route included")
    ap.add_argument("--consumers", type=int, default=5,
                    help="of those, consumer routes from other namespaces")
    ap.add_argument("--namespaces", type=int, default=30)
    ap.add_argument("--services", type=int, default=10, help="Services per namespace")
    ap.add_argument("--seed", type=int, default=8)
    args = ap.parse_args()
    if args.routes < 0:
        sys.exit("gen_routes.py: --routes must be 0 or more")
    docs, summary = generate(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "mesh.yaml")
    with open(path, "w") as f:
        f.write("\n---\n".join("\n".join(emit(d)) for d in docs) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
