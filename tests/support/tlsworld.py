"""A small Internet on loopback for TLS policy tests: a DNS server (AD bit on cue), a test CA, an MTA-STS
policy host, and SMTP sinks standing in for mail exchangers on 127.0.0.x, all on one `mx_port`.

    world = World(self, authenticated=True)             # stopped by the test's cleanups
    world.zone(("example.net", "MX"), ["10 mx1.example.net."])
    world.exchanger("mx1.example.net", "127.0.0.2", tls="good")    # "good" | "wrong-name" | "self-signed"
                                                                    # | "expired" | None (no STARTTLS)
    world.publish("example.net", "enforce", ["mx1.example.net"])   # the TXT record and the policy
    results = yield world.mx().deliver(message_to("b@example.net"), ["b@example.net"])
    world.reports.records                                           # what the ITLSReportSink was told

`record(usage, selector, mtype, cert)` is the TLSA record (RFC 6698) naming a certificate; `sink_cert(sink)`
the PEM certificate a sink presents.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor, ssl
from twisted.internet.error import CannotListenError
from zope.interface import implementer

from mailrelay import tls as relay_tls
from mailrelay.config import DeliveryConfig
from mailrelay.outbound.dane import TLSA
from mailrelay.outbound.dns import MXResolver
from mailrelay.queue.job import Timeouts
from mailrelay.outbound.mx import MXDelivery
from mailrelay.interfaces import ITLSReportSink
from tests.support.dnsserver import DNSServer
from tests.support.pki import TestCA
from tests.support.policyserver import PolicyServer
from tests.support.ports import free_port
from tests.support.sink import Sink

FAST = Timeouts(connect=5.0, reply=10.0, data_end=10.0)


@implementer(ITLSReportSink)
class RecordingReports:
    """An ITLSReportSink that keeps every outcome as a dict."""

    def __init__(self):
        self.records: list[dict] = []

    def record(self, policy_domain, policy_type, policy_strings, mx_host, result_type, success, detail):
        self.records.append(dict(domain=policy_domain, policy_type=policy_type, strings=tuple(policy_strings),
                                 mx_host=mx_host, result_type=result_type, success=success, detail=detail))

    def results(self) -> list[tuple]:
        """(policy_type, mx_host, result_type, success) of each record, in order."""
        return [(r["policy_type"], r["mx_host"], r["result_type"], r["success"]) for r in self.records]


def policy_text(mode: str, mx: list[str], max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}"] + [f"mx: {m}" for m in mx] + [f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


class World:
    def __init__(self, test, authenticated: bool = False, insecure=(), policy_certificate: str = "good"):
        self.test = test
        self.ca = TestCA()
        self.ca_file = self.ca.write(os.path.abspath(test.mktemp()))
        # TTL 0: the relay's resolver keeps nothing, so a test may change the zone between deliveries.
        self.dns = DNSServer({}, authenticated_data=authenticated, insecure=insecure, ttl=0)
        self.nameservers = (("127.0.0.1", self.dns.start(reactor)),)
        test.addCleanup(self.dns.stop)
        self.policies = PolicyServer(self.ca, certificate=policy_certificate)
        self.mx_port = free_port("127.0.0.2")
        self.reports = RecordingReports()
        self.sinks: dict[str, Sink] = {}
        self._policy_started = False

    def zone(self, key: tuple[str, str], values: list) -> None:
        self.dns.set(key[0], key[1], values)

    def server_options(self, name: str, kind: Optional[str]) -> Optional[ssl.CertificateOptions]:
        if kind is None:
            return None
        if kind == "self-signed":
            cert_pem, key_pem = relay_tls.generate_self_signed(name)
            pair = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
            return ssl.CertificateOptions(privateKey=pair.privateKey.original, certificate=pair.original)
        if kind == "wrong-name":
            return self.ca.server_options("not-" + name, send_ca=True)
        return self.ca.server_options(name, expired=kind == "expired", send_ca=True)

    def exchanger(self, name: str, address: str, tls: Optional[str] = "good", **sink_options) -> Sink:
        """A sink for MX host `name` on `address`:mx_port, with its A record; `tls` its certificate."""
        self.zone((name, "A"), [address])
        options = self.server_options(name, tls)
        self.last_certificate = self.ca.last_issued if tls not in (None, "self-signed") else None
        sink = Sink(hostname=name, **sink_options)
        try:
            sink.start(reactor, port=self.mx_port, interface=address, tls_options=options)
        except CannotListenError:
            self.test.skipTest(f"port {self.mx_port} is taken on {address}")
        self.test.addCleanup(sink.stop)
        self.sinks[name] = sink
        return sink

    def publish(self, domain: str, mode: str, mx: list[str], policy_id: str = "20260101", max_age: int = 86400,
                text: Optional[str] = None) -> None:
        """The `_mta-sts` TXT record and the policy, served by the policy host (started on first use)."""
        self.zone((f"_mta-sts.{domain}", "TXT"), [f"v=STSv1; id={policy_id};"])
        self.zone((f"mta-sts.{domain}", "A"), ["127.0.0.1"])
        self.policies.policies[domain] = text if text is not None else policy_text(mode, mx, max_age)
        if not self._policy_started:
            self._policy_started = True
            self.policies.start(reactor)
            self.test.addCleanup(self.policies.stop)

    @property
    def policy_port(self) -> int:
        return self.policies.port if self._policy_started else free_port()

    def delivery(self, **keys) -> DeliveryConfig:
        keys.setdefault("tls", "opportunistic")
        keys.setdefault("ca_file", self.ca_file)
        return DeliveryConfig(mx_port=self.mx_port, nameservers=self.nameservers,
                              mta_sts_port=self.policy_port, **keys)

    def mx(self, spool=None, clock=None, **keys) -> MXDelivery:
        delivery = self.delivery(**keys)
        resolver = MXResolver(self.nameservers, reactor, timeout=2.0)
        self.test.addCleanup(resolver.stop)
        mx = MXDelivery(delivery, "relay.test", reactor, resolver=resolver, timeouts=FAST, spool=spool,
                        tls_reports=self.reports)
        self.test.addCleanup(mx.close_idle)
        return mx


def record(usage: int, selector: int, mtype: int, cert: x509.Certificate) -> TLSA:
    if selector == 0:
        content = cert.public_bytes(serialization.Encoding.DER)
    else:
        content = cert.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    data = {0: content, 1: hashlib.sha256(content).digest(), 2: hashlib.sha512(content).digest()}[mtype]
    return TLSA(usage, selector, mtype, data)


def sink_cert(sink) -> bytes:
    """The PEM certificate the sink's TLS options present."""
    from OpenSSL import SSL, crypto

    connection = SSL.Connection(sink.tls_options.getContext(), None)
    return crypto.dump_certificate(crypto.FILETYPE_PEM, connection.get_certificate())
