#!/usr/bin/env python3
"""Turns one bench/run.sh run into bench/results/<date>-<label>.json and <label>.md.

Reads WORK/facts.json (machine, settings, idle RSS, proxy counters, written by run.sh)
and WORK/round-N-{direct,meshlet}.json (meshlet-loadgen reports). Standard library only;
a PNG plot is added when matplotlib happens to be importable.
"""

import argparse
import glob
import json
import os
import re
import statistics
import sys

GOAL_IDLE_KIB = 4 * 1024
GOAL_LOADED_KIB = 12 * 1024
GOAL_ADDED_P99_US = 300.0
PCTS = ["p50", "p90", "p99", "p999", "max"]
PROXIES = ["client-proxy", "server-proxy"]


def load_rounds(work):
    rounds = {}
    for path in glob.glob(os.path.join(work, "round-*-*.json")):
        m = re.search(r"round-(\d+)-(direct|meshlet)\.json$", path)
        if not m:
            continue
        with open(path) as f:
            rounds.setdefault(int(m.group(1)), {})[m.group(2)] = json.load(f)
    complete = {r: s for r, s in rounds.items() if {"direct", "meshlet"} <= s.keys()}
    if not complete:
        sys.exit(f"report.py: no complete round (direct + meshlet) in {work}")
    return [complete[r] for r in sorted(complete)]


def proc(report, name):
    for p in report["processes"]:
        if p["name"] == name:
            return p
    sys.exit(f"report.py: loadgen report has no watched process {name!r}")


def median(xs):
    return statistics.median(xs) if xs else None


def summarize(facts, rounds):
    """The figures the issue asks for, medians over rounds where there are several."""
    lat = {}
    for scenario in ("direct", "meshlet"):
        lat[scenario] = {
            p: median([r[scenario]["latency_us"][p] for r in rounds]) for p in PCTS
        }
    added = {
        p: median(
            [r["meshlet"]["latency_us"][p] - r["direct"]["latency_us"][p] for r in rounds]
        )
        for p in PCTS
        if p != "max"
    }
    proxies = {}
    for name in PROXIES:
        side = name.split("-")[0]
        ps = [proc(r["meshlet"], name) for r in rounds]
        proxies[name] = {
            "rss_kib_idle": facts["proxy_rss_kib"][side]["idle"],
            "rss_kib_loaded_max": max(p["rss_kib_max"] for p in ps),
            "rss_kib_loaded_end": ps[-1]["rss_kib_end"],
            "rss_kib_after_all_load": facts["proxy_rss_kib"][side]["after_load"],
            "rss_kib_idle_anon": facts["proxy_rss_kib"][side]["idle_split"]["anon"],
            "rss_kib_idle_file": facts["proxy_rss_kib"][side]["idle_split"]["file"],
            "rss_kib_after_load_anon": facts["proxy_rss_kib"][side]["after_load_split"]["anon"],
            "cpu_ms_per_1000_requests": median([p["cpu_ms_per_1000_requests"] for p in ps]),
        }
    servers = {
        s: median([proc(r[s], "server")["cpu_ms_per_1000_requests"] for r in rounds])
        for s in ("direct", "meshlet")
    }
    goals = {
        "idle_rss_le_4MiB": all(
            p["rss_kib_idle"] <= GOAL_IDLE_KIB for p in proxies.values()
        ),
        "loaded_rss_le_12MiB": all(
            p["rss_kib_loaded_max"] <= GOAL_LOADED_KIB for p in proxies.values()
        ),
        "added_p99_le_300us": added["p99"] <= GOAL_ADDED_P99_US,
    }
    achieved = {
        s: median([r[s]["achieved_rate"] for r in rounds]) for s in ("direct", "meshlet")
    }
    errors = {s: sum(r[s]["errors"] for r in rounds) for s in ("direct", "meshlet")}
    return {
        "latency_us": lat,
        "added_latency_us": added,
        "proxies": proxies,
        "server_cpu_ms_per_1000_requests": servers,
        "achieved_rate": achieved,
        "errors": errors,
        "goals": goals,
    }


def fmt(x, digits=0):
    return "n/a" if x is None else f"{x:,.{digits}f}"


def mib(kib):
    return f"{kib / 1024:.2f} MiB"


