"""``python -m tests.bench SCENARIO... [options]`` -- see BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.bench import loadgen, report, scenarios
from tests.bench.systems import parse_cpus

ORDER = ("inbound-new", "inbound-resumed", "outbound-reuse", "bulk", "idle", "workers")


def _size(text: str) -> int:
    units = {"k": 1024, "kib": 1024, "m": 1024 ** 2, "mib": 1024 ** 2}
    lowered = text.strip().lower()
    for suffix, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(lowered)


def _first_line(*command: str) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_openssl": ssl.OPENSSL_VERSION,
        "openssl": _first_line("openssl", "version"),
        "postfix": _first_line("postconf", "-d", "-h", "mail_version"),
        "uvloop": __import__("uvloop").__version__,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("scenarios", nargs="+", metavar="SCENARIO",
                   help=f"all | floor | load | {' | '.join(ORDER)}")
    p.add_argument("--reps", type=int, default=3, help="measured runs per system (alternating order)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of load per run")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load per system first")
    p.add_argument("-c", "--concurrency", type=int, default=20, help="concurrent senders (inbound)")
    p.add_argument("-s", "--size", type=_size, default=4096, help="message size (4096, 4k, 1m)")
    p.add_argument("--mode", choices=("starttls", "implicit", "plain"), default="starttls",
                   help="inbound: STARTTLS or implicit TLS (load: also plain)")
    p.add_argument("--tls", dest="tls_version", choices=("1.2", "1.3"), default=None,
                   help="force the TLS version (default: negotiate, i.e. 1.3)")
    p.add_argument("--outbound-concurrency", type=int, default=10)
    p.add_argument("--outbound-messages-per-session", type=int, default=1)
    p.add_argument("--remote-rtt", type=float, default=0.0, metavar="MS",
                   help="outbound-reuse: round-trip time to the remote MX, added by tests.bench.delay_relay "
                        "(loopback has none: reuse then saves CPU only)")
    p.add_argument("--bulk-size", type=_size, default=50 * 1024 * 1024)
    p.add_argument("--idle-sessions", type=int, default=10_000,
                   help="smtproxy parked sessions (capped by RLIMIT_NOFILE: 2 fds per session)")
    p.add_argument("--anchor-idle-sessions", type=int, default=1_000,
                   help="Postfix parked sessions (one smtpd process each)")
    p.add_argument("--sut-cpus", default=None, help="CPUs of the system under test (default: the last CPU)")
    p.add_argument("--load-cpus", default=None, help="CPUs of the load generator and peers (default: the others)")
    p.add_argument("--workers-cpus", default=None, help="CPUs for the workers scenario without a quota (default: all)")
    p.add_argument("--worker-cpu-quota", type=float, default=None, metavar="CPUS",
                   help="workers: cap each worker process at this fraction of a CPU (cgroup CPU quota), all on the "
                        "SUT CPU; 0 turns it off (default: 0.4 on fewer than 3 cores, where the load has no core "
                        "of its own, else off)")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                   help="before each run wait up to SECONDS for other programs' CPU use to drop below "
                        "--quiet-threshold (shared machines); the load seen is recorded either way")
    p.add_argument("--quiet-threshold", type=float, default=0.3, metavar="CPUS")
    p.add_argument("--no-anchor", action="store_true", help="smtproxy only (no Postfix relay)")
    p.add_argument("--baseline", type=Path, default=None, metavar="SOURCE_DIR",
                   help="inbound, outbound-reuse and bulk: also run smtproxy from this source tree (a git worktree of an "
                        "older commit) as 'smtproxy-baseline', side by side: a change's before/after in one run")
    p.add_argument("--python-floor", action="store_true",
                   help="inbound (STARTTLS): also run tests.bench.minimal_proxy, the least a Python proxy does "
                        "per session (relay, STARTTLS, no SMTP logic): how much of smtproxy's CPU is its own code")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="after the measured runs, one extra run of smtproxy under py-spy; summaries in DIR")
    p.add_argument("--json", type=Path, default=None, help="write every run and the medians here")
    # `load`: the load generator alone, against any loopback port
    p.add_argument("--port", type=int, help="load: target port on 127.0.0.1")
    p.add_argument("-m", "--messages-per-session", type=int, default=1, help="load: messages per session")
    p.add_argument("--sessions", type=int, default=None, help="load: bound on sessions")
    p.add_argument("--resume", action="store_true", help="load: offer the previous session (resumption)")
    p.add_argument("--recipient", default="user@sink.test", help="load: RCPT TO address")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    ncpu = os.cpu_count() or 1
    sut_cpus = parse_cpus(args.sut_cpus) if args.sut_cpus else ({ncpu - 1} if ncpu > 1 else None)
    load_cpus = parse_cpus(args.load_cpus) if args.load_cpus else (set(range(ncpu - 1)) if ncpu > 1 else None)
    options = scenarios.Options(
        reps=args.reps, duration=args.duration, warmup=args.warmup, concurrency=args.concurrency,
        size=args.size, mode=args.mode if args.mode != "plain" else "starttls", tls_version=args.tls_version,
        outbound_concurrency=args.outbound_concurrency,
        outbound_messages_per_session=args.outbound_messages_per_session, remote_rtt_ms=args.remote_rtt,
        bulk_size=args.bulk_size,
        idle_sessions=args.idle_sessions, anchor_idle_sessions=args.anchor_idle_sessions,
        sut_cpus=sut_cpus, load_cpus=load_cpus, workers_cpus=parse_cpus(args.workers_cpus),
        worker_cpu_quota=args.worker_cpu_quota,
        anchor=not args.no_anchor, profile_dir=args.profile, quiet_wait=args.quiet_wait,
        quiet_threshold=args.quiet_threshold, baseline=args.baseline,
        python_floor=args.python_floor,
    )
    names = list(ORDER) if "all" in args.scenarios else args.scenarios
    unknown = [n for n in names if n not in (*ORDER, "floor", "load")]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; allowed: all, floor, load, {', '.join(ORDER)}",
              file=sys.stderr)
        return 2
    scenarios.raise_nofile()

    if "load" in names:
        if args.port is None:
            print("load: --port is required", file=sys.stderr)
            return 2
        spec = loadgen.LoadSpec(
            port=args.port, mode=args.mode, concurrency=args.concurrency,
            messages_per_session=args.messages_per_session, size=args.size, resume=args.resume,
            sessions=args.sessions, duration=args.duration, tls_version=args.tls_version,
            recipient=args.recipient,
        )
        scenarios.pin_self(options)
        result = scenarios.run_async(loadgen.run_load(spec))
        print(json.dumps(result.summary(), indent=2))
        return 0

    results: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "argv": sys.argv[1:], "sut_cpus": sorted(sut_cpus or []),
                               "load_cpus": sorted(load_cpus or [])}
    options.log(f"machine: {results['machine']}; SUT CPUs {results['sut_cpus']}, load CPUs {results['load_cpus']}")
    scenarios.pin_self(options)
    context = scenarios.make_context(options)
    context.results = results
    t0 = time.monotonic()
    try:
        scenarios.floor(context)
        for name in ORDER:
            if name in names:
                started = time.monotonic()
                options.log(f"== {name}")
                results[name] = scenarios.RUNNERS[name](context)
                results[name]["seconds"] = round(time.monotonic() - started, 1)
                if args.json:
                    args.json.write_text(json.dumps(results, indent=2, default=str))
    finally:
        shutil.rmtree(context.pki.directory, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - t0, 1)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    text = report.render(results)
    print(text)
    options.log(f"total {results['seconds']} s")
    return 0
