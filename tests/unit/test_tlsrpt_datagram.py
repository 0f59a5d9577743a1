"""The libtlsrpt datagram encoding: keys, key order, omitted values, as tlsrpt-collectd stores them."""

from __future__ import annotations

import json

import pytest

from smtproxy.telemetry.tlsrpt_datagram import (
    RESULT_CODES,
    TlsrptFailure,
    TlsrptPolicy,
    TlsrptResult,
    encode,
)

RECORD = "v=TLSRPTv1; rua=mailto:tlsrpt@example.com"

# What the compiled libtlsrpt 0.5 sent for this call sequence (shared/reference/tlsrpt-datagram.md)
LIBTLSRPT_CAPTURE = (
    '{"dpv": "1","d": "example.com","pr": "v=TLSRPTv1; rua=mailto:tlsrpt@example.com","policies":['
    '{"policy-type":2,"policy-domain": "example.com","policy-string":["version: STSv1","mode: enforce"],'
    '"mx-host":["*.example.com"],'
    '"failure-details":[{"c":205,"s": "192.0.2.1","n": "mx1.example.com",'
    '"h": "250-mx1.example.com\\r\\n250 STARTTLS","r": "198.51.100.7",'
    '"f": "self-signed_certificate"}],'
    '"t":1,"f":1}]}'
)

STS_POLICY = TlsrptPolicy("sts", "example.com", ("version: STSv1", "mode: enforce"), ("*.example.com",))
SELF_SIGNED = TlsrptFailure("validation-failure", sending_mta_ip="192.0.2.1", receiving_mx_hostname="mx1.example.com",
                            receiving_mx_helo="250-mx1.example.com\r\n250 STARTTLS", receiving_ip="198.51.100.7",
                            failure_reason_code="self-signed_certificate")


def keys_in_order(value):
    """The JSON value with every object turned into its list of (key, value) pairs."""
    if isinstance(value, dict):
        return [(key, keys_in_order(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [keys_in_order(item) for item in value]
    return value


def collectd_row_key(datagram: bytes) -> str:
    """What tlsrpt-collectd 0.6 stores a policy under (TLSRPTCollectdSQLite._add_policy)."""
    policy = json.loads(datagram)["policies"][0]
    for key in ("f", "failure-details", "t"):
        policy.pop(key, None)
    return json.dumps(policy)


def test_same_keys_values_and_order_as_libtlsrpt():
    ours = encode(TlsrptResult("example.com", RECORD, STS_POLICY, SELF_SIGNED))
    assert keys_in_order(json.loads(ours)) == keys_in_order(json.loads(LIBTLSRPT_CAPTURE))
    # only the whitespace differs: one compact JSON object, no trailing newline
    assert ours == json.dumps(json.loads(LIBTLSRPT_CAPTURE), separators=(",", ":")).encode()


def test_success_has_no_failure_details_and_t0_f0():
    datagram = json.loads(encode(TlsrptResult("example.com", RECORD, TlsrptPolicy("no-policy-found", "example.com"))))
    assert datagram == {"dpv": "1", "d": "example.com", "pr": RECORD, "policies": [
        {"policy-type": 9, "policy-domain": "example.com", "t": 0, "f": 0}]}
    assert isinstance(datagram["dpv"], str)


def test_success_and_failure_of_one_policy_share_the_collectors_row():
    policy = TlsrptPolicy("no-policy-found", "example.com")
    success = encode(TlsrptResult("example.com", RECORD, policy))
    failure = encode(TlsrptResult("example.com", RECORD, policy,
                                  TlsrptFailure("starttls-not-supported", receiving_mx_hostname="mx.example.com")))
    assert collectd_row_key(success) == collectd_row_key(failure)
    assert collectd_row_key(success) == '{"policy-type": 9, "policy-domain": "example.com"}'


def test_unknown_values_are_left_out():
    policy = TlsrptPolicy("no-policy-found", None)
    datagram = json.loads(encode(TlsrptResult("example.com", RECORD, policy,
                                              TlsrptFailure("certificate-expired", receiving_mx_hostname="mx.x"))))
    assert datagram["policies"] == [{"policy-type": 9, "failure-details": [{"c": 204, "n": "mx.x"}], "t": 1, "f": 1}]


@pytest.mark.parametrize(("result_type", "code"), sorted(RESULT_CODES.items()))
def test_result_codes(result_type, code):
    datagram = json.loads(encode(TlsrptResult("example.com", RECORD, TlsrptPolicy("no-policy-found", "example.com"),
                                              TlsrptFailure(result_type))))
    assert datagram["policies"][0]["failure-details"] == [{"c": code}]


def test_rfc_8460_codes():
    assert RESULT_CODES == {
        "starttls-not-supported": 201, "certificate-host-mismatch": 202, "certificate-not-trusted": 203,
        "certificate-expired": 204, "validation-failure": 205, "sts-policy-fetch-error": 301,
        "sts-policy-invalid": 302, "sts-webpki-invalid": 303, "tlsa-invalid": 304, "dnssec-invalid": 305,
        "dane-required": 306}


def test_unnamed_result_type_is_refused():
    with pytest.raises(KeyError):
        encode(TlsrptResult("example.com", RECORD, TlsrptPolicy("no-policy-found", "example.com"),
                            TlsrptFailure("tls-handshake-failure")))


def test_text_is_utf8_and_never_invalid():
    failure = TlsrptFailure("validation-failure", receiving_mx_helo="mx.bücher.example \udcff")
    datagram = encode(TlsrptResult("example.com", RECORD, TlsrptPolicy("no-policy-found", "example.com"), failure))
    helo = json.loads(datagram.decode("utf-8"))["policies"][0]["failure-details"][0]["h"]
    assert helo == "mx.bücher.example ?"
