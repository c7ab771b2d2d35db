#!/usr/bin/env python3
"""Turns one bench/webhook.sh run into bench/results/<date>-<label>.json and <label>.md
(`--render JSON` rewrites the markdown of a committed result).

Reads WORK/facts.json (machine, settings, injector RSS, written by webhook.sh), and for
each run NAME given on the command line WORK/NAME.json (the meshlet-webhook-bench
report) and WORK/NAME.meta.json (the injector's own counters, the command).
Standard library only.
"""

import argparse
import json
import os
import sys

PCTS = ["p50", "p90", "p99", "p999", "max"]
MODE_TEXT = {
    "keepalive": "kept alive",
    "newconn": "new TLS connection per review",
}


def load(path):
    with open(path) as f:
        return json.load(f)


def ms(us):
    return f"{us / 1000:.2f}"


def injector(report):
    for p in report["processes"]:
        if p["name"] == "injector":
            return p
    sys.exit("webhook_report.py: the bench report watched no process named injector")


def row(run):
    r, m = run["report"], run["meta"]
    p = injector(r)
    decision = m["injector_decision_s_sum"] / m["injector_decision_count"] * 1e6 if m[
        "injector_decision_count"
    ] else None
    return {
        "name": m["name"],
        "rate": m["rate"],
        "mode": m["mode"],
        "window_reviews": r["count"],
        "reviews_sent": r["requests_sent"],
        "answered_with_patch": r["injected_total"],
        "injector_counted_injected": m["injector_counted_injected"],
        "achieved_rate": r["achieved_rate"],
        "latency_us": r["latency_us"],
        "service_time_us": r["service_time_us"],
        "send_lag_us": r["send_lag_us"],
        "connect_us": r["connect_us"],
        "injector_decision_mean_us": decision,
        "injector_cpu_ms_per_1000_reviews": p["cpu_ms_per_1000_requests"],
        "injector_rss_kib_max": p["rss_kib_max"],
        "injector_rss_kib_end": p["rss_kib_end"],
        "tls": r.get("tls"),
        "patch_ops": r["patch_ops"],
        "review_bytes": r["review_bytes"],
    }


def saturated(x):
    """The generator could not keep to the timetable: latencies are queueing, not service."""
    return x["achieved_rate"] < 0.98 * x["rate"] or x["send_lag_us"]["p50"] > 1000.0


def reviews_cell(x):
    if saturated(x):
        return f"{x['window_reviews']} (**saturated**: {x['achieved_rate']:.0f}/s)"
    return str(x["window_reviews"])


def goal(facts, rows):
    limit_us = facts["settings"]["goal_p99_ms"] * 1000.0
    main = [x for x in rows if x["rate"] == 200 and x["mode"] == "keepalive"]
    if not main:
        return None, "no 200 reviews/s keep-alive run: the goal was not measured"
    p99 = main[0]["latency_us"]["p99"]
    if p99 < limit_us:
        return True, (
            f"**met**: p99 {ms(p99)} ms at 200 reviews/s, kept alive, "
            f"{ms(limit_us - p99)} ms under the {facts['settings']['goal_p99_ms']} ms goal "
            f"({limit_us / p99:.1f}x margin)"
        )
    return False, (
        f"**missed** by {ms(p99 - limit_us)} ms: p99 {ms(p99)} ms at 200 reviews/s, "
        f"kept alive, goal {facts['settings']['goal_p99_ms']} ms"
    )


