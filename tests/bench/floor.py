"""The crypto floor: what OpenSSL itself needs for the server side of one handshake.

``openssl speed ecdhx25519 ecdsap256`` (pinned to the CPU of the system under test) gives
X25519 operations/s and ECDSA P-256 signatures/s. A full TLS 1.3 handshake with an ECDSA
P-256 certificate and X25519 costs the server one X25519 key generation, one X25519 shared
secret and one ECDSA signature (CertificateVerify); a resumed one (psk_dhe_ke) the two
X25519 operations and no signature. Key generation is counted as one X25519 operation
(``openssl speed`` measures the shared-secret operation; OpenSSL's key generation is a
fixed-base multiplication and somewhat cheaper), so the floor is slightly generous to
OpenSSL: 2/x25519 + 1/sign seconds per full handshake.
"""

from __future__ import annotations

import re
import shutil
import subprocess


def openssl_speed(cpus: set[int] | None, seconds: int = 2) -> dict[str, float]:
    command = ["openssl", "speed", "-seconds", str(seconds), "ecdhx25519", "ecdsap256"]
    if cpus and shutil.which("taskset"):
        command = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *command]
    output = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    sign = re.search(r"ecdsa \(nistp256\)\s+\S+\s+\S+\s+([\d.]+)\s+([\d.]+)", output)
    x25519 = re.search(r"ecdh \(X25519\)\s+\S+\s+([\d.]+)", output)
    if sign is None or x25519 is None:
        raise RuntimeError(f"cannot parse `openssl speed` output:\n{output}")
    sign_s, verify_s, x_s = float(sign.group(1)), float(sign.group(2)), float(x25519.group(1))
    full = 2 / x_s + 1 / sign_s
    resumed = 2 / x_s
    return {
        "x25519_ops_per_s": x_s,
        "ecdsa_p256_sign_per_s": sign_s,
        "ecdsa_p256_verify_per_s": verify_s,
        "full_handshake_cpu_ms": 1000 * full,
        "resumed_handshake_cpu_ms": 1000 * resumed,
        "full_handshakes_per_cpu_s": 1 / full,
    }
