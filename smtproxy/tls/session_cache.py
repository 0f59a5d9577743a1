"""Client-side TLS sessions for resumption, in the spirit of Postfix's tls_scache.

Keyed by everything that decided how the session was made — MX host name, address, port,
the full `Policy` and the client certificate — so a session is only resumed
for a destination whose policy is identical to the one it was verified under (DESIGN.md
invariant 5).  Only sessions from handshakes that passed their level's checks are stored.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Hashable

from smtproxy.tls.openssl_ext import Session


class SessionCache:
    def __init__(self, timeout: float, max_entries: int = 10000) -> None:
        self.timeout = timeout
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[Hashable, tuple[float, Session]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Session | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored, session = entry
        if time.monotonic() - stored > min(self.timeout, session.timeout):
            del self._entries[key]
            return None
        return session

    def put(self, key: Hashable, session: Session | None) -> None:
        """Keep a session that can be offered again (a ticket, or a TLS 1.2 session ID)."""
        if self.timeout <= 0 or session is None:
            return
        if not session.has_ticket and not session.id:
            return
        self._entries[key] = (time.monotonic(), session)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def discard(self, key: Hashable) -> None:
        self._entries.pop(key, None)
