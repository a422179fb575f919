# -*- test-case-name: tests.test_dsn_params -*-
"""The DSN (RFC 3461) and REQUIRETLS (RFC 8689) requests a message carries, as the spool keeps them.

At the side of the journey, like `envelope`: the server's parameter parser (server/params.py) writes
them into `Envelope.params`, and delivery (what to pass on, what TLS a message needs), the scheduler
(which DSNs are due) and the DSN builder read them back through the functions here.  Also the xtext
codec of RFC 3461 section 4, used in both directions.

How they are stored: inside `Envelope.params`, a plain JSON object that every version of the relay
already loads, so a spool file written now still loads after a downgrade (the requests are then simply
not honoured) and an old spool file has no requests:

    "params": {"ENVID": "QQ-1 2",                  # decoded (printable ASCII), RFC 3461 4.4
               "RET": "HDRS",                      # "FULL" | "HDRS", RFC 3461 4.3
               "REQUIRETLS": true,                 # RFC 8689 4.1
               "RCPT": {"a@example.net": {"NOTIFY": "SUCCESS,DELAY",          # RFC 3461 4.1
                                          "ORCPT": "rfc822;A@example.net"}}}  # type;decoded, 4.2
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

ENVID_MAX = 100        # RFC 3461 4.4: the ENVID parameter may be up to 100 characters
ORCPT_MAX = 500        # RFC 3461 4.2: the entire ORCPT parameter may be up to 500 characters
NOTIFY_KEYWORDS = ("SUCCESS", "FAILURE", "DELAY")
# RFC 3461 4.1: without NOTIFY a server may read FAILURE or FAILURE,DELAY; we read the latter, so a
# sender who asked for nothing still hears of a long delay, as before.
DEFAULT_NOTIFY = frozenset(("FAILURE", "DELAY"))

_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*\Z")
_PRINTABLE = re.compile(r"[ -~]*\Z")     # RFC 3461 4.2/4.4: printable US-ASCII, graphic and space
_TLS_REQUIRED = re.compile(rb"(?im)^tls-required:[ \t]*(?:\r?\n[ \t]+)*([^\r\n]*)")


class XtextError(ValueError):
    """Not xtext (RFC 3461 4), or its decoded text is not printable US-ASCII."""


def xtext_decode(value: str) -> str:
    """The text an xtext value stands for; XtextError if `value` is not xtext (a bare "+", lower-case
    hex, "=", space, a control or non-ASCII) or decodes to anything but printable US-ASCII."""
    if not _XTEXT.match(value):
        raise XtextError(f"not xtext: {value[:60]!r}")
    decoded = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), value)
    if not _PRINTABLE.match(decoded):
        raise XtextError("decodes to a character that is not printable US-ASCII")
    return decoded


def xtext_encode(text: str) -> str:
    """`text` as xtext: "!" to "~" as themselves except "+" and "=", every other octet "+HH"."""
    out = []
    for byte in text.encode("utf-8"):
        out.append(chr(byte) if 33 <= byte <= 126 and byte not in (0x2B, 0x3D) else f"+{byte:02X}")
    return "".join(out)


# -- what an envelope asked for -----------------------------------------------------------------------

def _params(envelope) -> Mapping:
    params = getattr(envelope, "params", None)
    return params if isinstance(params, dict) else {}


def envid(envelope) -> Optional[str]:
    value = _params(envelope).get("ENVID")
    return value if isinstance(value, str) and value else None


def ret(envelope) -> Optional[str]:
    """"FULL", "HDRS", or None when the client said nothing."""
    value = _params(envelope).get("RET")
    return value if value in ("FULL", "HDRS") else None


def requiretls(envelope) -> bool:
    """RFC 8689 4.1: the message was tagged REQUIRETLS on receipt."""
    return _params(envelope).get("REQUIRETLS") is True


def _recipient(envelope, recipient: str) -> Mapping:
    rcpts = _params(envelope).get("RCPT")
    entry = rcpts.get(recipient) if isinstance(rcpts, dict) else None
    return entry if isinstance(entry, dict) else {}


def notify(envelope, recipient: str) -> Optional[frozenset]:
    """The recipient's NOTIFY as a set ({"NEVER"}, or some of NOTIFY_KEYWORDS); None when not given."""
    value = _recipient(envelope, recipient).get("NOTIFY")
    if not isinstance(value, str) or not value:
        return None
    return frozenset(value.split(","))


def notify_text(envelope, recipient: str) -> Optional[str]:
    """The recipient's NOTIFY as it was given ("NEVER", "SUCCESS,DELAY"), or None."""
    value = _recipient(envelope, recipient).get("NOTIFY")
    return value if isinstance(value, str) and value else None


def orcpt(envelope, recipient: str) -> Optional[str]:
    """The recipient's ORCPT as "addr-type;decoded address", or None."""
    value = _recipient(envelope, recipient).get("ORCPT")
    return value if isinstance(value, str) and ";" in value else None


def wants(envelope, recipient: str, event: str) -> bool:
    """Whether the sender wants a DSN about `recipient` for `event` ("SUCCESS", "FAILURE", "DELAY"),
    RFC 3461 4.1: NEVER wants nothing; no NOTIFY at all means FAILURE,DELAY."""
    asked = notify(envelope, recipient)
    return event in (DEFAULT_NOTIFY if asked is None else asked)


def has_dsn_request(envelope, recipients) -> bool:
    """Whether anything of RFC 3461 was asked for this message (and these recipients)."""
    if envid(envelope) or ret(envelope):
        return True
    return any(_recipient(envelope, r) for r in recipients)


def tls_required_no(header_block: bytes) -> bool:
    """RFC 8689 3: the header block has exactly one `TLS-Required: No` field (more than one MUST NOT
    appear: then none is trusted and the message keeps its TLS policy)."""
    values = _TLS_REQUIRED.findall(header_block)
    return len(values) == 1 and values[0].strip().lower() == b"no"
