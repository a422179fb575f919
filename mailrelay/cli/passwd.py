# -*- test-case-name: tests.test_cli_passwd -*-
"""`mailrelay passwd USER --config FILE [--stdin]`: add or change a password-file entry.

Before the journey starts: this is how an operator gives a client a login for SMTP AUTH (RFC 4954).
In: a user name, the config (for `auth.password_file`), a password typed twice at the terminal (getpass,
never echoed) or one line on standard input with `--stdin`.  Out: the password file rewritten atomically
with an argon2id hash for that user (other lines and comments kept, mode 0600); exit 0.
Failures: one line on stderr and a non-zero exit (2: bad user name or configuration, 1: no usable
password or the file cannot be written).  The password never appears in any output.
"""
from __future__ import annotations

import argparse
import getpass
import sys

from mailrelay import config
from mailrelay.server.passwords import set_password, valid_user_name

PROG = "mailrelay passwd"


class _Failure(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "passwd", help="add or change a user's password in auth.password_file",
        description="Add or change USER's entry in the password file named by auth.password_file.")
    parser.add_argument("user", metavar="USER", help="the login name (no ':', whitespace or control chars)")
    parser.add_argument("--config", required=True, metavar="FILE", help="the relay's tap.conf")
    parser.add_argument("--stdin", action="store_true",
                        help="read the password from the first line of standard input")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        path = _password_file(args)
        password = _read_password(args.stdin)
        try:
            set_password(path, args.user, password)
        except OSError as e:
            raise _Failure(f"cannot write {e.filename or path}: {e.strerror}", 1) from None
    except _Failure as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.status
    except Exception as e:     # a bug, not a user error: still one line, never a traceback
        print(f"{PROG}: unexpected error: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 1
    print(f"password for {args.user} set in {path}")
    return 0


def _password_file(args: argparse.Namespace):
    if not valid_user_name(args.user):
        raise _Failure("user name must not be empty or contain ':', whitespace or control characters", 2)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        raise _Failure(str(e), 2) from None
    except OSError as e:
        raise _Failure(f"{args.config}: {e.strerror}", 2) from None
    if cfg.auth.password_file is None:
        raise _Failure(f"{args.config}: auth.password_file: not set, so there is no file to write", 2)
    return cfg.auth.password_file


def _read_password(from_stdin: bool) -> str:
    try:
        if from_stdin:
            password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
        else:
            password = getpass.getpass("Password: ")
            if getpass.getpass("Retype password: ") != password:
                raise _Failure("passwords do not match", 1)
    except (EOFError, KeyboardInterrupt):
        raise _Failure("no password given", 1) from None
    except UnicodeDecodeError:
        raise _Failure("the password is not valid text in this locale", 1) from None
    if not password:
        raise _Failure("empty password refused", 1)
    if "\0" in password:
        # AUTH PLAIN separates its fields with NUL (RFC 4616 §2): such a password could never log in.
        raise _Failure("password must not contain NUL", 1)
    return password
