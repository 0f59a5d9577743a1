"""Distance between the outbound systems and the remote MX, emulated in user space:
``python -m tests.bench.delay_relay LISTEN_PORT UPSTREAM_PORT RTT_MS``.

Connection reuse saves round trips (TCP, greeting, EHLO, STARTTLS, the TLS handshake,
EHLO again); loopback has none to save.  netem would add them in the kernel, but this
machine's kernel is built without it (CONFIG_NET_SCH_NETEM is not set), so this relay
holds every byte for half the round-trip time in each direction, and opens its own
connection to the remote 1.5 round trips after accepting one: the remote's greeting then
arrives two round trips after connect(), as over a real path (SYN, SYN-ACK, ACK, then
the greeting).  A close travels like data, after what was sent before it.  What it does
not emulate: TCP's own behaviour over distance (slow start, windows); for SMTP
transactions of a few KiB, the round trips are what counts.
"""

from __future__ import annotations

import asyncio
import collections
import sys
from collections.abc import Callable

import uvloop

_CLOSE = None  # what a DelayLine carries to say "the sender closed"


class DelayLine:
    """What goes in comes out ``delay`` seconds later, in order (one timer at a time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float,
                 deliver: Callable[[bytes | None], None]) -> None:
        self._loop = loop
        self._delay = delay
        self._deliver = deliver
        self._queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def put(self, data: bytes | None) -> None:
        self._queue.append((self._loop.time() + self._delay, data))
        if self._timer is None:
            self._timer = self._loop.call_at(self._queue[0][0], self._release)

    def _release(self) -> None:
        self._timer = None
        now = self._loop.time() + 0.0005  # the loop's clock has millisecond steps
        while self._queue and self._queue[0][0] <= now:
            self._deliver(self._queue.popleft()[1])
        if self._queue:
            self._timer = self._loop.call_at(self._queue[0][0], self._release)


class _Remote(asyncio.Protocol):
    def __init__(self, near: NearEnd) -> None:
        self.near = near

    def data_received(self, data: bytes) -> None:
        self.near.to_near.put(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.near.to_near.put(_CLOSE)


class NearEnd(asyncio.Protocol):
    """A connection from a system under test, and its delayed twin to the remote."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.remote: asyncio.Transport | None = None
        self.waiting: list[bytes | None] = []  # arrived at the far end before it was connected

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        loop = asyncio.get_running_loop()
        self.to_near = DelayLine(loop, self.delay, self._to_near)
        self.to_remote = DelayLine(loop, self.delay, self._to_remote)
        loop.call_later(3 * self.delay, lambda: loop.create_task(self._connect()))

    async def _connect(self) -> None:
        if self.transport.is_closing():
            return
        try:
            remote, _ = await asyncio.get_running_loop().create_connection(
                lambda: _Remote(self), "127.0.0.1", self.upstream_port)
        except OSError:
            self.to_near.put(_CLOSE)
            return
        self.remote = remote
        for data in self.waiting:
            self._to_remote(data)
        self.waiting.clear()

    def data_received(self, data: bytes) -> None:
        self.to_remote.put(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.to_remote.put(_CLOSE)

    def _to_remote(self, data: bytes | None) -> None:
        if self.remote is None:
            self.waiting.append(data)
        else:
            _pass_on(self.remote, data)

    def _to_near(self, data: bytes | None) -> None:
        _pass_on(self.transport, data)


def _pass_on(transport: asyncio.Transport, data: bytes | None) -> None:
    if transport.is_closing():
        return
    if data is _CLOSE:
        transport.close()
    else:
        transport.write(data)


async def serve(port: int, upstream_port: int, rtt_ms: float) -> None:
    loop = asyncio.get_running_loop()
    delay = rtt_ms / 2000
    server = await loop.create_server(lambda: NearEnd(upstream_port, delay), "127.0.0.1", port, backlog=1024)
    print("delay relay ready", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
