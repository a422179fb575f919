# -*- test-case-name: tests.test_dane -*-
"""DANE for SMTP (RFC 7672, TLSA records of RFC 6698): which TLSA records count, and whether the
certificate chain an exchanger presented matches one of them.

Job in the journey: outbound.tlspolicy looks up `_PORT._tcp.MXHOST` TLSA for an exchanger whose MX and
address answers were authenticated, and hands the records here; after the TLS handshake the client's
check (outbound.tlsverify) hands the presented chain here.  In: TLSA rdata (usage, selector, matching
type, data) and the chain as cryptography x509 certificates, leaf first.  Out: `usable()` records, and
`match()` — None when the chain is authenticated, else an RFC 8460 result type and a reason.

RFC 7672 section 3.1: only DANE-TA(2) and DANE-EE(3) are usable for SMTP; PKIX-TA(0) and PKIX-EE(1)
are not (section 3.1.3: there is no agreed set of CAs for SMTP), nor unknown selectors or matching types
(RFC 6698 section 2.1).  DANE-EE matches the leaf's certificate (selector 0) or its public key (1), with
no name and no date checks (section 3.1.1).  DANE-TA matches a certificate of the presented chain that
the leaf chains to, the chain is then checked up to it (dates included), and the leaf must carry the MX
host's name (section 3.1.2, names per section 3.2.2: the MX name, RFC 6125 rules).  The matching itself
is done on DER from the cryptography package and by OpenSSL's chain verification; nothing is parsed
here by hand.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto

DANE_TA, DANE_EE = 2, 3
SELECTORS = (0, 1)                   # RFC 6698 2.1.2: full certificate, SubjectPublicKeyInfo
MATCHING = {0: None, 1: "sha256", 2: "sha512"}    # RFC 6698 2.1.3: exact, SHA2-256, SHA2-512


@dataclass(frozen=True)
class TLSA:
    """One TLSA record (RFC 6698 section 2.1)."""
    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def from_rdata(cls, rdata) -> "TLSA":
        return cls(int(rdata.usage), int(rdata.selector), int(rdata.mtype), bytes(rdata.cert))

    @property
    def usable(self) -> bool:
        # RFC 7672 3.1.3: PKIX-TA(0) and PKIX-EE(1) are not for SMTP; RFC 6698 2.1: unknown values are unusable.
        return self.usage in (DANE_TA, DANE_EE) and self.selector in SELECTORS and self.mtype in MATCHING

    def text(self) -> str:
        """Presentation form (RFC 6698 section 2.2), for logs, route-test and TLS reports."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    def matches(self, cert: x509.Certificate) -> bool:
        if self.selector == 0:
            content = cert.public_bytes(serialization.Encoding.DER)
        else:
            content = cert.public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
        algorithm = MATCHING[self.mtype]
        digest = content if algorithm is None else hashlib.new(algorithm, content).digest()
        return digest == self.data


def usable(records: Iterable[TLSA]) -> tuple[TLSA, ...]:
    return tuple(r for r in records if r.usable)


def match(records: Sequence[TLSA], chain: Sequence[x509.Certificate], mx_host: str) -> Optional[tuple[str, str]]:
    """None when `chain` (leaf first, as presented) is authenticated by a usable record; else
    (RFC 8460 result type, reason)."""
    records = usable(records)
    if not chain:
        return "validation-failure", "no certificate presented"
    leaf = chain[0]
    if any(r.usage == DANE_EE and r.matches(leaf) for r in records):
        return None          # RFC 7672 3.1.1: DANE-EE: no name check, no expiry check
    anchors = [c for c in chain if any(r.usage == DANE_TA and r.matches(c) for r in records)]
    if not anchors:
        return "validation-failure", "no TLSA record matches the presented certificates"
    problem = _chains_to(leaf, chain[1:], anchors)
    if problem is not None:
        return "validation-failure", f"the certificate does not chain to the DANE-TA trust anchor: {problem}"
    if not _names(leaf, mx_host):
        # RFC 7672 3.2.2: with DANE-TA, the leaf must name the MX host (the TLSA base domain).
        return "certificate-host-mismatch", f"the certificate is not valid for {mx_host}"
    return None


def _chains_to(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
               anchors: Sequence[x509.Certificate]) -> Optional[str]:
    """None when OpenSSL verifies `leaf` up to one of `anchors` (dates checked; a TA that is itself not
    self-signed is accepted, X509_V_FLAG_PARTIAL_CHAIN, as RFC 7672 3.1.2 allows an intermediate TA)."""
    store = crypto.X509Store()
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    for anchor in anchors:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    if any(_same(leaf, a) for a in anchors):
        return None          # the leaf itself is the trust anchor
    untrusted = [crypto.X509.from_cryptography(c) for c in intermediates]
    try:
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf), untrusted).verify_certificate()
    except crypto.X509StoreContextError as e:
        return str(e)[:160]
    return None


def _same(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a.public_bytes(serialization.Encoding.DER) == b.public_bytes(serialization.Encoding.DER)


def _names(cert: x509.Certificate, host: str) -> bool:
    from service_identity import VerificationError
    from service_identity.cryptography import verify_certificate_hostname

    try:
        verify_certificate_hostname(cert, host.rstrip("."))
    except (VerificationError, ValueError):
        return False
    except Exception:       # service_identity's CertificateError: no usable name at all
        return False
    return True
