#!/usr/bin/env python3
"""Test helper for tools/kube/test.sh: stands in for the node agent's side of the
API server's "cluster" egress, with a mutating webhook behind it.

  egress_webhook.py SOCKET CERT KEY CONNECT_LOG

- Listens on the unix socket SOCKET for HTTP CONNECT (what kube-apiserver sends
  with --egress-selector-config-file, transport uds). Every target is written to
  CONNECT_LOG, one a line, and served by the webhook below, whatever its address:
  the node agent would dial it inside the pod's network namespace instead.
- Behind it one TLS server (CERT/KEY, never on a TCP port) plays three parts:
  a mutating webhook (POST: allowed=true plus a JSONPatch adding the pod label
  meshlet-test/mutated=yes), an aggregated metrics.k8s.io/v1beta1 API (GET
  /apis/metrics.k8s.io/v1beta1, logging X-Remote-User) and a kubelet's
  /containerLogs/ endpoint.

Standard library only; exits on SIGTERM.
"""

import base64
import json
import os
import signal
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

PATCH = [{"op": "add", "path": "/metadata/labels/meshlet-test~1mutated", "value": "yes"}]


class Webhook(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 (http.server's naming)
        if self.path.startswith(("/exec/", "/attach/", "/portForward/")):
            # What a kubelet receives for pods/exec: log the upgrade request the
            # node agent must answer, then refuse it (no streams here).
            sys.stderr.write(
                f"post: {self.path.split('?')[0]} upgrade={self.headers.get('Upgrade', '')} "
                f"protocols={','.join(self.headers.get_all('X-Stream-Protocol-Version') or [])}\n"
            )
            self.send_error(400, "fake kubelet: no exec here")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        review = json.loads(body)
        request = review.get("request", {})
        patch = PATCH
        if not request.get("object", {}).get("metadata", {}).get("labels"):
            patch = [{"op": "add", "path": "/metadata/labels", "value": {"meshlet-test/mutated": "yes"}}]
        reply = json.dumps(
            {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {
                    "uid": request.get("uid", ""),
                    "allowed": True,
                    "patchType": "JSONPatch",
                    "patch": base64.b64encode(json.dumps(patch).encode()).decode(),
                },
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def do_GET(self):  # noqa: N802
        # What the node agent will serve: the aggregated metrics API (reached through
        # the front proxy, which names the user in X-Remote-User) and a kubelet's logs.
        sys.stderr.write(f"get: {self.path} user={self.headers.get('X-Remote-User', '')}\n")
        if self.path.startswith("/apis/metrics.k8s.io/v1beta1"):
            kind = "application/json"
            reply = json.dumps(
                {
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": "metrics.k8s.io/v1beta1",
                    "resources": [
                        {"name": "pods", "singularName": "", "namespaced": True, "kind": "PodMetrics", "verbs": ["get", "list"]},
                    ],
                }
            ).encode()
        elif self.path.startswith("/containerLogs/"):
            kind = "text/plain"
            reply = b"hello from the fake kubelet\n"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, fmt, *args):
        sys.stderr.write("webhook: " + (fmt % args) + "\n")


def serve_one_tls(conn, tls, server):
    """Serves one tunnelled connection: TLS, then HTTP, on the CONNECT socket itself."""
    try:
        stream = tls.wrap_socket(conn, server_side=True)
        Webhook(stream, ("egress", 0), server)
    except (OSError, ssl.SSLError) as err:
        sys.stderr.write(f"webhook: connection failed: {err}\n")
    finally:
        conn.close()


def handle(conn, tls, server, log, lock):
    conn.settimeout(30)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            conn.close()
            return
        head += chunk
        if len(head) > 16384:
            conn.close()
            return
    line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = line.split()
    if len(parts) != 3 or parts[0] != "CONNECT":
        conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
        conn.close()
        return
    with lock:
        log.write(parts[1] + "\n")
        log.flush()
    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    serve_one_tls(conn, tls, server)


def main():
    if len(sys.argv) != 5:
        sys.exit("usage: egress_webhook.py SOCKET CERT KEY CONNECT_LOG")
    sock_path, cert, key, log_path = sys.argv[1:]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    # HTTPServer is only the handler's context here; it never binds.
    server = HTTPServer(("127.0.0.1", 0), Webhook, bind_and_activate=False)
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(16)
    lock = threading.Lock()
    with open(log_path, "a", encoding="utf-8") as log:
        try:
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=handle, args=(conn, tls, server, log, lock), daemon=True).start()
        finally:
            listener.close()
            os.unlink(sock_path)


if __name__ == "__main__":
    main()
