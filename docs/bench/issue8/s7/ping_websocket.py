"""Round-trip microbenchmark (seventh session, docs/BENCHMARKS.md): aiohttp WebSocket echo over TLS (uvloop), back to back and with idle gaps; certificates of a `tide up` cluster in /tmp/base. `python ping_websocket.py s PORT &` then `python ping_websocket.py c PORT`."""

import asyncio
import ssl
import sys
import time

import uvloop
from aiohttp import ClientSession, web

T = "/tmp/base/tls"


async def server(port):
    async def h(req):
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(req)
        async for m in ws:
            await ws.send_bytes(m.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", h)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(f"{T}/broker-1.pem", f"{T}/broker-1-key.pem")
    r = web.AppRunner(app)
    await r.setup()
    await web.TCPSite(r, "127.0.0.1", port, ssl_context=ctx).start()
    await asyncio.sleep(3600)


async def client(port, gap):
    ctx = ssl.create_default_context(cafile=f"{T}/ca.pem")
    ctx.check_hostname = False
    async with ClientSession() as s:
        async with s.ws_connect(f"https://127.0.0.1:{port}/ws", ssl=ctx, compress=0) as ws:
            for mode_gap in gap:
                ts = []
                for i in range(2000):
                    t = time.perf_counter()
                    await ws.send_bytes(b"x" * 200)
                    m = await ws.receive()
                    ts.append((time.perf_counter() - t) * 1e6)
                    if mode_gap:
                        time.sleep(mode_gap)  # idle, blocking: like a quiet process
                ts.sort()
                print(
                    f"gap {mode_gap * 1000:.1f} ms: rtt p50 {ts[1000]:.0f} us p90 {ts[1800]:.0f} p99 {ts[1980]:.0f}"
                )


uvloop.install()
if sys.argv[1] == "s":
    asyncio.run(server(int(sys.argv[2])))
else:
    asyncio.run(client(int(sys.argv[2]), [0, 0.005, 0.0005, 0]))
