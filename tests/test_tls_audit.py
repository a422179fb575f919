"""testssl.sh (the Debian package, /usr/bin/testssl) against each listener kind of a real relay.

A relay runs in this process on loopback with an RSA certificate from a test CA made here (RSA, so that
static-RSA key exchange could show at all); its three listeners are scanned side by side (STARTTLS for
relay and submission).  testssl checks protocols, cipher categories, forward secrecy, the server's
cipher order, the known vulnerabilities and its client simulations, and writes flat JSON.  A listener
fails on any finding rated MEDIUM, HIGH or CRITICAL — on the submission ports LOW too (CBC, static
RSA) — or WARN/FATAL (a check that could not be done), other than those caused by the test certificate
not being publicly trusted (trust, chain, name, revocation, OCSP, CT, CAA); and when a current client
simulation (most of them offer ALPN) cannot connect.  The scan must also have run: the checks in
EXPECTED_IDS must all be in its output.  (Session resumption, which testssl checks only with -S, and
the per-listener ALPN handshakes are in test_tls_listeners.)

Skipped, with the reason, only when /usr/bin/testssl is absent (CI installs it).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from twisted.internet import defer, reactor, utils
from twisted.trial import unittest

from tests.support.relay import RelayFixture
from tests.support.testca import issue

TESTSSL = "/usr/bin/testssl"
SCAN_TIMEOUT = 600      # seconds for one scan: the three run side by side in 50-100 s on a quiet machine,
                        # and several times that when other work shares its two cores
KINDS = ("relay", "submission", "submissions")
# protocols, cipher categories, forward secrecy, server cipher order, vulnerabilities, client simulations
CHECKS = ("-p", "-s", "-f", "-P", "-U", "-c")

# Findings about the certificate being from a private test CA, not about the listener's TLS.
CERTIFICATE_TRUST_IDS = frozenset({
    "cert_trust", "cert_chain_of_trust", "cert_commonName", "cert_commonName_wo_SNI", "cert_subjectAltName",
    "cert_caIssuers", "cert_revocation", "cert_crlDistributionPoints", "cert_ocspURL", "OCSP_stapling",
    "cert_mustStapleExtension", "certificate_transparency", "DNS_CAArecord", "cert_eTLS",
    "cert_certificatePolicies_EV", "DROWN_hint",
})
# WARN: a check that could not be done; FATAL: a scan that could not go on.  Neither may pass.
FAILING = {
    "relay": {"MEDIUM", "HIGH", "CRITICAL", "WARN", "FATAL"},
    "submission": {"LOW", "MEDIUM", "HIGH", "CRITICAL", "WARN", "FATAL"},
    "submissions": {"LOW", "MEDIUM", "HIGH", "CRITICAL", "WARN", "FATAL"},
}
# Present in every complete scan with CHECKS (a scan that broke off early must not pass); where testssl
# versions name a check differently, either name.
EXPECTED_IDS = (("SSLv2",), ("SSLv3",), ("TLS1",), ("TLS1_1",), ("TLS1_2",), ("TLS1_3",),
                ("cipherlist_NULL",), ("cipherlist_aNULL",), ("cipherlist_EXPORT",), ("cipherlist_LOW",),
                ("cipherlist_3DES_IDEA",), ("cipherlist_AVERAGE", "cipherlist_OBSOLETED"), ("cipherlist_STRONG",),
                ("PFS", "FS"), ("cipher_order",), ("heartbleed",), ("CCS",), ("ROBOT",), ("secure_renego",),
                ("secure_client_renego",), ("CRIME_TLS",), ("POODLE_SSL",), ("fallback_SCSV",), ("SWEET32",),
                ("FREAK",), ("DROWN",), ("LOGJAM",), ("BEAST",), ("LUCKY13",), ("RC4",),
                ("clientsimulation-android_12",), ("clientsimulation-go_1178",),
                ("clientsimulation-thunderbird_91_9",))
# Client simulations that must connect where testssl runs them: current stacks, most offering ALPN.
MODERN_CLIENTS = ("android_11", "android_12", "chrome_101_win10", "firefox_100_win10", "edge_101_win10_21h2",
                  "safari_154_osx_1231", "java1102", "java1703", "go_1178", "openssl_303", "thunderbird_91_9",
                  "apple_mail_16_0")


def findings_to_fail(kind: str, findings: list[dict]) -> list[str]:
    """The findings that fail the audit of a `kind` listener, one line each."""
    bad = []
    for f in findings:
        fid, severity = f.get("id", ""), f.get("severity", "")
        if fid in CERTIFICATE_TRUST_IDS or fid.startswith("cert_trust"):
            continue
        if severity in FAILING[kind] or fid == "scanProblem":
            bad.append(f"{severity} {fid}: {f.get('finding')}")
        if fid.startswith("clientsimulation-") and fid.split("-", 1)[1] in MODERN_CLIENTS \
                and "No connection" in f.get("finding", ""):
            bad.append(f"{fid}: a current client cannot connect")
    return bad


class FindingRules(unittest.SynchronousTestCase):
    """The rules over testssl's JSON, on findings of the kind it writes (no scan needed)."""

    def test_static_rsa_and_cbc_fail_a_submission_listener_but_not_the_relay_port(self):
        findings = [{"id": "cipherlist_AVERAGE", "severity": "LOW", "finding": "offered"},
                    {"id": "LUCKY13", "severity": "LOW", "finding": "potentially vulnerable, uses TLS CBC ciphers"}]
        self.assertEqual(len(findings_to_fail("submission", findings)), 2)
        self.assertEqual(findings_to_fail("relay", findings), [])

    def test_the_test_certificate_is_not_held_against_the_listener(self):
        findings = [{"id": "cert_chain_of_trust", "severity": "CRITICAL", "finding": "failed (chain incomplete)."},
                    {"id": "DNS_CAArecord", "severity": "LOW", "finding": "--"}]
        self.assertEqual(findings_to_fail("submissions", findings), [])

    def test_a_medium_finding_or_a_failed_modern_client_fails_every_kind(self):
        findings = [{"id": "secure_client_renego", "severity": "MEDIUM", "finding": "VULNERABLE"},
                    {"id": "clientsimulation-go_1178", "severity": "INFO", "finding": "No connection"},
                    {"id": "clientsimulation-ie_6_xp", "severity": "INFO", "finding": "No connection"}]
        for kind in FAILING:
            self.assertEqual(len(findings_to_fail(kind, findings)), 2, kind)


