# -*- test-case-name: tests.test_source_routes, tests.test_dsn_params, tests.test_smtputf8 -*-
"""Command arguments: EHLO/HELO names, MAIL FROM / RCPT TO paths and their ESMTP parameters.

Its job in the message's journey: the session hands it the text after the command verb; it hands back
a checked value or the Reply to send.  Nothing that leaves here can carry CR, LF, a control character
or a non-ASCII octet into the envelope or a `Received` header (header injection, smuggling).

Implements RFC 5321 4.1.1.1 (EHLO/HELO argument: Domain / address-literal), 4.1.1.2-3 and 4.1.2
(Reverse-path / Forward-path, Mailbox, dot-string and quoted-string local parts, source routes),
4.5.3.1 (local part 64, domain 255, path 256 octets), RFC 1870 (SIZE=), RFC 6152 (BODY=); the DSN
(RFC 3461) and REQUIRETLS (RFC 8689) parameters are checked by params.py.
Source routes (`<@a,@b:user@c>`) are accepted and stripped, as RFC 5321 4.1.1.3 and Appendix C allow
(servers SHOULD ignore the route): the policy judges, the spool keeps and delivery uses `user@c` only.
`RCPT TO:<postmaster>` without a domain is accepted (RFC 5321 4.5.1).
SMTPUTF8 (RFC 6531): `MAIL FROM:<...> SMTPUTF8` lets the transaction's addresses be UTF-8 (3.3: a
UTF-8 local part, a domain of U-labels or A-labels); without it a non-ASCII address gets 553 5.6.7
(3.5).  The command line arrives as octets (one character each, latin-1); a UTF-8 path is decoded
strictly (an invalid sequence, an overlong form or a surrogate: 553 5.6.7), may hold no control
character, C0 or C1, and its domain must pass IDNA2008 (mailrelay.idn; else 553 5.1.7 / 5.1.3 with
the reason).  Lengths are counted in octets of UTF-8 (RFC 6531 3.3).  Nothing is normalised: the
address goes on as the client wrote it (see mailrelay.idn).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from mailrelay import idn
from mailrelay.interfaces import Reply
from mailrelay.server import params as esmtp_params

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?\Z")
# EHLO names in the wild contain underscores ("my_host"); harmless, so accepted there only.
_HELO_DOMAIN = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,253})\Z")
_LITERAL = re.compile(r"\[(?:[0-9.]{7,15}|IPv6:[0-9A-Fa-f:.]{2,45}|[A-Za-z0-9-]*[A-Za-z0-9]:[!-Z^-~]+)\]\Z")
_DOT_STRING = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
_QUOTED = re.compile(r'"(?:[ !#-\[\]-~]|\\[ -~])*"\Z')
# RFC 6531 3.3: atext and qtext extended with UTF8-non-ascii (controls are refused before these match).
_UTF8_DOT_STRING = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+"
                              r"(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+)*\Z")
_UTF8_QUOTED = re.compile(r'"(?:[ !#-\[\]-~\u0080-\U0010ffff]|\\[ -~])*"\Z')
_ROUTE = re.compile(rf"@(?:{_LABEL}(?:\.{_LABEL})*|\[[!-Z^-~]+\])")
_XTEXT_VALUE = re.compile(r"[!-<>-~]+\Z")

SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_PATH = Reply(501, "5.1.7", "Bad address syntax")
BAD_RCPT = Reply(501, "5.1.3", "Bad recipient address syntax")
NON_ASCII = Reply(553, "5.6.7", "Non-ASCII address without SMTPUTF8 (RFC 6531): give MAIL FROM:<...> SMTPUTF8")
BAD_UTF8 = Reply(553, "5.6.7", "Address is not valid UTF-8 (RFC 6531 3.3)")
BAD_SMTPUTF8 = Reply(501, "5.5.4", "SMTPUTF8 takes no value")
SMTPUTF8_NEEDS_EHLO = Reply(555, "5.5.4", "SMTPUTF8 needs EHLO (RFC 6531)")
NULL_RCPT = Reply(501, "5.1.3", "The null path <> is not a valid recipient")
UNKNOWN_PARAM = esmtp_params.UNKNOWN_PARAM
BAD_BODY = Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
BAD_SIZE = Reply(501, "5.5.4", "SIZE must be a decimal number of octets")


@dataclass(frozen=True)
class MailFrom:
    sender: str                  # "" for the null reverse-path
    size: int | None = None      # SIZE= as declared, None when absent
    body: str = "7BIT"           # BODY=
    smtputf8: bool = False       # SMTPUTF8 given (RFC 6531 3.4): UTF-8 addresses and headers allowed
    params: dict = field(default_factory=dict)   # RET, ENVID, REQUIRETLS as the envelope keeps them


@dataclass(frozen=True)
class RcptTo:
    recipient: str
    params: dict = field(default_factory=dict)


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def has_control(text: str) -> bool:
    """True when `text` holds a C0 control (except HT) or DEL: never allowed in a command line."""
    return _CONTROL.search(text) is not None


def check_helo(argument: str) -> Union[str, Reply]:
    """The EHLO/HELO argument, validated (RFC 5321 4.1.1.1): a domain or an address literal."""
    name = argument.strip()
    if not name or has_control(name) or not name.isascii() or " " in name or "\t" in name:
        return Reply(501, "5.5.4", "Invalid EHLO/HELO argument: a domain or address literal is required")
    if _HELO_DOMAIN.match(name) or _LITERAL.match(name):
        return name
    return Reply(501, "5.5.4", "Invalid EHLO/HELO argument: a domain or address literal is required")


def parse_mail(argument: str) -> Union[MailFrom, Reply]:
    """`FROM:<path> [params]` → MailFrom, or the Reply to send."""
    parsed = _split_path(argument, "FROM:")
    if isinstance(parsed, Reply):
        return parsed
    path, params = parsed
    utf8 = "SMTPUTF8" in params
    sender = "" if path == "" else _mailbox(path, BAD_PATH, utf8)
    if isinstance(sender, Reply):
        return sender
    size: Optional[int] = None
    body = "7BIT"
    kept: dict = {}        # RET, ENVID, REQUIRETLS as MailFrom.params keeps them (server.params)
    for key, value in params.items():
        if key == "SMTPUTF8":
            if value is not None:
                return BAD_SMTPUTF8           # RFC 6531 3.4: the parameter has no value
        elif key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                return BAD_SIZE
            size = int(value)
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return BAD_BODY
            body = value.upper()
        else:
            refusal = esmtp_params.mail_parameter(key, value, kept)   # 555 for one we do not know
            if refusal is not None:
                return refusal
    return MailFrom(sender, size, body, utf8, kept)


def parse_rcpt(argument: str, smtputf8: bool = False) -> Union[RcptTo, Reply]:
    """`TO:<path> [params]` → RcptTo, or the Reply to send.  NOTIFY and ORCPT are the parameters.
    `smtputf8`: the transaction's MAIL FROM gave SMTPUTF8, so the path may be UTF-8."""
    parsed = _split_path(argument, "TO:")
    if isinstance(parsed, Reply):
        return parsed
    path, params = parsed
    if path == "":
        return NULL_RCPT
    kept: dict = {}
    for key, value in params.items():
        refusal = esmtp_params.rcpt_parameter(key, value, kept)       # 555 for one we do not know
        if refusal is not None:
            return refusal
    if path.lower() == "postmaster":
        return RcptTo("postmaster", kept)      # RFC 5321 4.5.1: must be accepted without a domain
    recipient = _mailbox(path, BAD_RCPT, smtputf8)
    if isinstance(recipient, Reply):
        return recipient
    return RcptTo(recipient, kept)


