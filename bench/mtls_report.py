#!/usr/bin/env python3
"""Turns one bench/mtls.sh run into bench/results/<date>-<label>.json and <label>.md.

Reads WORK/facts.json (machine, settings, RSS, meshlet's tls="true" counters, written by
mtls.sh) and WORK/run-RATE-MODE-SCENARIO.json (meshlet-loadgen reports). Standard
library only. `--render results/<date>-<label>.json` rewrites the table from a
committed JSON.
"""

import argparse
import glob
import json
import os
import re
import sys

RATIO = 1.25
GOAL_IDLE_KIB = 4 * 1024
GOAL_AFTER_KIB = 6 * 1024
GOAL_NEWCONN_ADDED_P99_US = 1000.0
PCTS = ["p50", "p90", "p99", "p999", "max"]
PAIRS = ["meshlet-mtls", "floor"]


def load_runs(work):
    runs = {}
    for path in glob.glob(os.path.join(work, "run-*.json")):
        m = re.search(r"run-(\d+)-(keepalive|newconn)-([a-z-]+)\.json$", path)
        if not m:
            continue
        with open(path) as f:
            runs.setdefault(f"{m.group(1)}:{m.group(2)}", {})[m.group(3)] = json.load(f)
    if not runs:
        sys.exit(f"mtls_report.py: no run-*.json in {work}")
    return runs


def proc(report, name):
    for p in report.get("processes", []):
        if p["name"] == name:
            return p
    return None


def summarize(runs):
    out = {}
    for key, by in runs.items():
        row = {}
        direct = by.get("direct")
        for s, r in by.items():
            e = {
                "latency_us": {p: r["latency_us"][p] for p in PCTS},
                "count": r["count"],
                "errors": r["errors"],
                "achieved_rate": r["achieved_rate"],
                "send_lag_p99_us": r["send_lag_us"]["p99"],
            }
            if direct is not None and s != "direct":
                e["added_us"] = {
                    p: r["latency_us"][p] - direct["latency_us"][p] for p in PCTS
                }
            if s != "direct":
                c, v = proc(r, "client-proxy"), proc(r, "server-proxy")
                e["cpu_ms_per_1000"] = {
                    "client": c["cpu_ms_per_1000_requests"],
                    "server": v["cpu_ms_per_1000_requests"],
                    "pair": c["cpu_ms_per_1000_requests"] + v["cpu_ms_per_1000_requests"],
                }
                e["rss_kib_max"] = {"client": c["rss_kib_max"], "server": v["rss_kib_max"]}
            app = proc(r, "server")
            if app:
                e["app_cpu_ms_per_1000"] = app["cpu_ms_per_1000_requests"]
            row[s] = e
        out[key] = row
    return out


def ratio_check(what, m, f):
    """meshlet value m against the floor's f: within RATIO x?"""
    if f is None or m is None:
        return None
    if f <= 0:
        return {
            "goal": what, "meshlet": m, "floor": f, "ratio": None,
            "met": m <= 0,
            "note": "the floor added nothing measurable; a ratio is undefined",
        }
    ratio = m / f
    return {
        "goal": what, "meshlet": m, "floor": f, "ratio": ratio,
        "limit": RATIO * f, "met": ratio <= RATIO,
        "missed_by": None if ratio <= RATIO else m - RATIO * f,
    }


def goals(summary, facts):
    checks = []
    for key, row in sorted(summary.items(), key=lambda kv: (kv[0].split(":")[1], int(kv[0].split(":")[0]))):
        rate, mode = key.split(":")
        m, f = row.get("meshlet-mtls"), row.get("floor")
        if mode == "keepalive" and m and f and "added_us" in m and "added_us" in f:
            for p in ("p50", "p99"):
                c = ratio_check(f"{rate}/s keep-alive: added {p} (µs) <= {RATIO}x floor's",
                                m["added_us"][p], f["added_us"][p])
                checks.append(c)
            checks.append(ratio_check(f"{rate}/s keep-alive: pair CPU ms/1000 req <= {RATIO}x floor's",
                                      m["cpu_ms_per_1000"]["pair"], f["cpu_ms_per_1000"]["pair"]))
        if mode == "newconn" and m and "added_us" in m:
            a = m["added_us"]["p99"]
            checks.append({
                "goal": f"{rate}/s new connection per request: added p99 <= {GOAL_NEWCONN_ADDED_P99_US:.0f} µs",
                "meshlet": a, "limit": GOAL_NEWCONN_ADDED_P99_US,
                "met": a <= GOAL_NEWCONN_ADDED_P99_US,
                "missed_by": None if a <= GOAL_NEWCONN_ADDED_P99_US else a - GOAL_NEWCONN_ADDED_P99_US,
            })
    rss = facts.get("rss_kib", {})
    for side in ("client", "server"):
        idle = rss.get("idle", {}).get("meshlet-mtls", {}).get(side)
        after = rss.get("after_load", {}).get("meshlet-mtls", {}).get(side)
        if idle is not None:
            checks.append({"goal": f"{side} meshlet-proxy RSS idle <= 4 MiB (KiB)", "meshlet": idle,
                           "limit": GOAL_IDLE_KIB, "met": idle <= GOAL_IDLE_KIB,
                           "missed_by": None if idle <= GOAL_IDLE_KIB else idle - GOAL_IDLE_KIB})
        if after is not None:
            checks.append({"goal": f"{side} meshlet-proxy RSS after the load <= 6 MiB (KiB)", "meshlet": after,
                           "limit": GOAL_AFTER_KIB, "met": after <= GOAL_AFTER_KIB,
                           "missed_by": None if after <= GOAL_AFTER_KIB else after - GOAL_AFTER_KIB})
    return [c for c in checks if c]