class TestsslAudit(unittest.TestCase):
    """One relay, its three listeners scanned side by side (one scan each), each judged by its kind."""

    timeout = SCAN_TIMEOUT + 60

    def setUp(self):
        if not os.access(TESTSSL, os.X_OK):
            raise unittest.SkipTest(f"{TESTSSL} is not installed (Debian package testssl.sh; CI installs it)")
        self.work = Path(self.mktemp()).absolute()
        pair = issue(self.work / "pki", key_type="rsa")
        self.relay = RelayFixture(self.work / "relay", extra=f'[tls]\ncert = "{pair.cert}"\nkey = "{pair.key}"\n')
        self.relay.start(reactor)
        self.addCleanup(self.relay.stop)

    @defer.inlineCallbacks
    def scan(self, kind: str):
        """testssl against the `kind` listener: (its findings, the parsed JSON; seconds it took)."""
        report = self.work / f"testssl-{kind}.json"
        args = ["--quiet", "--color", "0", "--warnings", "off", "--nodns", "none",
                "--openssl-timeout", "10", "--connect-timeout", "10", *CHECKS, "--jsonfile", str(report)]
        if kind != "submissions":
            args += ["--starttls", "smtp"]
        started = time.monotonic()
        out, err, code = yield utils.getProcessOutputAndValue(
            "/usr/bin/timeout", [str(SCAN_TIMEOUT), TESTSSL, *args, f"127.0.0.1:{self.relay.ports[kind]}"],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.work), "LC_ALL": "C"},
            path=str(self.work), reactor=reactor,
        )
        elapsed = time.monotonic() - started
        if not report.exists():
            return None, elapsed, f"testssl wrote no report (exit {code}): {(out + err)[-1000:]!r}"
        keep = os.environ.get("TESTSSL_REPORT_DIR")      # to look at the reports after a run
        if keep:
            shutil.copy(report, Path(keep) / report.name)
        try:
            return json.loads(report.read_text()), elapsed, None
        except ValueError as e:
            return None, elapsed, f"testssl's report is not JSON ({e}; exit {code}, timeout 124)"

    def judge(self, kind: str, findings: list[dict]) -> list[str]:
        """Everything wrong with one listener's scan."""
        ids = {f.get("id") for f in findings}
        problems = [f"check missing from the scan: {' or '.join(names)}"
                    for names in EXPECTED_IDS if not ids.intersection(names)]
        problems += findings_to_fail(kind, findings)
        by_id = {f["id"]: f["finding"] for f in findings}
        for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
            if "not offered" not in by_id.get(old, "not offered"):
                problems.append(f"{old} offered")
        for wanted, text in (("TLS1_2", "offered"), ("TLS1_3", "offered"), ("secure_renego", "supported"),
                             ("secure_client_renego", "not vulnerable"), ("cipher_order", "server")):
            if text not in by_id.get(wanted, ""):
                problems.append(f"{wanted}: {by_id.get(wanted)!r}, expected {text!r}")
        if kind != "relay" and "not offered" not in by_id.get("cipherlist_AVERAGE", "not offered"):
            problems.append("CBC or static-RSA suites offered on a submission port")
        return problems

    @defer.inlineCallbacks
    def test_every_listener_passes_testssl(self):
        scans = yield defer.gatherResults([self.scan(kind) for kind in KINDS])
        problems = []
        for kind, (findings, elapsed, broken) in zip(KINDS, scans):
            print(f"\ntestssl, {kind} listener: {elapsed:.0f} s, "
                  f"{'no report' if findings is None else f'{len(findings)} findings'}")
            if broken:
                problems.append(f"{kind}: {broken}")
            else:
                problems += [f"{kind}: {p}" for p in self.judge(kind, findings)]
        self.assertEqual(problems, [], "\n".join(problems))
