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
SMTPUTF8 is not offered, so a non-ASCII address is refused with 553 5.6.7 (RFC 6531 3.5).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

from mailrelay.interfaces import Reply
from mailrelay.server import params as esmtp_params

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?\Z")
# EHLO names in the wild contain underscores ("my_host"); harmless, so accepted there only.
_HELO_DOMAIN = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,253})\Z")
_LITERAL = re.compile(r"\[(?:[0-9.]{7,15}|IPv6:[0-9A-Fa-f:.]{2,45}|[A-Za-z0-9-]*[A-Za-z0-9]:[!-Z^-~]+)\]\Z")
_DOT_STRING = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
_QUOTED = re.compile(r'"(?:[ !#-\[\]-~]|\\[ -~])*"\Z')
_ROUTE = re.compile(rf"@(?:{_LABEL}(?:\.{_LABEL})*|\[[!-Z^-~]+\])")
_XTEXT_VALUE = re.compile(r"[!-<>-~]+\Z")

SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_PATH = Reply(501, "5.1.7", "Bad address syntax")
BAD_RCPT = Reply(501, "5.1.3", "Bad recipient address syntax")
NON_ASCII = Reply(553, "5.6.7", "Non-ASCII addresses are not supported (no SMTPUTF8)")
NULL_RCPT = Reply(501, "5.1.3", "The null path <> is not a valid recipient")
UNKNOWN_PARAM = esmtp_params.UNKNOWN_PARAM
BAD_BODY = Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
BAD_SIZE = Reply(501, "5.5.4", "SIZE must be a decimal number of octets")


@dataclass(frozen=True)
class MailFrom:
    sender: str                  # "" for the null reverse-path
    size: int | None = None      # SIZE= as declared, None when absent
    body: str = "7BIT"           # BODY=
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
    sender = "" if path == "" else _mailbox(path, BAD_PATH)
    if isinstance(sender, Reply):
        return sender
    size, body, kept = None, "7BIT", {}
    for key, value in params.items():
        if key == "SIZE":
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
    return MailFrom(sender, size, body, kept)


def parse_rcpt(argument: str) -> Union[RcptTo, Reply]:
    """`TO:<path> [params]` → RcptTo, or the Reply to send.  NOTIFY and ORCPT are the parameters."""
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
    recipient = _mailbox(path, BAD_RCPT)
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
    if not (path + tail).isascii():
        return NON_ASCII                  # RFC 6531 3.5: no SMTPUTF8 → 553 5.6.7
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


def _mailbox(path: str, bad: Reply) -> Union[str, Reply]:
    """Validate `local@domain` (RFC 5321 4.1.2) and its lengths (4.5.3.1)."""
    local, at, domain = path.rpartition("@")
    if not at or not local or not domain or len(path) > 254:
        return bad
    if len(local) > 64 or len(domain) > 255:
        return bad
    if not (_DOT_STRING.match(local) or _QUOTED.match(local)):
        return bad
    if not (_DOMAIN.match(domain) or _LITERAL.match(domain)):
        return bad
    return path
