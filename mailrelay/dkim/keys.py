# -*- test-case-name: tests.test_config_reference, tests.test_examples, tests.test_cli_route_test -*-
"""DKIM private keys: RSA (>= 1024 bits) or Ed25519, PEM in PKCS#8 or PKCS#1, type detected.

In: a key file path.  Out: a `SigningKey` whose `sign(digest)` uses OpenSSL (cryptography), and the DNS TXT
record to publish (RFC 6376 3.6.1; Ed25519 per RFC 8463 4.2: the raw 32-byte public key).
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

RSA_MIN_BITS = 1024   # RFC 8301 3.2: verifiers must reject shorter RSA keys


class KeyError_(ValueError):
    """A key file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class _Signature:
    signature: bytes


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

    @property
    def algorithm(self) -> bytes:
        return b"ed25519-sha256" if isinstance(self.private, ed25519.Ed25519PrivateKey) else b"rsa-sha256"

    def sign(self, digest: bytes) -> _Signature:
        """Sign a SHA-256 digest (RSASSA-PKCS1-v1_5, or Ed25519 over the digest as RFC 8463 3 says)."""
        if isinstance(self.private, ed25519.Ed25519PrivateKey):
            return _Signature(self.private.sign(digest))
        return _Signature(self.private.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256())))

    def txt_record(self) -> str:
        return txt_record(self.private)


def load_private_key(path: Path) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyError_(f"{path}: cannot read: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)   # PKCS#8 and PKCS#1 alike
    except (ValueError, TypeError) as e:
        raise KeyError_(f"{path}: not an unencrypted PEM private key ({e})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_MIN_BITS:
            raise KeyError_(f"{path}: RSA key of {key.key_size} bits; at least {RSA_MIN_BITS} required")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise KeyError_(f"{path}: DKIM keys are RSA or Ed25519, not {type(key).__name__}")


def generate(algorithm: str = "rsa", bits: int = 2048) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if bits < RSA_MIN_BITS:
        raise KeyError_(f"--bits {bits}: at least {RSA_MIN_BITS}")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_b64(key) -> str:
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def txt_record(key) -> str:
    kind = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"
    return f"v=DKIM1; k={kind}; p={public_key_b64(key)}"


def split_txt(value: str, size: int = 255) -> list[str]:
    """A TXT value as the <= 255-octet character-strings DNS needs (RFC 1035 3.3.14)."""
    return [value[i : i + size] for i in range(0, len(value), size)] or [""]
