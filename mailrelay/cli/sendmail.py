# -*- test-case-name: tests.test_sendmail -*-
"""`mailrelay-sendmail`: a drop-in for /usr/sbin/sendmail that submits to a relay over SMTP.

In: sendmail's command line (`-t`, `-i`/`-oi`, `-f`, `-F`, recipients as arguments) and a message on stdin.
Out: one SMTP submission (STARTTLS or implicit TLS, AUTH when configured) and sendmail's exit status:
0 accepted, 75 EX_TEMPFAIL (relay unreachable, 4xx), 69 EX_UNAVAILABLE (5xx), 77 EX_NOPERM (AUTH refused),
64 EX_USAGE, 65 EX_DATAERR, 78 EX_CONFIG — with one clear line on stderr, never a traceback.

Settings: `[sendmail]` of `--config FILE` (a tap.conf or a file with only that section), else the
environment: MAILRELAY_SERVER (host:port), MAILRELAY_SECURITY, MAILRELAY_USERNAME, MAILRELAY_PASSWORD_FILE,
MAILRELAY_CA_FILE, MAILRELAY_VERIFY (0/1).

SMTPUTF8 (RFC 6531): a UTF-8 envelope address, or a header block holding UTF-8 (RFC 6532), is
submitted with `MAIL FROM:<...> SMTPUTF8` (a relay without it refuses: EX_UNAVAILABLE).
"""
from __future__ import annotations

import email.utils
import getpass
import os
import re
import smtplib
import socket
import ssl
import sys
from dataclasses import dataclass
from email.parser import HeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Optional

from mailrelay import idn
from mailrelay.config import SendmailConfig

EX_OK, EX_USAGE, EX_DATAERR, EX_UNAVAILABLE = 0, 64, 65, 69
EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 75, 77, 78
TIMEOUT = 60.0     # seconds for connecting and for each reply


