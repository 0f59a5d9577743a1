"""`smtproxy run --workers N`: N worker processes share the listeners through SO_REUSEPORT.

The supervisor (this process) starts each worker as a fresh interpreter
(`smtproxy run --worker-fd FD`), hands all of them the same session-ticket keys over a
private socket pair — so a client resumes its TLS session whichever worker its next
connection lands on — and then each new key as it rotates them.  Once every worker has
bound its listeners, it serves /metrics, /healthz and /readyz for all of them: workers
keep their metric values in files (prometheus-client's multiprocess mode) that the
supervisor's scrape sums.  SIGTERM
and SIGHUP are passed on to the workers; a worker that dies is started again.  A worker
whose supervisor vanishes (its end of the socket pair closes) drains and stops.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable

import structlog
from prometheus_client import CollectorRegistry, multiprocess

from smtproxy.config import Config, ConfigError, load_config
from smtproxy.telemetry.http import MetricsServer, Readiness
from smtproxy.telemetry.metrics import MULTIPROCESS_DIR_VARIABLE, watch_backend
from smtproxy.tls.openssl_ext import TICKET_KEY_LENGTH, TicketKeys
from smtproxy.tls.ticket_rotation import TicketKeyRotation, new_ticket_key

log = structlog.get_logger("smtproxy")

READY = b"R"
START_TIMEOUT = 30.0
# A worker that dies within STABLE_UPTIME of its start is restarted after RESTART_DELAY,
# doubled for each such death in a row up to MAX_RESTART_DELAY (Postfix's master throttles a
# crashing service for 60 s): a broken config file on disk must not become a busy loop.
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0
STABLE_UPTIME = 60.0


class WorkerLink:
    """The worker's end of its socket pair: session-ticket keys in (the previous and the
    current one at start, then each new one), "ready" out, the supervisor's life."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        keys = b""
        while len(keys) < 2 * TICKET_KEY_LENGTH:
            chunk = self.sock.recv(2 * TICKET_KEY_LENGTH - len(keys))
            if not chunk:
                raise OSError("the supervisor closed the worker channel before sending ticket keys")
            keys += chunk
        self.ticket_keys = TicketKeys(current=keys[TICKET_KEY_LENGTH:], previous=keys[:TICKET_KEY_LENGTH])
        self.sock.setblocking(False)

    def ready(self) -> None:
        self.sock.send(READY)

    def watch(self, on_new_ticket_key: Callable[[bytes], None], on_supervisor_gone: Callable[[], None]) -> None:
        """Pass on each new ticket key; call `on_supervisor_gone` once the supervisor's end closes."""
        loop = asyncio.get_running_loop()
        pending = bytearray()

        def readable() -> None:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self.sock.fileno())
                on_supervisor_gone()
                return
            pending.extend(data)
            while len(pending) >= TICKET_KEY_LENGTH:
                on_new_ticket_key(bytes(pending[:TICKET_KEY_LENGTH]))
                del pending[:TICKET_KEY_LENGTH]

        loop.add_reader(self.sock.fileno(), readable)


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.channel: socket.socket | None = None
        self.ready = False
        self.started = 0.0
        self.reload_pending = False  # a SIGHUP came while it was starting: sent once it is ready
        self.quick_deaths = 0  # deaths in a row within STABLE_UPTIME of the start


