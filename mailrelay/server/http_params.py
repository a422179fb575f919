# -*- test-case-name: tests.test_http_api, tests.test_smtputf8 -*-
"""The HTTP injection API's optional delivery requests: `"dsn"` (RFC 3461) and `"requiretls"` (RFC 8689).

Its job in the message's journey: http.py hands over the request's JSON object and its recipients; this
turns the optional fields into the envelope's `params` (layout: mailrelay/dsnparams.py), exactly what
the same requests given as SMTP MAIL/RCPT parameters would have made, or raises ValueError with the
reason for the 400.  Values are plain JSON text, not xtext: they are checked as SMTP would check them
once encoded (ENVID at most 100 characters, ORCPT at most 500, printable US-ASCII).

    "dsn": {"ret": "FULL" | "HDRS",
            "envid": "text",
            "notify": ["SUCCESS", "FAILURE", "DELAY"] | ["NEVER"],        # for every recipient
            "orcpt": {"a@example.net": "rfc822;A@example.net"}}          # per recipient, optional
    "requiretls": true                                                   # only over HTTPS
"""
from __future__ import annotations

import re

from mailrelay.dsnparams import ENVID_MAX, NOTIFY_KEYWORDS, ORCPT_MAX, xtext_encode

OPTIONAL_FIELDS = frozenset(("dsn", "requiretls"))
DSN_KEYS = frozenset(("ret", "envid", "notify", "orcpt"))
_PRINTABLE = re.compile(r"[ -~]*\Z")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")


def parse_options(data: dict, recipients: list[str]) -> dict:
    """The envelope params the request asks for ({} when none); ValueError naming the bad field."""
    params: dict = {}
    requiretls = data.get("requiretls", False)
    if not isinstance(requiretls, bool):
        raise ValueError('"requiretls" must be true or false')
    if requiretls:
        params["REQUIRETLS"] = True
    dsn = data.get("dsn")
    if dsn is None:
        return params
    if not isinstance(dsn, dict):
        raise ValueError('"dsn" must be an object: {"ret", "envid", "notify", "orcpt"}')
    unknown = sorted(set(dsn) - DSN_KEYS)
    if unknown:
        raise ValueError(f"dsn: unknown field {unknown[0]!r}: only ret, envid, notify and orcpt are read")
    if "ret" in dsn:
        if not isinstance(dsn["ret"], str) or dsn["ret"].upper() not in ("FULL", "HDRS"):
            raise ValueError('dsn.ret must be "FULL" or "HDRS" (RFC 3461 4.3)')
        params["RET"] = dsn["ret"].upper()
    if "envid" in dsn:
        envid = dsn["envid"]
        if not isinstance(envid, str) or not envid or not _PRINTABLE.match(envid) \
                or len(xtext_encode(envid)) > ENVID_MAX:
            raise ValueError(f"dsn.envid must be printable ASCII text of at most {ENVID_MAX} characters once "
                             "xtext-encoded (RFC 3461 4.4)")
        params["ENVID"] = envid
    per_recipient: dict[str, dict[str, str]] = {r: {} for r in recipients}
    if "notify" in dsn:
        notify = _notify(dsn["notify"])
        for entry in per_recipient.values():
            entry["NOTIFY"] = notify
    if "orcpt" in dsn:
        _orcpts(dsn["orcpt"], per_recipient)
    rcpts = {r: entry for r, entry in per_recipient.items() if entry}
    if rcpts:
        params["RCPT"] = rcpts
    return params


def _notify(value) -> str:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError('dsn.notify must be a non-empty list: ["NEVER"] or some of "SUCCESS", "FAILURE", "DELAY"')
    words = [v.upper() for v in value]
    if words == ["NEVER"]:
        return "NEVER"
    # RFC 3461 4.1: NEVER only by itself; each keyword once.
    if any(w not in NOTIFY_KEYWORDS for w in words) or len(set(words)) != len(words):
        raise ValueError('dsn.notify: "NEVER" alone, or each of "SUCCESS", "FAILURE", "DELAY" at most once '
                         "(RFC 3461 4.1)")
    return ",".join(words)


def _orcpts(value, per_recipient: dict) -> None:
    if not isinstance(value, dict):
        raise ValueError('dsn.orcpt must be an object: {"recipient": "addr-type;address"}')
    for recipient, orcpt in value.items():
        if recipient not in per_recipient:
            raise ValueError(f"dsn.orcpt: {recipient[:100]!r} is not one of the recipients in \"to\"")
        addr_type, semicolon, address = orcpt.partition(";") if isinstance(orcpt, str) else ("", "", "")
        if not semicolon or not _ATOM.match(addr_type) or not address or not _PRINTABLE.match(address) \
                or len(f"{addr_type};{xtext_encode(address)}") > ORCPT_MAX:
            raise ValueError(f"dsn.orcpt[{recipient[:100]!r}] must be \"addr-type;address\", printable ASCII, at "
                             f"most {ORCPT_MAX} characters once xtext-encoded (RFC 3461 4.2)")
        per_recipient[recipient]["ORCPT"] = f"{addr_type};{address}"
