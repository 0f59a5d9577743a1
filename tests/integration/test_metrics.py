"""Issue 5 acceptance: a real Prometheus scrapes a running smtproxy, promtool checks our
exposition and alert rules, and the Grafana dashboard's PromQL parses and names only
metrics smtproxy exports.

One smtproxy runs inbound (a real smtp-sink behind it) and outbound (a real Postfix remote
MX with STARTTLS, pinned by fingerprint so the handshake is Verified); known traffic goes
through it once per module, and a real Prometheus scrapes it every second.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.peers import (
    Pki,
    PostfixInstance,
    SmtproxyProcess,
    SmtpSink,
    free_port,
    http_get,
    openssl_s_client,
    postfix_tls_server_params,
    run_swaks,
    stop_process,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "grafana" / "dashboards" / "smtproxy.json"
ALERT_RULES = REPO / "deploy" / "prometheus" / "smtproxy-alerts.yml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "smtproxy-alerts.test.yml"
SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
REMOTE_DOMAIN = "remote.test"


class Prometheus:
    """Debian's `prometheus` on 127.0.0.1, scraping one target and evaluating our alert rules
    every second."""

    def __init__(self, root: Path, target: str) -> None:
        self.root = root
        self.port = free_port()
        self.log_file = root / "prometheus.log"
        self.config = root / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: ['{ALERT_RULES}']\n"
            f"scrape_configs:\n  - job_name: smtproxy\n    static_configs:\n      - targets: ['{target}']\n")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                ["prometheus", f"--config.file={self.config}", f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                start_new_session=True)
        wait_until(self._ready, 30, "Prometheus /-/ready", interval=0.1)
        return self

    def _ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log_text()
        try:
            return http_get(f"http://127.0.0.1:{self.port}/-/ready", timeout=1)[0] == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        return json.loads(http_get(url)[1])

    def value(self, expr: str) -> float | None:
        """The single value of an instant query (None: no series)."""
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        result = answer["data"]["result"]
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self) -> None:
        stop_process(self.process, 20)


class Stack:
    def __init__(self, proxy: SmtproxyProcess, inbound_port: int, outbound_port: int, metrics_port: int,
                 prometheus: Prometheus) -> None:
        self.proxy = proxy
        self.inbound_port = inbound_port
        self.outbound_port = outbound_port
        self.metrics_port = metrics_port
        self.prometheus = prometheus

    def scrape(self, accept: str = "") -> str:
        status, text = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics", headers={"Accept": accept})
        assert status == 200, text
        return text


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pki: Pki) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("metrics")
    remote_pki = Pki(root / "remote-pki")
    remote_chain = remote_pki.server_cert("mx.remote.test")
    inbound_chain = pki.server_cert("mx.example.test")
    inbound_port, outbound_port, metrics_port = free_port(), free_port(), free_port()
    with SmtpSink(root / "sink") as sink, \
            PostfixInstance(root / "remote", domains=[REMOTE_DOMAIN], hostname="mx.remote.test",
                            extra_main_cf=postfix_tls_server_params(remote_chain)) as remote:
        nexthop = f"[127.0.0.1]:{remote.port}"
        (root / "routes").write_text(f"{REMOTE_DOMAIN} {nexthop}\n")
        (root / "tls_policy").write_text(f"{nexthop} fingerprint match={Pki.fingerprint(remote_chain.cert_file)}\n")
        config = {
            "inbound": {
                "listen": [f"127.0.0.1:{inbound_port}"],
                "implicit_tls_listen": [],
                "backend": f"127.0.0.1:{sink.port}",
                "hostname": "mx.example.test",
                "certificates": [{"cert_file": str(inbound_chain.cert_file), "key_file": str(inbound_chain.key_file)}],
            },
            "outbound": {
                "listen": [f"127.0.0.1:{outbound_port}"],
                "hostname": "out.example.test",
                "routes_file": str(root / "routes"),
                "policy_file": str(root / "tls_policy"),
                "connection_cache_time_limit": 60,
            },
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
            "tlsrpt": {"socket": ""},
            "log": {"format": "json", "level": "info"},
        }
        proxy = SmtproxyProcess(write_config(root / "proxy", config)).start()
        prometheus = Prometheus(root, f"127.0.0.1:{metrics_port}")
        try:
            ready = proxy.wait_ready()
            assert f"127.0.0.1:{metrics_port} (metrics)" in ready["listeners"]
            prometheus.start()
            yield Stack(proxy, inbound_port, outbound_port, metrics_port, prometheus)
        finally:
            prometheus.stop()
            proxy.stop()
            print(f"--- smtproxy output ---\n{proxy.output_text()}\n--- prometheus ---\n{prometheus.log_text()}")


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> Stack:
    """Inbound: two X25519 handshakes (swaks' default group, one message; s_client) and one
    P-256; outbound: two messages over one Verified connection (the second reuses it)."""
    swaks = run_swaks("--server", f"127.0.0.1:{stack.inbound_port}", "--tls", "--to", "user@example.test",
                      "--from", "sender@example.test")
    assert swaks.returncode == 0, swaks.stdout
    for group in ("X25519", "P-256"):
        result = openssl_s_client(stack.inbound_port, args=["-groups", group], input=b"EHLO client.test\r\nQUIT\r\n")
        assert "221" in result.stdout, result.stdout + result.stderr
    for _ in range(2):
        sent = run_swaks("--server", f"127.0.0.1:{stack.outbound_port}", "--to", f"user@{REMOTE_DOMAIN}",
                         "--from", "sender@example.test")
        assert sent.returncode == 0, sent.stdout
    return stack


# ----------------------------------------------------------------------------- Prometheus


EXPECTED = {
    'sum(smtproxy_tls_handshakes_total{direction="inbound",key_exchange="X25519"})': 2,
    'sum(smtproxy_tls_handshakes_total{direction="inbound",key_exchange="P-256"})': 1,
    'sum(smtproxy_tls_handshakes_total{direction="inbound",forward_secrecy="true",protocol="TLSv1.3",'
    'peer_trust="anonymous",resumed="false"})': 3,
    'sum(smtproxy_tls_handshakes_total{direction="outbound",peer_trust="verified",forward_secrecy="true"})': 1,
    'sum(smtproxy_tls_handshakes_total{direction="outbound"})': 1,  # the reused connection is no handshake
    'sum(smtproxy_tls_handshakes_total{forward_secrecy="false"}) or vector(0)': 0,
    'sum(smtproxy_tls_handshake_failures_total) or vector(0)': 0,
    'sum(smtproxy_tls_handshake_seconds_count)': 4,
    'sum(smtproxy_connection_reuse_total{outcome="new"})': 1,
    'sum(smtproxy_connection_reuse_total{outcome="reused"})': 1,
    'sum(smtproxy_messages_total{direction="inbound",result="accepted"})': 1,
    'sum(smtproxy_messages_total{direction="outbound",result="accepted"})': 2,
    'sum(smtproxy_message_relay_seconds_count{direction="outbound"})': 2,
    'sum(smtproxy_connections_total{direction="inbound",tls="true"})': 3,
    'sum(smtproxy_connections_total{direction="outbound",tls="false"})': 2,
    'sum(smtproxy_policy_decisions_total{level="fingerprint",source="policy_file",outcome="tls"})': 2,
    'sum(smtproxy_connections_active)': 0,
    'smtproxy_connections_cached': 1,
    'smtproxy_backend_up': 1,
}


def test_prometheus_scrapes_exactly_the_traffic_sent(traffic: Stack):
    prometheus = traffic.prometheus

    def observed() -> dict[str, float | None]:
        return {expr: prometheus.value(expr) for expr in EXPECTED}

    wait_until(lambda: observed() == EXPECTED, 30, "Prometheus to hold the expected counts", interval=0.25)
    assert prometheus.value('up{job="smtproxy"}') == 1


def test_promtool_check_metrics_finds_no_problem(traffic: Stack):
    exposition = traffic.scrape()
    assert "smtproxy_tls_handshakes_total{" in exposition
    result = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result


def test_openmetrics_is_served_when_asked_for(traffic: Stack):
    exposition = traffic.scrape("application/openmetrics-text; version=1.0.0")
    assert exposition.endswith("# EOF\n")
    assert "# TYPE smtproxy_tls_handshakes counter" in exposition


def test_the_alert_rules_fire_when_they_should_and_only_then():
    """deploy/prometheus/smtproxy-alerts.test.yml: every handshake of a direction failing
    fires the ratio alert, scanners do not, a backend down and a scrape failing do."""
    result = subprocess.run(["promtool", "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_promtool_checks_alert_rules_and_scrape_config():
    rules = subprocess.run(["promtool", "check", "rules", str(ALERT_RULES)], capture_output=True, text=True,
                           timeout=30)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 6 rules found" in rules.stdout
    config = subprocess.run(["promtool", "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True,
                            timeout=30)
    assert config.returncode == 0, config.stdout + config.stderr


# ----------------------------------------------------------------------------- dashboard


GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "5m"}
PROMETHEUS_OWN = {"up"}  # what Prometheus records about each scrape itself
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", ())]


def loaded_rules(prometheus: Prometheus) -> list[dict]:
    return [rule for group in prometheus.api("rules")["data"]["groups"] for rule in group["rules"]]


def selected_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label
    matchers, ranges, grouping clauses, function calls and keywords are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\boffset\s+\w+", " ", expr)
    words = re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*\b(?!\s*\()", expr)
    return {word for word in words if word.lower() not in PROMQL_WORDS}


def exported_metrics(exposition: str) -> set[str]:
    """Every series name smtproxy's families can produce (also those without a sample yet)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {family.name + suffix for family in text_string_to_metric_families(exposition)
            for suffix in suffixes.get(family.type, ("",))}


