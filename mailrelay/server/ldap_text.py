# -*- test-case-name: tests.test_ldap -*-
"""Text that goes to an LDAP directory: user names checked, DNs and filters escaped, URLs parsed.

Part of AUTH against LDAP (mailrelay.server.ldap).  In: the user name a client typed, the templates and
URLs of `[auth.ldap]`.  Out: a DN or filter string where the user name can only ever be a value, never
structure, and `LDAPURL` values.  Implements RFC 4514 §2.4 (DN escaping), RFC 4515 §3 (filter escaping),
RFC 4516 §2 (the scheme/host/port part of LDAP URLs).
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from ipaddress import ip_address
from urllib.parse import urlsplit

MAX_USERNAME_LENGTH = 256
DEFAULT_PORTS = {"ldap": 389, "ldaps": 636}

# RFC 4514 §2.4: characters escaped anywhere in an attribute value, with a backslash.
_DN_SPECIALS = frozenset('"+,;<>\\=')
# RFC 4515 §3: characters escaped in an assertion value, as a backslash and two hex digits.
_FILTER_SPECIALS = {"\\": r"\5c", "*": r"\2a", "(": r"\28", ")": r"\29", "\0": r"\00"}


class BadUsername(ValueError):
    """The user name cannot be a directory user: empty, too long or with control characters."""


def check_username(name: str | bytes) -> str:
    """The user name as text, or BadUsername.  Control characters (CR/LF log or protocol injection, NUL
    truncation in C directories) and names over 256 characters are refused before any LDAP traffic."""
    if isinstance(name, bytes):
        try:
            name = name.decode("utf-8")
        except UnicodeDecodeError:
            raise BadUsername("not UTF-8") from None
    if not name:
        raise BadUsername("empty")
    if len(name) > MAX_USERNAME_LENGTH:
        raise BadUsername("too long")
    if any(unicodedata.category(c) in ("Cc", "Cs") or c in "\u2028\u2029" for c in name):
        raise BadUsername("control character")
    return name


def escape_dn_value(value: str) -> str:
    """`value` as an RFC 4514 attribute value: `alice,ou=x` becomes `alice\\,ou=x`, one RDN value."""
    out = []
    for i, c in enumerate(value):
        if c == "\0":
            out.append(r"\00")
        elif c in _DN_SPECIALS:
            out.append("\\" + c)
        elif (i == 0 and c in " #") or (i == len(value) - 1 and c == " "):
            # RFC 4514 §2.4: a leading space or '#', and a trailing space, would change the value.
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def escape_filter_value(value: str) -> str:
    """`value` as an RFC 4515 assertion value: `*)(uid=*` matches only that literal string."""
    return "".join(_FILTER_SPECIALS.get(c, c) for c in value)


def substitute(template: str, escaped_user: str) -> str:
    """The template with every `{user}` replaced (plain replacement: other braces are left alone)."""
    return template.replace("{user}", escaped_user)


@dataclass(frozen=True)
class LDAPURL:
    """Where one directory server listens: ldap:// (plain, maybe STARTTLS) or ldaps:// (TLS at once)."""
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "ldaps"

    @property
    def is_ip(self) -> bool:
        try:
            ip_address(self.host)
            return True
        except ValueError:
            return False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_url(url: str) -> LDAPURL:
    """`ldap://host[:port]` or `ldaps://host[:port]` (a trailing `/` is allowed); ValueError otherwise.
    A DN, attributes or filter in the URL (RFC 4516) are refused: the config has its own keys for them."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"bad LDAP URL {url!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"bad LDAP URL {url!r}: the scheme must be ldap:// or ldaps://")
    if not parts.hostname:
        raise ValueError(f"bad LDAP URL {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"bad LDAP URL {url!r}: only scheme, host and port are allowed")
    return LDAPURL(scheme, parts.hostname, port or DEFAULT_PORTS[scheme])
