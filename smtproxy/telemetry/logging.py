"""structlog set-up, and the subscriber that logs each handshake in Postfix's wording."""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
from collections.abc import Mapping
from typing import Any, TextIO

import structlog

from smtproxy.events import EventBus, HandshakeFacts
from smtproxy.tls.wording import connection_line, summary

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class BatchedLineWriter:
    """The structlog logger: the lines logged during one event-loop turn leave in one
    write(2) at the end of that turn instead of one write each (a session's connect,
    handshake, message and disconnect lines would otherwise cost four system calls).
    Outside a running loop (start-up, other threads, exit) lines are written at once."""

    MAX_PENDING = 256

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._flush_loop: asyncio.AbstractEventLoop | None = None  # where a flush is due
        self._flush_thread = 0

    def msg(self, message: str) -> None:
        loop = self._flush_loop
        if loop is None or self._flush_thread != threading.get_ident() or not loop.is_running():
            # asyncio._get_running_loop() costs a getpid(): asked once per turn only
            loop = asyncio._get_running_loop()
            if loop is None:
                with self._lock:
                    self._lines.append(message)  # after what a stopped loop left, in order
                    self._write_pending()
                return
            self._flush_loop, self._flush_thread = loop, threading.get_ident()
            loop.call_soon(self.flush)
        self._lines.append(message)
        if len(self._lines) >= self.MAX_PENDING:
            self._write_pending()

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = err = msg

    def flush(self) -> None:
        with self._lock:
            self._flush_loop = None
            self._write_pending()

    def _write_pending(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()


_writer: BatchedLineWriter | None = None


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None,
              *, static_fields: Mapping[str, Any] | None = None) -> None:
    """JSON lines for machines, a readable console rendering for humans; both on stderr.
    `static_fields` go into every line (a worker's pid)."""
    global _writer
    flush()
    renderer: structlog.types.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    processors: list[structlog.types.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    if static_fields:
        fields = dict(static_fields)

        def add_static_fields(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
            event.update(fields)
            return event

        processors.insert(0, add_static_fields)
    writer = _writer = BatchedLineWriter(stream or sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *args: writer,
        cache_logger_on_first_use=False,
    )


@atexit.register
def flush() -> None:
    """Write the lines still waiting for the end of an event-loop turn."""
    if _writer is not None:
        _writer.flush()


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
