#!/usr/bin/env python3
"""Turns the raw output of bench/k8s.sh (watch logs, pod JSON, the API server's
/metrics) into bench/results/<label>.md and <date>-<label>.json.

`k8s_report.py --render results/<date>-k8s.json` rewrites the table from a committed JSON.
"""
import argparse
import json
import math
import os
import platform
import re
import subprocess
from datetime import datetime, timezone

PHASES = [("bench-plain", "baseline (no sidecar)"), ("bench-mesh", "meshed (webhook + meshlet-init + meshlet-proxy)")]


def ts(s):
    """RFC 3339 with whole seconds (metav1.Time) -> epoch seconds."""
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def pct(values, q):
    """Nearest-rank percentile: always a value that was measured (p99 of 50 is the 50th)."""
    if not values:
        return None
    v = sorted(values)
    return v[max(0, math.ceil(q / 100 * len(v)) - 1)]


def summary(values, digits=3):
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(pct(values, 50), digits),
        "p99": round(pct(values, 99), digits),
        "max": round(max(values), digits),
        "min": round(min(values), digits),
        "mean": round(sum(values) / len(values), digits),
    }


def is_ready(obj):
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in obj.get("status", {}).get("conditions", []) or [])


STAGES = [
    ("bound", "PodScheduled=True (bound by the node agent)"),
    ("sandbox", "PodReadyToStartContainers=True (network namespace wired)"),
    ("initialized", "Initialized=True (init containers done, native sidecar started)"),
    ("all_started", "every container started"),
    ("ready", "Ready=True"),
]


def stages_of(obj):
    st = obj.get("status", {})
    true = {c.get("type") for c in st.get("conditions", []) or [] if c.get("status") == "True"}
    statuses = (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or [])
    names = [c["name"] for c in obj["spec"].get("initContainers", [])] + [c["name"] for c in obj["spec"]["containers"]]
    started = {s["name"] for s in statuses if s.get("started") or "terminated" in s.get("state", {})}
    return {
        "bound": bool(obj["spec"].get("nodeName")),
        "sandbox": "PodReadyToStartContainers" in true,
        "initialized": "Initialized" in true,
        "all_started": bool(names) and set(names) <= started,
        "ready": "Ready" in true,
    }


def from_watch(path):
    """Per pod: local receive time of each stage, from the pod's first watch event on."""
    first, seen, names = {}, {}, {}
    with open(path) as f:
        for line in f:
            t, _, raw = line.partition("\t")
            try:
                ev = json.loads(raw)
            except json.JSONDecodeError:
                continue
            obj = ev.get("object", {})
            uid = obj.get("metadata", {}).get("uid")
            if not uid or ev.get("type") not in ("ADDED", "MODIFIED"):
                continue
            names[uid] = obj["metadata"]["name"]
            first.setdefault(uid, float(t))
            for stage, reached in stages_of(obj).items():
                if reached:
                    seen.setdefault(uid, {}).setdefault(stage, float(t) - first[uid])
    return {names[u]: seen.get(u, {}) for u in first}


def from_pods(path):
    """Per pod, from the API's own (whole-second) timestamps."""
    with open(path) as f:
        items = json.load(f)["items"]
    rows = []
    for p in items:
        created = ts(p["metadata"]["creationTimestamp"])
        conds = {c["type"]: c for c in p["status"].get("conditions", [])}
        statuses = p["status"].get("containerStatuses", []) + p["status"].get("initContainerStatuses", [])
        started = []
        for s in statuses:
            st = s.get("state", {})
            run = st.get("running", {}).get("startedAt") or st.get("terminated", {}).get("startedAt")
            if run:
                started.append(ts(run))
        rows.append({
            "pod": p["metadata"]["name"],
            "containers": [c["name"] for c in p["spec"].get("initContainers", [])] + [c["name"] for c in p["spec"]["containers"]],
            "ready_s": ts(conds["Ready"]["lastTransitionTime"]) - created if "Ready" in conds else None,
            "containers_ready_s": ts(conds["ContainersReady"]["lastTransitionTime"]) - created if "ContainersReady" in conds else None,
            "last_container_started_s": max(started) - created if started else None,
        })
    return rows


