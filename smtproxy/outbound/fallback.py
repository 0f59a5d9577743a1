"""When `may` mail goes in plaintext after a failed TLS handshake.

Postfix's smtp client (smtp_proto.c, PLAINTEXT_FALLBACK_OK_AFTER_STARTTLS_FAILURE) retries a
server in plaintext after a failed handshake only for a message that has already waited
`minimal_backoff_time` (300 s) in its queue; a fresh message is deferred.  So whoever on
the path breaks handshakes gets no plaintext unless they keep it up for that long.

smtproxy holds no queue and cannot see a message's age: it counts from the first failed
handshake with the server instead.  Mail to that server is deferred until the delay has
passed, then goes in plaintext at once.  A completed handshake with the server, or a day
without a failed one, starts the count afresh.  Servers are told apart with the settings
of the handshake (`Connector`'s TLS session key: address, port, SNI, policy, client
certificate): a handshake that works under other settings says nothing about these.
The count lives in the process: a reload or another worker starts it afresh, which only
defers more.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable


class PlaintextFallback:
    FORGET_AFTER = 86400.0  # seconds without a failed handshake
    MAX_SERVERS = 10000  # servers remembered; the oldest failure is forgotten first

    def __init__(self, delay: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.delay = delay
        self._clock = clock
        self._failing: collections.OrderedDict[Hashable, tuple[float, float]] = collections.OrderedDict()

    def handshake_failed(self, server: Hashable) -> float:
        """Record a failed handshake; the seconds until plaintext is allowed (0: now)."""
        now = self._clock()
        first, last = self._failing.pop(server, (now, now))
        if now - last > self.FORGET_AFTER:
            first = now
        self._failing[server] = (first, now)
        if len(self._failing) > self.MAX_SERVERS:
            self._failing.popitem(last=False)
        return max(0.0, self.delay - (now - first))

    def handshake_completed(self, server: Hashable) -> None:
        self._failing.pop(server, None)
