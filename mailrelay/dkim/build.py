# -*- test-case-name: tests.test_queue_front, tests.test_dns_cache, tests.test_operations -*-
"""From `[dkim]` to the objects the delivery stage uses: a Signer (mode "sign" with keys) and a Verifier
(`verify = true`). Keys are loaded once here, at start or reload, so a bad key file is a start-up error."""
from __future__ import annotations

from typing import Optional

from mailrelay.config import Config
from mailrelay.dkim.keys import SigningKey, load_private_key
from mailrelay.dkim.signer import Signer
from mailrelay.dkim.verifier import Verifier, make_resolver


def build_signer(config: Config) -> Optional[Signer]:
    dkim = config.dkim
    if dkim.mode != "sign" or not dkim.keys:
        return None
    keys = [SigningKey(k.domain, k.selector, load_private_key(k.key_file)) for k in dkim.keys]
    return Signer(keys, headers=dkim.headers or None, expire=dkim.expire or None)


def build_verifier(config: Config) -> Optional[Verifier]:
    if not config.dkim.verify:
        return None
    return Verifier(config.hostname, make_resolver(config.delivery.nameservers))
