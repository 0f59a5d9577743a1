"""When `may` mail to a server whose TLS handshake failed may go in plaintext."""

from __future__ import annotations

from smtproxy.outbound.fallback import PlaintextFallback

SERVER, OTHER = ("192.0.2.1", 25), ("192.0.2.2", 25)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plaintext_only_once_the_server_has_failed_for_the_delay():
    clock = Clock()
    fallback = PlaintextFallback(300, clock)
    assert fallback.handshake_failed(SERVER) == 300
    clock.now += 120
    assert fallback.handshake_failed(SERVER) == 180
    assert fallback.handshake_failed(OTHER) == 300  # counted per server
    clock.now += 180
    assert fallback.handshake_failed(SERVER) == 0
    clock.now += 3600
    assert fallback.handshake_failed(SERVER) == 0  # still failing: still allowed


def test_a_completed_handshake_or_a_quiet_day_starts_the_count_afresh():
    clock = Clock()
    fallback = PlaintextFallback(300, clock)
    fallback.handshake_failed(SERVER)
    clock.now += 400
    fallback.handshake_completed(SERVER)
    assert fallback.handshake_failed(SERVER) == 300
    clock.now += 400
    assert fallback.handshake_failed(SERVER) == 0
    clock.now += PlaintextFallback.FORGET_AFTER + 1
    assert fallback.handshake_failed(SERVER) == 300


def test_zero_delay_allows_plaintext_at_once_and_memory_is_bounded():
    clock = Clock()
    assert PlaintextFallback(0, clock).handshake_failed(SERVER) == 0
    fallback = PlaintextFallback(300, clock)
    for port in range(PlaintextFallback.MAX_SERVERS + 5):
        fallback.handshake_failed(("192.0.2.9", port))
    assert len(fallback._failing) == PlaintextFallback.MAX_SERVERS
