"""smtproxy.policy.qmail: every s/qmail tlsdestinations form of qmail-remote(8), its lookup
precedence, the refusals with their one-line messages, and that the Postfix translation
gives the same policies for the same lookups."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from smtproxy.policy.levels import Level, Policy
from smtproxy.policy.qmail import load_tlsdestinations, to_postfix_lines
from smtproxy.policy.table import Policies, PolicyTable, PolicyTableError

FP = hashlib.sha256(b"a pinned certificate").hexdigest().upper()
FP_COLONS = ":".join(FP[i:i + 2] for i in range(0, 64, 2))
SECURE_NEXTHOP = Policy(Level.SECURE, match=("nexthop",))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tlsdestinations"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str) -> PolicyTable:
    return load_tlsdestinations(write(tmp_path, text))


def only(tmp_path: Path, line: str) -> Policy:
    """The policy of the one per-destination rule in `line`."""
    (decision,) = load(tmp_path, line + "\n").entries.values()
    return decision.policy


def error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(PolicyTableError) as info:
        load_tlsdestinations(path)
    message = str(info.value)
    assert "\n" not in message
    return message.removeprefix(f"{path} ")


# --------------------------------------------------------------------------- the forms


@pytest.mark.parametrize(("line", "expected"), [
    ("!nosslhost.example.com:", Policy(Level.NONE)),
    (f"%peer.partner.com:={FP}", Policy(Level.FINGERPRINT, match=(FP_COLONS,))),
    (f"%peer.partner.com:={FP.lower()}", Policy(Level.FINGERPRINT, match=(FP_COLONS,))),
    (f"peer.partner.com:={FP}", Policy(Level.FINGERPRINT, match=(FP_COLONS,))),
    ("=mx.myfriend.com:/etc/ssl/cacert||4", Policy(Level.SECURE, match=("nexthop",),
                                                   ca_file=Path("/etc/ssl/cacert"), verify_depth=4)),
    ("=mx.myfriend.com:", SECURE_NEXTHOP),
    ("~wildneighbor.net:", SECURE_NEXTHOP),
    ("example.com:", Policy(Level.ENCRYPT)),
    ("securityfirst.com:/etc/ssl/cafile|!SSLv2:HIGH", Policy(
        Level.VERIFY, ciphers="high", exclude=("SSLv2",), ca_file=Path("/etc/ssl/cafile"))),
    ("mx.partner.com:/etc/ssl/partnerca||2", Policy(Level.VERIFY, ca_file=Path("/etc/ssl/partnerca"),
                                                    verify_depth=2)),
    ("mx.partner.com:/etc/ssl/partnerca||2|", Policy(Level.VERIFY, ca_file=Path("/etc/ssl/partnerca"),
                                                     verify_depth=2)),
    ("-adhonlydomain.com:", Policy(Level.ENCRYPT)),
    ("-adhonlydomain.com:|MEDIUM:-RC4", Policy(Level.ENCRYPT, ciphers="medium", exclude=("RC4",))),
    (".example.org:", Policy(Level.ENCRYPT)),
    ("Mixed.Case.Example:", Policy(Level.ENCRYPT)),
])
def test_per_destination_forms(tmp_path: Path, line: str, expected: Policy) -> None:
    assert only(tmp_path, line) == expected


def test_ports_add_bracketed_keys_and_keep_the_destination_itself(tmp_path: Path) -> None:
    """s/qmail's `hiddenpartner.org:;35` demands TLS for the domain (the port only says
    where): mail that reaches it by MX lookup must not fall to the default level."""
    table = load(tmp_path, "hiddenpartner.org:;35\nremote.com:/etc/ssl/ca.pem||3;26\n[192.0.2.1]:;2525\n")
    assert table.entries["[hiddenpartner.org]:35"].policy == Policy(Level.ENCRYPT)
    assert table.entries["[remote.com]:26"].policy == Policy(Level.VERIFY, ca_file=Path("/etc/ssl/ca.pem"),
                                                             verify_depth=3)
    assert table.entries["[192.0.2.1]:2525"].policy == Policy(Level.ENCRYPT)
    assert table.lookup("hiddenpartner.org").policy == Policy(Level.ENCRYPT)
    assert table.lookup("[192.0.2.1]").policy == Policy(Level.ENCRYPT)


@pytest.mark.parametrize(("line", "expected"), [
    ("=*:", SECURE_NEXTHOP),
    ("~*:", SECURE_NEXTHOP),
    ("+*:", Policy(Level.ENCRYPT)),
    ("+*:/etc/ssl/ca.pem", Policy(Level.VERIFY, ca_file=Path("/etc/ssl/ca.pem"))),
    ("-*:", Policy(Level.ENCRYPT)),
    ("*:", Policy(Level.MAY)),
    ("-:", Policy(Level.MAY)),
    ("*:|HIGH", Policy(Level.MAY, ciphers="high")),
])
def test_rules_for_all_destinations_become_the_default(tmp_path: Path, line: str, expected: Policy) -> None:
    table = load(tmp_path, f"# general\n{line}\n")
    assert table.entries == {}
    assert table.default is not None and table.default.policy == expected
    assert table.lookup("anything.example") == table.default
    assert table.default.source == f"tlsdestinations {tmp_path}/tlsdestinations line 2 ({line.split(':')[0]})"


def test_general_rules_in_qmail_remote_order(tmp_path: Path) -> None:
    assert load(tmp_path, "-:\n*:\n-*:\n+*:\n").default.policy == Policy(Level.ENCRYPT)  # +* first
    assert load(tmp_path, "*:\n-:\n").default.source.endswith("line 1 (*)")
    assert load(tmp_path, "-:\n=*:\n~*:\n").default.source.endswith("line 2 (=*)")


def test_no_general_rule_means_no_default(tmp_path: Path) -> None:
    assert load(tmp_path, "example.com:\n").default is None


# --------------------------------------------------------------------------- precedence


PRECEDENCE = """\
# qmail-remote: ! rules first, then %host, =host, then ~, plain and - (host, then parents)
*:
!.shadow.example:
=mx.shadow.example:
.partner.org:
-mx.partner.org:
~.wild.example:
mx.wild.example:
=exact.wild.example:
%pin.wild.example:={fp}
!off.wild.example:
-.anon.example:
plain.anon.example:/etc/ssl/ca.pem
""".format(fp=FP)


@pytest.mark.parametrize(("nexthop", "expected", "line"), [
    ("mx.shadow.example", Policy(Level.NONE), 3),  # ! beats a more specific =host
    ("a.shadow.example", Policy(Level.NONE), 3),
    ("mx.partner.org", Policy(Level.ENCRYPT), 5),  # plain .partner.org beats -mx.partner.org
    ("mx.wild.example", SECURE_NEXTHOP, 7),  # ~.wild.example beats the plain host rule
    ("exact.wild.example", SECURE_NEXTHOP, 9),  # =host before ~
    ("pin.wild.example", Policy(Level.FINGERPRINT, match=(FP_COLONS,)), 10),
    ("off.wild.example", Policy(Level.NONE), 11),
    ("x.off.wild.example", SECURE_NEXTHOP, 7),  # !host covers that host only
    ("plain.anon.example", Policy(Level.VERIFY, ca_file=Path("/etc/ssl/ca.pem")), 13),
    ("other.anon.example", Policy(Level.ENCRYPT), 12),
    ("elsewhere.example", Policy(Level.MAY), 2),
])
def test_precedence_is_qmail_remote_order(tmp_path: Path, nexthop: str, expected: Policy, line: int) -> None:
    found = load(tmp_path, PRECEDENCE).lookup(nexthop)
    assert found is not None and found.policy == expected
    assert f" line {line} (" in found.source


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("line", "problem"), [
    ("example.com", "no colon; allowed: destination:cafile|ciphers|verifydepth;port "
                    "(see qmail-remote(8), tlsdestinations)"),
    ("ex ample.com:", '"ex ample.com" is not a destination; allowed: host, .domain or [address] after one of '
                      "! % = ~ - (or none), or one of =* ~* +* -* * -"),
    ("!*:", '"!*" is not a destination; allowed: host, .domain or [address] after one of ! % = ~ - (or none), '
            "or one of =* ~* +* -* * -"),
    ("=.example.com:", '"=.example.com": = compares one host name; allowed: =host, not =.domain'),
    ("mx.partner.com:/etc/ssl/partnerca||2|mydomain.net",
     '"|mydomain.net" binds the rule to a sender domain; allowed: rules for every sender '
     "(smtproxy's policy depends on the destination only)"),
    ("a.example:x|y|z|w|v", "5 fields; allowed: destination:cafile|ciphers|verifydepth;port "
                            "(see qmail-remote(8), tlsdestinations)"),
    ("a.example:/ca.pem;26|HIGH", '";port" stands after the last field given; allowed: '
                                  "destination:cafile|ciphers|verifydepth;port (see qmail-remote(8), tlsdestinations)"),
    ("remote.com:/etc/ssl/certdir/||3;465", "port 465 means SMTPS (TLS from the first byte); allowed: a STARTTLS "
                                            "port (smtproxy sends with STARTTLS only)"),
    ("a.example:;6209", "port 6209 means QMTPS (TLS from the first byte); allowed: a STARTTLS port "
                        "(smtproxy sends with STARTTLS only)"),
    ("a.example:;0", 'port "0"; allowed: 1 to 65535'),
    (".example.com:;26", "a port needs one host; allowed: host:;26 or [address]:;26"),
    ("*:;26", "a port needs one host; allowed: host:;26 or [address]:;26"),
    ("remote.com:/etc/ssl/certdir/||3", '"/etc/ssl/certdir/" is a CA directory; allowed: a CA file (concatenate '
                                        "the directory's certificates into one PEM file)"),
    ("remote.com:control/ca.pem", 'cafile "control/ca.pem"; allowed: an absolute file name without blanks '
                                  "or commas (s/qmail reads relative names from its home directory)"),
    ("*:/etc/ssl/ca.pem", 'cafile "/etc/ssl/ca.pem" on a rule that checks no certificate; allowed: a cafile '
                          "after host, =host, ~host, +* , ~* or =*"),
    ("-anon.example:/etc/ssl/ca.pem", 'cafile "/etc/ssl/ca.pem" on a rule that checks no certificate; allowed: '
                                      "a cafile after host, =host, ~host, +* , ~* or =*"),
    ("a.example:||3", 'verifydepth "3" without a cafile; allowed: cafile|ciphers|verifydepth'),
    ("a.example:/ca.pem||deep", 'verifydepth "deep"; allowed: an integer from 1 to 100'),
    ("!off.example:|HIGH", "! (no TLS) takes nothing after the colon; allowed: !host:"),
    ("!off.example:;26", "! (no TLS) takes nothing after the colon; allowed: !host:"),
    ("%pin.example:/etc/ssl/ca.pem", "% (pinning) needs the fingerprint; allowed: %host:=fingerprint"),
    (f"-anon.example:={FP}", "a fingerprint on a - rule; allowed: %host:=fingerprint"),
    ("%pin.example:=" + "ab" * 20, "=fingerprint is SHA-1; allowed: a SHA-256 fingerprint (64 hex digits), "
                                   "e.g. from openssl x509 -noout -fingerprint -sha256"),
    ("%pin.example:=" + "ab" * 64, "=fingerprint is SHA-512; allowed: a SHA-256 fingerprint (64 hex digits), "
                                   "e.g. from openssl x509 -noout -fingerprint -sha256"),
    ("%pin.example:=xyz", '"xyz" is not a fingerprint; allowed: a SHA-256 digest as hex, plain or '
                          "colon-separated pairs (AB:CD:...)"),
    ("-adh.example:|aNULL:!kRSA", 'cipher item "aNULL" has no Postfix form; allowed: one grade '
                                  "(EXPORT, LOW, MEDIUM, HIGH, NULL) and !exclusions, e.g. HIGH:!RC4"),
    ("a.example:|HIGH:MEDIUM", 'cipher item "MEDIUM" has no Postfix form; allowed: one grade '
                               "(EXPORT, LOW, MEDIUM, HIGH, NULL) and !exclusions, e.g. HIGH:!RC4"),
])
def test_refusals_name_line_value_and_what_is_allowed(tmp_path: Path, line: str, problem: str) -> None:
    assert error(tmp_path, f"# first line\n{line}\n") == f"line 2: {line}: {problem}"


def test_a_rule_twice(tmp_path: Path) -> None:
    assert error(tmp_path, "=mx.example.com:\nexample.com:\n=MX.example.com:/etc/ca.pem\n") == (
        'line 3: =MX.example.com:/etc/ca.pem: rule "=MX.example.com" is already given on line 1; '
        "allowed: each once")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyTableError) as info:
        load_tlsdestinations(tmp_path / "nope")
    assert str(info.value) == f"{tmp_path}/nope: cannot read: No such file or directory"


# --------------------------------------------------------------------------- the Postfix translation


def translated(tmp_path: Path, table: PolicyTable) -> PolicyTable:
    path = tmp_path / "tls_policy"
    path.write_text("\n".join(to_postfix_lines(table)) + "\n")
    return PolicyTable.load(path)


NEXTHOPS = ["mx.shadow.example", "a.shadow.example", "shadow.example", "mx.partner.org", "partner.org",
            "a.b.partner.org", "mx.wild.example", "exact.wild.example", "pin.wild.example",
            "off.wild.example", "x.off.wild.example", "plain.anon.example", "other.anon.example",
            "elsewhere.example", "[192.0.2.1]", "[mx.shadow.example]:25"]


def test_translation_gives_equal_policies_for_the_same_lookups(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("CA\n")
    qmail = load(tmp_path, PRECEDENCE.replace("/etc/ssl/ca.pem", f"{tmp_path}/ca.pem"))
    postfix = translated(tmp_path, qmail)
    assert {key: entry.policy for key, entry in postfix.entries.items()} == {
        key: entry.policy for key, entry in qmail.entries.items()}
    for nexthop in NEXTHOPS:
        from_qmail = qmail.lookup(nexthop)
        # the s/qmail default ("*:" here) is [outbound] default_level for the Postfix table
        expected = from_qmail.policy if from_qmail is not None else None
        found = Policies(postfix, qmail.default.policy.level).decide(nexthop).policy
        assert found == (expected or qmail.default.policy), nexthop


def test_translation_with_ports_fingerprints_and_ca_files(tmp_path: Path) -> None:
    for name in ("ca.pem", "partner.pem"):
        (tmp_path / name).write_text("CA\n")
    qmail = load(tmp_path, f"remote.com:{tmp_path}/ca.pem|HIGH:!3DES|3;26\n%pin.example:={FP}\n"
                           f"=mx.partner.com:{tmp_path}/partner.pem||2\n")
    postfix = translated(tmp_path, qmail)
    for nexthop in ("[remote.com]:26", "pin.example", "mx.partner.com", "remote.com", "x.pin.example"):
        from_qmail, from_postfix = qmail.lookup(nexthop), postfix.lookup(nexthop)
        assert (from_qmail and from_qmail.policy) == (from_postfix and from_postfix.policy), nexthop
    assert postfix.lookup("[remote.com]:26").policy == Policy(
        Level.VERIFY, ciphers="high", exclude=("3DES",), ca_file=tmp_path / "ca.pem", verify_depth=3)


def test_postfix_lines_spell_out_the_default(tmp_path: Path) -> None:
    path = write(tmp_path, "=*:\nexample.com:\n")
    assert to_postfix_lines(load_tlsdestinations(path)) == [
        "# smtproxy policy_file (Postfix smtp_tls_policy_maps syntax), from s/qmail tlsdestinations",
        "example.com  encrypt",
        f'# other destinations (tlsdestinations {path} line 1 (=*)): [outbound] default_level = "secure"',
        "#   its attributes have no place in a table: secure match=nexthop",
    ]
    assert to_postfix_lines(load(tmp_path, "*:\n"))[-1].endswith('[outbound] default_level = "may"')
    assert to_postfix_lines(load(tmp_path, "!off.example:\n"))[-1] == (
        '# s/qmail used no TLS for other destinations: [outbound] default_level = "none" does the same')
