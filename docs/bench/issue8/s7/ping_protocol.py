"""Round-trip microbenchmark (seventh session, docs/BENCHMARKS.md): a bare asyncio Protocol echo over TLS (uvloop), length-prefixed frames, same use as ping_websocket.py."""

import asyncio
import ssl
import struct
import sys
import time

import uvloop

T = "/tmp/base/tls"
H = struct.Struct(">I")


class Srv(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
        self.buf = bytearray()

    def data_received(self, d):
        self.buf += d
        while len(self.buf) >= 4:
            n = H.unpack_from(self.buf)[0]
            if len(self.buf) < 4 + n:
                return
            msg = bytes(self.buf[4 : 4 + n])
            del self.buf[: 4 + n]
            self.t.write(H.pack(len(msg)) + msg)


class Cli(asyncio.Protocol):
    def __init__(self):
        self.buf = bytearray()
        self.waiter = None

    def connection_made(self, t):
        self.t = t

    def data_received(self, d):
        self.buf += d
        if len(self.buf) >= 4 and len(self.buf) >= 4 + H.unpack_from(self.buf)[0]:
            n = H.unpack_from(self.buf)[0]
            msg = bytes(self.buf[4 : 4 + n])
            del self.buf[: 4 + n]
            w, self.waiter = self.waiter, None
            w.set_result(msg)


async def server(port):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(f"{T}/broker-1.pem", f"{T}/broker-1-key.pem")
    s = await asyncio.get_running_loop().create_server(Srv, "127.0.0.1", port, ssl=ctx)
    await asyncio.sleep(3600)


async def client(port):
    ctx = ssl.create_default_context(cafile=f"{T}/ca.pem")
    ctx.check_hostname = False
    loop = asyncio.get_running_loop()
    t, p = await loop.create_connection(Cli, "127.0.0.1", port, ssl=ctx)
    for gap in (0, 0.005, 0, 0.005):
        ts = []
        for i in range(2000):
            s = time.perf_counter()
            p.waiter = loop.create_future()
            t.write(H.pack(200) + b"x" * 200)
            await p.waiter
            ts.append((time.perf_counter() - s) * 1e6)
            if gap:
                time.sleep(gap)
        ts.sort()
        print(
            f"raw protocol gap {gap * 1000:.0f} ms: rtt p50 {ts[1000]:.0f} us p90 {ts[1800]:.0f} p99 {ts[1980]:.0f}"
        )


uvloop.install()
if sys.argv[1] == "s":
    asyncio.run(server(int(sys.argv[2])))
else:
    asyncio.run(client(int(sys.argv[2])))
