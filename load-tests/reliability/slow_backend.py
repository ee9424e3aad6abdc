"""A backend that answers after ?ms=N milliseconds (default 8000): the in-flight request
of the upgrade case. Binds 127.0.0.1 on the port given as the only argument."""
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class Slow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        q = parse_qs(urlparse(self.path).query)
        ms = int(q.get("ms", ["8000"])[0])
        time.sleep(ms / 1000)
        body = b'{"slow":true,"ms":%d}\n' % ms
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Slow).serve_forever()
