"""When session-ticket keys change: every session lifetime, as Postfix's tlsmgr does.

A key seals the tickets issued during one lifetime, then opens them for one more as the
previous key (`TicketKeys`), then is dropped: every ticket stays usable for its whole
lifetime, and none is opened more than two lifetimes after its key came in.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from smtproxy.tls.openssl_ext import TICKET_KEY_LENGTH


def new_ticket_key() -> bytes:
    return os.urandom(TICKET_KEY_LENGTH)


async def rotate_ticket_keys(lifetime: Callable[[], int], apply: Callable[[bytes], None]) -> None:
    """Hand `apply` a new key every `lifetime()` seconds (read each time: a reload applies)."""
    while True:
        await asyncio.sleep(lifetime())
        apply(new_ticket_key())
