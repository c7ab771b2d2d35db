#!/usr/bin/env python3
"""Assertions on a rendered meshlet chart (called by scripts/test-chart.sh).

    chart_assert.py render  CHART RENDERED.yaml VALUES.yaml [--kube-version X.Y.Z]
    chart_assert.py values  CHART
    chart_assert.py args    RENDERED.yaml OUTDIR PORT
    chart_assert.py mutate  CHART RESPONSE.json VALUES.yaml UID [--kube-version X.Y.Z]
    chart_assert.py golden  RENDERED.yaml GOLDEN.yaml

`render` checks the objects that `helm template` produced against the merged
values (chart defaults + the value set), so every expectation follows from the
values rather than being hard-coded. `values` checks that values.yaml and
values.schema.json describe the same keys and that every key has a `# --` doc.
`args` writes the webhook Secret's files to OUTDIR and prints the injector
container's args (NUL-separated), with the listen address moved to
127.0.0.1:PORT and the TLS paths into OUTDIR, so the real binary can be started
exactly as the chart would start it. `mutate` checks the injector's
AdmissionReview response to a plain pod: the sidecar it added carries the
chart's images, resources, pull policy, log level, TLS mode and sidecar mode.
`golden` compares a render with a committed golden file after masking what is
generated per render (keys, certificates, caBundle); UPDATE_GOLDEN=1 rewrites
the golden file instead (review the diff).

Prints one line per failed check and exits 1 if any failed.
"""

import base64
import copy
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

NS = "meshlet-system"
INJECTOR = "meshlet-injector"
TLS_SECRET = "meshlet-injector-tls"
HOST = f"{INJECTOR}.{NS}.svc"

errors = []


def check(cond, msg):
    if not cond:
        errors.append(msg)
    return cond


