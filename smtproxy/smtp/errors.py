"""The one error type of the sans-IO core: the peer broke the protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smtproxy.smtp.replies import Reply


class PeerProtocolError(Exception):
    """The peer sent something unacceptable; `reply` is what to answer it."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply
