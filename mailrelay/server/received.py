# -*- test-case-name: tests.test_received, tests.test_smtputf8 -*-
"""The trace header the relay prepends to every message it accepts.

Its job in the message's journey: written by the session as the first bytes of each message, as soon as
DATA is accepted and the queue id is known.  In: what the session learned about the client (EHLO name,
IP, TLS, authenticated user), our hostname, the queue id, the recipients, the time.  Out: one folded
`Received:` header field, CRLF line ends, each line far below 998 octets.

Implements RFC 5321 4.4 (Time-stamp-line: from / by / with / id / for ; date-time), RFC 3848 (the
`with` keywords SMTP, ESMTP, ESMTPA, ESMTPS, ESMTPSA), RFC 6531 3.7.3 / 4.3 (UTF8SMTP[S][A]; a `for`
address may be UTF-8) and RFC 5322 3.3 (date-time) / 3.2.2 (comments).
Never a secret, and by default not even the login: the Received field leaves the organisation with the
message, and a login (often an Active Directory account name) is of use to no recipient but an attacker.
Only with `[auth] received_shows_user = true` does the user *name* appear, in a comment, escaped.
"""
from __future__ import annotations

import datetime
import email.utils
import functools
import ipaddress
from typing import Optional, Sequence

from mailrelay import idn


def protocol_name(*, esmtp: bool, tls: bool, authenticated: bool, utf8: bool = False) -> str:
    """RFC 3848 `with` keyword for the session: SMTP for HELO, else ESMTP plus S (TLS) and A (AUTH);
    for a transaction with SMTPUTF8 the keywords RFC 6531 4.3 registers: UTF8SMTP, UTF8SMTPS,
    UTF8SMTPA, UTF8SMTPSA (SMTPUTF8 needs EHLO, so never with HELO)."""
    if not esmtp:
        return "SMTP"
    suffix = ("S" if tls else "") + ("A" if authenticated else "")
    return ("UTF8SMTP" if utf8 else "ESMTP") + suffix


@functools.lru_cache(maxsize=1024)
def address_literal(ip: str) -> str:
    """`[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 4.1.3)."""
    try:
        if ipaddress.ip_address(ip).version == 6:
            return f"[IPv6:{ip}]"
    except ValueError:
        pass
    return f"[{ip}]"


def received_header(
    *,
    helo: str,
    address: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: Sequence[str],
    when: float,
    tls: Optional[str] = None,
    user: Optional[str] = None,
    show_user: bool = False,
) -> bytes:
    """The complete `Received:` field, folded, ending with CRLF. `tls` is "<version> <cipher>".
    `user` (the login) is named only with `show_user` (`[auth] received_shows_user`): by default the
    field says that the session was authenticated (ESMTPA/ESMTPSA, RFC 3848) but not as whom."""
    with_clause = f"with {protocol}"
    if tls:
        version, _, cipher = tls.partition(" ")
        with_clause += f" (version={_comment_text(version)} cipher={_comment_text(cipher or 'unknown')})"
    lines = [
        f"Received: from {helo or 'unknown'} ({address_literal(address)})",
        f"by {hostname} (mailrelay) {with_clause}",
    ]
    if user and show_user:
        lines.append(f"(authenticated as {_comment_text(user)})")
    lines.append(f"id {queue_id}")
    if len(recipients) == 1:
        lines.append(f"for <{_for_address(recipients[0])}>;")
    else:
        lines[-1] += ";"
    lines.append(_date(when))
    return ("\r\n\t".join(lines) + "\r\n").encode("utf-8")


def _for_address(recipient: str) -> str:
    """The `for` clause's address: ASCII where the address has an ASCII form (its domain as A-labels),
    so a header of ours never makes a message need SMTPUTF8 that would not otherwise (RFC 6531 3.7.3
    allows UTF-8 here; a UTF-8 local part has no other form, and such a message needs SMTPUTF8 anyway)."""
    if recipient.isascii():
        return recipient
    return idn.ascii_address(recipient) or recipient


@functools.lru_cache(maxsize=4)
def _date_of_second(second: int) -> str:
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(second, datetime.timezone.utc))


def _date(when: float) -> str:
    """RFC 5322 date-time, which has whole seconds: one rendering serves every message of a second."""
    return _date_of_second(int(when))


def _comment_text(text: str) -> str:
    """Safe inside an RFC 5322 comment: printable ASCII only, parentheses and backslash escaped."""
    safe = "".join(c if " " <= c <= "~" else "?" for c in text[:128])
    return safe.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