def merge(base, over):
    """Helm's coalescing: maps merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def semver_ge(v, want):
    nums = [int(x) for x in re.findall(r"\d+", v)[:3]]
    return nums >= list(want)


# ---------------------------------------------------------------- render ---


def objects_by_kind(docs):
    out = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def one(kinds, kind, name=None):
    objs = [o for o in kinds.get(kind, []) if name is None or o["metadata"]["name"] == name]
    check(len(objs) == 1, f"expected exactly one {kind} {name or ''}, found {len(objs)}")
    return objs[0] if objs else {}


def image(img, chart):
    return f"{img['repository']}:{img.get('tag') or chart['appVersion']}"


def resources(r):
    return {k: v for k, v in (r or {}).items() if v}


def openssl(*args, stdin=None):
    p = subprocess.run(["openssl", *args], input=stdin, capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def check_certs(secret, mwc, min_days):
    data = secret.get("data", {})
    check(secret.get("type") == "kubernetes.io/tls", "webhook Secret must be type kubernetes.io/tls")
    for k in ("ca.crt", "tls.crt", "tls.key"):
        check(k in data, f"webhook Secret lacks {k}")
    if not all(k in data for k in ("ca.crt", "tls.crt", "tls.key")):
        return
    for wh in mwc.get("webhooks", []):
        check(wh["clientConfig"].get("caBundle") == data["ca.crt"],
              f"webhook {wh['name']}: caBundle differs from ca.crt in Secret {TLS_SECRET}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for k in data:
            paths[k] = os.path.join(tmp, k)
            with open(paths[k], "wb") as f:
                f.write(base64.b64decode(data[k]))
        rc, out = openssl("verify", "-CAfile", paths["ca.crt"], "-purpose", "sslserver", paths["tls.crt"])
        check(rc == 0, f"serving certificate does not verify against the CA as a TLS server cert: {out.strip()}")
        rc, out = openssl("x509", "-in", paths["tls.crt"], "-noout", "-ext", "subjectAltName")
        check(f"DNS:{HOST}" in out, f"serving certificate has no SAN DNS:{HOST}: {out.strip()}")
        rc, out = openssl("x509", "-in", paths["tls.crt"], "-noout", "-checkend", str(min_days * 24 * 3600))
        check(rc == 0, f"serving certificate expires within {min_days} days")
        _, cert_pub = openssl("x509", "-in", paths["tls.crt"], "-noout", "-pubkey")
        _, key_pub = openssl("pkey", "-in", paths["tls.key"], "-pubout")
        check(cert_pub.strip() == key_pub.strip() and "PUBLIC KEY" in key_pub,
              "tls.key is not the private key of tls.crt")


def check_rbac(kinds, values):
    sa = one(kinds, "ServiceAccount", INJECTOR)
    cr = one(kinds, "ClusterRole", INJECTOR)
    role = one(kinds, "Role", INJECTOR)

    def grants(rules):
        out = set()
        for r in rules:
            for g in r.get("apiGroups", []):
                for res in r.get("resources", []):
                    for v in r.get("verbs", []):
                        out.add((g, res, v, tuple(r.get("resourceNames", []))))
        return out

    cluster = grants(cr.get("rules", []))
    # What the injector needs now and soon (webhook, identity issuer, config
    # controller), and nothing more: a new grant must be added here on purpose.
    read = ("get", "list", "watch")
    want = {("", r, v, ()) for r in ("namespaces", "pods", "services") for v in read}
    want |= {("discovery.k8s.io", "endpointslices", v, ()) for v in read}
    want |= {("gateway.networking.k8s.io", r, v, ())
             for r in ("httproutes", "grpcroutes", "referencegrants") for v in read}
    want |= {("gateway.networking.x-k8s.io", "xbackendtrafficpolicies", v, ()) for v in read}
    want |= {("gateway.networking.k8s.io", r, v, ())
             for r in ("httproutes/status", "grpcroutes/status") for v in ("update", "patch")}
    want |= {("policy.meshlet.io", "authorizationpolicies", v, ()) for v in read}
    want |= {("policy.meshlet.io", "authorizationpolicies/status", v, ()) for v in ("update", "patch")}
    want |= {("authentication.k8s.io", "tokenreviews", "create", ())}
    check(cluster == want, f"ClusterRole grants differ from least privilege: extra {sorted(cluster - want)}, "
                           f"missing {sorted(want - cluster)}")
    check(not any(g[1] == "secrets" for g in cluster), "ClusterRole must not grant anything on secrets")
    check(not any("*" in g[:3] for g in cluster | grants(role.get("rules", []))), "RBAC must not use wildcards")
    rg = grants(role.get("rules", []))
    user_ca = values["identity"]["caSecret"]
    ca_secret = user_ca or "meshlet-identity-ca"
    if user_ca:
        check(("", "secrets", "create", ()) not in rg, "a user-provided CA (identity.caSecret) needs no secret create")
    else:
        check(("", "secrets", "create", ()) in rg, "Role must allow creating secrets (identity CA)")
    check(("", "secrets", "get", (ca_secret,)) in rg and ("", "secrets", "update", (ca_secret,)) in rg,
          f"Role must allow get/update of the identity CA secret {ca_secret} only")
    lease = {("coordination.k8s.io", "leases", "create", ())}
    lease |= {("coordination.k8s.io", "leases", v, ("meshlet-controller",)) for v in ("get", "update")}
    check(lease <= rg, f"Role must allow the controller Lease: missing {sorted(lease - rg)}")
    rg -= lease
    check(all(g[1] == "secrets" for g in rg), f"Role grants more than secrets and the Lease: {sorted(rg)}")
    check(not any(g[2] in ("list", "watch", "delete") for g in rg), "Role must not list, watch or delete secrets")
    check(role["metadata"].get("namespace") == NS, "Role must live in the release namespace")
    for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        b = one(kinds, kind, INJECTOR)
        check(b.get("roleRef", {}).get("kind") == role_kind and b["roleRef"]["name"] == INJECTOR,
              f"{kind} must reference {role_kind}/{INJECTOR}")
        check(b.get("subjects") == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NS}],
              f"{kind} must bind exactly the injector ServiceAccount")


def check_webhook(kinds, values, deploy_secret):
    wv = values["webhook"]
    mwc = one(kinds, "MutatingWebhookConfiguration", INJECTOR)
    hooks = mwc.get("webhooks", [])
    check(len(hooks) == (2 if wv["podOptIn"] else 1), f"expected {2 if wv['podOptIn'] else 1} webhooks, got {len(hooks)}")
    excluded = {"kube-system", NS, *wv["excludeNamespaces"]}
    svc = one(kinds, "Service", INJECTOR)
    svc_ports = {p["port"] for p in svc.get("spec", {}).get("ports", [])}
    for wh in hooks:
        n = wh["name"]
        check(wh.get("sideEffects") == "None", f"{n}: sideEffects must be None")
        check(wh.get("admissionReviewVersions") == ["v1"], f"{n}: admissionReviewVersions must be [v1]")
        check(wh.get("failurePolicy") == wv["failurePolicy"], f"{n}: failurePolicy {wh.get('failurePolicy')} != value {wv['failurePolicy']}")
        check(wh.get("timeoutSeconds") == wv["timeoutSeconds"], f"{n}: timeoutSeconds does not follow the value")
        check(wh.get("reinvocationPolicy") == "IfNeeded", f"{n}: reinvocationPolicy must be IfNeeded")
        check(wh.get("rules") == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                   "resources": ["pods"], "scope": "Namespaced"}], f"{n}: rules must be pods CREATE only")
        s = wh.get("clientConfig", {}).get("service", {})
        check(s.get("name") == svc["metadata"]["name"] and s.get("namespace") == NS and s.get("path") == "/mutate"
              and s.get("port") in svc_ports, f"{n}: clientConfig.service does not point at the injector Service's /mutate")
        ns_expr = {e["key"]: e for e in wh.get("namespaceSelector", {}).get("matchExpressions", [])}
        name_expr = ns_expr.get("kubernetes.io/metadata.name", {})
        check(name_expr.get("operator") == "NotIn" and set(name_expr.get("values", [])) == excluded,
              f"{n}: namespaceSelector must exclude exactly {sorted(excluded)} by name, got {name_expr}")
        inj = ns_expr.get("meshlet.io/inject", {})
        obj = {e["key"]: e for e in wh.get("objectSelector", {}).get("matchExpressions", [])}.get("meshlet.io/inject", {})
        if n == "namespace.inject.meshlet.io":
            check(inj.get("operator") == "In" and inj.get("values") == ["enabled"], f"{n}: must select namespaces labelled enabled")
            check(obj.get("operator") == "NotIn" and obj.get("values") == ["disabled"], f"{n}: must skip pods labelled disabled")
        elif n == "object.inject.meshlet.io":
            # Disjoint from the namespace webhook: a pod is never sent twice.
            check(inj.get("operator") == "NotIn" and set(inj.get("values", [])) == {"enabled", "disabled"},
                  f"{n}: must only see namespaces labelled neither enabled nor disabled")
            check(obj.get("operator") == "In" and obj.get("values") == ["enabled"], f"{n}: must select pods labelled enabled")
        else:
            check(False, f"unexpected webhook {n}")

    cm = wv["certManager"]
    ann = mwc["metadata"].get("annotations", {}) or {}
    if cm["enabled"]:
        check("Secret" not in kinds, "with cert-manager the chart must not render a Secret")
        cert = one(kinds, "Certificate", INJECTOR)
        check(ann.get("cert-manager.io/inject-ca-from") == f"{NS}/{INJECTOR}", "MWC lacks cert-manager.io/inject-ca-from ns/name")
        check(all("caBundle" not in wh["clientConfig"] for wh in hooks), "with cert-manager, caBundle must be left to cert-manager")
        spec = cert.get("spec", {})
        check(spec.get("secretName") == deploy_secret, "Certificate secretName differs from the Secret the Deployment mounts")
        check(HOST in spec.get("dnsNames", []), f"Certificate dnsNames lack {HOST}")
        ref = spec.get("issuerRef", {})
        if cm["issuerRef"]["name"]:
            check(ref == cm["issuerRef"], f"Certificate issuerRef {ref} differs from the value {cm['issuerRef']}")
            check("Issuer" not in kinds, "with a user issuer the chart must not create Issuers")
        else:
            issuers = {i["metadata"]["name"]: i for i in kinds.get("Issuer", [])}
            check(ref.get("kind") == "Issuer" and ref.get("name") in issuers, "Certificate must use the chart's CA Issuer")
            ca_secret = issuers.get(ref.get("name"), {}).get("spec", {}).get("ca", {}).get("secretName")
            ca_certs = [c for c in kinds.get("Certificate", []) if c["spec"].get("secretName") == ca_secret]
            check(len(ca_certs) == 1 and ca_certs[0]["spec"].get("isCA") is True, "CA Issuer's secret must come from an isCA Certificate")
        for o in kinds.get("Certificate", []) + kinds.get("Issuer", []):
            check(o.get("apiVersion") == "cert-manager.io/v1", f"{o['kind']} {o['metadata']['name']}: apiVersion must be cert-manager.io/v1")
    else:
        check("cert-manager.io/inject-ca-from" not in ann, "MWC must not ask cert-manager without certManager.enabled")
        check("Certificate" not in kinds and "Issuer" not in kinds, "cert-manager objects rendered without certManager.enabled")
        secret = one(kinds, "Secret", TLS_SECRET)
        check(deploy_secret == TLS_SECRET, "Deployment must mount the webhook Secret")
        # Generated certificates live as long as the value says; a user's own
        # must at least be valid now.
        check_certs(secret, mwc, 0 if wv["tls"]["cert"] else int(wv["certValidityDays"]) - 1)
        if wv["tls"]["cert"]:
            data = secret.get("data", {})
            check(base64.b64decode(data.get("tls.crt", "")).decode() == wv["tls"]["cert"], "user-provided tls.cert not used")
            check(base64.b64decode(data.get("ca.crt", "")).decode() == wv["tls"]["caCert"], "user-provided tls.caCert not used")


def check_deployment(kinds, values, chart, kube_version):
    iv = values["injector"]
    d = one(kinds, "Deployment", INJECTOR)
    spec = d.get("spec", {})
    tpl = spec.get("template", {})
    pod = tpl.get("spec", {})
    labels = tpl.get("metadata", {}).get("labels", {})
    check(spec.get("replicas") == iv["replicas"], "Deployment replicas do not follow injector.replicas")
    check(spec.get("strategy", {}).get("rollingUpdate", {}).get("maxUnavailable") == 0, "rolling update must keep all injectors up")
    check(all(labels.get(k) == v for k, v in spec.get("selector", {}).get("matchLabels", {}).items()), "selector does not match pod labels")
    check(labels.get("meshlet.io/inject") == "disabled", "injector pods must carry meshlet.io/inject=disabled")
    psc = pod.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, "injector pod must run as non-root")
    check(psc.get("seccompProfile") == {"type": "RuntimeDefault"}, "injector pod must use the RuntimeDefault seccomp profile")
    check(pod.get("serviceAccountName") == INJECTOR, "Deployment must use the injector ServiceAccount")
    check(pod.get("nodeSelector", {}) == (iv["nodeSelector"] or {}), "nodeSelector does not follow the value")
    check(pod.get("tolerations", []) == iv["tolerations"], "tolerations do not follow the value")
    check(pod.get("affinity", {}) == iv["affinity"], "affinity does not follow the value")
    check(pod.get("priorityClassName", "") == iv["priorityClassName"], "priorityClassName does not follow the value")
    check([s["name"] for s in pod.get("imagePullSecrets", [])] == values["imagePullSecrets"], "imagePullSecrets do not follow the value")
    for k, v in iv["podAnnotations"].items():
        check(tpl.get("metadata", {}).get("annotations", {}).get(k) == v, f"pod annotation {k} missing")
    tsc = pod.get("topologySpreadConstraints", [])
    if iv["topologySpread"]["enabled"]:
        check(len(tsc) == 1 and tsc[0]["topologyKey"] == "kubernetes.io/hostname"
              and tsc[0]["whenUnsatisfiable"] == iv["topologySpread"]["whenUnsatisfiable"]
              and tsc[0]["maxSkew"] == iv["topologySpread"]["maxSkew"]
              and all(labels.get(k) == v for k, v in tsc[0]["labelSelector"]["matchLabels"].items()),
              "topologySpreadConstraints do not spread injector pods across nodes as configured")
    else:
        check(not tsc, "topologySpreadConstraints rendered although disabled")
    containers = pod.get("containers", [])
    check(len(containers) == 1, "injector pod must have one container")
    c = containers[0] if containers else {}
    check(c.get("image") == image(iv["image"], chart), f"injector image {c.get('image')} does not follow the value")
    check(c.get("imagePullPolicy") == iv["image"]["pullPolicy"], "injector pullPolicy does not follow the value")
    check(c.get("resources", {}) == resources(iv["resources"]), f"injector resources {c.get('resources')} do not follow the value")
    csc = c.get("securityContext", {})
    check(csc.get("readOnlyRootFilesystem") is True, "injector must have a read-only root filesystem")
    check(csc.get("allowPrivilegeEscalation") is False, "injector must not allow privilege escalation")
    check(csc.get("capabilities", {}).get("drop") == ["ALL"] and not csc.get("capabilities", {}).get("add"),
          "injector must drop ALL capabilities and add none")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    check(ports.get("https") == 8443, "injector must listen on 8443 (port name https)")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        g = c.get(probe, {}).get("httpGet", {})
        check(g.get("path") == path and g.get("scheme") == "HTTPS" and g.get("port") in ("https", 8443),
              f"{probe} must be GET {path} over HTTPS on the serving port")
    args = c.get("args", [])
    flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    check(args[:1] == ["serve"], "injector must run the serve subcommand")
    controller = iv.get("controller", {}).get("enabled", True)
    check(("--no-controller" in args) == (not controller),
          f"--no-controller must be passed exactly when injector.controller.enabled is false ({controller})")
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    for flag, file in (("tls-cert", "tls.crt"), ("tls-key", "tls.key")):
        check(flags.get(flag) == f"{mounts.get('tls')}/{file}", f"--{flag} must point into the mounted tls Secret")
    check(flags.get("proxy-image") == image(values["proxy"]["image"], chart), "--proxy-image does not follow proxy.image")
    pi = values["proxyInit"]["image"]
    init_image = f"{pi['repository'] or values['proxy']['image']['repository']}:{pi['tag'] or values['proxy']['image']['tag'] or chart['appVersion']}"
    check(flags.get("init-image") == init_image, f"--init-image {flags.get('init-image')} != {init_image}")
    pv = values["proxy"]
    native = pv["nativeSidecar"]
    if native == "auto":
        native = semver_ge(kube_version, (1, 29, 0))
    req = (pv["resources"] or {}).get("requests") or {}
    lim = (pv["resources"] or {}).get("limits") or {}
    want_flags = {
        "image-pull-policy": pv["image"]["pullPolicy"],
        "proxy-cpu": str(req.get("cpu", "")),
        "proxy-memory": str(req.get("memory", "")),
        "proxy-cpu-limit": str(lim.get("cpu", "")),
        "proxy-memory-limit": str(lim.get("memory", "")),
        "proxy-log-level": pv["logLevel"],
        "native-sidecar": str(native).lower(),
        "proxy-tls-mode": pv["tlsMode"],
        "default-inbound-policy": values["defaultInboundPolicy"],
    }
    for k, want in want_flags.items():
        check(flags.get(k) == want, f"--{k}={flags.get(k)!r}, want {want!r} from the values")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    check("emptyDir" in vols.get("tmp", {}) and mounts.get("tmp") == "/tmp", "read-only root needs a /tmp emptyDir")

    # Service 443 -> the container's https port.
    svc = one(kinds, "Service", INJECTOR)
    sp = svc.get("spec", {}).get("ports", [{}])
    check(sp[0].get("port") == 443 and sp[0].get("targetPort") in ("https", 8443), "Service must map 443 to 8443")
    idv = values["identity"]
    mesh = [p for p in sp[1:] if p.get("name") == "mesh"]
    if idv["enabled"]:
        check(len(sp) == 2 and len(mesh) == 1 and mesh[0].get("port") == 15012 and mesh[0].get("targetPort") == "mesh"
              and ports.get("mesh") == 15012, "identity.enabled: Service must map 15012 to the container's mesh port")
        check(flags.get("identity") == "true" and flags.get("cert-lifetime") == idv["certLifetime"]
              and flags.get("ca-secret") == (idv["caSecret"] or "meshlet-identity-ca")
              and flags.get("ca-secret-create") == str(not idv["caSecret"]).lower(),
              "identity flags do not follow the identity values")
        pinned = iv.get("service", {}).get("clusterIP", "")
        want_addr = values["controlPlane"]["address"] or (f"{pinned}:15012" if pinned else None)
        if want_addr:
            check(flags.get("control-plane-address") == want_addr,
                  f"--control-plane-address={flags.get('control-plane-address')!r}, want {want_addr!r}")
        if pinned:
            check(svc["spec"].get("clusterIP") == pinned, "injector.service.clusterIP is not the Service's clusterIP")
    else:
        check(len(sp) == 1 and flags.get("identity") == "false", "identity off: no mesh port and --identity=false")
    check(svc.get("spec", {}).get("selector") == spec.get("selector", {}).get("matchLabels"), "Service selector != Deployment selector")

    pdbs = kinds.get("PodDisruptionBudget", [])
    if iv["podDisruptionBudget"]["enabled"]:
        check(len(pdbs) == 1 and pdbs[0]["spec"].get("minAvailable") == iv["podDisruptionBudget"]["minAvailable"]
              and pdbs[0]["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"],
              "PodDisruptionBudget does not protect the injector pods as configured")
        check(iv["podDisruptionBudget"]["minAvailable"] < iv["replicas"], "PDB would block drains")
    else:
        check(not pdbs, "PodDisruptionBudget rendered although disabled")

    # Mesh defaults the injector applies.
    cm = one(kinds, "ConfigMap", "meshlet-config")
    try:
        defaults = json.loads(cm.get("data", {}).get("defaults.json", ""))
    except ValueError as e:
        check(False, f"meshlet-config defaults.json is not JSON: {e}")
        defaults = {}
    p = defaults.get("proxy", {})
    check(p.get("nativeSidecar") is native, f"nativeSidecar {p.get('nativeSidecar')} != {native} (kube {kube_version})")
    check(p.get("image") == image(pv["image"], chart) and p.get("tlsMode") == pv["tlsMode"] and p.get("logLevel") == pv["logLevel"]
          and p.get("resources") == pv["resources"] and p.get("imagePullPolicy") == pv["image"]["pullPolicy"],
          "proxy defaults in meshlet-config do not follow the values")
    check(defaults.get("proxyInit", {}).get("image") == init_image, "init image in meshlet-config differs from --init-image")
    check(defaults.get("defaultInboundPolicy") == values["defaultInboundPolicy"] and defaults.get("trustDomain") == values["trustDomain"],
          "mesh-wide defaults in meshlet-config do not follow the values")
    return vols.get("tls", {}).get("secret", {}).get("secretName")


def cmd_render(chart_dir, rendered, values_file, kube_version):
    with open(os.path.join(chart_dir, "Chart.yaml")) as f:
        chart = yaml.safe_load(f)
    with open(os.path.join(chart_dir, "values.yaml")) as f:
        values = yaml.safe_load(f)
    with open(values_file) as f:
        values = merge(values, yaml.safe_load(f) or {})
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kinds = objects_by_kind(docs)
    for d in docs:
        md = d.get("metadata", {})
        cluster_scoped = d["kind"] in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration")
        check(cluster_scoped or md.get("namespace") == NS, f"{d['kind']}/{md.get('name')} must be in namespace {NS}")
        check(md.get("labels", {}).get("app.kubernetes.io/part-of") == "meshlet", f"{d['kind']}/{md.get('name')} lacks the part-of label")
    deploy_secret = check_deployment(kinds, values, chart, kube_version)
    check_rbac(kinds, values)
    check_webhook(kinds, values, deploy_secret)


# ---------------------------------------------------------------- values ---


def doc_comments(path):
    """Maps each key path in values.yaml to whether a `# --` block precedes it."""
    out = {}
    stack = []  # (indent, key)
    comment_block = []
    with open(path) as f:
        for line in f:
            s = line.strip()
            if not s:
                comment_block = []
                continue
            if s.startswith("#"):
                comment_block.append(s)
                continue
            m = re.match(r"^( *)([A-Za-z0-9_.-]+):", line)
            if m and not s.startswith("-"):
                indent = len(m.group(1))
                while stack and stack[-1][0] >= indent:
                    stack.pop()
                stack.append((indent, m.group(2)))
                documented = bool(comment_block) and comment_block[0].startswith("# --")
                out[tuple(k for _, k in stack)] = documented
            comment_block = []
    return out


def cmd_values(chart_dir):
    with open(os.path.join(chart_dir, "values.yaml")) as f:
        values = yaml.safe_load(f)
    with open(os.path.join(chart_dir, "values.schema.json")) as f:
        schema = json.load(f)
    docs = doc_comments(os.path.join(chart_dir, "values.yaml"))
    defs = schema.get("definitions", {})

    def resolve(s):
        while "$ref" in s:
            s = defs[s["$ref"].split("/")[-1]]
        return s

    def walk(v, s, path, reverse=True):
        # Shared definitions (resources) list optional keys such as
        # ephemeral-storage, so only the chart's own objects must have a
        # default for every schema key.
        if "$ref" in s:
            reverse = False
        s = resolve(s)
        name = ".".join(path) or "<root>"
        if isinstance(v, dict) and s.get("type") == "object" and "properties" in s:
            check(s.get("additionalProperties") is False, f"schema for {name} must set additionalProperties: false")
            for k in v:
                check(k in s["properties"], f"value {'.'.join(path + (k,))} is not in values.schema.json")
            if reverse:
                for k in s["properties"]:
                    check(k in v or (not path and k == "global"),
                          f"schema key {'.'.join(path + (k,))} has no default in values.yaml")
            for k, sub in v.items():
                if k in s["properties"]:
                    walk(sub, s["properties"][k], path + (k,), reverse)
        elif isinstance(v, dict) and v and s.get("additionalProperties") is not False and "additionalProperties" not in s:
            check(s.get("type") == "object", f"schema for {name} does not describe a map")

    walk(values, schema, ())

    def documented(v, path):
        if docs.get(path):
            return True
        if isinstance(v, dict) and v:
            return all(documented(sub, path + (k,)) for k, sub in v.items())
        return False

    def report(v, path):
        if documented(v, path):
            return
        if isinstance(v, dict) and v and not docs.get(path):
            for k, sub in v.items():
                report(sub, path + (k,))
        else:
            check(False, f"value {'.'.join(path)} has no `# --` comment in values.yaml")

    for k, v in values.items():
        report(v, (k,))

    # The README's values table must not drift from values.yaml.
    with open(os.path.join(chart_dir, "README.md")) as f:
        readme = f.read()
    for path, has_doc in docs.items():
        if has_doc:
            check(f"| `{'.'.join(path)}` |" in readme, f"README.md's values table lacks `{'.'.join(path)}`")


def cmd_args(rendered, outdir, port):
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kinds = objects_by_kind(docs)
    secret = one(kinds, "Secret", TLS_SECRET)
    for k, v in secret.get("data", {}).items():
        with open(os.path.join(outdir, k), "wb") as f:
            f.write(base64.b64decode(v))
    c = one(kinds, "Deployment", INJECTOR)["spec"]["template"]["spec"]["containers"][0]
    out = []
    for a in c["args"]:
        if a.startswith("--addr="):
            a = f"--addr=127.0.0.1:{port}"
        elif a.startswith("--tls-cert="):
            a = "--tls-cert=" + os.path.join(outdir, "tls.crt")
        elif a.startswith("--tls-key="):
            a = "--tls-key=" + os.path.join(outdir, "tls.key")
        elif a.startswith("--identity="):
            # No API server here (TokenReview, the CA Secret): the issuer is tested
            # against a real one by injector/tests/issuer_kube.rs.
            a = "--identity=false"
        out.append(a)
    sys.stdout.write("\0".join(out) + "\0")


def cmd_mutate(chart_dir, response, values_file, uid, kube_version):
    with open(os.path.join(chart_dir, "Chart.yaml")) as f:
        chart = yaml.safe_load(f)
    with open(os.path.join(chart_dir, "values.yaml")) as f:
        values = yaml.safe_load(f)
    with open(values_file) as f:
        values = merge(values, yaml.safe_load(f) or {})
    with open(response) as f:
        resp = json.load(f).get("response", {})
    check(resp.get("uid") == uid, f"response uid {resp.get('uid')} != request uid {uid}")
    check(resp.get("allowed") is True, f"pod refused: {resp.get('status')}")
    check(resp.get("patchType") == "JSONPatch", "response carries no JSONPatch")
    try:
        patch = json.loads(base64.b64decode(resp.get("patch", "")))
    except ValueError as e:
        check(False, f"patch is not base64 JSON: {e}")
        return
    where = {}
    for op in patch:
        if op.get("op") == "add" and op.get("path") in ("/spec/initContainers", "/spec/containers"):
            for c in op["value"]:
                where[c["name"]] = (op["path"].rsplit("/", 1)[1], c)
        elif op.get("op") == "add" and re.match(r"^/spec/(initContainers|containers)/\d+$|^/spec/(initContainers|containers)/-$", op.get("path", "")):
            where[op["value"]["name"]] = (op["path"].split("/")[2], op["value"])
    pv = values["proxy"]
    native = pv["nativeSidecar"]
    if native == "auto":
        native = semver_ge(kube_version, (1, 29, 0))
    if not check("meshlet-proxy" in where and "meshlet-init" in where, f"patch adds no meshlet-proxy/meshlet-init: {sorted(where)}"):
        return
    list_name, proxy = where["meshlet-proxy"]
    check(list_name == ("initContainers" if native else "containers"),
          f"meshlet-proxy added to {list_name}, but nativeSidecar resolves to {native}")
    check(proxy.get("image") == image(pv["image"], chart), f"proxy image {proxy.get('image')} does not follow proxy.image")
    check(proxy.get("imagePullPolicy") == pv["image"]["pullPolicy"], "proxy imagePullPolicy does not follow the value")
    check(proxy.get("resources") == resources(pv["resources"]),
          f"proxy resources {proxy.get('resources')} != values {resources(pv['resources'])}")
    env = {e["name"]: e.get("value") for e in proxy.get("env", [])}
    check(env.get("MESHLET_LOG") == pv["logLevel"], f"MESHLET_LOG={env.get('MESHLET_LOG')} != proxy.logLevel")
    check(env.get("MESHLET_TLS_MODE") == pv["tlsMode"], f"MESHLET_TLS_MODE={env.get('MESHLET_TLS_MODE')} != proxy.tlsMode")
    pi = values["proxyInit"]["image"]
    init_image = f"{pi['repository'] or pv['image']['repository']}:{pi['tag'] or pv['image']['tag'] or chart['appVersion']}"
    check(where["meshlet-init"][1].get("image") == init_image, "init image does not follow proxyInit.image")


GENERATED = "<generated per render>"


def masked(text):
    """The render with per-render randomness replaced, so goldens are stable."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\s*)(ca\.crt|tls\.crt|tls\.key|caBundle): \S+$", line)
        out.append(f"{m.group(1)}{m.group(2)}: {GENERATED}" if m else line.rstrip())
    return "\n".join(out).strip() + "\n"


