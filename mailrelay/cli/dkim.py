# -*- test-case-name: tests.test_dkim -*-
"""`mailrelay dkim genkey DOMAIN SELECTOR [--algorithm rsa|ed25519] [--bits N] [--output FILE] --config F`
writes a private key (mode 0600) and prints the DNS TXT record to publish;
`mailrelay dkim check DOMAIN SELECTOR --config F` compares the published record with the configured key.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from mailrelay.config import ConfigError, load
from mailrelay.dkim import keys
from mailrelay.idn import domain_key


def register(subparsers) -> None:
    parser = subparsers.add_parser("dkim", help="DKIM key tools")
    verbs = parser.add_subparsers(dest="verb", required=True)
    gen = verbs.add_parser("genkey", help="write a new key and print its DNS record")
    gen.add_argument("domain")
    gen.add_argument("selector")
    gen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    gen.add_argument("--bits", type=int, default=2048)
    gen.add_argument("--output", help="key file (default: the [[dkim.key]] key_file, else dkim/DOMAIN.SELECTOR.pem)")
    gen.add_argument("--config", required=True)
    gen.set_defaults(func=genkey)
    check = verbs.add_parser("check", help="compare the published DNS record with the configured key")
    check.add_argument("domain")
    check.add_argument("selector")
    check.add_argument("--config", required=True)
    check.set_defaults(func=check_record)


def _configured_key_file(config, domain: str, selector: str):
    for key in config.dkim.keys:
        if domain_key(key.domain) == domain_key(domain) and key.selector == selector:
            return key.key_file
    return None


def record_name(domain: str, selector: str) -> str:
    """The TXT record's name; an internationalised domain as its A-label, the name DNS holds (RFC 5890)."""
    return f"{selector}._domainkey.{domain_key(domain)}."


def genkey(args) -> int:
    try:
        config = load(args.config)
        path = Path(args.output) if args.output else (
            _configured_key_file(config, args.domain, args.selector)
            or config.path.parent / "dkim" / f"{args.domain}.{args.selector}.pem"
        )
        if path.exists():
            raise keys.KeyError_(f"{path}: exists already; remove it first or give --output")
        private = keys.generate(args.algorithm, args.bits)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(keys.private_pem(private))
    except (ConfigError, keys.KeyError_) as e:
        print(f"mailrelay dkim: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"mailrelay dkim: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    value = keys.txt_record(private)
    strings = " ".join(f'"{part}"' for part in keys.split_txt(value))
    print(f"# key written to {path}; publish:")
    print(f"{record_name(args.domain, args.selector)} IN TXT ( {strings} )")
    return 0


def check_record(args) -> int:
    from mailrelay.dkim.verifier import TemporaryDNSError, make_resolver, txt_lookup

    try:
        config = load(args.config)
        key_file = _configured_key_file(config, args.domain, args.selector)
        if key_file is None:
            raise keys.KeyError_(f"no [[dkim.key]] for {args.domain} selector {args.selector} in {config.path}")
        expected = keys.public_key_b64(keys.load_private_key(key_file))
        published = txt_lookup(make_resolver(config.delivery.nameservers))(
            record_name(args.domain, args.selector).encode()
        )
    except (ConfigError, keys.KeyError_) as e:
        print(f"mailrelay dkim: {e}", file=sys.stderr)
        return 2
    except TemporaryDNSError as e:
        print(f"mailrelay dkim: DNS did not answer: {e}", file=sys.stderr)
        return 2
    name = record_name(args.domain, args.selector)
    if published is None:
        print(f"{name}: no TXT record published")
        return 1
    tags = dict(
        part.strip().split("=", 1) for part in published.decode("ascii", "replace").split(";") if "=" in part
    )
    found = "".join(tags.get("p", "").split())
    if found == expected:
        print(f"{name}: OK, the published key matches {key_file}")
        return 0
    print(f"{name}: MISMATCH: published p= does not match {key_file}")
    return 1
