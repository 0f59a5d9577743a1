"""Command line: argument parsing only; the work happens in app and config."""

from __future__ import annotations

import argparse
import sys

from smtproxy import __version__
from smtproxy.config import ConfigError, load_config, render_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtproxy", description="TLS-terminating SMTP proxy")
    parser.add_argument("--version", action="version", version=f"smtproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("--config", required=True, help="TOML configuration file")
    check = commands.add_parser("check", help="validate the configuration and print it with defaults")
    check.add_argument("--config", required=True, help="TOML configuration file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"smtproxy: {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(render_config(config), end="")
        return 0
    from smtproxy import app  # imported late: `check` must not need uvloop or the TLS layer

    return app.run(config)
