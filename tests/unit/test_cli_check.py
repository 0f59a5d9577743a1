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
