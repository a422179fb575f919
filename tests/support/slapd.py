"""A real OpenLDAP slapd on loopback for the LDAP checker's tests.

`Slapd(directory).start()` writes a slapd.conf (mdb backend, memberof overlay), a test CA and a server
certificate (SAN 127.0.0.1 and localhost), starts slapd on two OS-chosen free ports of 127.0.0.1 (ldap://
with STARTTLS available, and ldaps://), and loads the directory below with ldapadd, so the memberof
overlay fills in `memberOf`.  `stop()` kills slapd and removes the directory.

slapd also serves ldaps on 127.0.0.2 (Linux routes all of 127/8 to loopback), an address the
certificate does not name, for the host name check.

`shared_slapd()` starts one instance lazily for the whole test process (stopped at exit), and raises
SkipTest with the reason when slapd or ldapadd is not installed (`apt-get install slapd ldap-utils`).

    dc=example,dc=org
      ou=people      uid=alice, uid=bob, uid=carol (passwords in USERS)
      ou=services    cn=relay (the service account)
      ou=groups      cn=mail-senders       groupOfNames, member alice and bob (carol is outside)
                     cn=restricted-senders groupOfNames, member alice; unreadable by users, so only
                                           alice's memberOf shows the membership
                     cn=unique-senders     groupOfUniqueNames, uniqueMember bob
                     cn=team-b             groupOfNames, member cn=team-a; itself a member of mail-senders
                     cn=team-a             groupOfNames, member dave (so dave is in mail-senders two
                                           levels down, and in no group directly)
                     cn=loop-1, cn=loop-2  each a member of the other; loop-2 also lists carol
"""
from __future__ import annotations

import atexit
import base64
import ctypes
import datetime
import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import ports

BASE = "dc=example,dc=org"
PEOPLE = f"ou=people,{BASE}"
GROUPS = f"ou=groups,{BASE}"
ROOT_DN = f"cn=admin,{BASE}"
ROOT_PASSWORD = "root-secret"
SERVICE_DN = f"cn=relay,ou=services,{BASE}"
SERVICE_PASSWORD = "relay-service-secret"
USERS = {"alice": "alice-secret", "bob": "bob p\u00e4ss w\u00f6rd", "carol": "carol-secret",
         "dave": "dave-secret"}
MAIL_SENDERS = f"cn=mail-senders,{GROUPS}"
RESTRICTED_SENDERS = f"cn=restricted-senders,{GROUPS}"
UNIQUE_SENDERS = f"cn=unique-senders,{GROUPS}"
TEAM_A = f"cn=team-a,{GROUPS}"
TEAM_B = f"cn=team-b,{GROUPS}"
LOOP_1 = f"cn=loop-1,{GROUPS}"
LOOP_2 = f"cn=loop-2,{GROUPS}"

SLAPD_CANDIDATES = ("slapd", "/usr/sbin/slapd")
MODULE_PATH = "/usr/lib/ldap"
SCHEMA_DIR = "/etc/ldap/schema"
START_TIMEOUT = 10.0

SLAPD_CONF = """\
include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/inetorgperson.schema
modulepath {modules}
moduleload back_mdb
moduleload memberof
pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
TLSCACertificateFile {dir}/ca.pem
TLSCertificateFile {dir}/server.pem
TLSCertificateKeyFile {dir}/server.key
# like Active Directory, accept an unauthenticated bind (a DN, no password) as anonymous (RFC 4513 §5.1.2)
allow bind_anon_dn

database mdb
suffix "{base}"
rootdn "{root_dn}"
rootpw {root_pw}
directory {dir}/db
maxsize 10485760
overlay memberof

access to attrs=userPassword
  by anonymous auth
  by * none
access to dn.base="{restricted}"
  by * none
access to *
  by users read
  by * none
"""


def ldap_installed() -> Optional[str]:
    """The slapd executable, or None when slapd/ldapadd are missing or the modules are not where Debian
    puts them."""
    slapd = next((p for p in map(shutil.which, SLAPD_CANDIDATES) if p), None)
    if slapd and shutil.which("ldapadd") and Path(MODULE_PATH, "back_mdb.so").exists():
        return slapd
    return None