def test_selected_metrics_extraction():
    assert selected_metrics('histogram_quantile(0.99, sum by (direction, le) (rate(a_bucket{x="y z"}[5m])))'
                            ' / on (direction) b_total offset 1d > bool 0 or vector(0)') == {"a_bucket", "b_total"}


def test_dashboard_has_a_datasource_variable_used_by_every_panel():
    dashboard = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"] == ["datasource"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]


def test_every_dashboard_and_alert_expression_parses_and_names_only_exported_metrics(traffic: Stack):
    exported = exported_metrics(traffic.scrape())
    expressions = dashboard_targets() + [(rule["name"], rule["query"]) for rule in loaded_rules(traffic.prometheus)]
    assert len(expressions) >= 25
    used = set()
    for title, expr in expressions:
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        answer = traffic.prometheus.api("query", query=expr)
        assert answer["status"] == "success", (title, expr, answer)
        names = selected_metrics(expr)
        assert names and names <= exported | PROMETHEUS_OWN, (title, names - exported)
        used |= names
    # the forward-secrecy question is on the dashboard, from the DESIGN.md metrics
    assert {"smtproxy_tls_handshakes_total", "smtproxy_tls_handshake_failures_total",
            "smtproxy_tlsrpt_events_total", "smtproxy_tlsrpt_events_dropped_total",
            "smtproxy_connection_reuse_total", "smtproxy_message_relay_seconds_bucket",
            "smtproxy_connections_active"} <= used


