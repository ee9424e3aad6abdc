#!/usr/bin/env python3
"""Does an HTTP server read a request's whole body before it answers?

Usage: reads-body.py PORT PATH

For each framing (Content-Length, chunked), sends a POST head and the first 100 bytes
of a 4 KiB body to 127.0.0.1:PORT, waits a second, and checks that no answer came yet;
then sends the rest and checks a 200 arrives. bench.sh runs this against the backend's
/post before the body scenarios: nginx's `return 200` answers at once (it discards the
body afterwards), and a backend that answers before the body is in changes what a
proxy does (it may stop sending, and must not reuse the connection), so the bench
would measure something else. Exits 1, saying which framing, if the server answered
early or not with 200.
"""
import socket
import sys

SIZE = 4096
FIRST = 100


def probe(port, path, chunked):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        if chunked:
            head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nTransfer-Encoding: chunked\r\n\r\n"
            head += f"{SIZE:x}\r\n"
            rest = b"x" * (SIZE - FIRST) + b"\r\n0\r\n\r\n"
        else:
            head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {SIZE}\r\n\r\n"
            rest = b"x" * (SIZE - FIRST)
        s.sendall(head.encode() + b"x" * FIRST)
        s.settimeout(1.0)
        try:
            early = s.recv(64)
        except socket.timeout:
            early = b""
        if early:
            return f"answered before the body was complete: {early[:40]!r}"
        s.sendall(rest)
        s.settimeout(5.0)
        answer = s.recv(64)
        if not answer.startswith(b"HTTP/1.1 200"):
            return f"answered {answer[:40]!r} to the whole body, not 200"
    return None


def main():
    port, path = int(sys.argv[1]), sys.argv[2]
    failed = False
    for chunked in (False, True):
        err = probe(port, path, chunked)
        framing = "chunked" if chunked else "Content-Length"
        if err:
            print(f"{framing}: {err}")
            failed = True
        else:
            print(f"{framing}: waited for the whole body, then 200")
    sys.exit(1 if failed else 0)


main()
