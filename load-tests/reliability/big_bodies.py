"""Clients that send bodies far over a route's limit, for body413.sh.

usage: big_bodies.py PORT PATH SECONDS CLIENTS

Each client loops for SECONDS: opens a connection, sends a request head declaring a
100 MiB body (Content-Length on even rounds, chunked on odd ones), streams the body in
64 KiB pieces until busbar answers (or 100 MiB went out), reads the status line, closes.
Prints one line: `BODIES sent=… status_413=… other=… bytes=…`.
"""

import asyncio
import sys
import time

PORT, PATH, SECONDS, CLIENTS = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
PIECE = b"x" * 65536
TOTAL = 100 * 1024 * 1024
stats = {"sent": 0, "413": 0, "other": 0, "bytes": 0, "other_chunked": 0}


async def one(chunked):
    r, w = await asyncio.open_connection("127.0.0.1", PORT)
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % TOTAL
    w.write(b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: t\r\n" + framing + b"\r\n")
    status = asyncio.ensure_future(r.readline())
    sent = 0
    try:
        while sent < TOTAL and not status.done():
            if chunked:
                w.write(b"10000\r\n" + PIECE + b"\r\n")
            else:
                w.write(PIECE)
            sent += len(PIECE)
            await w.drain()
    except (ConnectionError, OSError):
        pass  # busbar answered and closed while we were still sending: expected
    try:
        line = await asyncio.wait_for(status, 10)
    except (asyncio.TimeoutError, ConnectionError, OSError):
        line = b""
    stats["sent"] += 1
    stats["bytes"] += sent
    if line.startswith(b"HTTP/1.1 413"):
        stats["413"] += 1
    else:
        stats["other"] += 1
        stats["other_chunked"] += chunked
        if stats["other"] <= 3:
            print("unexpected:", "chunked" if chunked else "content-length", line[:80], file=sys.stderr)
    w.close()


async def client(i):
    end = time.monotonic() + SECONDS
    n = i
    while time.monotonic() < end:
        await one(chunked=(n % 2 == 1))
        n += 1


async def main():
    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    print(
        "BODIES sent=%d status_413=%d other=%d other_chunked=%d bytes=%d"
        % (stats["sent"], stats["413"], stats["other"], stats["other_chunked"], stats["bytes"])
    )


asyncio.run(main())
