"""The `[metrics] listen` HTTP endpoint: /metrics, /healthz, /readyz.

A small asyncio server on the proxy's own event loop, so readiness can probe the backend
without threads.  One GET or HEAD per connection; the request head is bounded in size and
time, and a slow or hostile client costs one short-lived connection (invariant 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from smtproxy.config import Address

REQUEST_HEAD_LIMIT = 8192
REQUEST_TIMEOUT = 5.0
PROBE_CACHE_SECONDS = 1.0  # a probe flood becomes at most one backend connection per second

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class Readiness:
    """Ready while the listeners are bound and the legacy MTA accepts a TCP connection."""

    def __init__(self, listening: Callable[[], bool], backend: Address | None, timeout: float) -> None:
        self.listening = listening
        self.backend = backend
        self.timeout = timeout
        self.backend_up = backend is None
        self._probed_at: float | None = None
        self._lock = asyncio.Lock()
        self._probe: asyncio.Task[str | None] | None = None

    def follow(self, backend: Address | None, timeout: float) -> None:
        """A reload changed the backend: probe the new one (the next check does)."""
        if self.backend is not None:
            self.backend, self.timeout, self._probed_at = backend, timeout, None

    async def check(self) -> str | None:
        """None when ready, else why not."""
        if not self.listening():
            return "listeners are not accepting connections"
        if self.backend is None:
            return None
        async with self._lock:
            if self._probed_at is None or time.monotonic() - self._probed_at >= PROBE_CACHE_SECONDS:
                self.backend_up = await _accepts(self.backend, self.timeout)
                self._probed_at = time.monotonic()
        return None if self.backend_up else f"backend {self.backend} is not reachable"

    def refresh(self) -> None:
        """Probe in the background, for /metrics: a scrape must not wait up to
        backend_connect_timeout for a backend that hangs (Prometheus would give up on the
        scrape, and smtproxy_backend_up would vanish instead of reading 0)."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self.check())


async def _accepts(address: Address, timeout: float) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address.host, address.port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, readiness: Readiness) -> None:
        self.registry = registry
        self.readiness = readiness
        self._server: asyncio.AbstractServer | None = None

    async def start(self, address: Address) -> None:
        self._server = await asyncio.start_server(self._serve, address.host, address.port,
                                                  reuse_address=True, limit=REQUEST_HEAD_LIMIT)
        self.readiness.refresh()  # the first scrape already shows whether the backend answers

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            status, content_type, body, method = await self._answer(head.decode("latin-1"))
            writer.write(f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, head: str) -> tuple[int, str, bytes, str]:
        request_line, *header_lines = head.split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3:
            return 400, "text/plain", b"bad request\n", ""
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n", method
        path = target.split("?", 1)[0]
        if path == "/metrics":
            self.readiness.refresh()  # smtproxy_backend_up: this scrape shows the last probe's result
            accept = next((line.split(":", 1)[1].strip() for line in header_lines
                           if line.lower().startswith("accept:")), "")
            encode, content_type = choose_encoder(accept)
            return 200, content_type, encode(self.registry), method
        if path == "/healthz":
            return 200, "text/plain", b"ok\n", method
        if path == "/readyz":
            problem = await self.readiness.check()
            if problem is None:
                return 200, "text/plain", b"ready\n", method
            return 503, "text/plain", f"not ready: {problem}\n".encode(), method
        return 404, "text/plain", b"not found; try /metrics, /healthz or /readyz\n", method
