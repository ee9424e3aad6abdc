"""Slow-body and slow-read clients, and the upstream they reach, for slowbody.sh (case 3b).

usage: slow_clients.py backend PORT STATS_FILE
       slow_clients.py attack PORT BODY_CONNS READ_CONNS SECONDS RATE

backend: an HTTP/1.1 upstream on 127.0.0.1:PORT. A POST's body is read to its
Content-Length (then 200); `GET /big` is answered with BIG bytes. Every second it rewrites
STATS_FILE with one line `BACKEND posts=… posts_open=… posts_max_open=… posts_cut=…
posts_done=… big=… big_done=… big_cut=…` (posts_open: half requests it is holding now).

attack: opens BODY_CONNS slow-body and READ_CONNS slow-read connections to busbar, RATE a
second, alternately, and keeps them going for SECONDS from the start.
- slow body (R-U-Dead-Yet, as `slowhttptest -B`): `POST /upload` declaring a 4096-byte
  body, 16 body bytes at once and 16 more every 10 s; it reads whatever busbar answers.
- slow read (as `slowhttptest -X`): `GET /big` from a socket with a 4 KiB receive buffer
  and an MSS of 1460 (a real network's segment size: on loopback the 64 KiB MSS would let
  busbar's send buffer grow to MiBs per connection), reading 32 bytes every 5 s.
Prints `SLOWBODY opened=… status_408=… other_status=… closed_no_answer=… open_at_end=…
answer_p50_s=… answer_max_s=…` and `SLOWREAD opened=… eof_seen=… open_at_end=…
bytes_read=…`. A slow reader sees busbar's close only after what was in flight, so
busbar's own count (`busbar_edge_refusals_total{reason="send_timeout"}`) is the measure.
"""

import asyncio
import os
import socket
import sys
import time

BIG = 1 << 20
BODY_DECLARED = 4096
PIECE = 16
BODY_EVERY = 10.0
READ_BYTES = 32
READ_EVERY = 5.0


# ---------------------------------------------------------------- backend

stats = {"posts": 0, "posts_open": 0, "posts_max_open": 0, "posts_cut": 0, "posts_done": 0,
         "big": 0, "big_done": 0, "big_cut": 0}


async def upstream(reader, writer):
    big = False
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /big"):
                big = True
                stats["big"] += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
                piece = b"b" * 65536
                for _ in range(BIG // len(piece)):
                    writer.write(piece)
                    await writer.drain()
                stats["big_done"] += 1
                big = False
                continue
            declared = 0
            for h in head.split(b"\r\n"):
                if h.lower().startswith(b"content-length:"):
                    declared = int(h.split(b":", 1)[1])
            stats["posts"] += 1
            stats["posts_open"] += 1
            stats["posts_max_open"] = max(stats["posts_max_open"], stats["posts_open"])
            try:
                await reader.readexactly(declared)
            except (asyncio.IncompleteReadError, ConnectionError):
                stats["posts_cut"] += 1
                return
            finally:
                stats["posts_open"] -= 1
            stats["posts_done"] += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        if big:
            stats["big_cut"] += 1
    finally:
        writer.close()


async def backend(port, stats_file):
    server = await asyncio.start_server(upstream, "127.0.0.1", port, backlog=4096)
    async with server:
        while True:
            line = "BACKEND " + " ".join(f"{k}={v}" for k, v in stats.items()) + "\n"
            tmp = stats_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(line)
            os.replace(tmp, stats_file)
            await asyncio.sleep(1)


# ---------------------------------------------------------------- attack

body = {"opened": 0, "408": 0, "other": 0, "closed": 0, "open": 0, "answer_s": []}
read = {"opened": 0, "eof": 0, "open": 0, "bytes": 0}


async def slow_body(port, until):
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    body["opened"] += 1
    start = time.monotonic()
    w.write(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n" % BODY_DECLARED + b"a" * PIECE)
    answer = asyncio.ensure_future(r.read(4096))

    async def trickle():
        sent = PIECE
        while sent + PIECE <= BODY_DECLARED:
            await asyncio.sleep(BODY_EVERY)
            w.write(b"a" * PIECE)
            await w.drain()
            sent += PIECE

    feeder = asyncio.ensure_future(trickle())
    try:
        data = await asyncio.wait_for(asyncio.shield(answer), max(0.1, until - time.monotonic()))
        if data.startswith(b"HTTP/1.1 408"):
            body["408"] += 1
            body["answer_s"].append(time.monotonic() - start)
        elif data:
            body["other"] += 1
            if body["other"] <= 3:
                print("slow body: unexpected answer", data[:120], file=sys.stderr)
        else:
            body["closed"] += 1
    except asyncio.TimeoutError:
        body["open"] += 1
    except (ConnectionError, OSError):
        body["closed"] += 1
    finally:
        feeder.cancel()
        answer.cancel()
        w.close()


async def slow_read(port, until):
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, ("127.0.0.1", port))
        await loop.sock_sendall(s, b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
    except OSError:
        s.close()
        return
    read["opened"] += 1
    try:
        while time.monotonic() < until:
            await asyncio.sleep(min(READ_EVERY, max(0.0, until - time.monotonic())))
            try:
                data = await asyncio.wait_for(loop.sock_recv(s, READ_BYTES), 0.5)
            except asyncio.TimeoutError:
                continue
            if not data:
                read["eof"] += 1
                return
            read["bytes"] += len(data)
        read["open"] += 1
    except (ConnectionError, OSError):
        read["eof"] += 1
    finally:
        s.close()


async def attack(port, body_conns, read_conns, seconds, rate):
    until = time.monotonic() + seconds
    tasks = []
    # The two kinds alternate while both last.
    order = []
    b, rd = body_conns, read_conns
    while b or rd:
        if b:
            order.append(slow_body)
            b -= 1
        if rd:
            order.append(slow_read)
            rd -= 1
    for f in order:
        tasks.append(asyncio.ensure_future(f(port, until)))
        await asyncio.sleep(1.0 / rate)
    await asyncio.gather(*tasks, return_exceptions=True)
    a = sorted(body["answer_s"])
    p50 = a[len(a) // 2] if a else 0
    print(f"SLOWBODY opened={body['opened']} status_408={body['408']} other_status={body['other']} "
          f"closed_no_answer={body['closed']} open_at_end={body['open']} "
          f"answer_min_s={a[0] if a else 0:.1f} answer_p50_s={p50:.1f} answer_max_s={a[-1] if a else 0:.1f}")
    print(f"SLOWREAD opened={read['opened']} eof_seen={read['eof']} open_at_end={read['open']} "
          f"bytes_read={read['bytes']}")


def main():
    if sys.argv[1] == "backend":
        asyncio.run(backend(int(sys.argv[2]), sys.argv[3]))
    else:
        port, b, r, secs, rate = (int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                                 float(sys.argv[5]), float(sys.argv[6]))
        asyncio.run(attack(port, b, r, secs, rate))


if __name__ == "__main__":
    main()
