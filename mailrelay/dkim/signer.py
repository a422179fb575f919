# -*- test-case-name: tests.test_dkim, tests.test_smtputf8, tests.test_content_end_to_end -*-
"""Make DKIM-Signature headers (RFC 6376 3.5, 5) for messages whose From: domain has keys.

In: a spooled message as a binary file (headers, blank line, body).  Out: the header lines to prepend —
one signature per key of the From: domain or its nearest parent that has keys (RSA and Ed25519 alike),
or b"" when none applies or the sender may not use the From: domain.  The message itself is never
altered.

dkimpy builds the header: its header canonicalisation, header hashing, tag folding and b= placement
(`DKIM.gen_header`). Two things we give it: the body hash, computed by `bodyhash` in constant memory, and
the signature itself, made by OpenSSL through `keys.SigningKey.sign` — dkimpy's pure-Python RSA manages
about 150 RSA-2048 signatures a second, OpenSSL several thousand.
"""
from __future__ import annotations

import base64
import email.utils
import time
from typing import BinaryIO, Callable, Iterable, Optional

import dkim
from dkim.canonicalization import CanonicalizationPolicy

from mailrelay.dkim.bodyhash import BodyHasher
from mailrelay.dkim.keys import SigningKey
from mailrelay.idn import domain_key

# Signed when present (RFC 6376 5.4.1 recommends the identity- and content-bearing fields); List-* by prefix.
DEFAULT_HEADERS = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to", "references",
    "mime-version", "content-type", "content-transfer-encoding",
    "tls-report-domain", "tls-report-submitter",        # RFC 8460 5.3: a TLS report's own header fields
)
OVERSIGNED = ("from",)          # listed once more than present: no From can be added later (RFC 6376 8.15)
MAX_HEADER_BLOCK = 1024 * 1024  # a header block larger than this is not signed
CHUNK = 256 * 1024


def read_header_block(f: BinaryIO, limit: int = MAX_HEADER_BLOCK) -> Optional[bytes]:
    """The header block through its terminating empty line (CRLF CRLF), the file left at the body.
    None when no complete header block appears within `limit` octets."""
    block = b""
    while len(block) < limit:
        line = f.readline(limit - len(block) + 2)
        if not line:
            break
        block += line
        if line == b"\r\n":
            return block
    return None


def from_addresses(headers: list[tuple[bytes, bytes]]) -> Optional[list[str]]:
    """The addresses of the one From: field, or None (none, several fields, or no address in it)."""
    values = [v.decode("utf-8", "replace") for k, v in headers if k.lower() == b"from"]
    if len(values) != 1:          # RFC 5322 3.6: exactly one From; anything else we do not sign
        return None
    addresses = [address for _, address in email.utils.getaddresses(values)]
    if not addresses or "@" not in addresses[0]:
        return None
    return addresses


def from_domain(headers: list[tuple[bytes, bytes]]) -> Optional[str]:
    """The domain the signature is for: that of the first From: address."""
    addresses = from_addresses(headers)
    if addresses is None:
        return None
    return domain_key(addresses[0].rpartition("@")[2].strip())


class Signer:
    def __init__(
        self,
        keys: Iterable[SigningKey],
        headers: Optional[tuple[str, ...]] = None,
        expire: Optional[float] = None,
        canonicalization: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
        clock: Callable[[], float] = time.time,
    ):
        self._keys: dict[str, list[SigningKey]] = {}
        for key in keys:
            self._keys.setdefault(domain_key(key.domain), []).append(key)
        self._headers = tuple(h.lower() for h in headers) if headers else DEFAULT_HEADERS
        self._expire = expire
        self._canonicalization = canonicalization
        self._clock = clock

    def keys_for(self, domain: str) -> list[SigningKey]:
        """Keys of `domain` or of its nearest parent domain that has keys; a U-label domain finds the
        keys of its A-label (RFC 5890: one domain; RFC 8616 4: d= is the A-label)."""
        labels = domain_key(domain).split(".")
        for i in range(len(labels) - 1):
            found = self._keys.get(".".join(labels[i:]))
            if found:
                return found
        return []

    def sign(self, f: BinaryIO, permitted: Optional[Callable[[list[str], bytes], bool]] = None) -> bytes:
        """The DKIM-Signature header lines for the message in `f` (read from its current position).
        `permitted`, given the From: addresses and the header block, says whether the sender may use
        them (dkim/permission.py: the permit decision); b"" when it says no."""
        block = read_header_block(f)
        if block is None:
            return b""
        headers, _ = dkim.rfc822_parse(block)
        domain = from_domain(headers)
        keys = self.keys_for(domain) if domain else []
        if not keys:
            return b""
        # from_addresses is not None here: from_domain found the domain in it.
        if permitted is not None and not permitted(from_addresses(headers) or [], block):
            return b""
        hasher = BodyHasher(self._canonicalization[1])
        for chunk in iter(lambda: f.read(CHUNK), b""):
            hasher.update(chunk)
        body_hash = base64.b64encode(hasher.digest())
        include = self._include(headers)
        now = int(self._clock())
        return b"".join(self._signature(block, key, include, body_hash, now) for key in keys)

    def _include(self, headers: list[tuple[bytes, bytes]]) -> list[bytes]:
        present = [k.lower() for k, _ in headers]
        chosen = [k for k in present if k.decode("ascii", "replace") in self._headers or k.startswith(b"list-")]
        return chosen + [h.encode() for h in OVERSIGNED if h.encode() in present]

    def _signature(self, block: bytes, key: SigningKey, include: list[bytes], body_hash: bytes,
                   now: int) -> bytes:
        canon = CanonicalizationPolicy.from_c_value(b"/".join(self._canonicalization))
        fields = [
            (b"v", b"1"),
            (b"a", key.algorithm),
            (b"c", canon.to_c_value()),
            (b"d", domain_key(key.domain).encode("ascii", "replace")),     # the A-label (RFC 8616 4)
            (b"s", key.selector.encode("ascii")),
            (b"t", str(now).encode("ascii")),
        ]
        if self._expire:
            fields.append((b"x", str(now + int(self._expire)).encode("ascii")))
        # RFC 6376 3.5: FWS may follow each ":" of h=.  dkimpy folds at spaces (or, without one, anywhere:
        # inside a header name, which no verifier reads back), so each name is followed by one.
        fields += [(b"h", b": ".join(include)), (b"bh", body_hash), (b"b", b"0" * 60)]
        signer = dkim.DKIM(block, linesep=b"\r\n")
        signer.hasher = dkim.HASH_ALGORITHMS[key.algorithm]
        # gen_header signs with `pk.sign(digest).signature` on its Ed25519 path; our key object offers exactly
        # that for RSA too (OpenSSL PKCS#1 v1.5 over the same SHA-256 digest), so both take that path. The
        # a= tag above says which algorithm was really used.
        signer.signature_algorithm = b"ed25519-sha256"
        value = signer.gen_header(fields, include, canon, b"DKIM-Signature", key)
        return b"DKIM-Signature: " + value