def parse_metrics(path, names):
    """apiserver_admission_webhook_* samples for the given webhook names."""
    hist, rejections, requests = {}, [], []
    line_re = re.compile(r'^(\w+)\{(.*)\}\s+(\S+)$')
    label_re = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
    with open(path) as f:
        for line in f:
            m = line_re.match(line.strip())
            if not m:
                continue
            metric, labels, value = m.group(1), dict(label_re.findall(m.group(2))), float(m.group(3))
            if names and labels.get("name") not in names:
                continue
            if metric.startswith("apiserver_admission_webhook_admission_duration_seconds"):
                key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
                h = hist.setdefault(key, {"labels": dict(key), "buckets": [], "count": 0, "sum": 0.0})
                if metric.endswith("_bucket"):
                    h["buckets"].append([labels["le"], value])
                elif metric.endswith("_count"):
                    h["count"] = value
                elif metric.endswith("_sum"):
                    h["sum"] = value
            elif metric == "apiserver_admission_webhook_rejection_count":
                rejections.append({"labels": labels, "value": value})
            elif metric == "apiserver_admission_webhook_request_total":
                requests.append({"labels": labels, "value": value})
    out = []
    for h in hist.values():
        b = sorted(((math.inf if le == "+Inf" else float(le)), c) for le, c in h["buckets"])
        h["buckets"] = [["+Inf" if le == math.inf else le, int(c)] for le, c in b]
        h["count"] = int(h["count"])
        h["mean_s"] = h["sum"] / h["count"] if h["count"] else None
        h["p50_s"] = quantile(0.50, b)
        h["p99_s"] = quantile(0.99, b)
        out.append(h)
    return out, rejections, requests


def injector_side(work):
    """meshlet_injector_review_duration_seconds and reviews_total, summed over the injector pods."""
    out = {"pods": 0, "count": 0, "sum_s": 0.0, "reviews": {}, "buckets": {}}
    line_re = re.compile(r'^(\w+)(?:\{(.*)\})?\s+(\S+)$')
    label_re = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
    for fn in sorted(os.listdir(work)):
        if not (fn.startswith("injector-metrics-") and fn.endswith(".txt")) or not os.path.getsize(os.path.join(work, fn)):
            continue
        out["pods"] += 1
        with open(os.path.join(work, fn)) as f:
            for line in f:
                m = line_re.match(line.strip())
                if not m:
                    continue
                metric, labels, value = m.group(1), dict(label_re.findall(m.group(2) or "")), float(m.group(3))
                if metric == "meshlet_injector_review_duration_seconds_count":
                    out["count"] += int(value)
                elif metric == "meshlet_injector_review_duration_seconds_sum":
                    out["sum_s"] += value
                elif metric == "meshlet_injector_review_duration_seconds_bucket":
                    out["buckets"][labels["le"]] = out["buckets"].get(labels["le"], 0) + int(value)
                elif metric == "meshlet_injector_reviews_total":
                    k = ",".join(f"{a}={b}" for a, b in sorted(labels.items()))
                    out["reviews"][k] = out["reviews"].get(k, 0) + int(value)
    out["mean_s"] = out["sum_s"] / out["count"] if out["count"] else None
    b = sorted(((math.inf if le == "+Inf" else float(le)), c) for le, c in out["buckets"].items())
    out["p50_s"], out["p99_s"] = quantile(0.5, b), quantile(0.99, b)
    return out


def quantile(q, buckets):
    """Prometheus histogram_quantile: linear interpolation inside the bucket holding the rank."""
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == math.inf:
                return prev_le  # the highest finite bound, as histogram_quantile does
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def machine(args):
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // 1024
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip() if shutil_which("rustc") else "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_mib": mem,
        "kernel": platform.release(),
        "loadavg_at_start": args.loadavg_start,
        "loadavg_at_end": args.loadavg_end,
        "rustc": rustc,
    }


