"""A minimal SMTP sink for the bulk scenario: ``python -m tests.bench.blackhole PORT COUNTER``.

Postfix's smtp-sink reads a message line by line through 4 KiB buffers, so at 200 MB/s it
needs most of a CPU itself, and in the bulk run it shares that CPU with the load
generator: the sink, not the system under test, set the pace.  This one reads 256 KiB at
a time and only looks for the end-of-data, so both systems under test (smtproxy and the
Postfix relay, which deliver to it alike) are measured rather than the sink.

It trusts its clients (the bench's two systems under test on loopback): every command
gets a positive reply.  After each message it appends ``mesg=N`` to COUNTER, the same
counter format as smtp-sink's ``-c``.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

_END = b"\r\n.\r\n"
_EHLO = b"250-blackhole\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n"
_REPLIES = {
    b"HELO": b"250 blackhole\r\n",
    b"EHLO": _EHLO,
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
    b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    b"QUIT": b"221 2.0.0 Bye\r\n",
}


class Counter:
    def __init__(self, path: str) -> None:
        self.messages = 0
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the process lifetime

    def stored(self) -> None:
        self.messages += 1
        self.file.write(f"mesg={self.messages}\n")


class Blackhole(asyncio.Protocol):
    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.buffer = b""
        self.in_data = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.write(b"220 blackhole ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies = []
        while self.buffer:
            if self.in_data:
                end = self.buffer.find(_END)
                if end < 0:
                    self.buffer = self.buffer[-4:]  # a split end-of-data
                    break
                self.buffer = self.buffer[end + len(_END):]
                self.in_data = False
                self.counter.stored()
                replies.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            line_end = self.buffer.find(b"\n")
            if line_end < 0:
                break
            verb = self.buffer[:4].upper()
            self.buffer = self.buffer[line_end + 1:]
            replies.append(_REPLIES.get(verb, b"250 2.0.0 Ok\r\n"))
            if verb == b"DATA":
                self.in_data = True
                self.buffer = b"\r\n" + self.buffer  # the data starts at a line start
            elif verb == b"QUIT":
                self.transport.write(b"".join(replies))
                self.transport.close()
                return
        if replies:
            self.transport.write(b"".join(replies))


async def serve(port: int, counter_path: str) -> None:
    counter = Counter(counter_path)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Blackhole(counter), "127.0.0.1", port, backlog=1024)
    print("blackhole ready", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2]))
