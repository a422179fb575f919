# -*- test-case-name: tests.test_dkim_permit, tests.test_dkim, tests.test_content_end_to_end -*-
"""Check incoming DKIM signatures (RFC 6376 6) and say so in an Authentication-Results header (RFC 8601).

In: a spooled message as a binary file.  Out: one `Authentication-Results:` header line (folded) with a
dkim= result per signature: pass, fail, temperror (DNS did not answer), permerror (unusable signature
or key record), or dkim=none. Public keys come from DNS through dnspython with the configured nameservers; this
runs in a worker thread, never on the reactor. A message over `max_size` is not read whole: it gets
dkim=neutral with a comment, since dkimpy needs the whole message in memory to verify it.
"""
from __future__ import annotations

from typing import BinaryIO, Optional, Sequence

import dkim
import dns.exception
import dns.resolver


class TemporaryDNSError(Exception):
    pass


def make_resolver(nameservers: Sequence[tuple[str, int]] = (), timeout: float = 5.0) -> dns.resolver.Resolver:
    if nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [host for host, _ in nameservers]
        resolver.nameserver_ports = {host: port for host, port in nameservers}
    else:
        resolver = dns.resolver.Resolver()
    resolver.lifetime = timeout
    return resolver


def txt_lookup(resolver: dns.resolver.Resolver):
    """A dkimpy `dnsfunc`: the joined TXT strings of a name, None when there is none, TemporaryDNSError when
    DNS could not say (SERVFAIL, timeout) — a key that cannot be fetched is not a failed signature."""
    def lookup(name: bytes, timeout: float = 5) -> Optional[bytes]:
        try:
            answer = resolver.resolve(name.decode("ascii").rstrip("."), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise TemporaryDNSError(str(e)) from None
        return b"".join(b"".join(rdata.strings) for rdata in answer)
    return lookup


class Verifier:
    def __init__(self, authserv_id: str, resolver: dns.resolver.Resolver, max_size: int = 10 * 1024 * 1024):
        self._authserv_id = authserv_id
        self._lookup = txt_lookup(resolver)
        self._max_size = max_size

    def results_header(self, f: BinaryIO, size: int) -> bytes:
        if size > self._max_size:
            results = ["dkim=neutral (message too large to verify here)"]
        else:
            results = self._results(f.read())
        value = ";\r\n\t".join([self._authserv_id] + results)
        return b"Authentication-Results: " + value.encode("utf-8") + b"\r\n"

    def _results(self, message: bytes) -> list[str]:
        checker = dkim.DKIM(message, minkey=1024)
        signatures = [v for k, v in checker.headers if k.lower() == b"dkim-signature"]
        if not signatures:
            return ["dkim=none"]
        return [self._one(checker, index, raw) for index, raw in enumerate(signatures)]

    def _one(self, checker: dkim.DKIM, index: int, raw: bytes) -> str:
        try:
            tags = dkim.util.parse_tag_value(b"".join(raw.split()))
        except dkim.util.InvalidTagValueList:
            return "dkim=permerror (unparseable signature)"
        props = " ".join(
            f"header.{name}={tags[tag].decode('ascii', 'replace')}"
            for name, tag in (("d", b"d"), ("s", b"s")) if tag in tags
        )
        if b"b" in tags:
            props += f" header.b={tags[b'b'][:8].decode('ascii', 'replace')}"
        try:
            ok = checker.verify(idx=index, dnsfunc=self._lookup)
        except TemporaryDNSError:
            return f"dkim=temperror (key lookup failed) {props}".rstrip()
        except dkim.ValidationError as e:      # the signature does not match the message (RFC 8601 2.7.1)
            return f"dkim=fail ({_comment(str(e))}) {props}".rstrip()
        except dkim.DKIMException as e:       # unusable signature or key record
            return f"dkim=permerror ({_comment(str(e))}) {props}".rstrip()
        return f"dkim={'pass' if ok else 'fail'} {props}".rstrip()


def _comment(text: str) -> str:
    """Text safe inside an RFC 5322 comment: no parentheses, backslashes or line breaks."""
    return "".join(c for c in text if c.isprintable() and c not in "()\\")[:80]