def cmd_golden(rendered, golden):
    with open(rendered) as f:
        got = masked(f.read())
    if os.environ.get("UPDATE_GOLDEN") == "1":
        with open(golden, "w") as f:
            f.write(got)
        print(f"rewrote {golden}")
        return
    if not os.path.exists(golden):
        check(False, f"{golden} is missing; create it with UPDATE_GOLDEN=1 scripts/test-chart.sh and review it")
        return
    with open(golden) as f:
        want = f.read()
    if got != want:
        import difflib
        diff = difflib.unified_diff(want.splitlines(), got.splitlines(), "golden", "rendered", lineterm="", n=2)
        check(False, "render differs from the golden file (UPDATE_GOLDEN=1 rewrites it; review the diff):\n"
              + "\n".join(list(diff)[:60]))


def main(argv):
    if len(argv) >= 5 and argv[1] == "render":
        kube = "1.33.0"
        if "--kube-version" in argv:
            kube = argv[argv.index("--kube-version") + 1]
        cmd_render(argv[2], argv[3], argv[4], kube)
    elif len(argv) == 3 and argv[1] == "values":
        cmd_values(argv[2])
    elif len(argv) >= 6 and argv[1] == "mutate":
        kube = "1.33.0"
        if "--kube-version" in argv:
            kube = argv[argv.index("--kube-version") + 1]
        cmd_mutate(argv[2], argv[3], argv[4], argv[5], kube)
    elif len(argv) == 4 and argv[1] == "golden":
        cmd_golden(argv[2], argv[3])
    elif len(argv) == 5 and argv[1] == "args":
        cmd_args(argv[2], argv[3], argv[4])
    else:
        print(__doc__, file=sys.stderr)
        return 64
    for e in errors:
        print(f"  - {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