def shutil_which(name):
    import shutil
    return shutil.which(name)


def binaries(bin_dir):
    out = {}
    for b in ("meshlet-node", "meshlet-proxy", "meshlet-init", "meshlet-injector", "meshlet-testapp"):
        p = os.path.join(bin_dir, b)
        st = os.stat(p)
        out[b] = {"path": p, "bytes": st.st_size, "mtime": datetime.utcfromtimestamp(st.st_mtime).strftime("%Y-%m-%dT%H:%M:%SZ")}
    return out


def build(args):
    work = args.work
    names = set(args.webhooks.split())
    phases = {}
    for ns, title in PHASES:
        watch = from_watch(os.path.join(work, f"watch-{ns}.log"))
        to_ready = [(n, st["ready"]) for n, st in watch.items() if "ready" in st]
        pods = from_pods(os.path.join(work, f"pods-{ns}.json"))
        steps = []
        with open(os.path.join(work, "steps.jsonl")) as f:
            for line in f:
                s = json.loads(line)
                if s["ns"] == ns:
                    steps.append({"replicas": s["replicas"], "seconds": round(s["all_ready_at"] - s["scaled_at"], 2)})
        phases[ns] = {
            "title": title,
            "containers": sorted({",".join(r["containers"]) for r in pods}),
            "watch_first_event_to_ready_s": summary([d for _, d in to_ready]),
            "watch_stages_s": {k: summary([st[k] for st in watch.values() if k in st]) for k, _ in STAGES},
            "api_created_to_ready_s": summary([r["ready_s"] for r in pods if r["ready_s"] is not None], 0),
            "api_created_to_containers_ready_s": summary([r["containers_ready_s"] for r in pods if r["containers_ready_s"] is not None], 0),
            "api_created_to_last_container_started_s": summary([r["last_container_started_s"] for r in pods if r["last_container_started_s"] is not None], 0),
            "steps": steps,
            "per_pod_watch_s": {n: {k: round(v, 3) for k, v in st.items()} for n, st in sorted(watch.items())},
        }
    hist, rejections, requests = parse_metrics(os.path.join(work, "apiserver-metrics.txt"), names)
    injector = injector_side(work)
    return {
        "date": args.date,
        "commit": args.commit,
        "label": args.label,
        "machine": machine(args),
        "settings": {"pods_per_namespace": args.pods, "step": args.step, "binaries": binaries(args.bin),
                     "kube_version": args.kube_version, "helm_version": args.helm_version,
                     "helm_install_wait_s": float(args.helm_install_s), "webhooks": sorted(names)},
        "phases": phases,
        "admission_webhook": {"duration_histograms": hist, "rejection_count": rejections, "request_total": requests,
                              "injector_side": injector},
        "commands": [
            "bash tools/kube/cluster.sh up   # MESHLET_KUBE_DIR=target/kube-bench",
            "target/debug/meshlet-node --cluster-env target/kube-bench/cluster.env --name node-1 --state-dir $WORK/node",
            "helm install meshlet charts/meshlet -n meshlet-system --create-namespace --wait --timeout 180s",
            "kubectl apply -f $WORK/<ns>.yaml   # Namespace (+ label meshlet.io/inject=enabled for bench-mesh), Deployment app, replicas 0",
            f"kubectl -n <ns> scale deployment/app --replicas N   # N = {args.step}, {2 * args.step}, ... {args.pods}; wait until N pods Ready",
            "kubectl get --raw '/api/v1/namespaces/<ns>/pods?watch=1'   # every event stamped on arrival",
            "kubectl get --raw /metrics",
        ],
    }


def fmt(v, unit="s", digits=2):
    return "-" if v is None else f"{v:.{digits}f} {unit}"


