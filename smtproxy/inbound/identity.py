"""How the legacy MTA learns who the real client was: PROXY v1/v2, XCLIENT, Received."""

from __future__ import annotations

import ipaddress
import struct
from datetime import datetime, timezone
from email.utils import format_datetime

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_PROXY_V2_CMD_PROXY = 0x21  # version 2, PROXY command
_PROXY_V2_TCP4 = 0x11
_PROXY_V2_TCP6 = 0x21


def _unmapped(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def proxy_v1_header(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """HAProxy PROXY protocol v1 line, e.g. ``PROXY TCP4 192.0.2.1 192.0.2.9 5000 25``."""
    src_ip, dst_ip = _unmapped(src[0]), _unmapped(dst[0])
    if src_ip.version != dst_ip.version:
        dst_ip = ipaddress.ip_address("::" if src_ip.version == 6 else "0.0.0.0")
    family = "TCP4" if src_ip.version == 4 else "TCP6"
    return f"PROXY {family} {src_ip} {dst_ip} {src[1]} {dst[1]}\r\n".encode("ascii")


def proxy_v2_header(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """HAProxy PROXY protocol v2 binary header for a TCP stream (no TLVs)."""
    src_ip, dst_ip = _unmapped(src[0]), _unmapped(dst[0])
    if src_ip.version != dst_ip.version:
        dst_ip = ipaddress.ip_address("::" if src_ip.version == 6 else "0.0.0.0")
    family = _PROXY_V2_TCP4 if src_ip.version == 4 else _PROXY_V2_TCP6
    body = src_ip.packed + dst_ip.packed + struct.pack("!HH", src[1], dst[1])
    return PROXY_V2_SIGNATURE + struct.pack("!BBH", _PROXY_V2_CMD_PROXY, family, len(body)) + body


def _xtext(value: str) -> str:
    """RFC 3461 xtext, which XCLIENT attribute values use."""
    return "".join(
        c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in value
    )


def xclient_command(addr: str, port: int, helo: str | None = None, *,
                    offered: frozenset[str] = frozenset({"NAME", "ADDR", "PORT", "HELO"})) -> bytes:
    """XCLIENT telling Postfix the real client; NAME is unknown because we do no rDNS.
    Only the attributes the backend announced in its EHLO reply (`offered`) are sent."""
    ip = _unmapped(addr)
    shown = f"IPV6:{ip}" if ip.version == 6 else str(ip)
    attrs = [("NAME", "[UNAVAILABLE]"), ("ADDR", shown), ("PORT", str(port))]
    if helo:
        attrs.append(("HELO", _xtext(helo)))
    return ("XCLIENT " + " ".join(f"{name}={value}" for name, value in attrs if name in offered) + "\r\n").encode(
        "ascii")


def received_header(
    *,
    helo: str | None,
    client_addr: str,
    by_host: str,
    protocol: str,
    tls_clauses: tuple[str, ...] = (),
    now: datetime | None = None,
) -> bytes:
    """A trace header in Postfix's layout, with the TLS facts the backend cannot see.

    ``tls_clauses`` are the parenthesised comments from `tls.wording.received_clause`,
    each on its own folded line.  The HELO name is client-controlled, so it is reduced to
    characters that cannot break the header: printable ASCII without parentheses and
    backslashes, anything else as "?" (as Postfix's printable() does), at most 255 of them,
    so the line stays short (RFC 5322 2.1.1) and 7-bit.
    """
    safe_helo = "".join(c if c.isascii() else "?" for c in (helo or "unknown")
                        if (c.isprintable() or not c.isascii()) and c not in "()\\")
    ip = _unmapped(client_addr)
    shown = f"IPv6:{ip}" if ip.version == 6 else str(ip)
    lines = [f"Received: from {safe_helo[:255] or 'unknown'} (unknown [{shown}])"]
    lines.extend(f"\t{clause}" for clause in tls_clauses)
    lines.append(f"\tby {by_host} (smtproxy) with {protocol};")
    lines.append(f"\t{format_datetime(now or datetime.now(timezone.utc))}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