def markdown(doc, json_name, png_name):
    f, s, m = doc["settings"], doc["summary"], doc["machine"]
    lat, add, px = s["latency_us"], s["added_latency_us"], s["proxies"]
    ok = lambda b: "met" if b else "**missed**"  # noqa: E731
    lines = [
        f"# Data path: direct vs meshlet sidecar pair ({doc['date']})",
        "",
        "Written by `bench/run.sh` (see `bench/README.md`); raw data: "
        f"[`{json_name}`]({json_name}). Commit `{doc['git_commit']}`.",
        "",
        "## Machine",
        "",
        f"- {m['nproc']} CPUs, {m['cpu_model']}, kernel {m['kernel']}, "
        f"{m['mem_total_kib'] // 1024} MiB RAM",
        f"- load average when the run started: {m['loadavg_at_start']} "
        "(the machine is shared with other builds: expect noise)",
        f"- {f['network']}; {f['protocol']}; TLS {'on' if f['tls'] else 'off'}",
        "- "
        + (
            "pinned, one core per pod (loadgen and client proxy on CPU 0, server and "
            "server proxy on CPU 1)"
            if f["pinned"]
            else "not pinned"
        )
        + "; "
        + (
            "SCHED_FIFO 10 for loadgens, servers and proxies during the fixed-rate rounds"
            if f.get("realtime")
            else "normal scheduling"
        )
        + "; "
        f"proxy worker threads {f['proxy_worker_threads']}; {f['profile']} build, "
        f"{f.get('proxy_link', 'dynamic')}ally linked proxy "
        f"({f.get('proxy_binary_bytes', 0) / 1e6:.1f} MB)",
        "",
        f"## Latency at {fmt(f['rate'])} req/s (open loop, {f['connections']} connections, "
        f"{f['duration']} measured after {f['warmup']} warmup"
        + (f", median of {f['rounds']} rounds" if f["rounds"] > 1 else "")
        + ")",
        "",
        "Latency is measured from each request's intended send time on the fixed "
        "timetable to the last byte of the response (no coordinated omission), in µs.",
        "",
        "| path | achieved req/s | errors | p50 | p90 | p99 | p99.9 | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sc, name in (("direct", "direct"), ("meshlet", "meshlet pair (client + server sidecar)")):
        l = lat[sc]
        lines.append(
            f"| {name} | {fmt(s['achieved_rate'][sc], 1)} | {s['errors'][sc]} | "
            + " | ".join(fmt(l[p], 1) for p in PCTS)
            + " |"
        )
    lines.append(
        "| **added by the pair** | | | "
        + " | ".join(f"**{fmt(add[p], 1)}**" for p in PCTS if p != "max")
        + " | |"
    )
    lines += [
        "",
        "## Proxy footprint",
        "",
        "| proxy | RSS idle | of which anon / file | RSS max under load | RSS at end of load "
        "| anon after the rounds | CPU ms per 1000 req |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in px.items():
        lines.append(
            f"| {name} | {mib(p['rss_kib_idle'])} | {mib(p['rss_kib_idle_anon'])} / "
            f"{mib(p['rss_kib_idle_file'])} | {mib(p['rss_kib_loaded_max'])} | "
            f"{mib(p['rss_kib_loaded_end'])} | {mib(p['rss_kib_after_load_anon'])} | "
            f"{fmt(p['cpu_ms_per_1000_requests'], 1)} |"
        )
    lines += [
        "",
        "RSS is `VmRSS`; *anon* (`RssAnon`) is the proxy's own heap and stacks, *file* "
        "(`RssFile`) the mapped pages of its binary and shared libraries (libc, libm, "
        "ld.so), most of them shared with other processes and counted in full by "
        "`VmRSS`.",
    ]
    sv = s["server_cpu_ms_per_1000_requests"]
    g = s["goals"]
    lines += [
        "",
        f"For scale, the upstream server itself used {fmt(sv['direct'], 1)} CPU ms per 1000 "
        f"requests on the direct path and {fmt(sv['meshlet'], 1)} behind the pair.",
        "",
        "## Goals",
        "",
        f"- idle RSS <= 4 MiB per proxy: {ok(g['idle_rss_le_4MiB'])} "
        f"({', '.join(mib(p['rss_kib_idle']) for p in px.values())})",
        f"- RSS <= 12 MiB at {fmt(f['rate'])} req/s: {ok(g['loaded_rss_le_12MiB'])} "
        f"({', '.join(mib(p['rss_kib_loaded_max']) for p in px.values())})",
        f"- added p99 <= 0.3 ms: {ok(g['added_p99_le_300us'])} ({fmt(add['p99'], 1)} µs)",
        "",
        "## Check that the load went through the proxies",
        "",
        "| round | loadgen sent | client proxy outbound | server proxy inbound |",
        "|---:|---:|---:|---:|",
    ]
    for c in doc["proxy_request_counts"]:
        lines.append(
            f"| {c['round']} | {c['loadgen_sent']} | {c['client_proxy_outbound']} | "
            f"{c['server_proxy_inbound']} |"
        )
    mt = doc.get("max_throughput", {})
    if mt:
        lines += [
            "",
            "## Max throughput (closed loop)",
            "",
            "Normal scheduling, same pinning, one pass each after the rounds. "
            "The loadgen shares the client core, so this is the throughput of the whole "
            "setup on this machine, not of one proxy.",
            "",
            "| path | req/s | errors | p50 µs | p99 µs | proxy CPU ms/1000 (client, server) "
            "| proxy RSS max (client, server) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for sc, r in mt.items():
            ps = {p["name"]: p for p in r["processes"]}
            cpu = ", ".join(
                fmt(ps[n]["cpu_ms_per_1000_requests"], 1) for n in PROXIES if n in ps
            )
            rss = ", ".join(mib(ps[n]["rss_kib_max"]) for n in PROXIES if n in ps)
            lines.append(
                f"| {sc} | {fmt(r['achieved_rate'])} | {r['errors']} | "
                f"{fmt(r['latency_us']['p50'], 1)} | {fmt(r['latency_us']['p99'], 1)} | "
                f"{cpu or 'n/a'} | {rss or 'n/a'} |"
            )
    lines += ["", "## Commands", ""]
    for k, v in doc["commands"].items():
        lines.append(f"- {k}: `{v}`")
    if png_name:
        lines += ["", f"![latency percentiles]({png_name})"]
    return "\n".join(lines) + "\n"


def plot(doc, path):
    """Latency percentiles of both paths and proxy RSS against the goals, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    s = doc["summary"]
    lat = s["latency_us"]
    # p99.9 and max are dominated by machine noise here (see README) and would flatten
    # the rest on a linear axis; they stay in the table.
    pcts = ["p50", "p90", "p99"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    w = 0.38
    xs = list(range(len(pcts)))
    for off, sc, name in ((-w / 2, "direct", "direct"), (w / 2, "meshlet", "meshlet pair")):
        bars = ax1.bar([x + off for x in xs], [lat[sc][p] for p in pcts], w, label=name)
        ax1.bar_label(bars, fmt="%.0f", fontsize=8)
    ax1.set_xticks(xs, pcts)
    ax1.set_ylabel("latency (µs)")
    ax1.set_title(f"HTTP/1.1 at {doc['settings']['rate']:.0f} req/s, open loop")
    ax1.legend()
    names = list(s["proxies"])
    xs = list(range(len(names)))
    ax2.bar([x - w / 2 for x in xs], [s["proxies"][n]["rss_kib_idle"] / 1024 for n in names], w,
            label="idle")
    ax2.bar([x + w / 2 for x in xs],
            [s["proxies"][n]["rss_kib_loaded_max"] / 1024 for n in names], w,
            label=f"{doc['settings']['rate']:.0f} req/s")
    ax2.axhline(GOAL_IDLE_KIB / 1024, color="C0", ls="--", lw=1)
    ax2.axhline(GOAL_LOADED_KIB / 1024, color="C1", ls="--", lw=1)
    ax2.set_xticks(xs, names)
    ax2.set_ylabel("VmRSS (MiB); dashed: goals")
    ax2.set_title(f"proxy RSS ({doc['settings'].get('proxy_link', 'dynamic')} link)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(doc, results, label):
    day = doc["date"][:10]
    json_name = f"{day}-{label}.json"
    png_name = f"{label}.png"
    with open(os.path.join(results, json_name), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    if not plot(doc, os.path.join(results, png_name)):
        png_name = None
    with open(os.path.join(results, f"{label}.md"), "w") as f:
        f.write(markdown(doc, json_name, png_name))
    return json_name


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", help="the run directory run.sh filled")
    ap.add_argument("--results", help="where to write the JSON, markdown and plot")
    ap.add_argument("--label", default="datapath")
    ap.add_argument(
        "--render",
        metavar="RESULT_JSON",
        help="only rewrite <label>.md and <label>.png from a committed <date>-<label>.json",
    )
    a = ap.parse_args()
    if a.render:
        with open(a.render) as f:
            doc = json.load(f)
        m = re.match(r"\d{4}-\d{2}-\d{2}-(.+)\.json$", os.path.basename(a.render))
        if not m:
            sys.exit(f"report.py: {a.render} is not named <date>-<label>.json")
        write(doc, os.path.dirname(os.path.abspath(a.render)), m.group(1))
        return
    if not (a.work and a.results):
        sys.exit("report.py: give --work and --results (or --render RESULT_JSON)")
    facts_path = os.path.join(a.work, "facts.json")
    if not os.path.exists(facts_path):
        sys.exit(f"report.py: {facts_path} is missing: run bench/run.sh, which writes it")
    with open(facts_path) as f:
        facts = json.load(f)
    rounds = load_rounds(a.work)
    doc = dict(facts)
    doc["summary"] = summarize(facts, rounds)
    doc["rounds"] = rounds
    maxtp = {}
    for sc in ("direct", "meshlet"):
        path = os.path.join(a.work, f"maxtp-{sc}.json")
        if os.path.exists(path):
            with open(path) as f:
                maxtp[sc] = json.load(f)
    if maxtp:
        doc["max_throughput"] = maxtp
    json_name = write(doc, a.results, a.label)
    s = doc["summary"]
    print(
        f"report.py: added p50 {s['added_latency_us']['p50']:.1f} µs, "
        f"p99 {s['added_latency_us']['p99']:.1f} µs; "
        + "; ".join(
            f"{n} RSS idle {mib(p['rss_kib_idle'])} loaded {mib(p['rss_kib_loaded_max'])} "
            f"CPU {p['cpu_ms_per_1000_requests']:.1f} ms/1000 req"
            for n, p in s["proxies"].items()
        )
        + f"; goals {s['goals']}; wrote {a.results}/{json_name} and {a.label}.md",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