def markdown(facts, rows, met, verdict):
    s, mc, inj = facts["settings"], facts["machine"], facts["injector"]
    out = [
        "# meshlet-injector webhook latency",
        "",
        f"Issue 4's goal: p99 < {s['goal_p99_ms']} ms at 200 reviews/s over HTTPS. {verdict}.",
        "",
        f"Run {facts['date']} at commit `{facts['commit']}`, `bench/webhook.sh` "
        f"(LABEL={facts['label']}). Latency is from the *intended* send time on a fixed "
        "timetable to the last byte of the response (open loop, no coordinated omission); "
        "every review sent, warmup included, came back allowed with a JSON Patch for its "
        "own uid, and the injector's `meshlet_injector_reviews_total{result=\"injected\"}` "
        "grew by exactly the number sent.",
        "",
        "| rate /s | connection | reviews | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms "
        "| injector CPU ms / 1000 | injector RSS max MiB | decision mean µs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in rows:
        lat = x["latency_us"]
        dec = x["injector_decision_mean_us"]
        out.append(
            f"| {x['rate']} | {MODE_TEXT.get(x['mode'], x['mode'])} | {reviews_cell(x)} | "
            + " | ".join(ms(lat[p]) for p in PCTS)
            + f" | {x['injector_cpu_ms_per_1000_reviews']:.0f}"
            + f" | {x['injector_rss_kib_max'] / 1024:.1f}"
            + (f" | {dec:.0f} |" if dec is not None else " | - |")
        )
    out += [
        "",
        "- **reviews**: injected reviews inside the measured window "
        f"({s['duration']} after {s['warmup']} warmup); sent in all (warmup included) and "
        "answered with a patch: "
        + ", ".join(
            f"{x['name']} {x['answered_with_patch']}/{x['reviews_sent']}" for x in rows
        )
        + ".",
        "- **injector CPU ms / 1000**: utime + stime of the injector over the window "
        "(`/proc/PID/stat`, 10 ms ticks) per 1000 injected reviews; the new-connection rows "
        "include the server's side of a full TLS handshake per review.",
        f"- **injector RSS**: {inj['rss_kib_idle'] / 1024:.1f} MiB idle (after /readyz and "
        f"1 s), largest sample under load in the table, {inj['rss_kib_after_all_load'] / 1024:.1f} "
        "MiB after all runs.",
        "- **decision mean**: the injector's own `meshlet_injector_review_duration_seconds` "
        "(sum/count over the run): parse, mutate, serialize, without TLS and HTTP.",
        "- **TCP + TLS + HTTP/1.1 setup** of a new connection (client side): "
        + ", ".join(
            f"{x['name']} p50 {ms(x['connect_us']['p50'])} ms / p99 {ms(x['connect_us']['p99'])} ms"
            for x in rows
            if x["mode"] == "newconn"
        )
        + ".",
        f"- review: `{s['fixture']}`, {rows[0]['review_bytes']} bytes compact, "
        f"{rows[0]['patch_ops']} JSON Patch operations in the answer; TLS "
        f"`{rows[0]['tls']}`, {s['key']} serving key, no session resumption.",
    ]
    if any(saturated(x) for x in rows):
        out.append(
            "- **saturated**: the rate could not be kept (fewer reviews than the timetable, "
            "or the median review left more than 1 ms late); its latencies are mostly time "
            "queued in the generator and say only that this machine cannot do that rate."
        )
    out += [
        "",
        "## Machine and settings",
        "",
        f"- CPU: {mc['cpu']}, {mc['cores']} cores shared with other engineers' builds "
        f"and tests; load average {mc['loadavg_at_start']} at start, "
        f"{mc.get('loadavg_at_end', '?')} at end.",
        f"- Kernel {mc['kernel']}; {facts['toolchain']['rustc']}; "
        f"{facts['toolchain']['openssl']} (certificates only).",
        f"- Profile {s['profile']}; injector tokio worker threads: {s['injector_threads']}; "
        f"scheduling: {'SCHED_FIFO 10 for injector and load generator' if s['rt'] else 'normal (no pinning, no real-time priority)'}; "
        f"{s['connections']} client connections.",
        "- Everything on 127.0.0.1: the load generator and the injector share the machine.",
        "",
        "## Commands",
        "",
        "```",
        inj["command"],
    ]
    out += [x["command"] for x in facts["runs"]]
    out += ["```", ""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work")
    ap.add_argument("--results", required=True)
    ap.add_argument("--render", metavar="JSON", help="rewrite <label>.md from a results JSON")
    ap.add_argument("runs", nargs="*")
    a = ap.parse_args()
    if a.render:
        out = load(a.render)
        met, verdict = goal(out, out["summary"])
        mpath = os.path.join(a.results, f"{out['label']}.md")
        with open(mpath, "w") as f:
            f.write(markdown(out, out["summary"], met, verdict))
        print(f"webhook_report.py: wrote {mpath}", file=sys.stderr)
        return
    if not (a.work and a.runs):
        sys.exit("webhook_report.py: give --work DIR and run names, or --render JSON")
    facts = load(os.path.join(a.work, "facts.json"))
    runs = []
    for name in a.runs:
        runs.append(
            {
                "report": load(os.path.join(a.work, f"{name}.json")),
                "meta": load(os.path.join(a.work, f"{name}.meta.json")),
            }
        )
    rows = [row(r) for r in runs]
    met, verdict = goal(facts, rows)
    facts["runs"] = [r["meta"] for r in runs]
    out = {
        **facts,
        "goal_met": met,
        "goal": verdict.replace("**", ""),
        "summary": rows,
        "bench_reports": {r["meta"]["name"]: r["report"] for r in runs},
    }
    os.makedirs(a.results, exist_ok=True)
    day = facts["date"][:10]
    jpath = os.path.join(a.results, f"{day}-{facts['label']}.json")
    mpath = os.path.join(a.results, f"{facts['label']}.md")
    with open(jpath, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    with open(mpath, "w") as f:
        f.write(markdown(facts, rows, met, verdict))
    print(f"webhook_report.py: wrote {jpath} and {mpath}", file=sys.stderr)
    print(verdict.replace("**", ""), file=sys.stderr)


if __name__ == "__main__":
    main()
