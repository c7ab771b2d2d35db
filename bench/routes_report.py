#!/usr/bin/env python3
"""Turns one `ROUTES=0,1000 bench/run.sh` run into bench/results/<date>-<label>.json and
<label>.md: the cost of HTTPRoutes in the sidecar pair (issue 8).

Reads WORK/facts.json (machine, settings, per-variant mesh config facts, RSS and proxy
counters, written by run.sh) and WORK/round-N-{direct,routes-K}.json (meshlet-loadgen
reports). The variant with the fewest routes is the baseline; every other variant is
judged against it: added p99 within 10 % of the baseline's, proxy RSS at most 2 MiB
more. Standard library only.
"""

import argparse
import glob
import json
import os
import re
import statistics
import sys

P99_TOLERANCE = 0.10
RSS_GROWTH_KIB = 2 * 1024
PCTS = ["p50", "p90", "p99", "p999", "max"]
ADDED = ["p50", "p90", "p99", "p999"]
PROXIES = ["client-proxy", "server-proxy"]


def median(xs):
    return statistics.median(xs) if xs else None


def load_rounds(work, scenarios):
    rounds = {}
    for path in glob.glob(os.path.join(work, "round-*-*.json")):
        m = re.search(r"round-(\d+)-([a-z0-9-]+)\.json$", path)
        if not m:
            continue
        with open(path) as f:
            rounds.setdefault(int(m.group(1)), {})[m.group(2)] = json.load(f)
    complete = [rounds[r] for r in sorted(rounds) if set(scenarios) <= rounds[r].keys()]
    if not complete:
        sys.exit(f"routes_report.py: no complete round ({', '.join(scenarios)}) in {work}")
    return complete


def proc(report, name):
    for p in report["processes"]:
        if p["name"] == name:
            return p
    sys.exit(f"routes_report.py: loadgen report has no watched process {name!r}")


def summarize(facts, rounds):
    variants = sorted(facts["variants"], key=lambda v: facts["variants"][v]["routes"])
    base = variants[0]
    scen = ["direct"] + variants
    lat = {s: {p: median([r[s]["latency_us"][p] for r in rounds]) for p in PCTS} for s in scen}
    per_round_added = {
        v: [{p: r[v]["latency_us"][p] - r["direct"]["latency_us"][p] for p in ADDED}
            for r in rounds]
        for v in variants
    }
    added = {v: {p: median([a[p] for a in per_round_added[v]]) for p in ADDED} for v in variants}
    proxies = {}
    for v in variants:
        rss = facts["variants"][v]["proxy_rss_kib"]
        proxies[v] = {}
        for name in PROXIES:
            side = name.split("-")[0]
            ps = [proc(r[v], name) for r in rounds]
            proxies[v][name] = {
                "rss_kib_idle": rss[side]["idle"],
                "rss_kib_idle_anon": rss[side]["idle_split"]["anon"],
                "rss_kib_idle_file": rss[side]["idle_split"]["file"],
                "rss_kib_loaded_max": max(p["rss_kib_max"] for p in ps),
                "rss_kib_after_load": rss[side]["after_load"],
                "rss_kib_after_load_anon": rss[side]["after_load_split"]["anon"],
                "rss_kib_after_load_file": rss[side]["after_load_split"]["file"],
                "cpu_ms_per_1000_requests": median(
                    [p["cpu_ms_per_1000_requests"] for p in ps]
                ),
            }
    comparisons = {}
    for v in variants[1:]:
        b, x = added[base]["p99"], added[v]["p99"]
        # The same round's two pairs ran a minute apart at most, in alternating order: their
        # ratio is the paired view, less exposed to drift than the ratio of medians.
        paired = [
            a["p99"] / c["p99"]
            for a, c in zip(per_round_added[v], per_round_added[base])
            if c["p99"] > 0
        ]
        growth = {
            name: {
                k: proxies[v][name][k] - proxies[base][name][k]
                for k in ("rss_kib_idle", "rss_kib_loaded_max", "rss_kib_after_load",
                          "rss_kib_idle_anon", "rss_kib_after_load_anon")
            }
            for name in PROXIES
        }
        cpu = {
            name: proxies[v][name]["cpu_ms_per_1000_requests"]
            - proxies[base][name]["cpu_ms_per_1000_requests"]
            for name in PROXIES
        }
        comparisons[v] = {
            "baseline": base,
            "added_delta_us": {p: added[v][p] - added[base][p] for p in ADDED},
            "added_p99_ratio": (x / b) if b and b > 0 else None,
            "added_p99_ratio_per_round": paired,
            "added_p99_ratio_paired_median": median(paired),
            "rss_growth_kib": growth,
            "cpu_ms_per_1000_delta": cpu,
            "goals": {
                # A baseline at or below the direct path's p99 (noise) gives no scale to
                # be within 10 % of: not decidable from this run.
                "added_p99_within_10pct": (x <= (1 + P99_TOLERANCE) * b) if b > 0 else None,
                "rss_growth_le_2MiB": all(
                    g[k] <= RSS_GROWTH_KIB
                    for g in growth.values()
                    for k in ("rss_kib_idle", "rss_kib_loaded_max", "rss_kib_after_load")
                ),
            },
        }
    return {
        "baseline": base,
        "variants": variants,
        "latency_us": lat,
        "added_latency_us": added,
        "added_latency_us_per_round": per_round_added,
        "proxies": proxies,
        "server_cpu_ms_per_1000_requests": {
            s: median([proc(r[s], "server")["cpu_ms_per_1000_requests"] for r in rounds])
            for s in scen
        },
        "achieved_rate": {s: median([r[s]["achieved_rate"] for r in rounds]) for s in scen},
        "send_lag_p99_us": {s: median([r[s]["send_lag_us"]["p99"] for r in rounds])
                            for s in scen},
        "errors": {s: sum(r[s]["errors"] for r in rounds) for s in scen},
        "comparisons": comparisons,
    }


