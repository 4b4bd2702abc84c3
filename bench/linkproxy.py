#!/usr/bin/env python3
"""A TCP proxy that behaves like a slow link: a shared bandwidth limit per direction
and a one-way delay on every byte (this kernel has no netem). It counts the bytes it
carried towards the client, so a benchmark can report what crossed the "network".

usage: bench/linkproxy.py LISTEN_PORT TARGET_HOST:PORT [--mbit 100] [--delay-ms 20]
       [--stats FILE]   (FILE gets {"down": bytes, "up": bytes} on SIGUSR1 and at exit)

Listens on 127.0.0.1 only.
"""
import argparse
import asyncio
import json
import signal
import time


class Link:
    """One direction of the link: packets leave no earlier than `delay` after they
    arrive, and no faster than `rate` bytes per second in total."""

    def __init__(self, rate, delay):
        self.rate = rate
        self.delay = delay
        self.free_at = 0.0
        self.bytes = 0

    def schedule(self, n):
        now = time.monotonic()
        start = max(now, self.free_at)
        self.free_at = start + n / self.rate if self.rate else start
        self.bytes += n
        return self.free_at + self.delay


async def pump(reader, writer, link):
    """Reads as the link allows (a quarter second of backlog at most) and writes each
    piece when it is due, so that pieces are in flight together as on a real link."""
    q = asyncio.Queue()

    async def sender():
        while True:
            item = await q.get()
            if item is None:
                break
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    task = asyncio.ensure_future(sender())
    try:
        while True:
            backlog = link.free_at - time.monotonic()
            if backlog > 0.25:
                await asyncio.sleep(backlog - 0.25)
            data = await reader.read(65536)
            if not data:
                break
            q.put_nowait((link.schedule(len(data)), data))
        q.put_nowait(None)
        await task
    except (ConnectionError, asyncio.CancelledError):
        task.cancel()
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("target")
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--stats")
    a = ap.parse_args()
    host, port = a.target.rsplit(":", 1)
    rate = a.mbit * 1e6 / 8 if a.mbit > 0 else 0
    down = Link(rate, a.delay_ms / 1000)
    up = Link(rate, a.delay_ms / 1000)

    def dump(*_):
        if a.stats:
            with open(a.stats, "w") as f:
                json.dump({"down": down.bytes, "up": up.bytes}, f)

    async def handle(cr, cw):
        # the TCP handshake costs one round trip on a real link
        await asyncio.sleep(2 * a.delay_ms / 1000)
        try:
            sr, sw = await asyncio.open_connection(host, int(port))
        except OSError:
            cw.close()
            return
        await asyncio.gather(pump(cr, sw, up), pump(sr, cw, down))

    server = await asyncio.start_server(handle, "127.0.0.1", a.port)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, dump)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()
    dump()


if __name__ == "__main__":
    asyncio.run(main())