def render(doc):
    ph = doc["phases"]
    lines = [
        f"# Pod start-up and admission latency on a real API server ({doc['date'][:10]})",
        "",
        f"kube-apiserver {doc['settings']['kube_version']} + kube-controller-manager + etcd on loopback, "
        f"meshlet-node as the only node, chart `charts/meshlet` installed with Helm; "
        f"{doc['settings']['pods_per_namespace']} pods per namespace, Deployment scaled in steps of "
        f"{doc['settings']['step']} (each step waits until all are Ready). Commit {doc['commit']}, "
        f"debug binaries from `cargo build --workspace --bins` ({doc['settings']['binaries']['meshlet-proxy']['path'].rsplit('/', 2)[-2]}), "
        f"{doc['machine']['cores']} cores ({doc['machine']['cpu']}), load average {doc['machine']['loadavg_at_start']} at start, "
        f"{doc['machine']['loadavg_at_end']} at end. Raw numbers: `{doc['date'][:10]}-{doc['label']}.json`.",
        "",
        "## Pod created -> Ready",
        "",
        "| | baseline p50 | p99 | max | meshed p50 | p99 | max | added p50 | added p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [
        ("watch: first event -> Ready=True (ms resolution)", "watch_first_event_to_ready_s", 3),
        ("API: creationTimestamp -> Ready lastTransitionTime", "api_created_to_ready_s", 0),
        ("API: creationTimestamp -> ContainersReady", "api_created_to_containers_ready_s", 0),
        ("API: creationTimestamp -> last container startedAt", "api_created_to_last_container_started_s", 0),
    ]
    for title, key, d in rows:
        b, m = ph["bench-plain"][key], ph["bench-mesh"][key]
        if not b.get("n") or not m.get("n"):
            lines.append(f"| {title} | - | - | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {title} | {fmt(b['p50'], digits=d)} | {fmt(b['p99'], digits=d)} | {fmt(b['max'], digits=d)} "
            f"| {fmt(m['p50'], digits=d)} | {fmt(m['p99'], digits=d)} | {fmt(m['max'], digits=d)} "
            f"| {fmt(m['p50'] - b['p50'], digits=d)} | {fmt(m['p99'] - b['p99'], digits=d)} |")
    lines += [
        "",
        "p50/p99 are nearest-rank over the pods (with 50 pods, p99 is the 50th value, i.e. the max). "
        "The API's timestamps are whole seconds, so those rows are +-1 s; the watch row stamps each "
        "watch event on arrival at the client. creationTimestamp is set when the pod is stored, "
        "i.e. after mutating admission: the webhook's time is not in these rows (see below).",
        "",
        "Containers: " + "; ".join(f"{ph[ns]['title']}: `{' / '.join(ph[ns]['containers'])}`" for ns, _ in PHASES),
        "",
        "Where the time goes (watch; seconds from the pod's first event to the first event showing the stage; "
        "the node agent batches status writes, so stages that land in one write share a time):",
        "",
        "| stage | baseline p50 | p99 | meshed p50 | p99 |",
        "|---|---|---|---|---|",
    ]
    for key, title in STAGES:
        b, m = ph["bench-plain"]["watch_stages_s"][key], ph["bench-mesh"]["watch_stages_s"][key]
        lines.append(f"| {title} | {fmt(b.get('p50'), digits=3)} | {fmt(b.get('p99'), digits=3)} "
                     f"| {fmt(m.get('p50'), digits=3)} | {fmt(m.get('p99'), digits=3)} |")
    lines += [
        "",
        "Seconds from `kubectl scale` to all replicas Ready, per step:",
        "",
        "| replicas | " + " | ".join(str(s["replicas"]) for s in ph["bench-plain"]["steps"]) + " |",
        "|---|" + "---|" * len(ph["bench-plain"]["steps"]),
    ]
    for ns, title in PHASES:
        lines.append(f"| {ns} | " + " | ".join(f"{s['seconds']:.1f}" for s in ph[ns]["steps"]) + " |")
    aw = doc["admission_webhook"]
    lines += [
        "",
        "## Webhook admission latency, as kube-apiserver measures it",
        "",
        "`apiserver_admission_webhook_admission_duration_seconds` from `kubectl get --raw /metrics` at the end "
        "of the run: every call of the meshlet webhook, which the chart limits to pod CREATE in labelled "
        "namespaces, so only the bench-mesh pods (the injector's own pods and bench-plain are not sent). "
        "One sample is one call, not one pod: with `reinvocationPolicy: IfNeeded` the API server calls the "
        "webhook again when a later mutating plugin changed the pod (calls per pod below). p50/p99 are "
        "`histogram_quantile`-style linear interpolations inside the API server's buckets "
        "(5, 25, 100, 500 ms, ...), so they are only as fine as the buckets; the mean (sum/count) is exact.",
        "",
        "| webhook | operation | rejected | count | mean | p50 (est.) | p99 (est.) |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in aw["duration_histograms"]:
        lb = h["labels"]
        ms = (lambda v: "-" if v is None else f"{v * 1000:.1f} ms")
        lines.append(f"| {lb.get('name')} | {lb.get('operation')} | {lb.get('rejected')} | {h['count']} | {ms(h['mean_s'])} | {ms(h['p50_s'])} | {ms(h['p99_s'])} |")
    if not aw["duration_histograms"]:
        lines.append("| (no samples for the meshlet webhook) | | | | | | |")
    n_mesh = doc["settings"]["pods_per_namespace"]
    total = sum(h["count"] for h in aw["duration_histograms"])
    lines += ["", f"Calls: {total} for {n_mesh} meshed pods created = {total / n_mesh:.2f} per pod."]
    lines += ["", "Buckets (le -> cumulative count): " + "; ".join(
        f"{h['labels'].get('operation')}: " + ", ".join(f"{le}: {c}" for le, c in h["buckets"]) for h in aw["duration_histograms"])]
    inj = aw.get("injector_side") or {}
    if inj.get("count"):
        ms = (lambda v: "-" if v is None else f"{v * 1000:.2f} ms")
        lines += ["", f"The injector's own `meshlet_injector_review_duration_seconds` (parse, mutate, serialize; summed "
                  f"over its {inj['pods']} pods): {inj['count']} reviews, mean {ms(inj['mean_s'])}, p50 {ms(inj['p50_s'])}, "
                  f"p99 {ms(inj['p99_s'])} (bucket estimates). Reviews by result: "
                  + ", ".join(f"{k}: {v}" for k, v in sorted(inj["reviews"].items())) + ". "
                  "The rest of the API server's figure is transport (egress socket, meshlet-node's CONNECT "
                  "splice into the pod, TLS, HTTP) and the API server's own encoding and waiting."]
    rej = aw["rejection_count"]
    lines += ["", "`apiserver_admission_webhook_rejection_count`: " + (
        "; ".join(f"{r['labels']} = {int(r['value'])}" for r in rej) if rej else "absent (no rejection was ever counted)")]
    req = aw["request_total"]
    if req:
        lines += ["", "`apiserver_admission_webhook_request_total`: " + "; ".join(
            f"code {r['labels'].get('code')} {r['labels'].get('operation')} = {int(r['value'])}" for r in req)]
    lines += ["", "Commands:", "", "```"] + doc["commands"] + ["```", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--render")
    for a in ("work", "results", "label", "date", "commit", "bin", "webhooks", "loadavg-start", "loadavg-end",
              "kube-version", "helm-version", "helm-install-s"):
        ap.add_argument("--" + a)
    ap.add_argument("--pods", type=int)
    ap.add_argument("--step", type=int)
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            doc = json.load(f)
        out = os.path.join(os.path.dirname(args.render), f"{doc['label']}.md")
    else:
        doc = build(args)
        with open(os.path.join(args.results, f"{args.date[:10]}-{args.label}.json"), "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        out = os.path.join(args.results, f"{args.label}.md")
    with open(out, "w") as f:
        f.write(render(doc))
    print(render(doc))


if __name__ == "__main__":
    main()