class Supervisor:
    def __init__(self, config: Config, count: int) -> None:
        assert config.source is not None
        self.config = config
        self.workers = [_Worker(index) for index in range(count)]
        self.ticket_keys = [new_ticket_key(), new_ticket_key()]  # previous, current
        self.metrics_dir = tempfile.mkdtemp(prefix="smtproxy-metrics-")
        self.stopping = asyncio.Event()
        self._changed = asyncio.Event()
        self._readiness: Readiness | None = None
        self._rotation: TicketKeyRotation | None = None

    async def _start(self, worker: _Worker) -> None:
        worker.reload_pending = False  # it reads the file as it starts (a SIGHUP from now on is pending)
        ours, theirs = socket.socketpair()
        env = {**os.environ, MULTIPROCESS_DIR_VARIABLE: self.metrics_dir}
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "smtproxy", "run", "--config", str(self.config.source),
            "--worker-fd", str(theirs.fileno()), pass_fds=(theirs.fileno(),), env=env, stdin=asyncio.subprocess.DEVNULL)
        theirs.close()
        ours.sendall(b"".join(self.ticket_keys))
        ours.setblocking(False)
        worker.channel, worker.ready, worker.started = ours, False, time.monotonic()
        asyncio.get_running_loop().create_task(self._watch(worker, worker.process, ours))

    async def _watch(self, worker: _Worker, process: asyncio.subprocess.Process, channel: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            if await loop.sock_recv(channel, 1) == READY:
                worker.ready = True
                if worker.reload_pending:
                    process.send_signal(signal.SIGHUP)
                self._changed.set()
        except OSError:
            pass
        code = await process.wait()
        channel.close()
        worker.ready = False
        multiprocess.mark_process_dead(process.pid, self.metrics_dir)
        if not self.stopping.is_set():
            log.error("worker exited", worker=worker.index, pid=process.pid, status=code)
        self._changed.set()

    def _new_ticket_key(self, key: bytes) -> None:
        """Every worker gets the new key; one being restarted gets it with the previous one
        when it starts. A worker whose channel cannot take 80 bytes has not read it for
        thousands of rotations: it is wedged, and restarted with the keys in force."""
        self.ticket_keys = [self.ticket_keys[1], key]
        for worker in self.workers:
            process = worker.process
            if worker.channel is None or process is None or process.returncode is not None:
                continue
            try:
                sent = worker.channel.send(key)
            except BlockingIOError:
                sent = 0
            except OSError:
                continue  # it is exiting: its replacement gets the keys as it starts
            if sent != len(key):
                log.error("worker does not read its channel; restarting it", worker=worker.index, pid=process.pid)
                process.kill()

    def _all_ready(self) -> bool:
        return all(worker.ready for worker in self.workers)

    def _signal(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signum)

    def _reload(self) -> None:
        """SIGHUP to every worker. One still starting would die of it (its handler is not
        installed yet), so it gets the signal once it reports ready. The supervisor reads
        the file too, for the backend its /readyz probes (the workers judge and report a
        broken file themselves)."""
        try:
            self.config = load_config(self.config.source)
        except ConfigError:
            pass
        else:
            if self._readiness is not None:
                inbound = self.config.inbound
                self._readiness.follow(inbound.backend, inbound.backend_connect_timeout)
            if self._rotation is not None:
                self._rotation.reschedule()
        for worker in self.workers:
            if worker.ready and worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signal.SIGHUP)
            else:
                worker.reload_pending = True  # still being started: told once it is ready

    async def _wait_started(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while not self._all_ready():
            if any(w.process is not None and w.process.returncode is not None for w in self.workers):
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return False
        return True

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        try:
            for worker in self.workers:
                await self._start(worker)
            if not await self._wait_started():
                log.error("a worker did not start; stopping")
                await self._stop_workers()
                return 1
            try:
                metrics_server = await self._serve_metrics()
            except OSError as exc:  # as a single process words it
                log.error(f"metrics.listen: cannot bind: {exc}")
                await self._stop_workers()
                return 1
            log.info("smtproxy ready", workers=len(self.workers), pids=[w.process.pid for w in self.workers],
                     backend=str(self.config.inbound.backend))
            self._rotation = TicketKeyRotation(lambda: self.config.inbound.tls.session_timeout, self._new_ticket_key)
            await self._keep_running()
            self._rotation.stop()
            log.info("smtproxy stopping", workers=len(self.workers))
            await self._stop_workers()
            if metrics_server is not None:
                metrics_server.close()
            log.info("smtproxy stopped")
            return 0
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def _keep_running(self) -> None:
        stop = asyncio.ensure_future(self.stopping.wait())
        while not self.stopping.is_set():
            self._changed.clear()
            changed = asyncio.ensure_future(self._changed.wait())
            await asyncio.wait({stop, changed}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            for worker in self.workers:
                if self.stopping.is_set() or worker.process is None or worker.process.returncode is None:
                    continue
                quick = time.monotonic() - worker.started < STABLE_UPTIME
                worker.quick_deaths = worker.quick_deaths + 1 if quick else 0
                delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (worker.quick_deaths - 1)) if quick else 0.0
                log.warning("restarting worker", worker=worker.index, after=delay)
                if delay:  # crash-loop brake, not synchronisation; a stop ends it
                    await asyncio.wait({stop}, timeout=delay)
                    if self.stopping.is_set():
                        break
                await self._start(worker)

    async def _serve_metrics(self) -> MetricsServer | None:
        listen = self.config.metrics.listen
        if listen is None:
            return None
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.metrics_dir)
        inbound = self.config.inbound
        backend = inbound.backend if inbound.listen or inbound.implicit_tls_listen else None
        readiness = self._readiness = Readiness(lambda: self._all_ready() and not self.stopping.is_set(), backend,
                                                inbound.backend_connect_timeout)
        if backend is not None:
            watch_backend(registry, lambda: readiness.backend_up)
        server = MetricsServer(registry, readiness)
        await server.start(listen)
        return server

    async def _stop_workers(self) -> None:
        self._signal(signal.SIGTERM)
        timeout = max(self.config.inbound.drain_timeout, self.config.outbound.drain_timeout) + 10
        processes = [w.process for w in self.workers if w.process is not None]
        _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in processes], timeout=timeout)
        if pending:
            for process in processes:
                if process.returncode is None:
                    process.kill()
            await asyncio.wait(pending, timeout=5)