def fmt(x, digits=0, sign=False):
    if x is None:
        return "n/a"
    return f"{x:+,.{digits}f}" if sign else f"{x:,.{digits}f}"


def mib(kib, sign=False):
    return f"{kib / 1024:+.2f} MiB" if sign else f"{kib / 1024:.2f} MiB"


def title(facts, v):
    return f"{facts['variants'][v]['routes']:,} routes"


def markdown(doc, json_name):
    f, s, m = doc["settings"], doc["summary"], doc["machine"]
    def ok(b):
        if b is None:
            return "**not decidable** (the baseline's added p99 is not positive)"
        return "**met**" if b else "**missed**"

    variants, base = s["variants"], s["baseline"]
    lines = [
        f"# The cost of HTTPRoutes in the sidecar pair ({doc['date']})",
        "",
        "Written by `ROUTES=... bench/run.sh` (see `bench/README.md`, issue 8); raw data: "
        f"[`{json_name}`]({json_name}). Commit `{doc['git_commit']}`.",
        "",
        "Goal: at 1000 req/s, with 1,000 routes configured, the pair's added p99 stays within "
        "10 % of the same run without routes, and each proxy's RSS grows by at most 2 MiB.",
        "",
        "## Machine",
        "",
        f"- {m['nproc']} CPUs, {m['cpu_model']}, kernel {m['kernel']}, "
        f"{m['mem_total_kib'] // 1024} MiB RAM",
        f"- **load average: {m['loadavg_at_start']} at the start, "
        f"{m.get('loadavg_at_end', 'n/a')} at the end** (1/5/15 min; the 2 cores are shared "
        "with other engineers' builds; per-run figures in the JSON, `loadavg_per_run`)",
        f"- {f['network']}; {f['protocol']}; TLS off",
        "- "
        + ("pinned, one core per pod (loadgen and client proxy on CPU 0, server and server "
           "proxy on CPU 1)" if f["pinned"] else "not pinned")
        + "; "
        + ("SCHED_FIFO 10 for loadgens, servers and proxies" if f.get("realtime")
           else "normal scheduling")
        + f"; proxy worker threads {f['proxy_worker_threads']}; {f['profile']} build "
        f"({f.get('proxy_binary_bytes', 0) / 1e6:.1f} MB proxy)",
        f"- each round runs the direct path and one meshed pair per variant (own "
        f"namespaces, own proxies), {f['duration']} at {fmt(f['rate'])} req/s after "
        f"{f['warmup']} warmup each, direct then by route count, reversed in even rounds; "
        f"{f['rounds']} rounds, medians below",
        "",
        "## Mesh configs",
        "",
        "Both variants hold the same Services; only the HTTPRoutes differ. Generated by "
        "`bench/gen_routes.py`, compiled by `meshlet-injector compile --from-files` "
        "(no route left out).",
        "",
        "| variant | HTTPRoutes | on the benchmark's Service | Services | YAML | mesh config JSON |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        c = doc["variants"][v]["config"]
        lines.append(
            f"| {title(doc, v)} | {c['routes']:,} | {c['routes_on_bench_service']} | "
            f"{c['services']} | {c['yaml_bytes'] / 1e3:,.0f} kB | {c['json_bytes'] / 1e3:,.0f} kB |"
        )
    lines += [
        "",
        f"With routes, every benchmark request (`GET /`) selects `{doc['variants'][variants[-1]]['config'].get('bench_route')}` "
        "(`PathPrefix /`), which ranks below every other rule of the Service, so each "
        "request is checked against those first.",
        "",
        f"## Latency at {fmt(f['rate'])} req/s, µs (open loop, {f['connections']} connections)",
        "",
        "From each request's intended send time to the last byte of its response.",
        "",
        "| path | achieved req/s | errors | p50 | p90 | p99 | p99.9 | max | loadgen send lag p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sc in ["direct"] + variants:
        name = "direct" if sc == "direct" else f"meshlet pair, {title(doc, sc)}"
        l = s["latency_us"][sc]
        lines.append(
            f"| {name} | {fmt(s['achieved_rate'][sc], 1)} | {s['errors'][sc]} | "
            + " | ".join(fmt(l[p], 1) for p in PCTS)
            + f" | {fmt(s['send_lag_p99_us'][sc], 1)} |"
        )
    lines += [
        "",
        "### Added by the pair (meshlet minus direct, same round; median over rounds)",
        "",
        "| variant | p50 | p90 | p99 | p99.9 |",
        "|---|---:|---:|---:|---:|",
    ]
    for v in variants:
        a = s["added_latency_us"][v]
        lines.append(f"| {title(doc, v)} | " + " | ".join(fmt(a[p], 1) for p in ADDED) + " |")
    for v, c in s["comparisons"].items():
        lines.append(
            f"| **{title(doc, v)} minus {title(doc, base)}** | "
            + " | ".join(f"**{fmt(c['added_delta_us'][p], 1, sign=True)}**" for p in ADDED)
            + " |"
        )
    lines += [
        "",
        "Added p99 per round (µs), to show the spread:",
        "",
        "| round | " + " | ".join(title(doc, v) for v in variants) + " |",
        "|---:|" + "---:|" * len(variants),
    ]
    for i in range(len(doc["rounds"])):
        lines.append(
            f"| {i + 1} | "
            + " | ".join(fmt(s["added_latency_us_per_round"][v][i]["p99"], 1) for v in variants)
            + " |"
        )
    lines += [
        "",
        "## Proxy footprint and CPU",
        "",
        "| variant | proxy | RSS idle | idle anon / file | RSS max under load | RSS after the rounds "
        "| after: anon / file | CPU ms per 1000 req |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        for name in PROXIES:
            p = s["proxies"][v][name]
            lines.append(
                f"| {title(doc, v)} | {name} | {mib(p['rss_kib_idle'])} | "
                f"{mib(p['rss_kib_idle_anon'])} / {mib(p['rss_kib_idle_file'])} | "
                f"{mib(p['rss_kib_loaded_max'])} | {mib(p['rss_kib_after_load'])} | "
                f"{mib(p['rss_kib_after_load_anon'])} / {mib(p['rss_kib_after_load_file'])} | "
                f"{fmt(p['cpu_ms_per_1000_requests'], 1)} |"
            )
    lines += [
        "",
        "RSS is `VmRSS` (*anon*: `RssAnon`, the proxy's heap and stacks; *file*: `RssFile`, "
        "mapped pages of its binary and libraries). Idle: after `/ready` and a rest, before "
        "any request. CPU: utime + stime over each measured window (10 ms ticks).",
        "",
        "## Verdict",
        "",
    ]
    for v, c in s["comparisons"].items():
        g = c["goals"]
        b, x = s["added_latency_us"][base]["p99"], s["added_latency_us"][v]["p99"]
        paired = ", ".join(f"{r:.2f}" for r in c["added_p99_ratio_per_round"])
        lines.append(
            f"- added p99 within 10 % of {title(doc, base)}: {ok(g['added_p99_within_10pct'])} "
            f"({fmt(x, 1)} vs {fmt(b, 1)} µs, ratio {fmt(c['added_p99_ratio'], 2)}; "
            f"limit {fmt((1 + P99_TOLERANCE) * b, 1)} µs; per-round ratios {paired}, "
            f"median {fmt(c['added_p99_ratio_paired_median'], 2)})"
        )
        spread = [a["p99"] for a in s["added_latency_us_per_round"][base]]
        if b > 0 and max(spread) - min(spread) > P99_TOLERANCE * b:
            lines.append(
                f"  - caution: the added p99 of the {title(doc, base)} pair alone ranged "
                f"{fmt(min(spread), 1)} to {fmt(max(spread), 1)} µs over the rounds, wider "
                f"than the 10 % band ({fmt(P99_TOLERANCE * b, 1)} µs): on this machine the "
                "p99 verdict says \"no difference beyond the noise\", not more"
            )
        grow = c["rss_growth_kib"]
        lines.append(
            f"- proxy RSS grows by at most 2 MiB: {ok(g['rss_growth_le_2MiB'])} ("
            + "; ".join(
                f"{n}: idle {mib(grow[n]['rss_kib_idle'], True)}, max under load "
                f"{mib(grow[n]['rss_kib_loaded_max'], True)}, after the rounds "
                f"{mib(grow[n]['rss_kib_after_load'], True)} (anon "
                f"{mib(grow[n]['rss_kib_after_load_anon'], True)})"
                for n in PROXIES
            )
            + ")"
        )
        lines.append(
            "- CPU per 1000 requests, difference: "
            + ", ".join(f"{n} {fmt(c['cpu_ms_per_1000_delta'][n], 1, sign=True)} ms"
                        for n in PROXIES)
        )
    lines += [
        "",
        "## Check that the load went through the proxies and the route",
        "",
        "`client proxy routed`: the increase of the client sidecar's "
        "`meshlet_requests_total{direction=\"outbound\"}` with a `route` label (with routes, "
        "all of it `route=\"bench/server-default\"`).",
        "",
        "| round | variant | loadgen sent | client proxy outbound | client proxy routed "
        "| server proxy inbound |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for c in doc["proxy_request_counts"]:
        lines.append(
            f"| {c['round']} | {c['variant']} | {c['loadgen_sent']} | "
            f"{c['client_proxy_outbound']} | {c['client_proxy_routed']} | "
            f"{c['server_proxy_inbound']} |"
        )
    lines += ["", "## Commands", ""]
    for k, v in doc["commands"].items():
        lines.append(f"- {k}: `{v}`")
    return "\n".join(lines) + "\n"


def write(doc, results, label):
    json_name = f"{doc['date'][:10]}-{label}.json"
    with open(os.path.join(results, json_name), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    with open(os.path.join(results, f"{label}.md"), "w") as f:
        f.write(markdown(doc, json_name))
    return json_name


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", help="the run directory run.sh filled")
    ap.add_argument("--results", help="where to write the JSON and markdown")
    ap.add_argument("--label", default="routes")
    ap.add_argument("--render", metavar="RESULT_JSON",
                    help="only rewrite <label>.md from a committed <date>-<label>.json")
    a = ap.parse_args()
    if a.render:
        with open(a.render) as f:
            doc = json.load(f)
        m = re.match(r"\d{4}-\d{2}-\d{2}-(.+)\.json$", os.path.basename(a.render))
        if not m:
            sys.exit(f"routes_report.py: {a.render} is not named <date>-<label>.json")
        write(doc, os.path.dirname(os.path.abspath(a.render)), m.group(1))
        return
    if not (a.work and a.results):
        sys.exit("routes_report.py: give --work and --results (or --render RESULT_JSON)")
    facts_path = os.path.join(a.work, "facts.json")
    if not os.path.exists(facts_path):
        sys.exit(f"routes_report.py: {facts_path} is missing: run ROUTES=... bench/run.sh")
    with open(facts_path) as f:
        facts = json.load(f)
    if len(facts.get("variants", {})) < 2:
        sys.exit("routes_report.py: needs at least two variants (ROUTES=0,1000)")
    rounds = load_rounds(a.work, ["direct"] + list(facts["variants"]))
    doc = dict(facts)
    doc["summary"] = summarize(facts, rounds)
    doc["rounds"] = rounds
    json_name = write(doc, a.results, a.label)
    s = doc["summary"]
    for v, c in s["comparisons"].items():
        print(
            f"routes_report.py: added p99 {s['added_latency_us'][v]['p99']:.1f} µs with {v} vs "
            f"{s['added_latency_us'][s['baseline']]['p99']:.1f} µs with {s['baseline']}; "
            f"RSS growth (KiB) {json.dumps(c['rss_growth_kib'])}; goals {c['goals']}; "
            f"wrote {a.results}/{json_name} and {a.label}.md",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
