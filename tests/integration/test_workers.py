"""`smtproxy run --workers N`: workers share the listeners, resume each other's TLS
sessions (shared ticket keys), are summed in one scrape, and are restarted when they die.

Real peers: a plaintext Postfix as the legacy MTA, `openssl s_client -sess_out/-sess_in`
as the resuming client, the supervisor's own /metrics endpoint.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import pytest

from tests.integration.peers import (
    LOOPBACK,
    PostfixInstance,
    SmtproxyProcess,
    free_port,
    http_get,
    s_client_session,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration

HOSTNAME = "mx.example.test"
RECONNECTS = 12


def workers_config(tmp_path, legacy: PostfixInstance, pki, **inbound) -> tuple[Path, int, int]:
    cert = pki.server_cert(HOSTNAME)
    port, metrics_port = free_port(), free_port()
    config = {
        "inbound": {"listen": [f"{LOOPBACK}:{port}"], "implicit_tls_listen": [],
                    "backend": f"{LOOPBACK}:{legacy.port}", "hostname": HOSTNAME,
                    "certificates": [{"cert_file": str(cert.cert_file), "key_file": str(cert.key_file)}],
                    **inbound},
        "outbound": {"listen": []},
        "metrics": {"listen": f"{LOOPBACK}:{metrics_port}"},
        "tlsrpt": {"socket": ""},
        "log": {"format": "json", "level": "info"},
    }
    return write_config(tmp_path / "proxy", config), port, metrics_port


@pytest.fixture
def workers(tmp_path, postfix_factory, pki):
    legacy: PostfixInstance = postfix_factory()
    config_path, port, metrics_port = workers_config(tmp_path, legacy, pki)
    process = SmtproxyProcess(config_path, args=("--workers", "2")).start()
    try:
        process.wait_ready()
        yield process, port, metrics_port, legacy
    finally:
        process.stop()
        print(f"--- smtproxy output ---\n{process.output_text()}")


def s_client(port: int, session_file, *, resume: bool) -> str:
    return s_client_session(port, session_file, resume=resume, server_name=HOSTNAME)


def handshakes(process: SmtproxyProcess, count: int) -> list[dict]:
    def enough() -> list[dict] | None:
        found = [r for r in process.logs() if "TLS connection established from" in r["event"]]
        return found if len(found) >= count else None

    return wait_until(enough, 20, f"{count} handshake log lines")


def scrape(metrics_port: int) -> str:
    status, text = http_get(f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=10)
    assert status == 200, text
    return text


def test_sessions_resume_on_whichever_worker_and_one_scrape_sums_them(workers, tmp_path):
    process, port, metrics_port, _ = workers
    ready = process.wait_for_log("smtproxy ready")
    assert len(ready["pids"]) == 2
    session = tmp_path / "session.pem"
    assert "Reused" not in s_client(port, session, resume=False)
    outputs = [s_client(port, session, resume=True) for _ in range(RECONNECTS)]
    assert all("Reused, TLSv1.3" in output for output in outputs), [o[-400:] for o in outputs]

    facts = handshakes(process, 1 + RECONNECTS)
    assert [r["resumed"] for r in facts] == [False] + [True] * RECONNECTS
    # both workers served resumed handshakes: sessions really crossed worker processes
    assert {r["worker_pid"] for r in facts[1:]} == set(ready["pids"]), facts

    def summed() -> float | None:
        text = scrape(metrics_port)
        values = re.findall(r'^smtproxy_tls_handshakes_total\{[^}]*direction="inbound"[^}]*\} (\S+)$', text, re.M)
        total = sum(float(v) for v in values)
        return total if total >= 1 + RECONNECTS else None

    assert wait_until(summed, 10, "the supervisor's scrape to count every handshake") == 1 + RECONNECTS


def test_rotated_ticket_keys_reach_every_worker(tmp_path, postfix_factory, pki):
    """The supervisor rotates the keys every half session lifetime (5 s here) and sends each
    new one to the workers: a session made after a rotation resumes on both workers."""
    config_path, port, _ = workers_config(tmp_path, postfix_factory(), pki, tls={"session_timeout": 10})
    process = SmtproxyProcess(config_path, args=("--workers", "2")).start()
    try:
        ready = process.wait_ready()
        wait_until(lambda: {r.get("worker_pid") for r in process.logs()
                            if r["event"] == "session-ticket keys rotated"} >= set(ready["pids"]) or None,
                   20, "both workers to rotate their keys")
        session = tmp_path / "session.pem"
        assert "Reused" not in s_client(port, session, resume=False)
        outputs = [s_client(port, session, resume=True) for _ in range(RECONNECTS)]
        assert all("Reused, TLSv1.3" in output for output in outputs), [o[-400:] for o in outputs]
        facts = handshakes(process, 1 + RECONNECTS)
        assert {r["worker_pid"] for r in facts[1:]} == set(ready["pids"]), facts
    finally:
        process.stop()
        print(f"--- smtproxy output ---\n{process.output_text()}")


def test_a_dead_worker_is_restarted_and_the_proxy_keeps_serving(workers, tmp_path):
    process, port, _, _ = workers
    ready = process.wait_for_log("smtproxy ready")
    victim = ready["pids"][0]
    os.kill(victim, signal.SIGKILL)
    process.wait_for_log(lambda r: r["event"] == "worker exited" and r["pid"] == victim)
    process.wait_for_log(lambda r: r["event"] == "worker ready" and r.get("worker_pid") not in ready["pids"])
    for attempt in range(4):
        assert "Verify return code" in s_client(port, tmp_path / f"s{attempt}.pem", resume=False)
    assert process.returncode is None


def test_the_supervisor_exports_backend_up_from_its_readiness_probe(workers):
    """The dashboard's "Backend reachable" panel and the SmtproxyBackendUnready alert read
    `smtproxy_backend_up`; with workers it comes from the supervisor, which probes."""
    _, _, metrics_port, legacy = workers
    assert http_get(f"http://{LOOPBACK}:{metrics_port}/readyz")[0] == 200
    assert re.search(r"^smtproxy_backend_up 1\.0$", scrape(metrics_port), re.M)
    legacy.stop()
    wait_until(lambda: http_get(f"http://{LOOPBACK}:{metrics_port}/readyz")[0] == 503, 10, "/readyz to answer 503 without the backend")
    assert re.search(r"^smtproxy_backend_up 0\.0$", scrape(metrics_port), re.M)


def test_a_sighup_while_workers_start_reaches_them_once_they_are_ready(tmp_path, postfix_factory, pki):
    """A worker installs its SIGHUP handler only once it runs; the default action would
    kill it. The supervisor holds the reload for workers still starting (here: sent as
    soon as both worker processes exist, which is well before they are ready)."""
    config_path, port, _ = workers_config(tmp_path, postfix_factory(), pki)
    process = SmtproxyProcess(config_path, args=("--workers", "2")).start()
    try:
        children = Path(f"/proc/{process.process.pid}/task/{process.process.pid}/children")
        wait_until(lambda: len(children.read_text().split()) == 2, 20, "two worker processes")
        process.send_signal(signal.SIGHUP)
        ready = process.wait_ready()
        assert len(ready["pids"]) == 2
        reloaded = wait_until(lambda: {r.get("worker_pid") for r in process.logs()
                                       if r["event"] == "configuration reloaded"} >= set(ready["pids"]) or None,
                              20, "both workers to reload")
        assert reloaded
        assert "Verify return code" in s_client(port, tmp_path / "after.pem", resume=False)
        assert process.returncode is None
    finally:
        process.stop()
        print(f"--- smtproxy output ---\n{process.output_text()}")


def test_after_a_reload_the_supervisor_probes_the_new_backend(workers):
    """The supervisor answers /readyz for the workers: a reload that moves the backend
    moves its probe too."""
    process, _, metrics_port, legacy = workers
    assert http_get(f"http://{LOOPBACK}:{metrics_port}/readyz")[0] == 200
    gone = free_port()
    process.config_path.write_text(process.config_path.read_text().replace(f":{legacy.port}", f":{gone}"))
    ready = process.wait_for_log("smtproxy ready")
    process.send_signal(signal.SIGHUP)
    wait_until(lambda: {r.get("worker_pid") for r in process.logs()
                        if r["event"] == "configuration reloaded"} >= set(ready["pids"]) or None,
               20, "both workers to reload")
    wait_until(lambda: http_get(f"http://{LOOPBACK}:{metrics_port}/readyz")[0] == 503, 10, "/readyz to follow the new backend")


def test_a_worker_that_cannot_start_is_restarted_ever_more_slowly(workers, tmp_path):
    """The config file on disk is broken and a worker dies: each restart fails at once, and
    the supervisor waits 1, 2, 4 s before the next (no busy loop); once the file is fixed,
    the next restart brings the worker back."""
    process, port, _, _ = workers
    ready = process.wait_for_log("smtproxy ready")
    good = process.config_path.read_text()
    process.config_path.write_text(good + "\n[bogus]\nkey = 1\n")
    os.kill(ready["pids"][0], signal.SIGKILL)

    def restarts(count: int) -> list[float] | None:
        found = [r["after"] for r in process.logs() if r["event"] == "restarting worker"]
        return found if len(found) >= count else None

    assert wait_until(lambda: restarts(3), 20, "three restarts")[:3] == [1.0, 2.0, 4.0]
    process.config_path.write_text(good)
    process.wait_for_log(lambda r: r["event"] == "worker ready" and r.get("worker_pid") not in ready["pids"],
                         timeout=30)
    assert "Verify return code" in s_client(port, tmp_path / "after.pem", resume=False)


def test_a_metrics_port_in_use_is_one_line_and_exit_1_with_workers_too(tmp_path, postfix_factory, pki):
    config_path, _, metrics_port = workers_config(tmp_path, postfix_factory(), pki)
    with socket.create_server(("127.0.0.1", metrics_port)):
        process = SmtproxyProcess(config_path, args=("--workers", "2")).start()
        try:
            assert process.process.wait(60) == 1
        finally:
            process.stop()
    errors = [r for r in process.logs() if r.get("level") == "error"]
    assert any(r["event"].startswith("metrics.listen: cannot bind: ") for r in errors), process.output_text()
    assert "Traceback" not in process.output_text()