def _split_path(argument: str, keyword: str) -> Union[tuple[str, dict], Reply]:
    """Split `FROM:<path> K=V ...` into the text inside <> and the parameters (keys upper-cased)."""
    if not argument[: len(keyword)].upper() == keyword:
        return SYNTAX
    rest = argument[len(keyword):].lstrip(" ")     # "FROM: <a@b>" is common; tolerated
    if not rest.startswith("<"):
        return SYNTAX
    end = _closing_bracket(rest)
    if end < 0:
        return SYNTAX
    path, tail = rest[1:end], rest[end + 1:]
    if tail and not tail.startswith(" "):
        return SYNTAX
    if not tail.isascii():
        return NON_ASCII                  # RFC 6531 3.5: non-ASCII parameters → 553 5.6.7
    params = _params(tail)
    if isinstance(params, Reply):
        return params
    return _strip_route(path), params


def _closing_bracket(text: str) -> int:
    """Index of the '>' that closes the path, skipping quoted strings and quoted pairs; -1 if none."""
    quoted = escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
    return -1


def _strip_route(path: str) -> str:
    """RFC 5321 4.1.1.3: a source route `@a,@b:` before the mailbox may be ignored; we drop it."""
    if not path.startswith("@") or ":" not in path:
        return path
    route, _, mailbox = path.partition(":")
    if mailbox and all(_ROUTE.fullmatch(hop) for hop in route.split(",")):
        return mailbox
    return path                           # not a route, or nothing after it: left for _mailbox to refuse


def _params(text: str) -> Union[dict, Reply]:
    params: dict = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        key = key.upper()
        if not key or key in params or (eq and not _XTEXT_VALUE.match(value)):
            return SYNTAX
        params[key] = value if eq else None
    return params


def wire_text(text: str) -> str:
    """Text as the session hands it to the parsers: each UTF-8 octet one character (latin-1), as a
    command line read off the wire is (for callers with real text, such as the HTTP API)."""
    return text.encode("utf-8").decode("latin-1")


def _mailbox(path: str, bad: Reply, utf8: bool = False) -> Union[str, Reply]:
    """Validate `local@domain` (RFC 5321 4.1.2, RFC 6531 3.3 when `utf8`) and its lengths (4.5.3.1,
    in octets).  Returns the address as Unicode text."""
    if not path.isascii():
        if not utf8:
            return NON_ASCII                  # RFC 6531 3.5: no SMTPUTF8 → 553 5.6.7
        try:
            path = path.encode("latin-1").decode("utf-8")     # strict: overlongs, surrogates refused
        except UnicodeError:
            return BAD_UTF8
        problem = idn.utf8_problem(path)
        if problem is not None:
            return Reply(bad.code, bad.status, f"{bad.text}: {problem}")
    local, at, domain = path.rpartition("@")
    if not at or not local or not domain or len(path.encode("utf-8")) > 254:
        return bad
    if len(local.encode("utf-8")) > 64 or len(domain.encode("utf-8")) > 255:
        return bad
    if local.isascii():
        if not (_DOT_STRING.match(local) or _QUOTED.match(local)):
            return bad
    elif not (_UTF8_DOT_STRING.match(local) or _UTF8_QUOTED.match(local)):
        return bad
    if _LITERAL.match(domain):
        return path
    if domain.isascii() and "xn--" not in domain.lower():
        return path if _DOMAIN.match(domain) else bad
    try:
        ascii_domain = idn.to_ascii(domain)   # U-labels, or A-labels that must decode (RFC 5891 5.4)
    except ValueError as e:
        return Reply(553, bad.status, f"{bad.text}: {e}")
    if not _DOMAIN.match(ascii_domain) or len(ascii_domain) > 255:
        return bad
    return path