def test_prometheus_evaluates_the_alert_rules_and_none_fires_on_healthy_traffic(traffic: Stack):
    prometheus = traffic.prometheus

    def evaluated() -> list[dict] | None:
        rules = loaded_rules(prometheus)
        return rules if rules and all(rule["health"] == "ok" for rule in rules) else None

    rules = wait_until(evaluated, 30, "every alert rule evaluated without error", interval=0.25)
    assert {rule["name"] for rule in rules} == {
        "SmtproxyNonForwardSecretHandshakes", "SmtproxyHandshakeFailureRatioHigh", "SmtproxyTlsrptEventsDropped",
        "SmtproxyConnectionReuseCollapsed", "SmtproxyBackendUnready", "SmtproxyScrapeFailing"}
    assert all(rule["state"] == "inactive" for rule in rules), rules


# ----------------------------------------------------------------------------- health


def inbound_with_metrics(pki: Pki, backend_port: int, metrics_port: int, **inbound) -> dict:
    chain = pki.server_cert("mx.example.test")
    return {
        "inbound": {"listen": [f"127.0.0.1:{free_port()}"], "implicit_tls_listen": [],
                    "backend": f"127.0.0.1:{backend_port}", **inbound,
                    "certificates": [{"cert_file": str(chain.cert_file), "key_file": str(chain.key_file)}]},
        "outbound": {"listen": []},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "tlsrpt": {"socket": ""},
    }


def test_readyz_follows_the_backend_and_healthz_the_process(tmp_path, pki: Pki):
    metrics_port = free_port()
    with SmtpSink(tmp_path / "sink") as sink:
        config = inbound_with_metrics(pki, sink.port, metrics_port)
        with SmtproxyProcess(write_config(tmp_path / "proxy", config)) as proxy:
            proxy.wait_ready()
            base = f"http://127.0.0.1:{metrics_port}"
            assert http_get(f"{base}/healthz") == (200, "ok\n")
            assert http_get(f"{base}/readyz") == (200, "ready\n")
            sink.stop()
            status = wait_until(lambda: http_get(f"{base}/readyz")[0] == 503 or None, 10,
                                "/readyz to report the stopped backend", interval=0.2)
            assert status
            assert http_get(f"{base}/readyz")[1] == f"not ready: backend 127.0.0.1:{sink.port} is not reachable\n"
            assert "smtproxy_backend_up 0.0" in http_get(f"{base}/metrics")[1]
            assert http_get(f"{base}/healthz") == (200, "ok\n")


def test_a_scrape_does_not_wait_for_a_backend_that_hangs(tmp_path, pki: Pki):
    """A backend whose accept queue is full never answers the probe's connect. /metrics
    answers at once with smtproxy_backend_up 0 (a scrape waiting backend_connect_timeout
    would time out in Prometheus, and the series would vanish instead of reading 0)."""
    metrics_port = free_port()
    with socket.create_server(("127.0.0.1", 0), backlog=0) as hung, \
            socket.create_connection(hung.getsockname(), timeout=5):  # fills the queue: later SYNs are dropped
        config = inbound_with_metrics(pki, hung.getsockname()[1], metrics_port, backend_connect_timeout=8)
        with SmtproxyProcess(write_config(tmp_path / "proxy", config)) as proxy:
            proxy.wait_ready()
            base = f"http://127.0.0.1:{metrics_port}"
            for _ in range(3):
                began = time.monotonic()
                status, text = http_get(f"{base}/metrics", timeout=5)
                assert status == 200 and time.monotonic() - began < 2, time.monotonic() - began
                assert re.search(r"^smtproxy_backend_up 0\.0$", text, re.M), text
