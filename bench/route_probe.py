#!/usr/bin/env python3
"""Route propagation prober (bench/route.sh): a GET every PERIOD ms, each on a new
connection (as a fresh client would, and so no connection is pinned to an old route),
printing one line per answer: `<unix time the answer arrived> <status> <x-testapp-name>`.
Runs until SIGTERM, inside the meshed client pod's network namespace."""

import argparse
import http.client
import json
import signal
import sys
import time
import urllib.parse


def _name(body: bytes) -> str:
    try:
        return str(json.loads(body).get("name", "-"))
    except ValueError:
        return "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--header", action="append", default=[], help="NAME:VALUE")
    ap.add_argument("--period-ms", type=float, default=10.0)
    a = ap.parse_args()
    u = urllib.parse.urlsplit(a.url)
    headers = dict(h.split(":", 1) for h in a.header)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    period = a.period_ms / 1000.0
    nxt = time.monotonic()
    while True:
        try:
            c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=2)
            c.request("GET", u.path or "/", headers=headers)
            r = c.getresponse()
            body = r.read()
            name = r.getheader("x-testapp-name") or _name(body)
            print(f"{time.time():.6f} {r.status} {name}", flush=True)
            c.close()
        except OSError as e:
            print(f"{time.time():.6f} 0 error:{type(e).__name__}", flush=True)
        nxt += period
        time.sleep(max(0.0, nxt - time.monotonic()))
        if nxt < time.monotonic() - 1.0:
            nxt = time.monotonic()


if __name__ == "__main__":
    main()
