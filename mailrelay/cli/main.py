# -*- test-case-name: tests.test_throttle_config, tests.test_cli_route_test, tests.test_cli_passwd -*-
"""`mailrelay SUBCOMMAND ... --config FILE`: one entry point, one module per subcommand.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets `func`, a callable
taking the parsed arguments and returning the exit status. Errors are one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("check", "passwd", "dkim", "queue", "route-test", "suppression", "apikey", "tlsrpt")   # mailrelay.cli.*


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given the arguments, only the subcommand they name is imported (each pulls in a part
    of the relay: `mailrelay queue list` need not load DKIM, LDAP and TLS first), else all of them."""
    parser = argparse.ArgumentParser(prog="mailrelay", description="mailrelay SMTP relay tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name in SUBCOMMANDS:
        if wanted is None or name == wanted:
            importlib.import_module(f"mailrelay.cli.{name.replace('-', '_')}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
