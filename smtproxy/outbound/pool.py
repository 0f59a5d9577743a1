"""The outbound connection cache: one TCP+TLS connection carries a burst of messages.

After a transaction the connection gets RSET (sent with the final dot when the remote
offers PIPELINING: `RemoteSession.reset_sent`) and waits, idle, for the next transaction to
the same nexthop (and, in transparent mode, the same address the MTA chose) under the
identical policy (DESIGN.md invariant 5) — from any legacy-MTA
connection.  Limits follow Postfix's smtp connection cache: idle time in the cache, age
since the connection was opened, transactions per connection, and the number of idle
connections in total and per destination.  A cached connection that turns out dead is
counted as stale and replaced by a new one; the message never fails for it.  One that
sends a reply while idle is dropped: that reply would answer the next command.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time

import structlog

from smtproxy.events import ConnectionReuse, EventBus
from smtproxy.outbound.connector import Connector, RemoteSession
from smtproxy.outbound.upstream import UpstreamError
from smtproxy.policy.levels import PolicyDecision
from smtproxy.routing.router import Destination
from smtproxy.tls.client_context import ClientCertificate

log = structlog.get_logger("smtproxy.outbound")


@dataclasses.dataclass(frozen=True, slots=True)
class PoolLimits:
    idle_time: float  # connection_cache_time_limit
    reuse_time: float  # connection_reuse_time_limit
    reuse_count: int  # connection_reuse_count_limit; 0: unlimited
    total: int  # connection_cache_size; 0: no cache
    per_destination: int  # connection_cache_destination_size
    reply_timeout: float


@dataclasses.dataclass
class _Parked:
    remote: RemoteSession
    timer: asyncio.TimerHandle


class ConnectionPool:
    def __init__(self, connector: Connector, limits: PoolLimits, bus: EventBus) -> None:
        self.connector = connector
        self.limits = limits
        self.bus = bus
        self._idle: dict[tuple, collections.deque[_Parked]] = {}
        self._closed = False  # after close_all (shutdown, or replaced on reload): park nothing
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def idle_connections(self) -> int:
        return sum(len(queue) for queue in self._idle.values())

    async def acquire(self, domain: str, destination: Destination, decision: PolicyDecision,
                      certificate: ClientCertificate | None = None) -> RemoteSession:
        # the client certificate too: one sender's connection never carries another's mail
        key = (destination.nexthop.lower(), destination.pinned, decision.policy, certificate)
        remote = self._take(key) if decision.policy.connection_reuse else None
        if remote is None:
            remote = await self.connector.connect(domain, destination, decision, certificate)
            self.bus.publish(ConnectionReuse("new"))
        remote.cache_key = key
        return remote

    def stale(self, remote: RemoteSession) -> None:
        """A reused connection failed at its first command: count it and drop it."""
        remote.cache_key = None
        remote.connection.abort()
        log.info(f"cached connection to {remote.peer} was stale", stale=True)
        self.bus.publish(ConnectionReuse("stale"))

    def _take(self, key: tuple) -> RemoteSession | None:
        queue = self._idle.get(key)
        while queue:
            parked = queue.pop()
            parked.timer.cancel()
            remote = parked.remote
            if not remote.connection.alive:
                log.info(f"cached connection to {remote.peer} was stale", stale=True,
                         reason=remote.connection.closed_reason)
                self.bus.publish(ConnectionReuse("stale"))
                remote.connection.abort()
                continue
            remote.connection.unpark()
            if not queue:
                del self._idle[key]
            remote.reused = True
            self._log_reuse(remote)
            self.bus.publish(ConnectionReuse("reused"))
            return remote
        self._idle.pop(key, None)
        return None

    def _log_reuse(self, remote: RemoteSession) -> None:
        if remote.facts is not None:
            if remote.reuse_facts is None:  # the same for every reuse of this connection
                remote.reuse_facts = dataclasses.replace(remote.facts, reused=True, resumed=False, duration=0.0)
            self.bus.publish(remote.reuse_facts)
            return
        log.info(f"connection reused to {remote.peer}", tls=False)

    def release(self, remote: RemoteSession, reusable: bool) -> None:
        """The transaction is over: park the connection after RSET, or say goodbye.

        The legacy MTA's reply is never delayed by either."""
        key, remote.cache_key = remote.cache_key, None
        remote.transactions += 1
        self.connector.remember_session(remote)
        if not reusable or key is None or self._closed or not self._may_park(remote, key):
            self._spawn(remote.connection.quit(self.limits.reply_timeout) if reusable else _abort(remote))
            return
        self._spawn(self._reset_and_park(remote, key))

    def _may_park(self, remote: RemoteSession, key: tuple) -> bool:
        limits = self.limits
        if not key[2].connection_reuse or limits.total == 0 or not remote.connection.alive:
            return False
        if limits.reuse_count and remote.transactions >= limits.reuse_count:
            return False
        return time.monotonic() - remote.opened < limits.reuse_time

    async def _reset_and_park(self, remote: RemoteSession, key: tuple) -> None:
        try:
            if remote.reset_sent:
                remote.reset_sent = False
                reply = await remote.connection.read_reply(self.limits.reply_timeout, "waiting for reply to RSET")
            else:
                reply = await remote.connection.command("RSET", self.limits.reply_timeout)
        except UpstreamError:
            remote.connection.abort()
            return
        if reply.code != 250 or not remote.connection.alive or self._closed:
            await remote.connection.quit(self.limits.reply_timeout)
            return
        if not remote.connection.park():
            log.info(f"cached connection to {remote.peer} dropped", reason=remote.connection.closed_reason)
            return
        queue = self._idle.setdefault(key, collections.deque())
        if len(queue) >= self.limits.per_destination:
            self._evict(queue.popleft())
        while self.idle_connections >= self.limits.total:
            oldest_key = min((k for k, q in self._idle.items() if q), key=lambda k: self._idle[k][0].remote.opened)
            self._evict(self._idle[oldest_key].popleft())
            if not self._idle[oldest_key] and oldest_key != key:
                del self._idle[oldest_key]
        timer = asyncio.get_running_loop().call_later(self.limits.idle_time, self._expire, key, remote)
        queue.append(_Parked(remote, timer))

    def _expire(self, key: tuple, remote: RemoteSession) -> None:
        queue = self._idle.get(key)
        if not queue:
            return
        for parked in list(queue):
            if parked.remote is remote:
                queue.remove(parked)
                self._evict(parked)
        if not queue:
            del self._idle[key]

    def _evict(self, parked: _Parked) -> None:
        parked.timer.cancel()
        self._spawn(parked.remote.connection.quit(self.limits.reply_timeout))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close_all(self) -> None:
        """Close every idle connection; connections handed back later are closed too."""
        self._closed = True
        for queue in self._idle.values():
            for parked in queue:
                self._evict(parked)
        self._idle.clear()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.limits.reply_timeout)


async def _abort(remote: RemoteSession) -> None:
    remote.connection.abort()
