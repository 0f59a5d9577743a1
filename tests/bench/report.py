"""Markdown tables of the median figures, ratio columns, and the verdict on issue 8's targets."""

from __future__ import annotations

import math
from typing import Any


def _f(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def _errors(row: dict[str, Any]) -> str:
    errors = row.get("errors") or {}
    return str(sum(errors.values())) if errors else "0"


def inbound_table(results: dict[str, Any], floor: dict[str, float] | None) -> list[str]:
    if not any(results.get(name) for name in ("inbound-new", "inbound-resumed")):
        return []
    lines = [
        "| scenario | system | sessions/s | msgs/s (end to end) | latency p50 / p90 / p99 ms | full / resumed | "
        "errors | CPU ms/session | × anchor | × floor | SUT CPU busy | load gen CPU busy | foreign CPU busy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("inbound-new", "inbound-resumed"):
        scenario = results.get(name)
        if not scenario:
            continue
        med = scenario["median"]
        anchor = med.get("postfix-relay", {}).get("cpu_ms_per_session")
        floor_ms = None
        if floor:
            floor_ms = floor["full_handshake_cpu_ms"] if name == "inbound-new" else floor["resumed_handshake_cpu_ms"]
        for label, row in med.items():
            lat = row["latency_ms"]
            cpu = row["cpu_ms_per_session"]
            lines.append(
                f"| {name} | {label} | {_f(row['sessions_per_s'], 0)} | {_f(row['delivered_per_s'], 0)} | "
                f"{_f(lat['p50'], 1)} / {_f(lat['p90'], 1)} / {_f(lat['p99'], 1)} | "
                f"{_f(row['full_handshakes'], 0)} / {_f(row['resumed_handshakes'], 0)} | {_errors(row)} | "
                f"{_f(cpu, 3)} | {_f(_ratio(cpu, anchor))} | {_f(_ratio(cpu, floor_ms), 1)} | "
                f"{_f(row['sut_cpu_util'])} | {_f(row['loadgen_cpu_util'])} | {_f(row.get('foreign_cpu_util'))} |"
            )
    return lines


def outbound_table(results: dict[str, Any]) -> list[str]:
    scenario = results.get("outbound-reuse")
    if not scenario:
        return []
    med = scenario["median"]
    lines = [
        "| system | msgs/s (end to end) | latency p50 / p99 ms | handshakes/msg (remote log) | remote TCP connections |"
        " established / reused / resumed (SUT log) | errors | CPU ms/msg | × anchor (CPU) | msgs/s on ÷ off |"
        " SUT CPU busy | foreign CPU busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, row in med.items():
        kind, _, variant = label.partition(" ")
        same_anchor = med.get(f"postfix-relay {variant}", {}) if kind.startswith("smtproxy") else row
        off = med.get(label.replace("reuse=on", "reuse=off")) if "reuse=on" in label else None
        lat = row["latency_ms"]
        lines.append(
            f"| {label} | {_f(row['delivered_per_s'], 0)} | {_f(lat['p50'], 1)} / {_f(lat['p99'], 1)} | "
            f"{_f(row['handshakes_per_message'], 3)} | {_f(row['remote_connections'], 0)} | "
            f"{_f(row.get('tls_established'), 0)} / {_f(row.get('tls_reused'), 0)} / {_f(row.get('tls_resumed'), 0)} | "
            f"{_errors(row)} | {_f(row['cpu_ms_per_message'], 3)} | "
            f"{_f(_ratio(row['cpu_ms_per_message'], same_anchor.get('cpu_ms_per_message')))} | "
            f"{_f(_ratio(row['delivered_per_s'], off['delivered_per_s']) if off else None, 1)} | "
            f"{_f(row['sut_cpu_util'])} | {_f(row.get('foreign_cpu_util'))} |"
        )
    return lines


def bulk_table(results: dict[str, Any]) -> list[str]:
    scenario = results.get("bulk")
    if not scenario:
        return []
    med = scenario["median"]
    anchor = med.get("postfix-relay", {})
    lines = ["| system | MB/s (sender: connect → final 250) | MB/s (end to end, at the sink) | SUT CPU s per GB | × anchor (CPU) |"
             " errors | foreign CPU busy |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, row in med.items():
        lines.append(f"| {label} | {_f(row['mb_per_s'], 0)} | {_f(row['end_to_end_mb_per_s'], 0)} | "
                     f"{_f(row['cpu_s_per_gb'])} | {_f(_ratio(row['cpu_s_per_gb'], anchor.get('cpu_s_per_gb')))} | "
                     f"{_errors(row)} | {_f(row.get('foreign_cpu_util'))} |")
    return lines


def idle_table(results: dict[str, Any]) -> list[str]:
    scenario = results.get("idle")
    if not scenario:
        return []
    med = scenario["median"]
    anchor = med.get("postfix-relay", {})
    lines = ["| system | sessions parked | RSS KiB/session | PSS KiB/session | × anchor (PSS) | processes |"
             " new session while parked p50 / max ms | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, row in med.items():
        workers = row.get("workers", 1)
        lines.append(
            f"| {label}{f' --workers {workers:g}' if workers > 1 else ''} | {_f(row['parked'], 0)} | "
            f"{_f(row['rss_kib_per_session'], 1)} | "
            f"{_f(row['pss_kib_per_session'], 1)} | {_f(_ratio(row['pss_kib_per_session'], anchor.get('pss_kib_per_session')))} | "
            f"{_f(row['processes_parked'], 0)} | {_f(row['probe_ms']['p50'], 1)} / {_f(row['probe_ms']['max'], 1)} | "
            f"{sum((row.get('errors') or {}).values()) + sum((row.get('probe_errors') or {}).values())} |")
    return lines


def workers_table(results: dict[str, Any]) -> list[str]:
    scenario = results.get("workers")
    if not scenario:
        return []
    if not scenario.get("available"):
        return ["workers: not available (`smtproxy run` has no `--workers` option yet)."]
    med = scenario["median"]
    one = med.get("smtproxy --workers 1", {})
    quota = scenario.get("worker_cpu_quota")
    heading = [f"Each worker process capped at {quota:g} CPU (cgroup CPU quota), all on the SUT CPU.", ""] if quota else []
    lines = [*heading, "| system | sessions/s | CPU ms/session | × 1 worker (sessions/s) | SUT CPU busy | load gen CPU busy |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, row in med.items():
        lines.append(f"| {label} | {_f(row['sessions_per_s'], 0)} | {_f(row['cpu_ms_per_session'], 3)} | "
                     f"{_f(_ratio(row['sessions_per_s'], one.get('sessions_per_s')))} | {_f(row['sut_cpu_util'])} | "
                     f"{_f(row['loadgen_cpu_util'])} |")
    return lines


def targets(results: dict[str, Any], floor: dict[str, float] | None) -> list[str]:
    out: list[str] = []

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("MET" if ok else "MISSED")

    new = results.get("inbound-new", {}).get("median", {})
    resumed = results.get("inbound-resumed", {}).get("median", {})
    proxy_new = new.get("smtproxy", {}).get("cpu_ms_per_session")
    anchor_new = new.get("postfix-relay", {}).get("cpu_ms_per_session")
    r = _ratio(proxy_new, anchor_new)
    out.append(f"- inbound-new CPU/session ≤ 1/3 of the Postfix relay: {_f(r)} × → {verdict(None if r is None else r <= 1 / 3)}")
    rf = _ratio(proxy_new, floor["full_handshake_cpu_ms"]) if floor else None
    out.append(f"- inbound-new CPU/session ≤ 5 × the crypto floor: {_f(rf, 1)} × → {verdict(None if rf is None else rf <= 5)}")
    proxy_res = resumed.get("smtproxy", {}).get("cpu_ms_per_session")
    rr = _ratio(proxy_res, proxy_new)
    out.append(f"- inbound-resumed CPU/session ≤ 0.5 × inbound-new: {_f(rr)} × → {verdict(None if rr is None else rr <= 0.5)}")
    outbound = results.get("outbound-reuse", {}).get("median", {})
    on, off = outbound.get("smtproxy reuse=on"), outbound.get("smtproxy reuse=off")
    if on and off:
        hs = on["handshakes_per_message"]
        speed = _ratio(on["delivered_per_s"], off["delivered_per_s"])
        out.append(f"- outbound-reuse ≤ 0.05 handshakes/message with reuse: {_f(hs, 3)} → {verdict(hs <= 0.05)}")
        out.append(f"- outbound-reuse msgs/s ≥ 10 × reuse off: {_f(speed, 1)} × → {verdict(speed is not None and speed >= 10)}")
    else:
        out.append("- outbound-reuse: not measured")
    bulk = results.get("bulk", {}).get("median", {}).get("smtproxy")
    out.append(f"- bulk ≥ 200 MB/s: {_f(bulk['mb_per_s'], 0) if bulk else '–'} MB/s → "
               f"{verdict(None if not bulk else bulk['mb_per_s'] >= 200)}")
    idle = results.get("idle", {}).get("median", {}).get("smtproxy")
    if idle:
        out.append(f"- idle ≤ 48 KiB RSS per parked session: {_f(idle['rss_kib_per_session'], 1)} KiB at "
                   f"{_f(idle['parked'], 0)} sessions → {verdict(idle['rss_kib_per_session'] <= 48)}")
        out.append(f"- idle: a new session completes in < 100 ms while parked: p50 {_f(idle['probe_ms']['p50'], 1)} ms, "
                   f"max {_f(idle['probe_ms']['max'], 1)} ms → {verdict(idle['probe_ms']['max'] < 100)}")
    else:
        out.append("- idle: not measured")
    workers = results.get("workers")
    if workers and workers.get("available"):
        med = workers["median"]
        w = _ratio(med["smtproxy --workers 2"]["sessions_per_s"], med["smtproxy --workers 1"]["sessions_per_s"])
        cores = results.get("machine", {}).get("nproc") or 0
        quota = workers.get("worker_cpu_quota")
        if quota:
            note = f" (each worker capped at {quota:g} CPU, all on the SUT CPU)"
        elif cores < 3:
            note = (f" (on {cores} cores shared with the load generator: not a fair test, it needs 2 free cores"
                    " for the workers and one for the load)")
        else:
            note = ""
        out.append(f"- workers: 2 workers ≥ 1.7 × one: {_f(w)} ×{note} → {verdict(w is not None and w >= 1.7)}")
    else:
        out.append("- workers: not measured in this run")
    return out


def _rtt(results: dict[str, Any]) -> str:
    rtt = results.get("outbound-reuse", {}).get("remote_rtt_ms")
    return f"; {rtt:g} ms round trip to the remote, emulated" if rtt else ""


def render(results: dict[str, Any]) -> str:
    floor = results.get("floor")
    parts: list[str] = []
    if floor:
        parts += ["### Crypto floor (openssl speed, SUT CPU)", "",
                  f"X25519 {floor['x25519_ops_per_s']:.0f} op/s, ECDSA P-256 sign {floor['ecdsa_p256_sign_per_s']:.0f}/s →"
                  f" full handshake {floor['full_handshake_cpu_ms']:.3f} ms CPU"
                  f" ({floor['full_handshakes_per_cpu_s']:.0f} handshakes per CPU-second),"
                  f" resumed {floor['resumed_handshake_cpu_ms']:.3f} ms.", ""]
    for title, table in (
        ("Inbound (STARTTLS + one message per session)", inbound_table(results, floor)),
        (f"Outbound reuse (plaintext in, STARTTLS out, one destination{_rtt(results)})", outbound_table(results)),
        ("Bulk (one message through inbound STARTTLS)", bulk_table(results)),
        ("Idle (TLS sessions parked after EHLO)", idle_table(results)),
        ("Workers (inbound-new)", workers_table(results)),
    ):
        if table:
            parts += [f"### {title}", "", *table, ""]
    parts += ["### Targets of issue 8", "", *targets(results, floor), ""]
    return "\n".join(parts)
