"""When session-ticket keys change: every half session lifetime, as Postfix's tlsmgr does.

A key seals the tickets issued during half a lifetime, then opens them for another half
as the previous key (`TicketKeys`), then is dropped: no key serves longer than one session
lifetime, and a ticket resumes for at least half of its own.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from smtproxy.tls.openssl_ext import TICKET_KEY_LENGTH


def new_ticket_key() -> bytes:
    return os.urandom(TICKET_KEY_LENGTH)


class TicketKeyRotation:
    """Hands `apply` a new key every `lifetime() / 2` seconds, on the event loop's clock."""

    def __init__(self, lifetime: Callable[[], int], apply: Callable[[bytes], None]) -> None:
        self._lifetime = lifetime
        self._apply = apply
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self.reschedule()

    def reschedule(self) -> None:
        """Apply a lifetime changed by a reload now: a shorter one may rotate at once."""
        self.stop()
        self._timer = self._loop.call_at(self._last + self._lifetime() / 2, self._rotate)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _rotate(self) -> None:
        self._apply(new_ticket_key())
        self._last = self._loop.time()
        self.reschedule()