def fmt(x, nd=0):
    if x is None:
        return "-"
    return f"{x:.{nd}f}"


def verdict(c):
    if c["met"]:
        return "**met**"
    if c.get("missed_by") is not None:
        r = f", {c['ratio']:.2f}x" if c.get("ratio") is not None else ""
        return f"**missed** by {c['missed_by']:.1f}{r}"
    return "**missed**"


def render_md(doc):
    f, s = doc["facts"], doc["settings"]
    lines = [
        "# meshlet mTLS pair against the floor pair (issue 7)",
        "",
        f"Run {f['date']} at {f['git_commit']}, {f['machine']['nproc']} cores "
        f"({f['machine']['cpu_model']}), load average at start {f['machine']['loadavg_at_start']}. "
        f"{s['duration']} per run (+{s['warmup']} warmup), {s['connections']} connections, "
        f"{s['proxy_worker_threads']} proxy thread, pinned={s['pinned']}, SCHED_FIFO={s['realtime']}, "
        f"profile {s['profile']}, meshlet inbound mode {s['meshlet_tls_mode']}. {s['protocol']}. "
        f"Network: {s['network']}.",
        "",
        "Latency from the intended send time (µs); *added* = path minus direct in the same run; "
        "CPU = (utime+stime) ms per 1000 requests of each sidecar over the window.",
        "",
    ]
    for key in sorted(doc["summary"], key=lambda k: (k.split(":")[1], int(k.split(":")[0]))):
        rate, mode = key.split(":")
        label = "HTTP/1.1 keep-alive" if mode == "keepalive" else "new TCP connection per request"
        lines += [f"## {rate} req/s, {label}", "",
                  "| path | p50 | p90 | p99 | p99.9 | max | added p50 | added p99 | CPU client | CPU server | CPU pair | RSS max client/server KiB | app CPU |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        row = doc["summary"][key]
        for sc in ["direct"] + PAIRS:
            e = row.get(sc)
            if not e:
                continue
            lat, add = e["latency_us"], e.get("added_us", {})
            cpu, rss = e.get("cpu_ms_per_1000", {}), e.get("rss_kib_max")
            lines.append(
                f"| {sc} | " + " | ".join(fmt(lat[p]) for p in PCTS)
                + f" | {fmt(add.get('p50'))} | {fmt(add.get('p99'))}"
                + f" | {fmt(cpu.get('client'), 1)} | {fmt(cpu.get('server'), 1)} | {fmt(cpu.get('pair'), 1)}"
                + f" | {(str(rss['client']) + '/' + str(rss['server'])) if rss else '-'}"
                + f" | {fmt(e.get('app_cpu_ms_per_1000'), 1)} |")
        lines.append("")
    rss = f.get("rss_kib", {})
    lines += ["## RSS (KiB)", "", "| pair | client idle | server idle | client after load | server after load |",
              "|---|---:|---:|---:|---:|"]
    for sc in PAIRS:
        i, a = rss.get("idle", {}).get(sc), rss.get("after_load", {}).get(sc)
        if i or a:
            lines.append(f"| {sc} | {i.get('client') if i else '-'} | {i.get('server') if i else '-'} | "
                         f"{a.get('client') if a else '-'} | {a.get('server') if a else '-'} |")
    lines += ["", "## Goals", "", "| goal | meshlet | floor | limit | verdict |", "|---|---:|---:|---:|---|"]
    for c in doc["goals"]:
        note = f" ({c['note']})" if c.get("note") else ""
        lines.append(f"| {c['goal']} | {fmt(c['meshlet'], 1)} | {fmt(c.get('floor'), 1)} | "
                     f"{fmt(c.get('limit'), 1)} | {verdict(c)}{note} |")
    counts = f.get("meshlet_tls_request_counts", [])
    if counts:
        lines += ["", "Pass-through check: for every run, both meshlet proxies counted exactly the "
                  "requests the load generator sent with `tls=\"true\"` ("
                  + ", ".join(f"{c['run']}: {c['loadgen_sent']}" for c in counts) + ")."]
    return "\n".join(lines) + "\n"


def write(doc, results, label):
    os.makedirs(results, exist_ok=True)
    day = doc["facts"]["date"][:10]
    jpath = os.path.join(results, f"{day}-{label}.json")
    with open(jpath, "w") as fh:
        json.dump(doc, fh, indent=1, sort_keys=True)
        fh.write("\n")
    with open(os.path.join(results, f"{label}.md"), "w") as fh:
        fh.write(render_md(doc))
    print(f"mtls_report.py: wrote {jpath} and {label}.md", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work")
    ap.add_argument("--results", required=True)
    ap.add_argument("--label", default="mtls")
    ap.add_argument("--render", help="re-render from a committed JSON")
    a = ap.parse_args()
    if a.render:
        with open(a.render) as fh:
            doc = json.load(fh)
        doc["summary"] = summarize(doc["raw"])
        doc["goals"] = goals(doc["summary"], doc["facts"])
    else:
        if not a.work:
            sys.exit("mtls_report.py: give --work DIR (from mtls.sh) or --render JSON")
        with open(os.path.join(a.work, "facts.json")) as fh:
            facts = json.load(fh)
        raw = load_runs(a.work)
        summary = summarize(raw)
        doc = {"facts": facts, "settings": facts["settings"], "summary": summary,
               "goals": goals(summary, facts), "raw": raw}
    write(doc, a.results, a.label)


if __name__ == "__main__":
    main()
