"""Every deployment example under examples/ is a complete tap.conf that validates, once the files it names
(certificates, keys, secrets) exist beside it."""
from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

from twisted.trial import unittest

from mailrelay.config import load
from mailrelay.dkim import keys
from mailrelay.tls import generate_self_signed

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SECRET_KEYS = ("password_file", "service_password_file", "oauth2_client_secret_file", "oauth2_refresh_token_file")
CERT_KEYS = ("cert", "key", "key_file", "ca_file", "oauth2_ca_file", "client_cert", "client_key")


def referenced_files(node, found=None):
    """(key, relative path) of every file a config names."""
    found = [] if found is None else found
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and key in CERT_KEYS + SECRET_KEYS:
                found.append((key, value))
            else:
                referenced_files(value, found)
    elif isinstance(node, list):
        for item in node:
            referenced_files(item, found)
    return found


class Examples(unittest.TestCase):
    def provide(self, directory: Path, key: str, relative: str) -> None:
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if key in ("cert", "ca_file", "key", "oauth2_ca_file", "client_cert", "client_key"):
            cert, private = generate_self_signed("relay.example.org")
            path.write_bytes(cert + private if key != "key" else private)
        elif key == "key_file":
            algorithm = "ed25519" if relative.endswith("e.pem") else "rsa"
            path.write_bytes(keys.private_pem(keys.generate(algorithm, 2048)))
        else:
            path.write_text("s3cret\n")

    def test_every_example_validates(self):
        examples = sorted(EXAMPLES.rglob("*.conf"))
        self.assertGreaterEqual(len(examples), 5)
        for example in examples:
            directory = Path(self.mktemp()).absolute()
            directory.mkdir(parents=True)
            shutil.copy(example, directory / example.name)
            data = tomllib.loads(example.read_text())
            for key, relative in referenced_files(data):
                self.provide(directory, key, relative)
            # cert and key name separate files: the key file must hold the same key as the certificate
            tls = data.get("tls")
            if tls:
                cert, private = generate_self_signed("relay.example.org")
                (directory / tls["cert"]).write_bytes(cert)
                (directory / tls["key"]).write_bytes(private)
            for transport in data.get("transports", {}).values():     # a client certificate and its key
                if "client_cert" in transport:
                    cert, private = generate_self_signed("relay.example.org")
                    (directory / transport["client_cert"]).write_bytes(cert)
                    (directory / transport["client_key"]).write_bytes(private)
            config = load(directory / example.name)
            self.assertEqual(config.path, directory / example.name, example.name)

    def test_the_examples_say_what_they_are_for(self):
        for example in EXAMPLES.rglob("*.conf"):
            self.assertTrue(example.read_text().startswith("#"), example.name)

    def test_smarthosts_in_2026(self):
        """Microsoft 365 and Gmail take no passwords any more: the examples relay through them with OAuth2
        (client credentials for Microsoft 365, a refresh token for Gmail) or a connector certificate."""
        kinds = {}
        for example in EXAMPLES.glob("*.conf"):
            for _name, t in tomllib.loads(example.read_text()).get("transports", {}).items():
                host = t["host"]
                if host.endswith(("office365.com", "outlook.com", "gmail.com")):
                    self.assertNotIn("password_file", t, example.name)
                    kinds[example.name] = (t.get("auth"), "client_cert" in t,
                                           "oauth2_refresh_token_file" in t, t.get("oauth2_token_url", ""))
        self.assertEqual(kinds["m365-oauth2-relay.conf"][:3], ("xoauth2", False, False))
        self.assertTrue(kinds["m365-oauth2-relay.conf"][3].startswith("https://login.microsoftonline.com/"))
        self.assertEqual(kinds["ad-security-buffer.conf"][:3], ("xoauth2", False, False))
        self.assertEqual(kinds["m365-connector-certificate.conf"][:3], ("none", True, False))
        self.assertEqual(kinds["gmail-oauth2-relay.conf"][:3], ("oauthbearer", False, True))
        self.assertEqual(kinds["gmail-oauth2-relay.conf"][3], "https://oauth2.googleapis.com/token")


class ClusterExample(unittest.TestCase):
    """examples/cluster: HAProxy in front of two nodes that share one Redis."""

    def test_haproxy_accepts_the_configuration(self):
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(haproxy).exists():
            raise unittest.SkipTest("haproxy is not installed (.ci/run installs it)")
        result = subprocess.run([haproxy, "-c", "-f", str(EXAMPLES / "cluster" / "haproxy.cfg")],
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertNotIn("WARNING", result.stdout + result.stderr)

    def test_every_backend_server_is_a_node_listener_that_expects_the_proxy_header(self):
        nodes = {}
        for name in ("relay1", "relay2"):
            data = tomllib.loads((EXAMPLES / "cluster" / f"{name}.conf").read_text())
            nodes[name] = data
        self.assertEqual(len({n["cluster"]["redis"] for n in nodes.values()}), 1)   # one Redis for all
        servers = re.findall(r"^\s*server (\S+) (\S+):(\d+) send-proxy-v2",
                             (EXAMPLES / "cluster" / "haproxy.cfg").read_text(), re.M)
        self.assertEqual(len(servers), 6)
        for name, address, port in servers:
            listeners = {table["endpoint"]: table for table in nodes[name]["listen"]}
            endpoint = f"tcp:{port}:interface={address}"
            self.assertIn(endpoint, listeners, f"{name} {address}:{port}")
            self.assertTrue(listeners[endpoint].get("proxy_protocol"), endpoint)
