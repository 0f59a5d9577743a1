"""The README's two commands: what a newcomer runs on a fresh machine.

The test command is what runs this suite (`.ci/run` calls it), so here: the README names
exactly the two scripts, `.ci/run` calls the test one, and the run command really installs
and starts smtproxy with the bundled example configuration, generating its self-signed
certificate on first start (on free loopback ports instead of 25/465, in a copy of
examples/ so the checkout stays clean).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from tests.integration.peers import RawSmtpClient, free_port, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def two_commands() -> list[str]:
    section = REPO.joinpath("README.md").read_text().split("## The two commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readme_names_exactly_two_commands_and_ci_runs_the_test_one():
    assert two_commands() == ["./scripts/run-example", "./scripts/test"]
    ci = REPO.joinpath(".ci/run").read_text()
    assert re.search(r"^exec scripts/test\b", ci, re.M), ci


def test_the_run_command_starts_the_bundled_example_and_makes_its_certificate(tmp_path):
    examples = tmp_path / "examples"
    shutil.copytree(REPO / "examples", examples, ignore=shutil.ignore_patterns("certs"))
    ports = {25: free_port(), 465: free_port(), 10025: free_port(), 9464: free_port()}
    config = examples / "smtproxy.toml"
    text = config.read_text()
    for old, new in ports.items():
        text, count = re.subn(rf':{old}"', f':{new}"', text)
        assert count == 1, f"port {old} appears {count} times in examples/smtproxy.toml"
    config.write_text(text.replace('"0.0.0.0:', '"127.0.0.1:'))

    process = subprocess.Popen([str(REPO / "scripts/run-example"), "--config", str(config)], cwd=REPO,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(
        raw.decode(errors="replace") for raw in iter(process.stdout.readline, b"")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("smtproxy ready" in line for line in lines) or process.poll() is not None,
                   120, "run-example to start smtproxy")
        assert process.poll() is None, "".join(lines)
        assert any("generated a self-signed certificate" in line for line in lines), "".join(lines)
        assert (examples / "certs/ecdsa.pem").exists() and (examples / "certs/ecdsa.key").exists()
        with RawSmtpClient(ports[25]) as client:
            # the example's backend (127.0.0.1:2525) is not running here: 421, as documented
            reply = client.read_reply()
            assert reply.code in (220, 421), reply
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
        reader.join(10)
    assert code == 0, "".join(lines)
    assert any("smtproxy stopped" in line for line in lines)
