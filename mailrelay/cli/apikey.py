# -*- test-case-name: tests.test_http_api -*-
"""`mailrelay apikey NAME --config FILE`: create or replace NAME's key for the HTTP injection API.

Before the journey starts: how an operator lets an application submit over HTTP.  In: a name (the
identity `[[permit]] users` rules match) and the config (for `[http] api_keys_file`).  Out: the key
file rewritten atomically (mode 0600) with the SHA-256 of a new random key for NAME (server/apikeys.py
says why SHA-256), and the key itself printed once, on the last line of standard output; exit 0.  The
key is stored nowhere: lost, it is replaced by running the command again (the old one stops working).
Failures: one line on stderr, exit 2 (bad name or configuration) or 1 (the file cannot be written).
"""
from __future__ import annotations

import argparse
import sys

from mailrelay import config
from mailrelay.server.apikeys import set_key
from mailrelay.server.passwords import valid_user_name

PROG = "mailrelay apikey"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "apikey", help="create or replace an HTTP API key in http.api_keys_file",
        description="Create (or replace) NAME's key for the HTTP injection API and print it once.")
    parser.add_argument("name", metavar="NAME", help="the key's name: the identity [[permit]] users rules match")
    parser.add_argument("--config", required=True, metavar="FILE", help="the relay's tap.conf")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not valid_user_name(args.name):
        return _fail("name must not be empty or contain ':', whitespace or control characters", 2)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        return _fail(str(e), 2)
    except OSError as e:
        return _fail(f"{args.config}: {e.strerror}", 2)
    path = cfg.http.api_keys_file
    if path is None:
        return _fail(f"{args.config}: http.api_keys_file: not set, so there is no file to write", 2)
    try:
        key = set_key(path, args.name)
    except OSError as e:
        return _fail(f"cannot write {e.filename or path}: {e.strerror}", 1)
    except Exception as e:     # a bug, not a user error: still one line, never a traceback
        return _fail(f"unexpected error: {e.__class__.__name__}", 1)
    print(f"key for {args.name} set in {path} (stored hashed: this is the only time it is shown)")
    print(key)
    return 0


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return status
