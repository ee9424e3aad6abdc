#!/usr/bin/env python3
"""Open N keep-alive connections to 127.0.0.1:PORT, send one GET / on each, read the
answer, and keep them all open (idle) until killed. bench.sh's memory scenarios (mem,
tlsmem) read the server's RSS while they are held.

Usage: idle-conns.py PORT N READY_FILE [HOLD_SECONDS] [--tls CA_FILE]
Writes "opened OK FAILED SECONDS" to READY_FILE once every connection has answered
(or failed), then holds them for HOLD_SECONDS (default 300) or until SIGTERM.
With --tls each connection is TLS (Python's ssl, OpenSSL's defaults, the server's
certificate verified against CA_FILE for the name localhost), one full handshake each.
"""
import asyncio
import os
import resource
import signal
import ssl
import sys
import time

PARALLEL = 256  # connects in flight at once: stays below the listen backlog


async def one(port, sem, held, tls):
    async with sem:
        try:
            if tls is None:
                conn = asyncio.open_connection("127.0.0.1", port)
            else:
                conn = asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                               server_hostname="localhost")
            reader, writer = await asyncio.wait_for(conn, 10)
            writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status = head.split(b" ", 2)[1]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v.strip())
            if length:
                await asyncio.wait_for(reader.readexactly(length), 10)
            held.append(writer)
            return status == b"200"
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
            return False


async def main():
    args = sys.argv[1:]
    tls = None
    if "--tls" in args:
        i = args.index("--tls")
        tls = ssl.create_default_context(cafile=args[i + 1])
        del args[i:i + 2]
    port, n, ready = int(args[0]), int(args[1]), args[2]
    hold = float(args[3]) if len(args) > 3 else 300.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 100
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            sys.exit(f"idle-conns: need {want} open files, hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    sem = asyncio.Semaphore(PARALLEL)
    held = []
    t0 = time.monotonic()
    results = await asyncio.gather(*(one(port, sem, held, tls) for _ in range(n)))
    ok = sum(results)
    tmp = ready + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{len(held)} {ok} {n - ok} {time.monotonic() - t0:.1f}\n")
    os.rename(tmp, ready)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), hold)
    except asyncio.TimeoutError:
        pass
    for w in held:
        w.close()


asyncio.run(main())
