#!/usr/bin/env python3
"""bench/route.sh's report: route change -> first routed request, p50/p99/max, as
results/<label>.md and results/<date>-<label>.json. `--render FILE.json` rewrites the
md from a committed json."""

import argparse
import json
import math
import os


def pct(v, p):
    """Nearest-rank percentile (p99 of 20 samples is the largest)."""
    s = sorted(v)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def summary(v):
    return {"p50_ms": pct(v, 50), "p99_ms": pct(v, 99), "max_ms": max(v), "min_ms": min(v)}


def render(d):
    a, b = d["from_apply_start"], d["from_api_write"]
    rows = "\n".join(
        f"| {c['n']} | backend-{c['to']} | {c['kubectl_ms']:.0f} | {c['from_apply_start_ms']:.0f} | {c['from_api_write_ms']:.0f} |"
        for c in d["changes"]
    )
    how = ("with `kubectl apply`" if d.get("method") == "kubectl"
           else "with one JSON merge patch each, sent straight to the API server (curl)")
    change = "`kubectl apply`" if d.get("method") == "kubectl" else "the PATCH"
    return f"""# HTTPRoute change -> first request routed by it ({d['date']})

`bench/route.sh` at {d['commit']}: real kube-apiserver {d['kube_version']} (tools/kube), meshlet-node,
the chart's injector (config controller) and sidecars from `{d['bin']}`
({'debug build' if 'debug' in d['bin'] else 'release build'}). A prober in the meshed client pod sends
`probe: on` to Service backend every {d['period_ms']} ms (new connection each); route `probe`
flips its backendRef between backend-v1 and backend-v2 {len(d['changes'])} times {how}.
Load average (1/5/15 min) at start {d['loadavg_start']}, at end {d['loadavg_end']} (2 shared cores).

| from | p50 | p99 | max | min |
|---|---|---|---|---|
| {change} sent | {a['p50_ms']:.0f} ms | {a['p99_ms']:.0f} ms | {a['max_ms']:.0f} ms | {a['min_ms']:.0f} ms |
| {change} returned (the API has the change) | {b['p50_ms']:.0f} ms | {b['p99_ms']:.0f} ms | {b['max_ms']:.0f} ms | {b['min_ms']:.0f} ms |

Goal (issue 8): p99 <= 1000 ms. p99 is nearest-rank, so over {len(d['changes'])} changes it is the
largest. The figures include up to one probe period ({d['period_ms']} ms) plus a request's time;
{d['probes']} probe answers in all, {d['probe_errors']} of them errors.

| change | to | the change took (ms) | routed after it was sent (ms) | after it returned (ms) |
|---|---|---|---|---|
{rows}
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--render")
    for k in ["changes", "probe", "results", "label", "date", "period-ms", "loadavg-start",
              "loadavg-end", "commit", "bin", "kube-version", "method"]:
        ap.add_argument("--" + k)
    a = ap.parse_args()
    if a.render:
        d = json.load(open(a.render))
        out = os.path.join(os.path.dirname(a.render), d["label"] + ".md")
        open(out, "w").write(render(d))
        return
    changes = []
    for line in open(a.changes):
        n, to, start, applied, seen = line.split()
        start, applied, seen = float(start), float(applied), float(seen)
        changes.append({
            "n": int(n), "to": to,
            "kubectl_ms": (applied - start) * 1000,
            "from_apply_start_ms": (seen - start) * 1000,
            "from_api_write_ms": max(0.0, (seen - applied) * 1000),
        })
    probes = [l.split() for l in open(a.probe) if l.strip()]
    d = {
        "label": a.label, "date": a.date, "commit": a.commit, "bin": a.bin,
        "kube_version": a.kube_version, "method": a.method, "period_ms": float(a.period_ms),
        "loadavg_start": a.loadavg_start, "loadavg_end": a.loadavg_end,
        "probes": len(probes), "probe_errors": sum(1 for p in probes if p[1] != "200"),
        "from_apply_start": summary([c["from_apply_start_ms"] for c in changes]),
        "from_api_write": summary([c["from_api_write_ms"] for c in changes]),
        "changes": changes,
    }
    os.makedirs(a.results, exist_ok=True)
    json.dump(d, open(os.path.join(a.results, f"{a.date[:10]}-{a.label}.json"), "w"), indent=1)
    open(os.path.join(a.results, f"{a.label}.md"), "w").write(render(d))


if __name__ == "__main__":
    main()
