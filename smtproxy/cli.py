"""Command line: argument parsing only; the work happens in app and config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smtproxy import __version__
from smtproxy.config import (
    OUTBOUND_LEVELS,
    ConfigError,
    certificate_problem,
    load_config,
    parse_config,
    render_config,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtproxy", description="TLS-terminating SMTP proxy")
    parser.add_argument("--version", action="version", version=f"smtproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("--config", required=True, help="TOML configuration file")
    run.add_argument("--workers", type=_positive, default=1,
                     help="worker processes sharing the listeners (SO_REUSEPORT); default 1")
    run.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    check = commands.add_parser("check", help="validate the configuration and print it with defaults")
    check.add_argument("--config", required=True, help="TOML configuration file")
    probe = commands.add_parser("probe", help="connect to a destination as outbound delivery would; print the TLS facts")
    probe.add_argument("--config", help="TOML configuration file (default: every default; system trust store)")
    probe.add_argument("--level", choices=OUTBOUND_LEVELS, help="use this TLS level instead of the policy table's")
    probe.add_argument("--sender", default="", help="envelope sender, for its client certificate")
    probe.add_argument("domain", help="recipient domain, routed as mail to it would be")
    policy = commands.add_parser(
        "policy", help="print the TLS policy of a destination, or convert s/qmail tlsdestinations",
        usage=f"%(prog)s {POLICY_USAGE}")
    policy.add_argument("--config", help="TOML configuration file")
    policy.add_argument("words", nargs="+", metavar="NEXTHOP | import-qmail FILE")
    return parser


POLICY_USAGE = "--config FILE NEXTHOP (example.com, [mx.example.net]:25) | import-qmail TLSDESTINATIONS"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: a whole number >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "policy":
        return _policy(args)
    if args.command == "probe":
        return _probe(args)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _print_config_error(args.config, exc)
        return 2
    if args.command == "check":
        problem = _table_problem(config) or certificate_problem(config)
        if problem is not None:
            print(f"smtproxy: {problem}", file=sys.stderr)
            return 2
        from smtproxy.tls.certificates import validity_warnings

        for warning in validity_warnings(config.inbound.certificates):
            print(f"smtproxy: warning: {warning}", file=sys.stderr)
        print(render_config(config), end="")
        return 0
    from smtproxy import app  # imported late: `check` must not need uvloop or the TLS layer

    return app.run(config, args.workers, args.worker_fd)


def _print_config_error(path: str, exc: ConfigError) -> None:
    """One line naming the file once: a file-level error (unreadable, not TOML) names it already."""
    print(f"smtproxy: {exc}" if exc.key == "" else f"smtproxy: {path}: {exc}", file=sys.stderr)


def _probe(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config) if args.config else parse_config(
            {"inbound": {"listen": [], "implicit_tls_listen": []}}, Path.cwd())
    except ConfigError as exc:
        _print_config_error(args.config, exc)
        return 2
    import uvloop

    from smtproxy.probe import probe
    from smtproxy.telemetry import logging as log_setup

    log_setup.configure("console", "info")
    return uvloop.run(probe(config, args.domain.rstrip(".").lower(), args.level, args.sender))


def _table_problem(config) -> str | None:
    """The first error in the outbound routes and policy tables, as one line; None: fine."""
    from smtproxy.policy.ciphers import cipher_problem
    from smtproxy.policy.table import Policies, PolicyTableError
    from smtproxy.routing.routes import RouteTable, RouteTableError

    outbound = config.outbound
    try:
        if outbound.routes_file is not None:
            RouteTable.load(outbound.routes_file)
        policies = Policies.from_config(outbound)
    except (RouteTableError, PolicyTableError) as exc:
        return str(exc)
    return cipher_problem(policies, outbound.tls.ciphers)


def _policy(args: argparse.Namespace) -> int:
    """`policy --config F NEXTHOP` and `policy import-qmail FILE`; neither needs uvloop or TLS."""
    from smtproxy.policy.qmail import load_tlsdestinations, to_postfix_lines
    from smtproxy.policy.table import Policies, PolicyTableError, describe_decision

    if args.words[0] == "import-qmail":
        usage_ok = len(args.words) == 2 and not args.config
    else:
        usage_ok = len(args.words) == 1 and bool(args.config)
    if not usage_ok:
        print(f"smtproxy policy: usage: smtproxy policy {POLICY_USAGE}", file=sys.stderr)
        return 2
    if args.words[0] == "import-qmail":
        try:
            lines = to_postfix_lines(load_tlsdestinations(args.words[1]))
        except PolicyTableError as exc:
            print(f"smtproxy: {exc}", file=sys.stderr)
            return 2
        print("\n".join(lines))
        return 0
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _print_config_error(args.config, exc)
        return 2
    try:
        decision = Policies.from_config(config.outbound).decide(args.words[0])
    except (PolicyTableError, ValueError) as exc:  # ValueError: not a nexthop
        print(f"smtproxy: {exc}", file=sys.stderr)
        return 2
    print("\n".join([f"nexthop: {args.words[0]}", *describe_decision(decision, config.outbound)]))
    return 0