class Failure(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Invocation:
    recipients: list[str]
    sender: Optional[str] = None
    full_name: Optional[str] = None
    read_recipients: bool = False     # -t
    dot_ends_input: bool = True       # cleared by -i / -oi
    config: Optional[str] = None


# Flags real sendmail accepts that change nothing here (delivery mode, error mode, verbosity ...).
_IGNORED_FLAGS = {"-odi", "-odb", "-odq", "-oem", "-oep", "-oeq", "-em", "-ep", "-eq", "-v", "-bm", "-U", "-n"}


def parse_args(argv: list[str]) -> Invocation:
    inv = Invocation(recipients=[])
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            inv.recipients.extend(args)
            break
        if arg in ("-i", "-oi"):
            inv.dot_ends_input = False
        elif arg == "-t":
            inv.read_recipients = True
        elif arg in ("-f", "-r", "-F", "--config", "-C", "-o", "-O", "-N", "-R", "-V", "-B"):
            if not args:
                raise Failure(EX_USAGE, f"option {arg} needs a value")
            value = args.pop(0)
            if arg in ("-f", "-r"):
                inv.sender = value
            elif arg == "-F":
                inv.full_name = value
            elif arg in ("--config", "-C"):
                inv.config = value
        elif arg.startswith(("-f", "-r")) and len(arg) > 2:
            inv.sender = arg[2:]
        elif arg.startswith("-F") and len(arg) > 2:
            inv.full_name = arg[2:]
        elif arg.startswith("--config="):
            inv.config = arg.split("=", 1)[1]
        elif arg in _IGNORED_FLAGS or re.fullmatch(r"-o[A-Za-z].*|-B\w+|-N\w+|-R\w+|-X.*", arg):
            continue
        elif arg.startswith("-"):
            raise Failure(EX_USAGE, f"unsupported option {arg}")
        else:
            inv.recipients.extend(a.strip() for a in arg.split(",") if a.strip())
    return inv


def load_settings(config_path: Optional[str], environ=os.environ) -> SendmailConfig:
    """`[sendmail]` of the config file, else the same settings from the environment."""
    if config_path:
        from mailrelay.config import ConfigError, load

        try:
            return load(config_path).sendmail
        except ConfigError as e:
            raise Failure(EX_CONFIG, str(e)) from None
    security = environ.get("MAILRELAY_SECURITY", "starttls")
    if security not in ("starttls", "tls", "none"):
        raise Failure(EX_CONFIG, f"MAILRELAY_SECURITY: must be starttls, tls or none, not {security!r}")
    def optional_path(name: str) -> Optional[Path]:
        return Path(environ[name]) if environ.get(name) else None

    return SendmailConfig(
        server=environ.get("MAILRELAY_SERVER", SendmailConfig.server),
        security=security,
        verify=environ.get("MAILRELAY_VERIFY", "1").lower() not in ("0", "false", "no"),
        username=environ.get("MAILRELAY_USERNAME") or None,
        password_file=optional_path("MAILRELAY_PASSWORD_FILE"),
        ca_file=optional_path("MAILRELAY_CA_FILE"),
    )


def read_message(stream, dot_ends_input: bool) -> bytes:
    """stdin → message with CRLF line ends. Without -i a line holding only "." ends the input (sendmail)."""
    lines = []
    for raw in stream:
        line = raw.rstrip(b"\r\n")
        if dot_ends_input and line == b".":
            break
        lines.append(line)
    return b"".join(line + b"\r\n" for line in lines)


def split_headers(message: bytes) -> tuple[bytes, bytes]:
    end = message.find(b"\r\n\r\n")
    if end < 0:
        # No blank line: all header lines if they look like headers, else all body.
        if re.match(rb"[!-9;-~]+:", message):
            return message, b""
        return b"", message
    return message[: end + 2], message[end + 4 :]


def _drop_header(headers: bytes, name: bytes) -> bytes:
    """Remove every occurrence of header `name` (with its continuation lines)."""
    out, skipping = [], False
    for line in headers.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.lower().startswith(name.lower() + b":")
        if not skipping:
            out.append(line)
    return b"\r\n".join(out)


def prepare(inv: Invocation, message: bytes) -> tuple[str, list[str], bytes]:
    """The envelope sender, the recipients and the message to submit."""
    headers, body = split_headers(message)
    # RFC 6532: header fields may be UTF-8; read as text so that UTF-8 addresses come out whole.
    parsed = HeaderParser(policy=compat32).parsestr(headers.decode("utf-8", "surrogateescape") + "\r\n")
    recipients = list(inv.recipients)
    if inv.read_recipients:
        fields = parsed.get_all("To", []) + parsed.get_all("Cc", []) + parsed.get_all("Bcc", [])
        recipients += [addr for _, addr in email.utils.getaddresses([str(f) for f in fields]) if addr]
        headers = _drop_header(headers, b"Bcc")   # RFC 5322 3.6.3: Bcc must not reach the recipients
    recipients = list(dict.fromkeys(r for r in recipients if r))
    for address in (inv.sender or "", *recipients):
        _check_utf8(address)
    if not recipients:
        raise Failure(EX_USAGE, "no recipients given (use arguments or -t)")
    from_addrs = email.utils.getaddresses([str(f) for f in parsed.get_all("From", [])])
    sender = inv.sender
    if sender is None:
        sender = from_addrs[0][1] if from_addrs and from_addrs[0][1] else f"{getpass.getuser()}@{socket.getfqdn()}"
    added = b""
    if not from_addrs:
        added += b"From: " + email.utils.formataddr((inv.full_name or "", sender)).encode() + b"\r\n"
    if parsed.get("Date") is None:
        added += b"Date: " + email.utils.formatdate(localtime=True).encode() + b"\r\n"
    if parsed.get("Message-ID") is None:
        domain = sender.rpartition("@")[2] or socket.getfqdn()
        try:
            domain = idn.to_ascii(domain)       # a Message-ID is ASCII (RFC 5322 3.6.4): the A-label
        except ValueError:
            domain = socket.getfqdn()
        added += b"Message-ID: " + email.utils.make_msgid(domain=domain).encode() + b"\r\n"
    if headers and not headers.endswith(b"\r\n"):
        headers += b"\r\n"
    _check_utf8(sender)
    return sender, recipients, added + headers + b"\r\n" + body


def needs_smtputf8(sender: str, recipients: list[str], message: bytes) -> bool:
    """A UTF-8 envelope address, or UTF-8 in the header block (RFC 6531 3.4, RFC 6532)."""
    if not all(a.isascii() for a in (sender, *recipients)):
        return True
    headers, _ = split_headers(message)
    return not headers.isascii()


def _check_utf8(address: str) -> None:
    """An address from the command line or a header that is not valid UTF-8 (a surrogate escape)."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        raise Failure(EX_DATAERR, f"address {address.encode('utf-8', 'replace').decode()!r} is not valid UTF-8") \
            from None


def _tls_context(settings: SendmailConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _status_for(code: int) -> int:
    return EX_TEMPFAIL if 400 <= code < 500 else EX_UNAVAILABLE


def submit(settings: SendmailConfig, sender: str, recipients: list[str], message: bytes) -> dict:
    host, _, port = settings.server.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port_number = int(port)
    except ValueError:
        raise Failure(EX_CONFIG, f"server: {settings.server!r} is not host:port") from None
    password = ""
    if settings.username:
        try:
            with open(settings.password_file or "", encoding="utf-8") as f:   # the secret's first line
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            raise Failure(EX_CONFIG, f"password_file: cannot read {settings.password_file}: {e.strerror}") from None
    options = ["BODY=8BITMIME"] if any(b > 127 for b in message) else []
    if needs_smtputf8(sender, recipients, message):
        options.append("SMTPUTF8")      # RFC 6531 3.4; smtplib then sends the commands as UTF-8
    try:
        smtp: smtplib.SMTP
        if settings.security == "tls":
            smtp = smtplib.SMTP_SSL(host, port_number, timeout=TIMEOUT, context=_tls_context(settings))
        else:
            smtp = smtplib.SMTP(host, port_number, timeout=TIMEOUT)
        with smtp:
            smtp.ehlo()
            if settings.security == "starttls":
                smtp.starttls(context=_tls_context(settings))
                smtp.ehlo()
            if settings.username:
                smtp.login(settings.username, password)
            return smtp.sendmail(sender, recipients, message, mail_options=options)
    except smtplib.SMTPAuthenticationError as e:
        raise Failure(EX_TEMPFAIL if e.smtp_code < 500 else EX_NOPERM,
                      f"authentication refused: {e.smtp_code} {_text(e.smtp_error)}") from None
    except smtplib.SMTPRecipientsRefused as e:
        codes = [code for code, _ in e.recipients.values()]
        first = next(iter(e.recipients.items()))
        status = EX_TEMPFAIL if any(400 <= c < 500 for c in codes) else EX_UNAVAILABLE
        raise Failure(status, f"recipients refused: {first[0]}: {first[1][0]} {_text(first[1][1])}") from None
    except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as e:
        raise Failure(_status_for(e.smtp_code), f"refused: {e.smtp_code} {_text(e.smtp_error)}") from None
    except smtplib.SMTPNotSupportedError as e:
        raise Failure(EX_UNAVAILABLE, f"relay at {settings.server} does not support this: {e}") from None
    except smtplib.SMTPResponseException as e:
        raise Failure(_status_for(e.smtp_code), f"relay answered {e.smtp_code} {_text(e.smtp_error)}") from None
    except ssl.SSLError as e:
        raise Failure(EX_UNAVAILABLE, f"TLS with {settings.server} failed: {e.reason or e}") from None
    except (OSError, smtplib.SMTPException) as e:
        raise Failure(EX_TEMPFAIL, f"relay {settings.server} unreachable: {e}") from None


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def main(argv: Optional[list[str]] = None, stdin=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        inv = parse_args(argv)
        settings = load_settings(inv.config)
        message = read_message(stdin if stdin is not None else sys.stdin.buffer, inv.dot_ends_input)
        sender, recipients, message = prepare(inv, message)
        refused = submit(settings, sender, recipients, message)
    except Failure as e:
        sys.stderr.write(f"mailrelay-sendmail: {e}\n")
        return e.status
    except KeyboardInterrupt:
        return EX_TEMPFAIL
    if refused:
        address, (code, text) = next(iter(refused.items()))
        sys.stderr.write(f"mailrelay-sendmail: accepted, except {len(refused)} recipient(s): "
                         f"{address}: {code} {_text(text)}\n")
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
