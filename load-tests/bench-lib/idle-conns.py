#!/usr/bin/env python3
"""Open N keep-alive connections to 127.0.0.1:PORT, send one GET / on each, read the
answer, and keep them all open (idle) until killed. bench.sh's memory scenario reads
busbar's RSS while they are held.

Usage: idle-conns.py PORT N READY_FILE [HOLD_SECONDS]
Writes "opened OK FAILED SECONDS" to READY_FILE once every connection has answered
(or failed), then holds them for HOLD_SECONDS (default 300) or until SIGTERM.
"""
import asyncio
import os
import resource
import signal
import sys
import time

PARALLEL = 256  # connects in flight at once: stays below the listen backlog


async def one(port, sem, held):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 10)
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
    port, n, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    hold = float(sys.argv[4]) if len(sys.argv) > 4 else 300.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 100
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            sys.exit(f"idle-conns: need {want} open files, hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    sem = asyncio.Semaphore(PARALLEL)
    held = []
    t0 = time.monotonic()
    results = await asyncio.gather(*(one(port, sem, held) for _ in range(n)))
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
