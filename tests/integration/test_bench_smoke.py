"""The benchmark (tests/bench, issue 8) still works end to end: every scenario against every
system, each for half a second. This checks what the bench does, never how fast anything
is: every session succeeds, every accepted message reaches the far side, resumption and
connection reuse happen. The figures themselves belong in BENCHMARKS.md, not in tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCENARIO_SYSTEMS = {
    "inbound-new": {"smtproxy", "smtproxy-baseline", "python-floor", "postfix-relay"},
    "inbound-resumed": {"smtproxy", "smtproxy-baseline", "python-floor", "postfix-relay"},
    "outbound-reuse": {"smtproxy reuse=on", "smtproxy-baseline reuse=on", "smtproxy reuse=off",
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
         "--baseline", str(REPO), "--json", str(out)],
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


@pytest.mark.timeout(450)
def test_resumption_and_reuse_happen(bench):
    results = bench[0]
    assert results["inbound-resumed"]["median"]["smtproxy"]["resumed_handshakes"] > 0
    assert results["inbound-new"]["median"]["smtproxy"]["resumed_handshakes"] == 0
    outbound = results["outbound-reuse"]["median"]
    assert outbound["smtproxy reuse=on"]["handshakes_per_message"] < 0.5
    assert outbound["smtproxy reuse=off"]["handshakes_per_message"] == 1.0


@pytest.mark.timeout(450)
def test_idle_parks_every_session_and_still_answers(bench):
    for label, parked in (("smtproxy", 200), ("postfix-relay", 20)):
        row = bench[0]["idle"]["median"][label]
        assert row["parked"] == parked and row["errors"] == {}, (label, row)
        assert row["probe_ok"] == 20 and row["probe_errors"] == {}, (label, row)


@pytest.mark.timeout(450)
def test_report_has_every_table_and_the_verdicts(bench):
    report = bench[1]
    for heading in ("### Crypto floor", "### Inbound", "### Outbound reuse", "### Bulk", "### Idle", "### Workers",
                    "### Targets of issue 8"):
        assert heading in report, heading