def ssha(password: str) -> str:
    """An OpenLDAP {SSHA} userPassword value."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def _ldif_value(value: str) -> str:
    """`attr: value`, or `attr:: base64` for non-ASCII values (RFC 2849)."""
    if value.isascii():
        return f": {value}"
    return ":: " + base64.b64encode(value.encode("utf-8")).decode("ascii")


def directory_ldif() -> str:
    entries = [
        f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: ou=services,{BASE}\nobjectClass: organizationalUnit\nou: services\n",
        f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups\n",
        f"dn: {SERVICE_DN}\nobjectClass: applicationProcess\nobjectClass: simpleSecurityObject\n"
        f"cn: relay\nuserPassword: {ssha(SERVICE_PASSWORD)}\n",
    ]
    for name, password in USERS.items():
        entries.append(
            f"dn: uid={name},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {name}\ncn: {name.title()}\n"
            f"sn: {name.title()}\nmail: {name}@example.org\nuserPassword{_ldif_value(ssha(password))}\n"
        )
    entries += [
        f"dn: {TEAM_A}\nobjectClass: groupOfNames\ncn: team-a\nmember: uid=dave,{PEOPLE}\n",
        f"dn: {TEAM_B}\nobjectClass: groupOfNames\ncn: team-b\nmember: {TEAM_A}\n",
        f"dn: {MAIL_SENDERS}\nobjectClass: groupOfNames\ncn: mail-senders\n"
        f"member: uid=alice,{PEOPLE}\nmember: uid=bob,{PEOPLE}\nmember: {TEAM_B}\n",
        f"dn: {LOOP_1}\nobjectClass: groupOfNames\ncn: loop-1\nmember: {TEAM_A}\n",
        f"dn: {LOOP_2}\nobjectClass: groupOfNames\ncn: loop-2\nmember: {LOOP_1}\nmember: uid=carol,{PEOPLE}\n",
        f"dn: {RESTRICTED_SENDERS}\nobjectClass: groupOfNames\ncn: restricted-senders\n"
        f"member: uid=alice,{PEOPLE}\n",
        f"dn: {UNIQUE_SENDERS}\nobjectClass: groupOfUniqueNames\ncn: unique-senders\n"
        f"uniqueMember: uid=bob,{PEOPLE}\n",
        # loop-1 <-> loop-2: a cycle (loop-1 is first created with team-a as its one member).
        f"dn: {LOOP_1}\nchangetype: modify\nadd: member\nmember: {LOOP_2}\n",
    ]
    return "\n".join(entries)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_server_cert(ca: x509.Certificate, ca_key) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def free_port() -> int:
    """A port of 127.0.0.1 no other test process is given (slapd binds it a moment later)."""
    return ports.free_port()


def _die_with_parent() -> None:
    """In the child before exec: on Linux, slapd gets SIGTERM when the test process dies, even when it
    is killed and the atexit cleanup never runs (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class Slapd:
    """One slapd process in its own directory, with the test CA, certificates and data."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.ca_file = self.directory / "ca.pem"
        self.wrong_ca_file = self.directory / "wrong-ca.pem"
        self.service_password_file = self.directory / "service.secret"
        self.ldap_url = self.ldaps_url = ""
        self.misnamed_ldaps_url = ""   # the ldaps port on 127.0.0.2, an address the certificate does not name
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "Slapd":
        slapd = ldap_installed()
        if slapd is None:
            raise unittest.SkipTest("slapd/ldapadd not installed (apt-get install slapd ldap-utils)")
        self._write_files()
        for _attempt in range(3):   # a free port can be taken between free_port() and slapd's bind
            ports = free_port(), free_port()
            if self._launch(slapd, *ports):
                self._load()
                return self
        raise RuntimeError(f"slapd did not start; see {self.directory / 'slapd.log'}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def _write_files(self) -> None:
        (self.directory / "db").mkdir(parents=True, exist_ok=True)
        ca, ca_key = make_ca("mailrelay test CA")
        server, server_key = make_server_cert(ca, ca_key)
        wrong_ca, _ = make_ca("some other CA")
        self.ca_file.write_bytes(_pem(ca))
        self.wrong_ca_file.write_bytes(_pem(wrong_ca))
        (self.directory / "server.pem").write_bytes(_pem(server))
        (self.directory / "server.key").write_bytes(
            server_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.service_password_file.write_text(SERVICE_PASSWORD + "\n")
        (self.directory / "slapd.conf").write_text(
            SLAPD_CONF.format(
                schema=SCHEMA_DIR, modules=MODULE_PATH, dir=self.directory, base=BASE, root_dn=ROOT_DN,
                root_pw=ROOT_PASSWORD, restricted=RESTRICTED_SENDERS,
            )
        )
        (self.directory / "data.ldif").write_text(directory_ldif())

    def _launch(self, slapd: str, ldap_port: int, ldaps_port: int) -> bool:
        self.ldap_url = f"ldap://127.0.0.1:{ldap_port}"
        self.ldaps_url = f"ldaps://127.0.0.1:{ldaps_port}"
        self.misnamed_ldaps_url = f"ldaps://127.0.0.2:{ldaps_port}"
        urls = f"{self.ldap_url}/ {self.ldaps_url}/ {self.misnamed_ldaps_url}/"
        log = open(self.directory / "slapd.log", "ab")
        self.process = subprocess.Popen(
            [slapd, "-f", str(self.directory / "slapd.conf"), "-h", urls, "-d", "0"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if _accepting(ldap_port) and _accepting(ldaps_port):
                return True
            time.sleep(0.02)
        self.process.kill()
        self.process.wait()
        return False

    def _load(self) -> None:
        subprocess.run(
            ["ldapadd", "-x", "-H", self.ldap_url, "-D", ROOT_DN, "-w", ROOT_PASSWORD,
             "-f", str(self.directory / "data.ldif")],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )


def start_private_slapd(directory: Optional[Path] = None) -> Slapd:
    """A slapd of one's own (e.g. to stop it in a test); the caller stops it."""
    return Slapd(Path(directory or tempfile.mkdtemp(prefix="mailrelay-slapd-"))).start()


def shared_slapd() -> Slapd:
    """One slapd for the whole test process, started on first use and stopped at exit."""
    if _shared.instance is None:
        if ldap_installed() is None:
            raise unittest.SkipTest("slapd/ldapadd not installed (apt-get install slapd ldap-utils)")
        instance = start_private_slapd()
        atexit.register(instance.stop)
        _shared.instance = instance
    return _shared.instance


class _shared:
    instance: Optional[Slapd] = None
