# -*- test-case-name: tests.test_config, tests.test_cli_check -*-
"""The configuration contract's example (EXAMPLE) and `write_example`, which puts it in a directory with every
file it names (certificates, secrets, a DKIM key); SES_SECRET is the smarthost password it holds, which no
output may show.
"""
from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from mailrelay.tls import generate_self_signed


# The configuration contract's example, with its /etc paths made relative to the config file.
EXAMPLE = '''
hostname = "relay.example.org"
spool = "/var/spool/mailrelay"

[tls]
cert = "fullchain.pem"
key  = "privkey.pem"

[[listen]]
kind = "relay"
endpoint = "tcp:25"
require_tls = false
[[listen]]
kind = "submission"
endpoint = "tcp:587"
[[listen]]
kind = "submissions"
endpoint = "tcp:465"

[limits]
max_message_size = "50MiB"
max_recipients = 100
max_connections = 1000
max_connections_per_ip = 50
messages_per_minute = 0
auth_failures_per_minute = 5
idle_timeout = "5m"

[auth]
mechanisms = ["PLAIN", "LOGIN"]
password_file = "passwords"
received_shows_user = false

[auth.ldap]
url = "ldaps://dc1.corp.example:636"
starttls = false
ca_file = "corp-ca.pem"
timeout = "5s"
bind_dn = "uid={user},ou=people,dc=example,dc=org"
search_base = "dc=corp,dc=example"
search_filter = "(&(objectClass=person)(uid={user}))"
service_dn = "cn=relay,ou=services,dc=corp,dc=example"
service_password_file = "ldap.secret"
require_group = "cn=mail-senders,ou=groups,dc=corp,dc=example"
cache = "5m"

[[permit]]
networks = ["10.0.0.0/8", "2001:db8::/32"]
senders = ["app.example.org", "noreply@example.org"]
recipients = ["*"]
[[permit]]
users = ["*"]
senders = ["example.org"]
check_from_header = true
[[permit]]
anyone = true
recipients = ["example.org"]

[dkim]
mode = "sign"
[[dkim.key]]
domain = "example.org"
selector = "relay2026"
key_file = "dkim/example.org.relay2026.pem"

[queue]
first_retry = "5m"
max_retry = "4h"
lifetime = "5d"
delay_warning = "4h"
bounces = true

[delivery]
tls = "opportunistic"
concurrency = 100
concurrency_per_domain = 10
mx_port = 25
nameservers = []
source_address = ""

[transports.ses]
host = "email-smtp.eu-west-1.amazonaws.com"
port = 587
security = "starttls"
verify = true
username = "AKIA..."
password_file = "ses.secret"

[[route]]
recipients = ["gmail.com", "*.outlook.com"]
senders = ["*"]
transport = "ses"
after_attempts = 0

[metrics]
endpoint = "tcp:9425:interface=127.0.0.1"

[log]
format = "text"
file = ""

[sendmail]
server = "127.0.0.1:587"
security = "starttls"
verify = true
username = "app1"
password_file = "app1.secret"
'''


SES_SECRET = "ses-password-never-printed"


def private_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_example(directory: Path) -> Path:
    """The contract's example and every file it references, in `directory`; returns the config path."""
    cert_pem, key_pem = generate_self_signed("relay.example.org")
    (directory / "fullchain.pem").write_bytes(cert_pem)
    (directory / "privkey.pem").write_bytes(key_pem)
    (directory / "corp-ca.pem").write_bytes(cert_pem)
    (directory / "ldap.secret").write_text("service-secret\n")
    (directory / "ses.secret").write_text(SES_SECRET + "\n")
    (directory / "dkim").mkdir()
    (directory / "dkim" / "example.org.relay2026.pem").write_bytes(private_pem(ed25519.Ed25519PrivateKey.generate()))
    path = directory / "tap.conf"
    path.write_text(EXAMPLE)
    return path
