"""Log lines: one write per event-loop turn, none lost or reordered."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
import structlog

from smtproxy.telemetry import logging as log_setup


@pytest.fixture(autouse=True)
def _restore_structlog():
    yield
    log_setup.flush()
    structlog.reset_defaults()


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_lines_of_one_loop_turn_leave_in_one_write():
    stream = CountingStream()
    log_setup.configure("json", "info", stream)
    log = structlog.get_logger("test")
    writes: list[int] = []
    loop = asyncio.new_event_loop()

    def one_turn() -> None:
        for n in range(5):
            log.info("line", n=n)  # the first one schedules the flush
        writes.append(stream.writes)
        loop.call_soon(after_the_turn)  # queued behind the flush

    def after_the_turn() -> None:
        writes.append(stream.writes)
        loop.stop()

    loop.call_soon(one_turn)
    loop.run_forever()
    loop.close()
    assert writes == [0, 1]
    assert [line["n"] for line in lines(stream)] == [0, 1, 2, 3, 4]


def test_outside_a_loop_lines_are_written_at_once_and_in_order():
    stream = CountingStream()
    log_setup.configure("json", "info", stream)
    log = structlog.get_logger("test")

    async def pending_at_loop_end() -> None:
        log.info("inside", n=1)  # its flush is scheduled, then the loop ends first

    asyncio.run(pending_at_loop_end())
    log.info("outside", n=2)
    assert [line["event"] for line in lines(stream)] == ["inside", "outside"]
    log_setup.flush()
    assert len(lines(stream)) == 2


def test_lines_pending_when_the_loop_stops_are_written_by_a_new_configuration():
    stream = CountingStream()
    log_setup.configure("json", "info", stream)
    loop = asyncio.new_event_loop()
    loop.call_soon(lambda: structlog.get_logger("test").warning("last words"))
    loop.call_soon(loop.stop)  # this turn is the last: the scheduled flush never runs
    loop.run_forever()
    loop.close()
    assert stream.getvalue() == ""
    log_setup.configure("json", "info", io.StringIO())
    assert [line["event"] for line in lines(stream)] == ["last words"]


def test_a_line_after_the_loop_stopped_is_written_with_what_the_loop_left():
    stream = CountingStream()
    log_setup.configure("json", "info", stream)
    loop = asyncio.new_event_loop()
    loop.call_soon(lambda: structlog.get_logger("test").info("in the loop"))
    loop.call_soon(loop.stop)
    loop.run_forever()
    loop.close()
    structlog.get_logger("test").info("after it")
    assert [line["event"] for line in lines(stream)] == ["in the loop", "after it"]


def test_worker_fields_are_in_every_line():
    stream = io.StringIO()
    log_setup.configure("json", "info", stream, static_fields={"worker_pid": 4242})
    structlog.get_logger("test").info("hello")
    log_setup.flush()
    assert lines(stream)[0]["worker_pid"] == 4242
