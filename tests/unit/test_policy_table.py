"""smtproxy.policy.table: the Postfix smtp_tls_policy_maps syntax (every level, every
attribute, the errors with their one-line messages), Postfix's lookup order, the
default_level fallback, and render → parse round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtproxy.config import OutboundConfig
from smtproxy.policy.levels import Level, Policy, PolicyDecision
from smtproxy.policy.table import (
    Policies,
    PolicyTable,
    PolicyTableError,
    parent_chain,
    parse_nexthop,
    render_policy,
)
from smtproxy.routing.routes import RouteTable

PATH = "/etc/smtproxy/tls_policy"
FP1 = "B6:B4:72:34:E2:59:CD:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88"
FP2 = "51:E9:AF:2E:1E:40:1F:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88"


def parse(text: str, path: str | Path = PATH) -> PolicyTable:
    return PolicyTable.parse(text, path)


def policy(value: str, path: str | Path = PATH) -> Policy:
    """The policy of a one-entry table `example.com <value>`."""
    return parse(f"example.com {value}\n", path).entries["example.com"].policy


def error(text: str, path: str | Path = PATH) -> str:
    with pytest.raises(PolicyTableError) as info:
        parse(text, path)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- levels


@pytest.mark.parametrize("level", [level for level in Level if level is not Level.FINGERPRINT])
def test_every_level_alone(level: Level) -> None:
    assert policy(level.value) == Policy(level)


def test_fingerprint_level_needs_a_fingerprint() -> None:
    assert policy(f"fingerprint match={FP1}") == Policy(Level.FINGERPRINT, match=(FP1,))
    assert error("[mx.example.net] fingerprint\n") == (
        f'{PATH} line 1: "[mx.example.net]" is at level fingerprint without a fingerprint; '
        "allowed: fingerprint match=AB:CD:...(SHA-256)")


def test_levels_and_attribute_names_are_case_insensitive() -> None:
    assert policy("DANE-Only CIPHERS=HIGH") == Policy(Level.DANE_ONLY, ciphers="high")


def test_unknown_level() -> None:
    assert error("example.com strict\n") == (
        f'{PATH} line 1: unknown security level "strict"; '
        "allowed: none, may, encrypt, fingerprint, verify, secure, dane, dane-only")


def test_key_without_level() -> None:
    assert error("example.com\n") == (
        f'{PATH} line 1: key "example.com" has no security level; '
        "allowed: none, may, encrypt, fingerprint, verify, secure, dane, dane-only")


# --------------------------------------------------------------------------- match=


def test_match_names_and_strategies_for_verify_and_secure() -> None:
    assert policy("secure match=Nexthop:dot-nexthop:.Example.NET:example.net") == Policy(
        Level.SECURE, match=("nexthop", "dot-nexthop", ".example.net", "example.net"))
    assert policy("verify match=hostname::nexthop") == Policy(Level.VERIFY, match=("hostname", "nexthop"))


def test_several_match_attributes_accumulate() -> None:
    assert policy("secure match=nexthop match=.example.com").match == ("nexthop", ".example.com")
    assert policy(f"fingerprint match={FP1} match={FP2}").match == (FP1, FP2)


def test_fingerprints_separated_by_bar_plain_hex_and_lower_case() -> None:
    plain = FP2.replace(":", "").lower()
    assert policy(f"fingerprint match={FP1.lower()}|{plain}").match == (FP1, FP2)


def test_fingerprint_continuation_lines_as_in_postconf5() -> None:
    table = parse(f"[thumb.example.org]  fingerprint\n    match={FP1}\n\t# a comment in between\n"
                  f"    match={FP2}\nnext.example may\n")
    assert table.entries["[thumb.example.org]"].policy.match == (FP1, FP2)
    assert table.entries["next.example"].policy == Policy(Level.MAY)


def test_match_default_for_verify_and_secure_is_postfix_default() -> None:
    assert policy("verify").match_or_default == ("hostname",)
    assert policy("secure").match_or_default == ("nexthop", "dot-nexthop")


@pytest.mark.parametrize("level", ["none", "may", "encrypt", "dane", "dane-only"])
def test_match_not_valid_at_levels_that_check_no_name(level: str) -> None:
    message = error(f"example.com {level} match=nexthop\n")
    assert message.startswith(f"{PATH} line 1: match=nexthop: ")
    if level == "none":
        assert message.endswith("not valid at level none; allowed: no attributes at level none")
    else:
        assert message.endswith(f"not valid at level {level}; allowed: ciphers=, protocols=, exclude=, "
                                "servername=, connection_reuse=")


def test_bad_match_names() -> None:
    assert error("example.com secure match=nexthop:bad_name!\n") == (
        f'{PATH} line 1: match=nexthop:bad_name!: "bad_name!" is neither a strategy nor a DNS name; '
        "allowed: hostname, nexthop, dot-nexthop, example.com, .example.com, separated by colons")
    assert error("example.com secure match=\n") == (
        f"{PATH} line 1: match=: empty value; allowed: hostname, nexthop, dot-nexthop, example.com, "
        ".example.com, separated by colons")


def test_bad_fingerprints_name_the_continuation_line() -> None:
    assert error(f"[mx.example.net] fingerprint\n  match={FP1}\n  match=XY:12\n") == (
        f'{PATH} line 3: match=XY:12: "XY:12" is not a fingerprint; allowed: a SHA-256 digest as hex, '
        "plain or colon-separated pairs (AB:CD:...)")
    sha1 = "AB:" * 19 + "CD"
    assert error(f"[mx.example.net] fingerprint match={sha1}\n") == (
        f'{PATH} line 1: match={sha1}: "{sha1}" has 20 bytes; allowed: a SHA-256 fingerprint (32 bytes); '
        "an MD5 or SHA-1 one must be computed again")
    assert "is not a fingerprint" in error("[mx.example.net] fingerprint match=ABC:DE\n")
    assert "is not a fingerprint" in error("[mx.example.net] fingerprint match=sha256:" + FP1 + "\n")


# --------------------------------------------------------------------------- other attributes


@pytest.mark.parametrize("grade", ["export", "low", "medium", "high", "null"])
def test_cipher_grades(grade: str) -> None:
    assert policy(f"encrypt ciphers={grade.upper()}").ciphers == grade


def test_bad_cipher_grade() -> None:
    assert error("example.com encrypt ciphers=HIGH:!RC4\n") == (
        f"{PATH} line 1: ciphers=HIGH:!RC4: allowed: a Postfix cipher grade: export, low, medium, high, null")


@pytest.mark.parametrize(("value", "expected"), [
    (">=TLSv1.2", ("TLSv1.2", "TLSv1.3")),
    ("<=TLSv1.2", ("TLSv1", "TLSv1.2")),
    (">=TLSv1.1:<=TLSv1.2", ("TLSv1.1", "TLSv1.2")),
    ("TLSv1.2:TLSv1.3", ("TLSv1.2", "TLSv1.3")),
    ("TLSv1", ("TLSv1", "TLSv1")),
    ("!SSLv2:!SSLv3:!TLSv1", ("TLSv1.1", "TLSv1.3")),
    ("!SSLv2:!SSLv3:!TLSv1:!TLSv1.1", ("TLSv1.2", "TLSv1.3")),
    ("SSLv3:TLSv1", ("TLSv1", "TLSv1")),  # TLS_README's example; SSLv3 has no effect
    (">=SSLv3", ("TLSv1", "TLSv1.3")),
    ("!tlsv1.3", ("TLSv1", "TLSv1.2")),
    (">=TLSv1:!TLSv1", ("TLSv1.1", "TLSv1.3")),
])
def test_protocols(value: str, expected: tuple[str, str]) -> None:
    found = policy(f"encrypt protocols={value}")
    assert (found.min_protocol, found.max_protocol) == expected


def test_no_protocols_attribute_leaves_the_configured_range() -> None:
    assert (policy("encrypt").min_protocol, policy("encrypt").max_protocol) == (None, None)


@pytest.mark.parametrize(("value", "problem"), [
    ("TLSv1.4", 'unknown protocol "TLSv1.4"; allowed: SSLv2, SSLv3, TLSv1, TLSv1.1, TLSv1.2, TLSv1.3, '
                "each alone, after ! (exclude), >= or <=, separated by colons"),
    ("SSLv3", "enables none of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3; allowed: a setting that leaves one"),
    ("<=SSLv3", "enables none of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3; allowed: a setting that leaves one"),
    ("", "empty value; allowed: protocol names separated by colons, e.g. >=TLSv1.2"),
    ("TLSv1:TLSv1.2", "leaves a gap (TLSv1:TLSv1.2); allowed: a contiguous range such as >=TLSv1.2"),
    ("!TLSv1.2", "leaves a gap (TLSv1:TLSv1.1:TLSv1.3); allowed: a contiguous range such as >=TLSv1.2"),
    (">=TLSv1.2:>=TLSv1.3", '">=" given twice; allowed: one >= and one <= bound'),
])
def test_bad_protocols(value: str, problem: str) -> None:
    assert error(f"example.com encrypt protocols={value}\n") == f"{PATH} line 1: protocols={value}: {problem}"


def test_exclude_lists_cipher_names() -> None:
    assert policy("may exclude=3DES:aNULL:ECDHE-RSA-AES128-SHA").exclude == (
        "3DES", "aNULL", "ECDHE-RSA-AES128-SHA")
    assert error("example.com may exclude=3DES:*\n") == (
        f'{PATH} line 1: exclude=3DES:*: "*" is not a cipher name; allowed: OpenSSL cipher names '
        "or families separated by colons, e.g. 3DES:aNULL")


@pytest.mark.parametrize(("value", "expected"), [
    ("hostname", "hostname"), ("NEXTHOP", "nexthop"), ("MX.Example.com", "mx.example.com")])
def test_servername(value: str, expected: str) -> None:
    assert policy(f"secure servername={value}").servername == expected


def test_bad_servername() -> None:
    assert error("example.com may servername=-bad-\n") == (
        f"{PATH} line 1: servername=-bad-: allowed: hostname, nexthop or a DNS name")


def test_connection_reuse_yes_no_and_last_one_wins() -> None:
    assert policy("may connection_reuse=no").connection_reuse is False
    assert policy("may connection_reuse=NO connection_reuse=yes").connection_reuse is True
    assert error("example.com may connection_reuse=maybe\n") == (
        f"{PATH} line 1: connection_reuse=maybe: allowed: yes or no")


def test_ca_file_and_verify_depth_relative_to_the_table(tmp_path: Path) -> None:
    (tmp_path / "partner-ca.pem").write_text("CA\n")
    found = policy("verify ca_file=partner-ca.pem verify_depth=3", tmp_path / "tls_policy")
    assert (found.ca_file, found.verify_depth) == (tmp_path / "partner-ca.pem", 3)
    assert policy(f"secure ca_file={tmp_path}/partner-ca.pem", tmp_path / "x").ca_file == tmp_path / "partner-ca.pem"


def test_ca_file_must_exist_and_verify_depth_is_bounded(tmp_path: Path) -> None:
    assert error("example.com verify ca_file=missing.pem\n", tmp_path / "tls_policy") == (
        f"{tmp_path}/tls_policy line 1: ca_file=missing.pem: {tmp_path}/missing.pem is not an existing "
        "file; allowed: a PEM file of CA certificates")
    assert error("example.com verify verify_depth=0\n") == (
        f"{PATH} line 1: verify_depth=0: allowed: an integer from 1 to 100")
    assert "not valid at level encrypt" in error("example.com encrypt verify_depth=2\n")


def test_tafile_is_refused_clearly() -> None:
    assert error("example.com verify tafile=/etc/ssl/partner.pem\n") == (
        f"{PATH} line 1: tafile=/etc/ssl/partner.pem: trust-anchor files (tafile=) are not supported; "
        "allowed: match=, ciphers=, protocols=, exclude=, servername=, connection_reuse=, "
        "ca_file=, verify_depth= (verify/secure: ca_file= for a CA file)")


def test_unknown_and_malformed_attributes() -> None:
    assert error("example.com may\n  ciphers=high\n  cipher=high\n") == (
        f'{PATH} line 3: cipher=high: unknown attribute "cipher"; allowed: ciphers=, protocols=, '
        "exclude=, servername=, connection_reuse=")
    assert error("example.com may # trailing comment\n") == (
        f"{PATH} line 1: #: not name=value; allowed: ciphers=, protocols=, exclude=, servername=, "
        "connection_reuse=")
    assert error("example.com may ciphers=high ciphers=low\n") == (
        f"{PATH} line 1: ciphers=low: given twice; allowed: once per entry")


def test_no_attributes_at_level_none() -> None:
    assert error("example.com none protocols=>=TLSv1.2\n") == (
        f"{PATH} line 1: protocols=>=TLSv1.2: not valid at level none; "
        "allowed: no attributes at level none")


def test_commas_separate_attributes_like_white_space() -> None:
    assert policy("encrypt,ciphers=high, exclude=RC4") == Policy(Level.ENCRYPT, ciphers="high", exclude=("RC4",))


# --------------------------------------------------------------------------- keys and file syntax


@pytest.mark.parametrize("key", [
    "example.com", ".example.com", "[mx.example.net]", "[mx.example.net]:25", "[192.0.2.1]:2525",
    "[2001:db8::1]:25", "[2001:db8::1]", "example.com:2525", "mail_host.example"])
def test_key_forms(key: str) -> None:
    assert list(parse(f"{key} may\n").entries) == [key]


@pytest.mark.parametrize("key", [
    "192.0.2.1", "[mx.example.net]:0", "[mx.example.net]:99999", "[mx.example.net]x", "[bad!host]",
    "exa$mple.com", ".example.com:25", "[mx.example.net", "*.example.com", "example.com:smtp"])
def test_bad_keys(key: str) -> None:
    assert error(f"{key} may\n") == (
        f'{PATH} line 1: "{key}" is not a policy key; allowed: example.com, .example.com, '
        "example.com:2525, [mx.example.net], [mx.example.net]:25, [192.0.2.1]:2525, [2001:db8::1]:25")


def test_keys_are_case_insensitive_and_given_once() -> None:
    assert list(parse("Example.COM may\n").entries) == ["example.com"]
    assert error("example.com may\n# x\nEXAMPLE.com encrypt\n") == (
        f'{PATH} line 3: key "EXAMPLE.com" is already given on line 1; allowed: each key once')


def test_blank_lines_comments_and_continuations() -> None:
    table = parse("\n# comment\n   \nexample.com secure\n  match=nexthop\n\n  protocols=>=TLSv1.2\n"
                  "  # indented comment\nexample.net may\n")
    assert table.entries["example.com"].policy == Policy(
        Level.SECURE, match=("nexthop",), min_protocol="TLSv1.2", max_protocol="TLSv1.3")
    assert table.entries["example.com"].source == f"policy_file {PATH} line 4 (example.com)"
    assert table.entries["example.net"].source == f"policy_file {PATH} line 9 (example.net)"


def test_continuation_without_entry() -> None:
    assert error("# head\n  match=nexthop\n") == (
        f'{PATH} line 2: "match=nexthop" continues no entry; allowed: a key at the start of the line')


def test_load_reads_the_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "tls_policy"
    path.write_text(".example.com encrypt\n")
    assert PolicyTable.load(path).lookup("a.example.com") == PolicyDecision(
        Policy(Level.ENCRYPT), f"policy_file {path} line 1 (.example.com)")


def test_load_errors_for_the_whole_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyTableError) as info:
        PolicyTable.load(tmp_path / "missing")
    assert str(info.value) == f"{tmp_path}/missing: cannot read: No such file or directory"
    path = tmp_path / "latin1"
    path.write_bytes(b"example.com may\nexample.org may \xe9\n")
    with pytest.raises(PolicyTableError) as info:
        PolicyTable.load(path)
    assert str(info.value) == f"{path} line 2: not UTF-8 text (byte 32); allowed: UTF-8 (in practice ASCII)"


# --------------------------------------------------------------------------- lookups


LOOKUP_TABLE = """\
example.com            secure
.example.com           encrypt
sub.example.com        verify
.org                   may
[mx.example.net]       fingerprint match={fp}
[mx.example.net]:587   secure match=nexthop
example.net:2525       none
[192.0.2.1]:2525       encrypt
[2001:db8::1]:25       encrypt protocols=>=TLSv1.3
""".format(fp=FP1)


@pytest.mark.parametrize(("nexthop", "key"), [
    ("example.com", "example.com"),  # exact beats .example.com
    ("mx.example.com", ".example.com"),
    ("a.b.example.com", ".example.com"),  # parents are tried one label at a time
    ("sub.example.com", "sub.example.com"),
    ("a.sub.example.com", ".example.com"),  # sub.example.com does not cover its subdomains
    ("EXAMPLE.Com", "example.com"),
    ("example.org", ".org"),
    ("[mx.example.net]", "[mx.example.net]"),
    ("[MX.example.NET]:587", "[mx.example.net]:587"),
    ("[mx.example.net]:25", None),  # a port is part of the key: no fallback to [mx.example.net]
    ("mx.example.net", None),  # nor does a bracketed key match the domain
    ("example.net:2525", "example.net:2525"),
    ("example.net", None),
    ("[192.0.2.1]:2525", "[192.0.2.1]:2525"),
    ("[192.0.2.1]", None),
    ("[2001:DB8::1]:25", "[2001:db8::1]:25"),
    ("[sub.example.com]", None),  # bracketed nexthops get no parent-domain lookups
    ("example.co", None),
])
def test_lookup_order_is_postfix_order(nexthop: str, key: str | None) -> None:
    table = parse(LOOKUP_TABLE)
    assert table.lookup(nexthop) == (table.entries[key] if key else None)


def test_lookup_source_names_file_line_and_key() -> None:
    assert parse(LOOKUP_TABLE).lookup("a.b.example.com").source == f"policy_file {PATH} line 2 (.example.com)"


@pytest.mark.parametrize("nexthop", [".example.com", "bad host", "[mx.example.net]:", "192.0.2.1", ""])
def test_lookup_of_a_non_nexthop(nexthop: str) -> None:
    with pytest.raises(ValueError) as info:
        parse(LOOKUP_TABLE).lookup(nexthop)
    assert str(info.value) == (
        f'"{nexthop}" is not a nexthop; allowed: example.com, example.com:2525, [mx.example.net], '
        "[mx.example.net]:25, [192.0.2.1], [2001:db8::1]:25")


def test_parent_chain_and_parse_nexthop() -> None:
    assert parent_chain("a.b.example.com") == ["a.b.example.com", ".b.example.com", ".example.com", ".com"]
    assert parent_chain(".example.com") == [".example.com", ".com"]
    assert parse_nexthop("[MX.example.net]:25") == ("[mx.example.net]:25", True)
    assert parse_nexthop("Example.com") == ("example.com", False)
    assert parse_nexthop("[IPv6:2001:db8::1]:25") == ("[ipv6:2001:db8::1]:25", True)
    with pytest.raises(ValueError):
        parse_nexthop("[IPv6:192.0.2.1]")


def test_every_routed_nexthop_has_a_policy() -> None:
    """Whatever the routes table accepts, the policy lookup takes (an `[IPv6:...]` route once
    passed `smtproxy check` and then failed every transaction in the lookup)."""
    routes = RouteTable.parse("a.example [IPv6:2001:db8::1]:2525\nb.example [2001:db8::2]\n"
                              "c.example relay.example:26\nd.example [192.0.2.1]\ne.example relay.example\n",
                              "routes")
    policies = Policies(parse("[ipv6:2001:db8::1]:2525 encrypt\n"), Level.MAY)
    levels = {}
    for domain in ("a.example", "b.example", "c.example", "d.example", "e.example"):
        route = routes.lookup(domain)
        assert route is not None
        levels[route.nexthop] = policies.decide(route.nexthop).policy.level
    assert levels == {"[IPv6:2001:db8::1]:2525": Level.ENCRYPT, "[2001:db8::2]": Level.MAY,
                      "relay.example:26": Level.MAY, "[192.0.2.1]": Level.MAY, "relay.example": Level.MAY}


def test_policies_fall_back_to_default_level() -> None:
    policies = Policies(parse(LOOKUP_TABLE), Level.MAY)
    assert policies.decide("a.example.com").source == f"policy_file {PATH} line 2 (.example.com)"
    assert policies.decide("example.co") == PolicyDecision(Policy(Level.MAY), "default_level")
    assert Policies(PolicyTable(), Level.VERIFY).decide("[192.0.2.7]:25") == PolicyDecision(
        Policy(Level.VERIFY), "default_level")
    with pytest.raises(ValueError):
        Policies(PolicyTable(), Level.MAY).decide("not a nexthop")


def test_policies_from_config(tmp_path: Path) -> None:
    path = tmp_path / "tls_policy"
    path.write_text(".example.com dane-only\n")
    policies = Policies.from_config(OutboundConfig(default_level="encrypt", policy_file=path))
    assert policies.decide("mx.example.com").policy == Policy(Level.DANE_ONLY)
    assert policies.decide("example.org").policy == Policy(Level.ENCRYPT)
    assert Policies.from_config(OutboundConfig()).decide("example.org") == PolicyDecision(
        Policy(Level.MAY), "default_level")


# --------------------------------------------------------------------------- writing back


def test_render_policy_words() -> None:
    assert render_policy(Policy(Level.FINGERPRINT, match=(FP1, FP2))) == f"fingerprint match={FP1}|{FP2}"
    assert render_policy(Policy(
        Level.SECURE, match=("nexthop", ".example.com"), min_protocol="TLSv1.1", max_protocol="TLSv1.2",
        ciphers="high", exclude=("3DES", "RC4"), servername="nexthop", connection_reuse=False,
        ca_file=Path("/etc/ssl/ca.pem"), verify_depth=2)) == (
        "secure match=nexthop:.example.com protocols=>=TLSv1.1:<=TLSv1.2 ciphers=high exclude=3DES:RC4 "
        "servername=nexthop connection_reuse=no ca_file=/etc/ssl/ca.pem verify_depth=2")
    assert render_policy(Policy(Level.MAY, min_protocol="TLSv1", max_protocol="TLSv1.1")) == "may protocols=<=TLSv1.1"


def test_render_then_parse_gives_the_same_table() -> None:
    table = parse(LOOKUP_TABLE)
    again = parse(table.render())
    assert {key: entry.policy for key, entry in again.entries.items()} == {
        key: entry.policy for key, entry in table.entries.items()}


_PROTOCOL_RANGES = [(low, high) for i, low in enumerate(("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"))
                    for high in ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")[i:]]
_NAMES = st.sampled_from(["example.com", "mx.example.net", "a-b.example", "mail_x.example"])
_FINGERPRINTS = st.binary(min_size=32, max_size=32).map(lambda raw: raw.hex(":").upper())


@st.composite
def _policies(draw: st.DrawFn, ca_file: Path) -> Policy:
    level = draw(st.sampled_from(list(Level)))
    if level is Level.NONE:
        return Policy(level)
    match: tuple[str, ...] = ()
    extra: dict[str, object] = {}
    if level is Level.FINGERPRINT:
        match = tuple(draw(st.lists(_FINGERPRINTS, min_size=1, max_size=3)))
    elif level in (Level.VERIFY, Level.SECURE):
        match = tuple(draw(st.lists(st.one_of(st.sampled_from(["hostname", "nexthop", "dot-nexthop"]),
                                              _NAMES, _NAMES.map(lambda name: "." + name)), max_size=3)))
        extra["ca_file"] = draw(st.sampled_from([None, ca_file]))
        extra["verify_depth"] = draw(st.sampled_from([None, 1, 9]))
    protocols = draw(st.sampled_from([(None, None), *_PROTOCOL_RANGES]))
    return Policy(
        level, match=match, min_protocol=protocols[0], max_protocol=protocols[1],
        ciphers=draw(st.sampled_from([None, "export", "low", "medium", "high", "null"])),
        exclude=tuple(draw(st.lists(st.sampled_from(["3DES", "aNULL", "RC4", "kRSA"]), max_size=3))),
        servername=draw(st.sampled_from(["hostname", "nexthop", "mx.example.com"])),
        connection_reuse=draw(st.booleans()), **extra)


_KEYS = st.one_of(_NAMES, _NAMES.map(lambda name: "." + name), _NAMES.map(lambda name: f"[{name}]:25"),
                  st.sampled_from(["[192.0.2.1]", "[2001:db8::1]:587", "example.org:2525"]))
_CA_DIR = Path(__file__).parent  # any existing file will do as a CA file name here
_CA_FILE = Path(__file__)


@given(st.dictionaries(_KEYS, _policies(_CA_FILE), max_size=6))
def test_rendered_tables_parse_to_equal_policies(policies: dict[str, Policy]) -> None:
    table = PolicyTable({key: PolicyDecision(found, "test") for key, found in policies.items()})
    again = PolicyTable.parse(table.render(), _CA_DIR / "tls_policy")
    assert {key: entry.policy for key, entry in again.entries.items()} == policies
