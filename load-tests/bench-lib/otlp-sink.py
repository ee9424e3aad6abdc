#!/usr/bin/env python3
"""A collector stand-in for bench.sh's tracing targets: accepts OTLP/HTTP exports
(`POST /v1/traces`), reads each body, answers 200 with an empty
ExportTraceServiceResponse, and counts requests and bytes (printed at exit).

Usage: otlp-sink.py PORT READY_FILE
"""
import http.server
import signal
import sys

counts = {"requests": 0, "bytes": 0}


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        self.rfile.read(n)
        counts["requests"] += 1
        counts["bytes"] += n
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    port, ready = int(sys.argv[1]), sys.argv[2]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Sink)

    def stop(*_):
        print(f"otlp-sink: {counts['requests']} exports, {counts['bytes']} bytes", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    open(ready, "w").close()
    server.serve_forever()


main()
