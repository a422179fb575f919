# -*- test-case-name: tests.test_dsn_params, tests.test_source_routes, tests.test_smtputf8 -*-
"""The MAIL FROM and RCPT TO parameters of DSN (RFC 3461) and REQUIRETLS (RFC 8689).

Its job in the message's journey: addresses.py splits a command's parameters into (KEYWORD, value)
pairs (keywords upper-cased, a keyword given twice already refused with 501 5.5.4, RFC 3461 4.5) and
hands every keyword it does not know itself to `mail_parameter` / `rcpt_parameter` here, which check
the value strictly and put what is worth keeping into the dict that becomes the envelope's `params`
(the layout is in mailrelay/dsnparams.py).  Out: None (taken) or the Reply to send:
`501 5.5.4` for a known parameter with a bad value, `555 5.5.4` for a parameter we do not know.

RFC 3461 4.1 (NOTIFY: NEVER alone, or a list of SUCCESS / FAILURE / DELAY, any case, none twice),
4.2 (ORCPT=addr-type;xtext, at most 500 characters, printable US-ASCII once decoded), 4.3 (RET=FULL /
HDRS), 4.4 (ENVID=xtext, at most 100 characters), 4 (xtext); RFC 8689 2 (REQUIRETLS, no value; that
it needs TLS is the transaction's check: 530 5.7.10).
"""
from __future__ import annotations

import re
from typing import Optional

from mailrelay.dsnparams import ENVID_MAX, NOTIFY_KEYWORDS, ORCPT_MAX, XtextError, xtext_decode
from mailrelay.interfaces import Reply

UNKNOWN_PARAM = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")     # RFC 5321 4.1.1.11
BAD_NOTIFY = Reply(501, "5.5.4", "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY (RFC 3461 4.1)")
BAD_ORCPT = Reply(501, "5.5.4", f"ORCPT must be addr-type;xtext, at most {ORCPT_MAX} characters (RFC 3461 4.2)")
BAD_RET = Reply(501, "5.5.4", "RET must be FULL or HDRS (RFC 3461 4.3)")
BAD_ENVID = Reply(501, "5.5.4", f"ENVID must be xtext of at most {ENVID_MAX} characters (RFC 3461 4.4)")
BAD_REQUIRETLS = Reply(501, "5.5.4", "REQUIRETLS takes no value (RFC 8689 2)")
REQUIRETLS_NEEDS_TLS = Reply(530, "5.7.10", "REQUIRETLS needs TLS: issue STARTTLS first (RFC 8689 2)")

_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")       # RFC 5322 atext: the addr-type


def mail_parameter(key: str, value: Optional[str], params: dict) -> Optional[Reply]:
    """One MAIL FROM parameter other than SIZE and BODY, kept in `params`; None or the Reply."""
    if key == "RET":
        if value is None or value.upper() not in ("FULL", "HDRS"):
            return BAD_RET
        params["RET"] = value.upper()
    elif key == "ENVID":
        if value is None or len(value) > ENVID_MAX:
            return BAD_ENVID
        try:
            params["ENVID"] = xtext_decode(value)
        except XtextError:
            return BAD_ENVID
    elif key == "REQUIRETLS":
        if value is not None:
            return BAD_REQUIRETLS
        params["REQUIRETLS"] = True
    else:
        return UNKNOWN_PARAM
    return None


def rcpt_parameter(key: str, value: Optional[str], params: dict) -> Optional[Reply]:
    """One RCPT TO parameter, kept in `params` ({"NOTIFY": ..., "ORCPT": ...}); None or the Reply."""
    if key == "NOTIFY":
        notify = _notify(value)
        if notify is None:
            return BAD_NOTIFY
        params["NOTIFY"] = notify
    elif key == "ORCPT":
        orcpt = _orcpt(value)
        if orcpt is None:
            return BAD_ORCPT
        params["ORCPT"] = orcpt
    else:
        return UNKNOWN_PARAM
    return None


def _notify(value: Optional[str]) -> Optional[str]:
    """"NEVER" or the keywords upper-cased in the client's order; None when malformed."""
    if not value:
        return None
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return "NEVER"
    # RFC 3461 4.1 a: NEVER only by itself; each keyword once (a repeat is no list we can honour).
    if any(w not in NOTIFY_KEYWORDS for w in words) or len(set(words)) != len(words):
        return None
    return ",".join(words)


def _orcpt(value: Optional[str]) -> Optional[str]:
    """"addr-type;decoded address"; None when malformed."""
    if not value or len(value) > ORCPT_MAX:       # the value after "ORCPT="
        return None
    addr_type, semicolon, encoded = value.partition(";")
    if not semicolon or not _ATOM.match(addr_type) or not encoded:
        return None
    try:
        address = xtext_decode(encoded)
    except XtextError:
        return None
    return f"{addr_type};{address}"
