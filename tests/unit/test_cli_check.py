"""`smtproxy check` also reads the outbound tables: a typo there must not wait for the first mail."""

from __future__ import annotations

import pytest

from smtproxy.cli import main

CONFIG = """\
[inbound]
listen = []
implicit_tls_listen = []
[outbound]
policy_file = "tls_policy"
routes_file = "routes"
"""


@pytest.mark.parametrize(("policy", "routes", "message"), [
    ("example.com verfy\n", "", 'tls_policy line 1: unknown security level "verfy"'),
    ("", "example.com error:nope\n", "routes line 1"),
    # each would fail every delivery to its destination: no cipher left to offer
    ("example.com encrypt ciphers=null\n", "", "tls_policy line 1 (example.com): its ciphers=, exclude= and level "
                                                 "select no cipher (OpenSSL cipher list 'eNULL:!aNULL:!eNULL')"),
    ("example.com may\nexample.net may exclude=ALL\n", "", "tls_policy line 2 (example.net): its ciphers="),
])
def test_check_names_the_table_line_in_error(tmp_path, capsys, policy, routes, message):
    (tmp_path / "tls_policy").write_text(policy)
    (tmp_path / "routes").write_text(routes)
    (tmp_path / "smtproxy.toml").write_text(CONFIG)
    assert main(["check", "--config", str(tmp_path / "smtproxy.toml")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err and len(err.strip().splitlines()) == 1, err


def test_check_passes_good_tables(tmp_path, capsys):
    (tmp_path / "tls_policy").write_text("example.com verify match=hostname:nexthop\n")
    (tmp_path / "routes").write_text("example.com [192.0.2.1]:2525\n")
    (tmp_path / "smtproxy.toml").write_text(CONFIG)
    assert main(["check", "--config", str(tmp_path / "smtproxy.toml")]) == 0
    assert 'policy_file = "' in capsys.readouterr().out


def _certificate_config(tmp_path, cert: str, key: str) -> str:
    (tmp_path / "smtproxy.toml").write_text(
        f'[inbound]\nlisten = []\nimplicit_tls_listen = []\n[[inbound.certificates]]\ncert_file = "{cert}"\n'
        f'key_file = "{key}"\n[outbound]\nlisten = []\n')
    return str(tmp_path / "smtproxy.toml")


@pytest.mark.parametrize("case", ["empty files", "key of another certificate"])
def test_check_loads_the_certificates_and_names_the_entry(tmp_path, capsys, case):
    """An unloadable chain is found by `check` (and at start), named by its entry and both
    files, not as OpenSSL's bare 'PEM lib'."""
    import trustme

    ca = trustme.CA()
    mine, other = ca.issue_cert("mx.example.test"), ca.issue_cert("other.example.test")
    if case == "empty files":
        (tmp_path / "tls.crt").write_text("")
        (tmp_path / "tls.key").write_text("")
    else:
        mine.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
        other.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    assert main(["check", "--config", _certificate_config(tmp_path, "tls.crt", "tls.key")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert f'inbound.certificates[0].cert_file = "{tmp_path}/tls.crt": cannot load it: ' in err, err
    assert f"key_file ({tmp_path}/tls.key)" in err, err


def test_check_passes_a_matching_chain_and_key(tmp_path, capsys):
    import trustme

    cert = trustme.CA().issue_cert("mx.example.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    assert main(["check", "--config", _certificate_config(tmp_path, "tls.crt", "tls.key")]) == 0


@pytest.mark.parametrize(("text", "problem"), [
    (None, "cannot read: No such file or directory"),
    ("[inbound\n", "TOML syntax error: "),
    ('[inbound]\nlisten = "bogus"\n', 'inbound.listen = "bogus": allowed: '),
])
def test_a_config_error_names_the_file_once(tmp_path, capsys, text, problem):
    path = tmp_path / "smtproxy.toml"
    if text is not None:
        path.write_text(text)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"smtproxy: {path}: {problem}") and err.count(str(path)) == 1, err


def test_check_warns_of_an_expired_certificate_and_still_passes(tmp_path, capsys):
    """Senders that check certificates will refuse it: the operator hears it from check
    (and from start and reload, in the log), the configuration itself is valid."""
    import datetime

    import trustme

    long_ago = datetime.datetime(2021, 1, 1, tzinfo=datetime.timezone.utc)
    cert = trustme.CA().issue_cert("mx.example.test", not_before=long_ago - datetime.timedelta(days=90),
                                   not_after=long_ago)
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    assert main(["check", "--config", _certificate_config(tmp_path, "tls.crt", "tls.key")]) == 0
    err = capsys.readouterr().err
    assert err == (f'smtproxy: warning: inbound.certificates[0].cert_file = "{tmp_path}/tls.crt": '
                   "the certificate expired on 2021-01-01 00:00 UTC\n"), err
