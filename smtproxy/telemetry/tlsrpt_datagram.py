"""One TLSRPT result as the libtlsrpt datagram that sys4's tlsrpt-collectd reads.

The JSON keys and their order are libtlsrpt's (0.5.x, as Postfix sends them): the collector
stores each policy under the JSON text of the policy without `f`, `t` and
`failure-details`, so a policy written with its keys in another order, or with an optional
key once present and once absent, would become a second row of the report.  Values that
are unknown are left out rather than sent empty.
"""

from __future__ import annotations

import dataclasses
import json

PROTOCOL_VERSION = "1"  # `dpv`: a string; the collector logs a number as an error

POLICY_TYPES = {"tlsa": 1, "sts": 2, "no-policy-found": 9}

RESULT_CODES = {
    "starttls-not-supported": 201,
    "certificate-host-mismatch": 202,
    "certificate-not-trusted": 203,
    "certificate-expired": 204,
    "validation-failure": 205,
    "sts-policy-fetch-error": 301,
    "sts-policy-invalid": 302,
    "sts-webpki-invalid": 303,
    "tlsa-invalid": 304,
    "dnssec-invalid": 305,
    "dane-required": 306,
}


@dataclasses.dataclass(frozen=True, slots=True)
class TlsrptPolicy:
    """The RFC 8460 policy block: `policy_type` tlsa, sts or no-policy-found."""

    policy_type: str
    policy_domain: str | None
    policy_strings: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class TlsrptFailure:
    """One failure-details entry; `result_type` an RFC 8460 result type."""

    result_type: str
    sending_mta_ip: str | None = None
    receiving_mx_hostname: str | None = None
    receiving_mx_helo: str | None = None
    receiving_ip: str | None = None
    additional_information: str | None = None
    failure_reason_code: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TlsrptResult:
    """The final result of one new TLS connection attempt for `domain` (an A-label),
    reported under its `_smtp._tls` TXT `record` (verbatim); `failure` None: success."""

    domain: str
    record: str
    policy: TlsrptPolicy
    failure: TlsrptFailure | None = None

    @property
    def result(self) -> str:
        return "success" if self.failure is None else "failure"


def _present(pairs: list[tuple[str, object]]) -> dict[str, object]:
    return {key: value for key, value in pairs if value is not None}


def _failure_object(failure: TlsrptFailure) -> dict[str, object]:
    return _present([
        ("c", RESULT_CODES[failure.result_type]),
        ("s", failure.sending_mta_ip),
        ("n", failure.receiving_mx_hostname),
        ("h", failure.receiving_mx_helo),
        ("r", failure.receiving_ip),
        ("a", failure.additional_information),
        ("f", failure.failure_reason_code),
    ])


def encode(result: TlsrptResult) -> bytes:
    """The datagram: one UTF-8 JSON object, no trailing newline.

    Text that is not valid Unicode (a peer's undecodable greeting) becomes "?": the
    collector must always get valid UTF-8 JSON.  Raises KeyError for a policy or result
    type that RFC 8460 does not name."""
    policy = result.policy
    failures = [] if result.failure is None else [_failure_object(result.failure)]
    policy_object = _present([
        ("policy-type", POLICY_TYPES[policy.policy_type]),
        ("policy-domain", policy.policy_domain),
        ("policy-string", list(policy.policy_strings) or None),
        ("mx-host", list(policy.mx_hosts) or None),
        ("failure-details", failures or None),
    ])
    policy_object["t"] = len(failures)
    policy_object["f"] = 1 if failures else 0
    datagram = {"dpv": PROTOCOL_VERSION, "d": result.domain, "pr": result.record, "policies": [policy_object]}
    return json.dumps(datagram, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
