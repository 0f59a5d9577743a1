"""Closing a connection whose peer may not be reading.

`transport.close()` waits until the bytes still queued have been written; a peer that never
reads them would keep the connection, its descriptor and its slot for as long as it likes.
"""

from __future__ import annotations

import asyncio

CLOSE_LINGER_SECONDS = 5.0


def close_with_linger(transport: asyncio.BaseTransport, loop: asyncio.AbstractEventLoop) -> asyncio.TimerHandle:
    """Close now; abort if the queued bytes have not left within CLOSE_LINGER_SECONDS (the
    abort of a transport already closed does nothing)."""
    transport.close()
    return loop.call_later(CLOSE_LINGER_SECONDS, transport.abort)
