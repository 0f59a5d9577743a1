"""Remote connections: opened through the connector, handed back after each transaction.

Connections are closed with QUIT when handed back; connection reuse (issue 3) extends this.
"""

from __future__ import annotations

import asyncio

from smtproxy.outbound.connector import Connector, RemoteSession
from smtproxy.policy.levels import PolicyDecision
from smtproxy.routing.router import Destination


class ConnectionPool:
    def __init__(self, connector: Connector, quit_timeout: float = 5.0) -> None:
        self.connector = connector
        self.quit_timeout = quit_timeout
        self._closing: set[asyncio.Task[None]] = set()

    async def acquire(self, domain: str, destination: Destination, decision: PolicyDecision) -> RemoteSession:
        return await self.connector.connect(domain, destination, decision)

    def release(self, remote: RemoteSession, reusable: bool) -> None:
        """The transaction is over; the MTA's reply is not delayed by the goodbye."""
        if not reusable:
            remote.connection.abort()
            return
        task = asyncio.get_running_loop().create_task(remote.connection.quit(self.quit_timeout))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close_all(self) -> None:
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=self.quit_timeout)
