"""`mailrelay SUBCOMMAND ... --config FILE`: one entry point, one module per subcommand.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets `func`, a callable
taking the parsed arguments and returning the exit status. Errors are one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("check", "passwd", "dkim", "queue", "route-test", "suppression", "apikey", "tlsrpt")   # mailrelay.cli.*


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailrelay", description="mailrelay SMTP relay tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"mailrelay.cli.{name.replace('-', '_')}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
