"""The benchmark (tests/bench, issue 8) still works end to end: every scenario against every
system, each for half a second. This checks what the bench does, never how fast anything
is: every session succeeds, every accepted message reaches the far side, resumption and
connection reuse happen. The load generator alone is also run in each of its modes
(plaintext against smtp-sink; STARTTLS and implicit TLS with resumption against smtproxy),
and the delay relay that gives the outbound scenario its round trips is checked alone.
The figures themselves belong in BENCHMARKS.md, not in tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bench.systems import DelayRelay
from tests.integration.peers import RawSmtpClient, free_port

REPO = Path(__file__).resolve().parents[2]
SCENARIO_SYSTEMS = {
    "inbound-new": {"smtproxy", "smtproxy-baseline", "python-floor", "postfix-relay"},
    "inbound-resumed": {"smtproxy", "smtproxy-baseline", "python-floor", "postfix-relay"},
    "outbound-reuse": {"smtproxy reuse=on", "smtproxy-baseline reuse=on", "smtproxy reuse=off",
                       "smtproxy-baseline reuse=off",
                       "postfix-relay reuse=on", "postfix-relay reuse=off"},
    "bulk": {"smtproxy", "smtproxy-baseline", "postfix-relay"},
    "workers": {"smtproxy --workers 1", "smtproxy --workers 2"},
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench", "all", "--reps", "1", "--duration", "0.5", "--warmup", "0.2",
         "--bulk-size", "1m", "--idle-sessions", "200", "--anchor-idle-sessions", "20", "--python-floor",
         "--baseline", str(REPO), "--remote-rtt", "2", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text()), result.stdout


@pytest.mark.timeout(450)
@pytest.mark.parametrize("scenario", sorted(SCENARIO_SYSTEMS))
def test_every_system_completes_its_sessions(bench, scenario):
    medians = bench[0][scenario]["median"]
    assert set(medians) == SCENARIO_SYSTEMS[scenario]
    for label, row in medians.items():
        assert row["errors"] == {}, (label, row["errors"])
        assert row["messages_ok"] > 0, label
        assert row["all_delivered"], (label, row["delivered"], row["messages_ok"])
        if scenario != "bulk":  # half a second of load: CPU shows at /proc's 10 ms resolution
            assert row["sut_cpu_s"] > 0, label  # summed over the whole process tree


@pytest.mark.timeout(450)
def test_resumption_and_reuse_happen(bench):
    results = bench[0]
    assert results["inbound-resumed"]["median"]["smtproxy"]["resumed_handshakes"] > 0
    assert results["inbound-new"]["median"]["smtproxy"]["resumed_handshakes"] == 0
    outbound = results["outbound-reuse"]["median"]
    assert outbound["smtproxy reuse=on"]["handshakes_per_message"] < 0.5
    assert outbound["smtproxy reuse=off"]["handshakes_per_message"] == 1.0
    assert results["outbound-reuse"]["remote_rtt_ms"] == 2  # through tests.bench.delay_relay


@pytest.mark.timeout(450)
def test_idle_parks_every_session_and_still_answers(bench):
    for label, parked in (("smtproxy", 200), ("postfix-relay", 20)):
        row = bench[0]["idle"]["median"][label]
        assert row["parked"] == parked and row["errors"] == {}, (label, row)
        assert row["probe_ok"] == 20 and row["probe_errors"] == {}, (label, row)


@pytest.mark.timeout(450)
def test_report_has_every_table_and_the_verdicts(bench):
    floor = bench[0]["floor"]
    assert floor["x25519_ops_per_s"] > 0 and floor["ecdsa_p256_sign_per_s"] > 0  # openssl speed ran
    report = bench[1]
    for heading in ("### Crypto floor", "### Inbound", "### Outbound reuse", "2 ms round trip to the remote, emulated",
                    "### Bulk", "### Idle", "### Workers", "### Targets of issue 8"):
        assert heading in report, heading


def run_load(port: int, *args: str) -> dict:
    """`python -m tests.bench load` (the load generator alone) -> its JSON summary."""
    result = subprocess.run([sys.executable, "-m", "tests.bench", "load", "--port", str(port), *args],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_load_generator_plaintext_against_smtp_sink(smtp_sink):
    summary = run_load(smtp_sink.port, "--mode", "plain", "-c", "3", "-m", "2", "--sessions", "12")
    assert (summary["sessions_ok"], summary["messages_ok"], summary["errors"]) == (12, 24, {})
    assert summary["bound"] == "sessions"
    assert len(smtp_sink.message_files()) == 24


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_load_generator_tls_with_resumption_against_smtproxy(mode, pki, smtp_sink, smtproxy):
    chain = pki.server_cert("mx.bench.test")
    port, tls_port = free_port(), free_port()
    smtproxy({
        "inbound": {
            "listen": [f"127.0.0.1:{port}"], "implicit_tls_listen": [f"127.0.0.1:{tls_port}"],
            "backend": f"127.0.0.1:{smtp_sink.port}", "hostname": "mx.bench.test",
            "certificates": [{"cert_file": str(chain.cert_file), "key_file": str(chain.key_file)}],
        },
        "outbound": {"listen": []}, "metrics": {"listen": ""}, "tlsrpt": {"socket": ""},
    })
    summary = run_load(tls_port if mode == "implicit" else port, "--mode", mode, "-c", "1", "--sessions", "5",
                       "--resume", "-s", "10k")
    assert (summary["sessions_ok"], summary["messages_ok"], summary["errors"]) == (5, 5, {})
    # one sender: its first session is a full handshake, each next one resumes the last
    assert (summary["full_handshakes"], summary["resumed_handshakes"]) == (1, 4)
    assert len(summary["latency_ms"]) == 3
    messages = smtp_sink.messages()
    assert len(messages) == 5 and all(len(message) >= 10 * 1024 for message in messages)


def test_delay_relay_adds_its_round_trips_and_passes_every_byte(smtp_sink):
    """The greeting comes two round trips after connect() (TCP's handshake, then the
    server's first words), each reply one round trip after its command, and the message
    arrives whole. Only lower bounds: a slow machine can add time, never take it away."""
    rtt = 0.2
    relay = DelayRelay(smtp_sink.port, rtt * 1000, None).start()
    try:
        started = time.monotonic()
        with RawSmtpClient(relay.port) as client:
            assert client.read_reply().code == 220
            greeted = time.monotonic()
            assert client.command("EHLO bench.test").code == 250
            answered = time.monotonic()
            assert client.command("MAIL FROM:<a@bench.test>").code == 250
            assert client.command("RCPT TO:<b@sink.test>").code == 250
            assert client.command("DATA").code == 354
            client.send(b"Subject: through the relay\r\n\r\n" + b"x" * 100_000 + b"\r\n.\r\n")
            assert client.read_reply().code == 250
        assert greeted - started >= 2 * rtt
        assert answered - greeted >= rtt
        [message] = smtp_sink.messages()
        assert b"through the relay" in message and message.count(b"x") >= 100_000
    finally:
        relay.stop()
