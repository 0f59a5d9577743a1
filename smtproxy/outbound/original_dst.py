"""Where a connection redirected by iptables REDIRECT/DNAT was going: SO_ORIGINAL_DST.

Linux netfilter keeps the pre-NAT destination; `getsockopt(SOL_IP, SO_ORIGINAL_DST)` returns
it as a `struct sockaddr_in`, and `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` as a
`struct sockaddr_in6` (both option numbers are 80, from linux/netfilter_ipv4.h and
linux/netfilter_ipv6/ip6_tables.h).
"""

from __future__ import annotations

import socket
import struct

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """(address, port) the client connected to before NAT; OSError when there is none."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        address = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        return address, port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
