"""The scenarios of issue 8, each against smtproxy and, in the same run, the Postfix anchor.

Every scenario starts its systems once (idle: once per repetition, so memory is measured
from a fresh process), warms each up, then runs ``reps`` repetitions alternating the order
of the systems (A B, B A, A B, ...). Each run is bounded by a duration and a session count;
every wait has a deadline. A run records the load generator's figures, the CPU-seconds the
system under test used (its whole process tree, exited children included) from the start
of the load until the far side (smtp-sink or the remote MX) had every accepted message, and
the load generator's own CPU use (near 1.0 = the load generator was the limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvloop

from tests.bench import loadgen
from tests.bench.floor import openssl_speed
from tests.bench.systems import (
    BlackholeSink,
    CpuQuota,
    DelayRelay,
    MinimalProxy,
    PostfixRelay,
    RemoteMx,
    Sink,
    Smtproxy,
    System,
    bench_dir,
    established_to,
    machine_busy_seconds,
    pin,
    tree_pids,
    wait_for,
)
from tests.integration.peers import Pki

SCENARIOS = ("inbound-new", "inbound-resumed", "outbound-reuse", "bulk", "idle", "workers")


@dataclasses.dataclass
class Options:
    reps: int = 3
    duration: float = 5.0
    warmup: float = 1.0
    concurrency: int = 20
    size: int = 4096
    mode: str = "starttls"
    tls_version: str | None = None
    outbound_concurrency: int = 10
    outbound_messages_per_session: int = 1
    remote_rtt_ms: float = 0.0  # outbound-reuse: round-trip time to the remote MX (tests.bench.delay_relay)
    bulk_size: int = 50 * 1024 * 1024
    idle_sessions: int = 10_000
    anchor_idle_sessions: int = 1_000
    idle_probes: int = 20
    sut_cpus: set[int] | None = None
    load_cpus: set[int] | None = None
    workers_cpus: set[int] | None = None
    worker_cpu_quota: float | None = None  # workers: CPUs per worker process (None: 0.4 below 3 cores)
    anchor: bool = True
    baseline: Path | None = None  # another source tree of smtproxy, run side by side
    python_floor: bool = False  # inbound: also tests.bench.minimal_proxy
    profile_dir: Path | None = None
    profile_seconds: float = 6.0
    quiet_wait: float = 0.0  # before each run, wait up to this long for other programs to calm down
    quiet_threshold: float = 0.3  # CPUs busy (everything but the idle bench) that counts as quiet
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Context:
    options: Options
    pki: Pki
    chain: Any
    floor: dict[str, float] | None = None
    results: dict[str, Any] = dataclasses.field(default_factory=dict)


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); return the limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def self_cpu() -> float:
    times = os.times()
    return times.user + times.system


def run_async(coro):
    return uvloop.run(coro)


# --------------------------------------------------------------------------- one measured run


def foreign_load(seconds: float = 0.5) -> float:
    """CPUs kept busy over ``seconds`` (the bench itself is idle between runs)."""
    busy0, t0 = machine_busy_seconds(), time.monotonic()
    time.sleep(seconds)
    return (machine_busy_seconds() - busy0) / (time.monotonic() - t0)


QUIET: dict[str, float] = {"wait": 0.0, "threshold": 0.3}


def wait_quiet() -> dict[str, float]:
    """Bounded wait for a quiet machine (other sessions' test suites share this box)."""
    start = time.monotonic()
    load = foreign_load()
    while load > QUIET["threshold"] and time.monotonic() - start < QUIET["wait"]:
        load = foreign_load(1.0)
    return {"waited_s": round(time.monotonic() - start, 1), "load_before": round(load, 2)}


def measured_run(
    system: System,
    spec: loadgen.LoadSpec,
    delivered: Callable[[], int],
    *,
    settle_timeout: float = 120.0,
    extra: Callable[[], dict[str, Any]] | None = None,
    peers: tuple[Any, ...] = (),
) -> dict[str, Any]:
    """One run of the load against ``system``; CPU counted until ``delivered()`` grew by
    every accepted message. ``peers`` (objects with ``cpu()``: the sink, the remote MX) are
    the bench's own helpers: what the machine spent beyond SUT, load generator and peers
    is reported as foreign load (other programs on a shared machine)."""
    quiet = wait_quiet()
    base_delivered = delivered()
    base_extra = extra() if extra else {}
    peers0 = sum(peer.cpu() for peer in peers)
    busy0 = machine_busy_seconds()
    cpu0, self0, t0 = system.cpu(), self_cpu(), time.monotonic()
    result = run_async(loadgen.run_load(spec))
    t_load = time.monotonic()
    self1 = self_cpu()
    accepted = result.messages_ok
    # end to end: from the first connect until the far side had every accepted message;
    # when it already had them as the load ended (smtproxy relays before it answers), the
    # load's own end is that moment (not the event loop's teardown after it)
    if delivered() - base_delivered >= accepted:
        complete, t_done = True, result.finished_at
    else:
        complete = wait_for(lambda: delivered() - base_delivered >= accepted, settle_timeout,
                            f"{accepted} messages at the far side", interval=0.01)
        t_done = time.monotonic()
    t0 = result.started_at
    cpu1 = system.cpu()
    self_done = self_cpu()
    busy1 = machine_busy_seconds()
    peers1 = sum(peer.cpu() for peer in peers)
    foreign = (busy1 - busy0) - (cpu1 - cpu0) - (self_done - self0) - (peers1 - peers0)
    row = result.summary()
    sessions = max(result.sessions_ok, 1)
    row.update({
        "system": system.label,
        "kind": system.kind,
        "delivered": delivered() - base_delivered,
        "all_delivered": complete,
        "end_to_end_s": round(t_done - t0, 3),
        "delivered_per_s": round(accepted / (t_done - t0), 1) if t_done > t0 else 0.0,
        "sut_cpu_s": round(cpu1 - cpu0, 3),
        "cpu_ms_per_session": round(1000 * (cpu1 - cpu0) / sessions, 4),
        "cpu_ms_per_message": round(1000 * (cpu1 - cpu0) / max(accepted, 1), 4),
        "sut_cpu_util": round((cpu1 - cpu0) / (t_done - t0), 3),
        "loadgen_cpu_util": round((self1 - self0) / (t_load - t0), 3),
        "peers_cpu_util": round((peers1 - peers0) / (t_done - t0), 3),
        "foreign_cpu_util": round(max(0.0, foreign) / (t_done - t0), 3),
        "foreign_before": quiet["load_before"],
        "quiet_waited_s": quiet["waited_s"],
    })
    if extra:
        now_extra = extra()
        row.update({key: now_extra[key] - base_extra.get(key, 0) for key in now_extra})
    return row


def alternating_runs(
    name: str,
    systems: list[System],
    spec_for: Callable[[System, float], loadgen.LoadSpec],
    sink: Sink,
    options: Options,
) -> dict[str, list[dict[str, Any]]]:
    """`options.reps` measured runs per system, in alternating order, delivering to `sink`."""
    runs: dict[str, list[dict[str, Any]]] = {s.label: [] for s in systems}
    for rep in range(options.reps):
        for system in alternate(systems, rep):
            row = measured_run(system, spec_for(system, options.duration), sink.stored, peers=(sink,))
            row["rep"] = rep
            runs[system.label].append(row)
            options.log(f"[{name} rep {rep}]" + describe(row))
            sink.clear()
    return runs


def alternate(systems: list[System], rep: int) -> list[System]:
    return systems if rep % 2 == 0 else list(reversed(systems))


def rotate(systems: list[System], rep: int) -> list[System]:
    shift = rep % len(systems)
    return systems[shift:] + systems[:shift]


@contextlib.contextmanager
def started(*systems: System) -> Iterator[None]:
    running: list[System] = []
    try:
        for system in systems:
            system.start()
            running.append(system)
        yield
    finally:
        for system in reversed(running):
            with contextlib.suppress(Exception):
                system.stop()
        for system in systems:
            cleanup = getattr(system, "cleanup", None)
            if cleanup:
                cleanup()


def describe(row: dict[str, Any]) -> str:
    lat = row.get("latency_ms", {})
    return (f"  {row['system']:<22} sess/s {row['sessions_per_s']:>7} msg/s(e2e) {row['delivered_per_s']:>7}"
            f" p50/p99 {lat.get('p50')}/{lat.get('p99')} ms cpu/sess {row['cpu_ms_per_session']} ms"
            f" full/res {row['full_handshakes']}/{row['resumed_handshakes']} err {row['sessions_failed']}"
            f" sut {row['sut_cpu_util']} load {row['loadgen_cpu_util']} peers {row['peers_cpu_util']}"
            f" foreign {row['foreign_cpu_util']}")


def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-key median of numeric fields (nested latency too); other fields from the first."""
    if not rows:
        return {}
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
            out[key] = value if key != "all_delivered" else all(r.get(key) for r in rows)
        elif isinstance(value, dict):
            if all(isinstance(v, (int, float)) for v in value.values()):
                out[key] = {k: statistics.median(r[key].get(k, 0) for r in rows) for k in value}
            else:
                merged: dict[str, int] = {}
                for r in rows:
                    for k, v in r[key].items():
                        merged[k] = merged.get(k, 0) + v
                out[key] = merged
        else:
            out[key] = statistics.median(r[key] for r in rows)
    out["errors"] = {}
    for r in rows:
        for k, v in r.get("errors", {}).items():
            out["errors"][k] = out["errors"].get(k, 0) + v
    out["runs"] = len(rows)
    return out


def maybe_profile(ctx: Context, name: str, system: System, spec: loadgen.LoadSpec) -> None:
    """An extra, unmeasured run with py-spy attached to smtproxy (``--profile DIR``)."""
    options = ctx.options
    if options.profile_dir is None or system.kind != "smtproxy":
        return
    from tests.bench.profile import profile_run

    options.log(f"[{name}] profiling {system.label} with py-spy")
    ctx.results.setdefault("profiles", {})[name] = profile_run(
        system, spec, options.profile_dir / f"{name}.txt", options.profile_seconds,
        options.load_cpus,
    )


# --------------------------------------------------------------------------- scenarios


def floor(ctx: Context) -> dict[str, float]:
    if ctx.floor is None:
        ctx.floor = openssl_speed(ctx.options.sut_cpus)
        ctx.results["floor"] = ctx.floor
        ctx.options.log(f"[floor] {ctx.floor}")
    return ctx.floor


def baseline(ctx: Context, label: str = "smtproxy-baseline", **config: Any) -> list[System]:
    """smtproxy from `--baseline`'s source tree, configured like the one under test."""
    if ctx.options.baseline is None:
        return []
    return [Smtproxy(label, cpus=ctx.options.sut_cpus, source=ctx.options.baseline, **config)]


def _inbound(ctx: Context, name: str, *, resume: bool) -> dict[str, Any]:
    options = ctx.options
    sink = Sink(options.load_cpus).start()
    try:
        proxy = Smtproxy("smtproxy", cpus=options.sut_cpus, backend_port=sink.port, chain=ctx.chain)
        systems: list[System] = [proxy, *baseline(ctx, backend_port=sink.port, chain=ctx.chain)]
        if options.python_floor and options.mode == "starttls":
            systems.append(MinimalProxy("python-floor", cpus=options.sut_cpus, backend_port=sink.port,
                                        chain=ctx.chain))
        if options.anchor:
            systems.append(PostfixRelay("postfix-relay", cpus=options.sut_cpus, sink_port=sink.port,
                                        chain=ctx.chain))
        with started(*systems):
            def spec_for(system: System, duration: float) -> loadgen.LoadSpec:
                port = system.implicit_port if options.mode == "implicit" else system.starttls_port
                return loadgen.LoadSpec(
                    port=port, mode=options.mode, concurrency=options.concurrency, messages_per_session=1,
                    size=options.size, resume=resume, duration=duration, tls_version=options.tls_version,
                    sessions=int(duration * 3000),
                )

            for system in systems:  # warm-up: caches, ticket keys, imports, Postfix processes
                measured_run(system, spec_for(system, options.warmup), sink.stored)
            runs = alternating_runs(name, systems, spec_for, sink, options)
            maybe_profile(ctx, name, proxy, spec_for(proxy, options.profile_seconds))
    finally:
        sink.stop()
    return {"runs": runs, "median": {label: medians(rows) for label, rows in runs.items()}}


def inbound_new(ctx: Context) -> dict[str, Any]:
    return _inbound(ctx, "inbound-new", resume=False)


def inbound_resumed(ctx: Context) -> dict[str, Any]:
    return _inbound(ctx, "inbound-resumed", resume=True)


def outbound_reuse(ctx: Context) -> dict[str, Any]:
    options = ctx.options
    remote = RemoteMx(ctx.chain, options.load_cpus).start()
    relay = DelayRelay(remote.port, options.remote_rtt_ms, options.load_cpus) if options.remote_rtt_ms else None
    peers: tuple[Any, ...] = (remote, relay) if relay else (remote,)
    try:
        if relay:
            relay.start()
        remote_port = relay.port if relay else remote.port
        routes = f"remote.test [127.0.0.1]:{remote_port}\n"
        no_reuse = f"[127.0.0.1]:{remote_port} may connection_reuse=no\nremote.test may connection_reuse=no\n"
        outbound = {"routes_file": "routes", "default_level": "may"}
        outbound_off = {**outbound, "policy_file": "policy"}
        systems: list[System] = [
            Smtproxy("smtproxy reuse=on", cpus=options.sut_cpus, inbound=False, outbound=outbound,
                     files={"routes": routes}),
            *baseline(ctx, "smtproxy-baseline reuse=on", inbound=False, outbound=outbound, files={"routes": routes}),
            Smtproxy("smtproxy reuse=off", cpus=options.sut_cpus, inbound=False, outbound=outbound_off,
                     files={"routes": routes, "policy": no_reuse}),
            *baseline(ctx, "smtproxy-baseline reuse=off", inbound=False, outbound=outbound_off,
                      files={"routes": routes, "policy": no_reuse}),
        ]
        if options.anchor:
            systems += [
                PostfixRelay("postfix-relay reuse=on", cpus=options.sut_cpus, remote_port=remote_port, reuse=True),
                PostfixRelay("postfix-relay reuse=off", cpus=options.sut_cpus, remote_port=remote_port, reuse=False),
            ]
        # Postfix logs a handshake made by tlsproxy(8) twice (tlsproxy and smtp): count smtp's
        # line. Postfix says nothing about resumption at smtp_tls_loglevel 1: smtproxy only.
        sut_patterns = {
            "tls_established": r"^(?!.*tlsproxy\[).*TLS connection established to ",
            "tls_reused": r"^(?!.*tlsproxy\[).*TLS connection reused to ",
        }
        with started(*systems):
            tails = {s.label: s.log_tail({**sut_patterns, "tls_resumed": r'"resumed": true'}
                                         if s.kind == "smtproxy" else sut_patterns) for s in systems}

            def spec_for(system: System, duration: float) -> loadgen.LoadSpec:
                return loadgen.LoadSpec(
                    port=system.outbound_port, mode="plain", concurrency=options.outbound_concurrency,
                    messages_per_session=options.outbound_messages_per_session, size=options.size,
                    duration=duration, recipient="user@remote.test", sessions=int(duration * 3000),
                )

            def delivered() -> int:
                return remote.log.update()["delivered"]

            for system in systems:
                measured_run(system, spec_for(system, options.warmup), delivered)
            runs: dict[str, list[dict[str, Any]]] = {s.label: [] for s in systems}
            for rep in range(options.reps):
                for system in rotate(systems, rep):
                    tail = tails[system.label]

                    def extra(tail=tail) -> dict[str, Any]:
                        counts = remote.log.update()
                        return {"remote_connections": counts["connections"],
                                "remote_handshakes": counts["handshakes"], **tail.update()}

                    row = measured_run(system, spec_for(system, options.duration), delivered, extra=extra,
                                       peers=peers)
                    row["rep"] = rep
                    row["handshakes_per_message"] = round(
                        row["remote_handshakes"] / max(row["delivered"], 1), 4)
                    runs[system.label].append(row)
                    options.log(f"[outbound-reuse rep {rep}]" + describe(row)
                                + f" hs/msg {row['handshakes_per_message']}"
                                + f" remote conns {row['remote_connections']}")
            maybe_profile(ctx, "outbound-reuse", systems[0], spec_for(systems[0], options.profile_seconds))
    finally:
        if relay:
            relay.stop()
        remote.stop()
    return {"runs": runs, "median": {label: medians(rows) for label, rows in runs.items()},
            "remote_rtt_ms": options.remote_rtt_ms}


def bulk(ctx: Context) -> dict[str, Any]:
    options = ctx.options
    sink = BlackholeSink(options.load_cpus).start()
    try:
        proxy = Smtproxy("smtproxy", cpus=options.sut_cpus, backend_port=sink.port, chain=ctx.chain)
        systems: list[System] = [proxy, *baseline(ctx, backend_port=sink.port, chain=ctx.chain)]
        if options.anchor:
            systems.append(PostfixRelay("postfix-relay", cpus=options.sut_cpus, sink_port=sink.port,
                                        chain=ctx.chain))
        with started(*systems):
            def spec_for(system: System) -> loadgen.LoadSpec:
                return loadgen.LoadSpec(port=system.starttls_port, mode="starttls", concurrency=1,
                                        size=options.bulk_size, sessions=1, duration=120, timeout=120)

            for system in systems:  # warm-up with a small message
                run_async(loadgen.run_load(dataclasses.replace(spec_for(system), size=4096)))
            wait_for(lambda: sink.complete() >= len(systems), 30, "warm-up messages")
            sink.clear()
            runs: dict[str, list[dict[str, Any]]] = {s.label: [] for s in systems}
            for rep in range(options.reps):
                for system in alternate(systems, rep):
                    row = measured_run(system, spec_for(system), sink.complete, peers=(sink,))
                    latency_s = row["latency_ms"]["p50"] / 1000
                    row["mb_per_s"] = round(options.bulk_size / 1e6 / latency_s, 1) if latency_s else 0.0
                    row["end_to_end_mb_per_s"] = round(options.bulk_size / 1e6 / row["end_to_end_s"], 1)
                    row["cpu_s_per_gb"] = round(row["sut_cpu_s"] / (options.bulk_size / 1e9), 3)
                    row["rep"] = rep
                    runs[system.label].append(row)
                    options.log(f"[bulk rep {rep}]  {system.label:<16} {row['mb_per_s']} MB/s at the sender,"
                                f" {row['end_to_end_mb_per_s']} MB/s end to end, cpu {row['sut_cpu_s']} s,"
                                f" errors {row['errors']}")
                    sink.clear()
            maybe_profile(ctx, "bulk", proxy, dataclasses.replace(spec_for(proxy), sessions=6))
    finally:
        sink.stop()
    return {"runs": runs, "median": {label: medians(rows) for label, rows in runs.items()}}


def idle(ctx: Context) -> dict[str, Any]:
    options = ctx.options
    soft, hard = raise_nofile()
    # smtproxy holds two descriptors per session (client + backend); one process cannot hold
    # more than the hard limit (which root may not be allowed to raise). Past that, the
    # sessions are spread over `--workers` processes (SO_REUSEPORT: unevenly, hence 80 %).
    # The load generator needs one descriptor per session.
    per_process = max(100, (hard - 200) // 2)
    proxy_sessions = min(options.idle_sessions, hard - 500)
    proxy_workers = math.ceil(proxy_sessions / (0.8 * per_process))
    anchor_sessions = min(options.anchor_idle_sessions, per_process)
    if proxy_workers > 1:
        options.log(f"[idle] RLIMIT_NOFILE hard limit {hard}: {proxy_sessions} sessions over --workers "
                    f"{proxy_workers} (two descriptors per proxied session)")
    sink = Sink(options.load_cpus, max_sessions=proxy_sessions + 500).start()
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for rep in range(options.reps):
            makers: list[tuple[str, Callable[[], System], int]] = [(
                "smtproxy",
                lambda: Smtproxy("smtproxy", cpus=options.sut_cpus, backend_port=sink.port, chain=ctx.chain,
                                 inbound_extra={"max_connections": proxy_sessions + 200,
                                                "max_connections_per_client": 0},
                                 args=("--workers", str(proxy_workers)) if proxy_workers > 1 else ()),
                proxy_sessions,
            )]
            if options.anchor:
                makers.append((
                    "postfix-relay",
                    lambda: PostfixRelay("postfix-relay", cpus=options.sut_cpus, sink_port=sink.port,
                                         chain=ctx.chain, process_limit=anchor_sessions + 200),
                    anchor_sessions,
                ))
            order = makers if rep % 2 == 0 else list(reversed(makers))
            for label, make, count in order:
                system = make()
                with started(system):
                    row = run_async(_idle_run(system, count, options, sink.port))
                row["rep"] = rep
                row["workers"] = proxy_workers if label == "smtproxy" else 1
                runs.setdefault(label, []).append(row)
                options.log(f"[idle rep {rep}]  {label:<16} parked {row['parked']}/{count} in {row['ramp_s']} s,"
                            f" RSS {row['rss_kib_per_session']} KiB/session (PSS {row['pss_kib_per_session']}),"
                            f" new session p50 {row['probe_ms']['p50']} ms max {row['probe_ms']['max']} ms,"
                            f" errors {row['errors']} {row['probe_errors']}")
                sink.clear()
    finally:
        sink.stop()
    return {"runs": runs, "median": {label: medians(rows) for label, rows in runs.items()},
            "nofile": {"soft": soft, "hard": hard}}


async def _idle_run(system: System, count: int, options: Options, sink_port: int) -> dict[str, Any]:
    base_spec = loadgen.LoadSpec(port=system.starttls_port, mode="starttls", concurrency=4, sessions=40,
                                 duration=10, resume=False)
    await loadgen.run_load(base_spec)  # warm-up
    # "before" once the warm-up's sessions are gone (a relay's cached connections to the sink too)
    wait_for(lambda: established_to(sink_port) == 0, 15, "warm-up connections to the sink closed")
    before = system.memory()
    park_spec = dataclasses.replace(base_spec, resume=True, timeout=60)
    # every parked session has had its EHLO answered: nothing is left in flight to wait for
    parked, tally = await loadgen.park_sessions(park_spec, count, concurrency=100, deadline=180)
    after = system.memory()
    probe = await loadgen.run_load(dataclasses.replace(
        base_spec, concurrency=1, sessions=options.idle_probes, duration=30, timeout=10))
    while_parked = system.memory()
    await loadgen.close_parked(parked)
    n = max(len(parked), 1)
    lat = sorted(probe.latencies)
    return {
        "system": system.label,
        "kind": system.kind,
        "parked": len(parked),
        "ramp_s": round(tally.elapsed, 2),
        "ramp_full_handshakes": tally.full_handshakes,
        "ramp_resumed_handshakes": tally.resumed_handshakes,
        "errors": dict(tally.errors),
        "rss_kib_per_session": round((after["rss_kib"] - before["rss_kib"]) / n, 1),
        "pss_kib_per_session": round((after["pss_kib"] - before["pss_kib"]) / n, 1),
        "rss_before_kib": before["rss_kib"],
        "rss_parked_kib": after["rss_kib"],
        "processes_parked": after["processes"],
        "rss_after_probes_kib": while_parked["rss_kib"],
        "probe_ms": {
            "p50": round(1000 * loadgen.percentile(lat, 50), 1) if lat else None,
            "max": round(1000 * lat[-1], 1) if lat else None,
        },
        "probe_ok": probe.sessions_ok,
        "probe_errors": dict(probe.errors),
    }


def workers_supported() -> bool:
    result = subprocess.run([sys.executable, "-m", "smtproxy", "run", "--help"], capture_output=True,
                            text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    return "--workers" in result.stdout


def workers(ctx: Context) -> dict[str, Any]:
    """--workers 2 against 1. With a quota (the default on fewer than 3 cores, where the
    load generator has no core of its own), every worker is capped at that fraction of a
    CPU and all run on the SUT CPU: the question is then whether twice the workers, given
    twice the CPU, serve twice the sessions."""
    options = ctx.options
    if not workers_supported():
        options.log("[workers] not available: `smtproxy run` has no --workers option yet")
        return {"available": False, "note": "smtproxy run has no --workers option yet"}
    quota = options.worker_cpu_quota
    if quota is None:
        quota = 0.4 if (os.cpu_count() or 1) < 3 else 0.0
    if quota and not CpuQuota.available():
        options.log("[workers] no writable cgroup cpu controller here: workers run without a CPU quota")
        quota = 0.0
    caps = CpuQuota(quota) if quota else None
    cpus = options.sut_cpus if caps else (options.workers_cpus or set(range(os.cpu_count() or 1)))
    sink = Sink(options.load_cpus if caps else None).start()
    try:
        systems: list[System] = [
            Smtproxy(f"smtproxy --workers {n}", cpus=cpus, backend_port=sink.port, chain=ctx.chain,
                     args=("--workers", str(n)))
            for n in (1, 2)
        ]
        with started(*systems):
            if caps:
                for system in systems:
                    # the workers, not their supervisor; --workers 1 serves in its own process
                    for pid in tree_pids(system.root_pid())[1:] or [system.root_pid()]:
                        caps.apply(pid)

            def spec_for(system: System, duration: float) -> loadgen.LoadSpec:
                return loadgen.LoadSpec(port=system.starttls_port, mode="starttls",
                                        concurrency=options.concurrency, duration=duration,
                                        sessions=int(duration * 3000))

            for system in systems:
                run_async(loadgen.run_load(spec_for(system, options.warmup)))
            sink.clear()
            runs = alternating_runs("workers", systems, spec_for, sink, options)
    finally:
        sink.stop()
        if caps:
            caps.remove()
    return {"available": True, "cpus": sorted(cpus or ()), "worker_cpu_quota": quota, "runs": runs,
            "median": {label: medians(rows) for label, rows in runs.items()}}


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "inbound-new": inbound_new,
    "inbound-resumed": inbound_resumed,
    "outbound-reuse": outbound_reuse,
    "bulk": bulk,
    "idle": idle,
    "workers": workers,
}


def make_context(options: Options) -> Context:
    QUIET.update(wait=options.quiet_wait, threshold=options.quiet_threshold)
    pki = Pki(bench_dir("pki"))
    chain = pki.server_cert("mx.bench.test")  # ECDSA P-256, as Postfix and smtproxy both use
    for path in (chain.key_file, chain.chain_file):
        path.chmod(0o644)  # Postfix reads its chain file as root anyway; smtproxy as root
    return Context(options, pki, chain)


def pin_self(options: Options) -> None:
    if options.load_cpus:
        pin([os.getpid()], options.load_cpus)
