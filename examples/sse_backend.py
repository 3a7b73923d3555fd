#!/usr/bin/env python3
"""A small SSE backend with no resilience of its own, for trying the
`sse-resilience proxy` command in front of a non-Rust server.

    python3 examples/sse_backend.py --port 8000

Routes:
  GET /stream/{id}?count=N&delay_ms=D&fail=1
      N token events (default 5), each after D ms (default 200), then a
      `completed` event, or a `failed` one with fail=1. Stops early when the
      client goes away.
  GET /calls/{id}
      How many times /stream/{id} was requested, as JSON.
  any method /echo
      The request's method, path, query, headers and body, as JSON.

Only the Python standard library is used. On start it prints
`listening on 127.0.0.1:PORT` (with --port 0 the port is picked by the OS).
"""

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CALLS = {}
CALLS_LOCK = threading.Lock()
MAX_COUNT = 10_000
MAX_DELAY_MS = 60_000


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: a streamed body ends when the connection closes, so no
    # chunked encoding is needed.
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path.startswith("/stream/"):
            self.stream(url.path[len("/stream/"):], parse_qs(url.query))
        elif url.path.startswith("/calls/"):
            with CALLS_LOCK:
                calls = CALLS.get(url.path[len("/calls/"):], 0)
            self.send_json({"calls": calls})
        elif url.path == "/echo":
            self.echo()
        else:
            self.send_json({"error": "not found"}, status=404)

    def do_POST(self):
        if urlsplit(self.path).path == "/echo":
            self.echo()
        else:
            self.send_json({"error": "not found"}, status=404)

    do_PUT = do_POST
    do_DELETE = do_POST

    def stream(self, stream_id, query):
        count = min(int(query.get("count", ["5"])[0]), MAX_COUNT)
        delay = min(int(query.get("delay_ms", ["200"])[0]), MAX_DELAY_MS) / 1000
        fail = query.get("fail", ["0"])[0] == "1"
        with CALLS_LOCK:
            CALLS[stream_id] = CALLS.get(stream_id, 0) + 1

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            for n in range(1, count + 1):
                time.sleep(delay)
                self.write(f'id: {n}\ndata: {{"type":"token","n":{n}}}\n\n')
            time.sleep(delay)
            end = "failed" if fail else "completed"
            self.write(f'id: {count + 1}\nevent: {end}\ndata: {{"tokens":{count}}}\n\n')
        except (BrokenPipeError, ConnectionResetError):
            # The client (or the proxy) went away: a plain backend just stops.
            pass

    def write(self, text):
        self.wfile.write(text.encode())
        self.wfile.flush()

    def echo(self):
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length) if length > 0 else b""
        self.send_json({
            "method": self.command,
            "path": url.path,
            "query": url.query,
            "headers": {name.lower(): value for name, value in self.headers.items()},
            "body": body.decode(errors="replace"),
        })

    def send_json(self, value, status=200):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        sys.stderr.write("sse_backend: " + format % args + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one")
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"listening on {host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
