#!/usr/bin/env python3
"""Open N keep-alive connections to 127.0.0.1:PORT, send one GET / on each, read the
answer, and keep them all open (idle) until killed. bench.sh's memory scenarios (mem,
tlsmem) read the server's RSS while they are held.

Usage: idle-conns.py PORT N READY_FILE [HOLD_SECONDS] [--tls CA_FILE] [--h2]
Writes "opened OK FAILED SECONDS" to READY_FILE once every connection has answered
(or failed), then holds them for HOLD_SECONDS (default 300) or until SIGTERM.
With --tls each connection is TLS (Python's ssl, OpenSSL's defaults, the server's
certificate verified against CA_FILE for the name localhost), one full handshake each.
With --h2 each connection speaks HTTP/2 (h2c with prior knowledge, or ALPN h2 with
--tls): the client preface, an empty SETTINGS, the server's SETTINGS acknowledged, and
one GET / on stream 1 read to its END_STREAM; then the connection stays open, idle.
"""
import asyncio
import os
import resource
import signal
import ssl
import struct
import sys
import time

PARALLEL = 256  # connects in flight at once: stays below the listen backlog


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# HPACK, static table only: :method GET (2), :scheme http (6) or https (7), :path / (4),
# :authority "bench" as a literal without indexing (name index 1).
def h2_get(tls):
    block = bytes([0x82, 0x87 if tls else 0x86, 0x84, 0x01, 5]) + b"bench"
    # HEADERS, END_STREAM | END_HEADERS, stream 1.
    return struct.pack(">I", len(block))[1:] + bytes([0x01, 0x05]) + struct.pack(">I", 1) + block


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


async def h2_exchange(reader, writer, tls):
    """Sends the preface and one GET; True once stream 1 ended with a :status 200."""
    writer.write(PREFACE + frame(0x4, 0, 0) + h2_get(tls))
    status_ok = False
    while True:
        head = await asyncio.wait_for(reader.readexactly(9), 10)
        length = int.from_bytes(head[:3], "big")
        kind, flags = head[3], head[4]
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        payload = await asyncio.wait_for(reader.readexactly(length), 10)
        if kind == 0x4 and not flags & 0x1:
            writer.write(frame(0x4, 0x1, 0))  # SETTINGS ACK
        elif kind == 0x6 and not flags & 0x1:
            writer.write(frame(0x6, 0x1, 0, payload))  # PING ACK
        elif kind == 0x7:
            return False  # GOAWAY
        elif stream == 1 and kind == 0x1:
            # :status 200 is static index 8 (0x88) when the server indexes it, as all do.
            block = payload
            if flags & 0x8:  # PADDED
                block = block[1:len(block) - block[0]]
            if flags & 0x20:  # PRIORITY
                block = block[5:]
            status_ok = block[:1] == b"\x88"
        elif stream == 1 and kind == 0x3:
            return False  # RST_STREAM
        if stream == 1 and kind in (0x0, 0x1) and flags & 0x1:
            return status_ok


async def h2_idle(reader, writer):
    try:
        while True:
            head = await reader.readexactly(9)
            payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
            if head[3] == 0x6 and not head[4] & 0x1:
                writer.write(frame(0x6, 0x1, 0, payload))
    except (OSError, asyncio.IncompleteReadError):
        pass


async def one(port, sem, held, tls, h2):
    async with sem:
        try:
            if tls is None:
                conn = asyncio.open_connection("127.0.0.1", port)
            else:
                conn = asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                               server_hostname="localhost")
            reader, writer = await asyncio.wait_for(conn, 10)
            if h2:
                ok = await h2_exchange(reader, writer, tls is not None)
                # An idle HTTP/2 client still answers PINGs (a server may probe it).
                held.append((asyncio.ensure_future(h2_idle(reader, writer)), writer))
                return ok
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
            held.append((reader, writer))
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
    h2 = "--h2" in args
    if h2:
        args.remove("--h2")
        if tls is not None:
            tls.set_alpn_protocols(["h2"])
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
    results = await asyncio.gather(*(one(port, sem, held, tls, h2) for _ in range(n)))
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
    for _, w in held:
        w.close()


asyncio.run(main())
