"""`smtproxy policy --config F NEXTHOP` and `smtproxy policy import-qmail FILE`: output,
one-line errors with exit status 2, and no uvloop or TLS layer on the way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smtproxy.cli import main

FP = "AB:" * 31 + "CD"


def configure(tmp_path: Path, policy_text: str | None, extra: str = "") -> Path:
    """A config without listeners that need certificates, with a policy file if given."""
    lines = ["[inbound]", "listen = []", "implicit_tls_listen = []", "[outbound]", 'default_level = "encrypt"']
    if policy_text is not None:
        (tmp_path / "tls_policy").write_text(policy_text)
        lines.append('policy_file = "tls_policy"')
    config = tmp_path / "smtproxy.toml"
    config.write_text("\n".join(lines) + "\n" + extra)
    return config


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_policy_from_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = configure(tmp_path, "# partners\n.example.com  secure protocols=>=TLSv1.3 exclude=3DES\n")
    assert run(capsys, "policy", "--config", str(config), "mx.Example.com") == (0, f"""\
nexthop: mx.Example.com
level: secure
match: nexthop:dot-nexthop (the default for secure)
protocols: TLSv1.3 to TLSv1.3 (protocols=>=TLSv1.3)
ciphers: medium ([outbound.tls] ciphers is empty)
exclude: 3DES
servername: hostname
connection_reuse: yes
ca_file: the system trust store ([outbound] ca_file is empty)
verify_depth: the TLS library default
source: policy_file {tmp_path}/tls_policy line 2 (.example.com)
""", "")


def test_policy_for_a_bracketed_nexthop_with_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ca.pem").write_text("CA\n")
    config = configure(tmp_path, f"[mx.example.net]:25 fingerprint match={FP} ciphers=high "
                                 "servername=nexthop connection_reuse=no\n"
                                 "partner.example verify match=nexthop ca_file=ca.pem verify_depth=2\n")
    status, out, err = run(capsys, "policy", "--config", str(config), "[mx.example.net]:25")
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        "nexthop: [mx.example.net]:25",
        "level: fingerprint",
        f"match: {FP}",
        "protocols: TLSv1.2 to TLSv1.3 (from [outbound.tls])",
        "ciphers: high",
        "exclude: (none)",
        "servername: nexthop",
        "connection_reuse: no",
        "ca_file: the system trust store ([outbound] ca_file is empty)",
        "verify_depth: the TLS library default",
        f"source: policy_file {tmp_path}/tls_policy line 1 ([mx.example.net]:25)",
    ]
    status, out, _ = run(capsys, "policy", "--config", str(config), "partner.example")
    assert (status, out.splitlines()[2], out.splitlines()[8:10]) == (
        0, "match: nexthop", [f"ca_file: {tmp_path}/ca.pem", "verify_depth: 2"])


def test_policy_falls_back_to_default_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = configure(tmp_path, None, '[outbound.tls]\nciphers = "HIGH"\nmin_protocol = "TLSv1.3"\n')
    status, out, err = run(capsys, "policy", "--config", str(config), "[192.0.2.1]:2525")
    assert (status, err) == (0, "")
    assert out.splitlines()[1:5] == [
        "level: encrypt",
        "match: (none: this level checks no name)",
        "protocols: TLSv1.3 to TLSv1.3 (from [outbound.tls])",
        'ciphers: "HIGH" (from [outbound.tls] ciphers)',
    ]
    assert out.splitlines()[-1] == "source: default_level"


def test_not_a_nexthop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = configure(tmp_path, None)
    assert run(capsys, "policy", "--config", str(config), ".example.com") == (
        2, "", 'smtproxy: ".example.com" is not a nexthop; allowed: example.com, example.com:2525, '
               "[mx.example.net], [mx.example.net]:25, [192.0.2.1], [2001:db8::1]:25\n")


def test_broken_policy_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = configure(tmp_path, "example.com may\nexample.org encrypt match=nexthop\n")
    assert run(capsys, "policy", "--config", str(config), "example.com") == (
        2, "", f"smtproxy: {tmp_path}/tls_policy line 2: match=nexthop: not valid at level encrypt; "
               "allowed: ciphers=, protocols=, exclude=, servername=, connection_reuse=\n")


def test_broken_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = configure(tmp_path, None)
    config.write_text(config.read_text().replace('"encrypt"', '"strict"'))
    status, out, err = run(capsys, "policy", "--config", str(config), "example.com")
    assert (status, out) == (2, "")
    assert err.startswith(f"smtproxy: {config}: outbound.default_level") and err.count("\n") == 1


def test_import_qmail_prints_a_postfix_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "tlsdestinations"
    source.write_text("*:\n!nossl.example.com:\n=mx.partner.example:\n")
    status, out, err = run(capsys, "policy", "import-qmail", str(source))
    assert (status, err) == (0, "")
    assert out == (
        "# smtproxy policy_file (Postfix smtp_tls_policy_maps syntax), from s/qmail tlsdestinations\n"
        "nossl.example.com   none\n"
        "mx.partner.example  secure match=nexthop\n"
        f'# other destinations (tlsdestinations {source} line 1 (*)): [outbound] default_level = "may"\n')


def test_import_qmail_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "tlsdestinations"
    source.write_text("remote.com:/etc/ssl/certdir/||3;465\n")
    status, out, err = run(capsys, "policy", "import-qmail", str(source))
    assert (status, out) == (2, "")
    assert err == (f"smtproxy: {source} line 1: remote.com:/etc/ssl/certdir/||3;465: port 465 means SMTPS "
                   "(TLS from the first byte); allowed: a STARTTLS port (smtproxy sends with STARTTLS only)\n")


@pytest.mark.parametrize("argv", [
    ["policy", "example.com"],
    ["policy", "--config", "x.toml", "a.example", "b.example"],
    ["policy", "import-qmail"],
    ["policy", "--config", "x.toml", "import-qmail", "tlsdestinations"],
])
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, *argv) == (2, "", "smtproxy policy: usage: smtproxy policy --config FILE NEXTHOP "
                                         "(example.com, [mx.example.net]:25) | import-qmail TLSDESTINATIONS\n")


def test_policy_needs_neither_uvloop_nor_the_tls_layer(tmp_path: Path) -> None:
    config = configure(tmp_path, ".example.com encrypt\n")
    source = tmp_path / "tlsdestinations"
    source.write_text("*:\n")
    script = (
        "import sys\n"
        "from smtproxy.cli import main\n"
        f"assert main(['policy', '--config', {str(config)!r}, 'mx.example.com']) == 0\n"
        f"assert main(['policy', 'import-qmail', {str(source)!r}]) == 0\n"
        "loaded = [name for name in sys.modules if name == 'uvloop' or name.startswith('smtproxy.tls')\n"
        "          or name.startswith(('smtproxy.app', 'smtproxy.outbound', 'smtproxy.inbound'))]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert result.returncode == 0, result.stderr
