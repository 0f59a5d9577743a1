"""Fixtures for integration tests: real peers on 127.0.0.1 (see ``peers.py``).

- ``pki`` (session): a trustme CA with server/client certificates as files.
- ``postfix_factory(**options)`` / ``postfix_backend``: real Postfix instances (the legacy
  MTA behind smtproxy, or a TLS remote MX), stopped at teardown.
- ``smtp_sink_factory(**options)`` / ``smtp_sink``: Postfix's smtp-sink.
- ``smtproxy(config, ...)``: starts smtproxy with a config (TOML text or dict), waits for
  ``smtproxy ready``, stops it at teardown.
- ``start_outbound(routes, ...)`` / ``remote_pki``: smtproxy's outbound listener alone, and a
  CA for remote MX hosts (``outbound_peers.py``); ``unbound_factory``: a real DNS server.

Every test in this directory is marked ``integration``. When a test fails, the logs of
the peers it started (smtproxy output, Postfix maillog, smtp-sink output) are attached
to its report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.integration.dns_server import unbound_factory  # noqa: F401  (a fixture for every test here)
from tests.integration.tlsrpt_collector import collector  # noqa: F401  (a fixture for every test here)
from tests.integration.outbound_peers import OutboundProxy, start_outbound_proxy
from tests.integration.peers import (
    Conversation,
    Pki,
    PostfixInstance,
    ScriptedRemote,
    SmtproxyProcess,
    SmtpSink,
    write_config,
)

HERE = Path(__file__).parent

# (title, read) pairs of the peers a test started; read() returns their log text.
LOG_SOURCES = pytest.StashKey[list[tuple[str, Callable[[], str]]]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for title, read in item.stash.get(LOG_SOURCES, []):
            try:
                text = read()
            except Exception as exc:  # a log that cannot be read must not hide the failure
                text = f"(could not read: {exc!r})"
            report.sections.append((title, text or "(empty)"))
    return report


def _attach_log(request: pytest.FixtureRequest, title: str, read: Callable[[], str]) -> None:
    request.node.stash.setdefault(LOG_SOURCES, []).append((title, read))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA (ECDSA) that issues server and client certificates as files."""
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def postfix_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., PostfixInstance]]:
    """``postfix_factory(**options) -> PostfixInstance``, started; options as for
    :class:`peers.PostfixInstance` (``domains``, ``hostname``, ``xclient_hosts``,
    ``proxy_protocol``, ``extra_main_cf``, ``extra_master_cf``). All are stopped at
    teardown."""
    instances: list[PostfixInstance] = []

    def make(**options: Any) -> PostfixInstance:
        instance = PostfixInstance(tmp_path / f"postfix{len(instances)}", **options)
        instances.append(instance)
        _attach_log(
            request,
            f"postfix maillog ({instance.root.name}, port {instance.port})",
            instance.log_text,
        )
        return instance.start()

    yield make
    for instance in reversed(instances):
        instance.stop()


@pytest.fixture
def postfix_backend(postfix_factory: Callable[..., PostfixInstance]) -> PostfixInstance:
    """A plaintext Postfix accepting mail for example.test into its Maildir."""
    return postfix_factory()


@pytest.fixture
def smtp_sink_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., SmtpSink]]:
    """``smtp_sink_factory(**options) -> SmtpSink``, started; options as for
    :class:`peers.SmtpSink`. All are stopped at teardown."""
    sinks: list[SmtpSink] = []

    def make(**options: Any) -> SmtpSink:
        sink = SmtpSink(tmp_path / f"smtp-sink{len(sinks)}", **options)
        sinks.append(sink)
        _attach_log(
            request, f"smtp-sink output ({sink.root.name}, port {sink.port})", sink.output_text
        )
        return sink.start()

    yield make
    for sink in reversed(sinks):
        sink.stop()


@pytest.fixture
def smtp_sink(smtp_sink_factory: Callable[..., SmtpSink]) -> SmtpSink:
    """smtp-sink with every ESMTP feature it has, storing each message in a file."""
    return smtp_sink_factory()


@pytest.fixture
def smtproxy(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., SmtproxyProcess]]:
    """``smtproxy(config, *, wait_ready=True, ready_timeout=20, env=None, args=())``:
    write ``config`` (TOML text or a dict) to a fresh directory, start
    ``python -m smtproxy run --config FILE`` there, wait for ``smtproxy ready`` and return
    the :class:`peers.SmtproxyProcess`. Stopped (SIGTERM, then SIGKILL) at teardown; its
    output is attached to the report of a failing test."""
    processes: list[SmtproxyProcess] = []

    def start(
        config: str | Mapping[str, Any],
        *,
        wait_ready: bool = True,
        ready_timeout: float = 20.0,
        env: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> SmtproxyProcess:
        directory = tmp_path / f"smtproxy{len(processes)}"
        path = write_config(directory, config)
        process = SmtproxyProcess(path, env=env, args=args)
        processes.append(process)
        _attach_log(request, f"smtproxy output ({directory.name})", process.output_text)
        process.start()
        if wait_ready:
            process.wait_ready(ready_timeout)
        return process

    yield start
    for process in reversed(processes):
        process.stop()


@pytest.fixture(scope="module")
def remote_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA for remote MX hosts (outbound tests)."""
    return Pki(tmp_path_factory.mktemp("remote-pki"))


@pytest.fixture
def start_outbound(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., OutboundProxy]]:
    """``start_outbound(routes, *, policy="", dns=None, **outbound_keys) -> OutboundProxy``:
    smtproxy with only its outbound listener, on a free port; stopped at teardown."""
    started: list[OutboundProxy] = []

    def start(routes: Mapping[str, str], **options: Any) -> OutboundProxy:
        proxy = start_outbound_proxy(tmp_path / f"outbound{len(started)}", routes, **options)
        started.append(proxy)
        _attach_log(request, f"smtproxy output (outbound{len(started) - 1})", proxy.process.output_text)
        return proxy

    yield start
    for proxy in started:
        proxy.process.stop()


@pytest.fixture
def scripted_remote() -> Iterator[Callable[..., ScriptedRemote]]:
    remotes: list[ScriptedRemote] = []

    def make(*scripts: Callable[[Conversation], None], **options) -> ScriptedRemote:
        remote = ScriptedRemote(*scripts, **options)
        remotes.append(remote)
        return remote

    yield make
    for remote in remotes:  # never leave a thread behind; each is bounded by its timeout
        remote.finished.wait(remote.timeout * 2 + 5)
        print(f"--- scripted remote {remote.port}: error {remote.error!r}, notes {remote.notes!r}")
