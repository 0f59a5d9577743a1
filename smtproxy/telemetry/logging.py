"""structlog set-up, and the subscriber that logs each handshake in Postfix's wording."""

from __future__ import annotations

import logging
import sys

import structlog

from smtproxy.events import EventBus, HandshakeFacts
from smtproxy.tls.wording import connection_line, summary

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(fmt: str = "json", level: str = "info", stream=None) -> None:
    """JSON lines for machines, a readable console rendering for humans; both on stderr."""
    renderer: structlog.types.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def log_handshake(facts: HandshakeFacts) -> None:
    if not facts.ok:
        return  # the session logs its own failure line with the peer's context
    structlog.get_logger("smtproxy.tls").info(
        connection_line(facts),
        direction=str(facts.direction),
        peer=f"{facts.peer_name}[{facts.peer_addr}]",
        protocol=facts.protocol,
        cipher=facts.cipher,
        key_exchange=facts.key_exchange,
        forward_secrecy=facts.forward_secrecy,
        peer_trust=str(facts.peer_trust),
        resumed=facts.resumed,
        reused=facts.reused,
        handshake=summary(facts),
    )


def subscribe(bus: EventBus) -> None:
    bus.subscribe(HandshakeFacts, log_handshake)
