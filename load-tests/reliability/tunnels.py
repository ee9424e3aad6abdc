"""Memory an open tunnel costs busbar: N upgraded connections held open at once.

usage: tunnels.py BUSBAR_BINARY [N]

Starts BUSBAR_BINARY on loopback (its own temp folder, ports chosen at run time) in front
of a raw upstream that answers every request `101 Switching Protocols` and then only
reads. Opens N client connections (default 2000) that each send a WebSocket-style
upgrade and wait for the 101, so N tunnels are open (`drivers::tunnel`); samples
busbar's RSS before, with all N open, and 3 s after they close. Prints:
`TUNNELS n=… rss_before_kib=… rss_open_kib=… per_tunnel_bytes=… rss_after_close_kib=…`.
"""

import asyncio
import resource
import socket
import subprocess
import sys
import tempfile

BIN = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
UPGRADE = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


async def upstream(r, w):
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await r.read(4096)
        if not chunk:
            return
        head += chunk
    w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    await w.drain()
    while await r.read(4096):
        pass


async def tunnel(port):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(UPGRADE)
    await w.drain()
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await r.read(4096)
        if not chunk:
            raise RuntimeError(f"closed before the 101: {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"not a 101: {head!r}")
    return w


async def main():
    up = await asyncio.start_server(upstream, "127.0.0.1", 0, backlog=4096)
    up_port = up.sockets[0].getsockname()[1]
    http, admin = free_port(), free_port()
    work = tempfile.mkdtemp(prefix="busbar-tunnels-")
    with open(f"{work}/busbar.toml", "w") as f:
        f.write(f"""[server]
runtime_dir = "{work}"
[listen]
http = ["127.0.0.1:{http}"]
admin = "127.0.0.1:{admin}"
[log]
level = "warn"
[[service]]
name = "s"
endpoints = [{{ addr = "127.0.0.1:{up_port}" }}]
[[route]]
name = "all"
service = "s"
""")
    bus = subprocess.Popen([BIN, "run", "-c", f"{work}/busbar.toml"],
                           stdout=open(f"{work}/stdout.log", "w"),
                           stderr=open(f"{work}/stderr.log", "w"))
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", http)).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        for _ in range(20):  # warm up: the runtime's threads and first allocations
            (await tunnel(http)).close()
        await asyncio.sleep(1)
        before = rss_kib(bus.pid)
        open_ = []
        for i in range(0, N, 100):
            open_ += await asyncio.gather(*[tunnel(http) for _ in range(min(100, N - i))])
        await asyncio.sleep(2)
        during = rss_kib(bus.pid)
        for w in open_:
            w.close()
        await asyncio.sleep(3)
        after = rss_kib(bus.pid)
        print(f"TUNNELS n={N} rss_before_kib={before} rss_open_kib={during} "
              f"per_tunnel_bytes={(during - before) * 1024 // N} rss_after_close_kib={after}")
    finally:
        bus.kill()
        bus.wait()


asyncio.run(main())
