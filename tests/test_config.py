"""mailrelay.config.load: the contract's example loads as written; every kind of mistake is refused with
one line naming the file and the exact key path."""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from twisted.trial import unittest

from mailrelay import config
from mailrelay.config import ConfigError, load, parse_duration, parse_host_port, parse_size
from mailrelay.tls import generate_self_signed
from tests.support.example_config import private_pem, write_example


# A 512-bit RSA key (too weak for DKIM, RFC 8301); cryptography no longer generates keys this small.
WEAK_RSA_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEAosrusVScOp3ZeXRr
AVykMYThiNyFqJVRc8D5XgS1o3ex2SiHC2FXhgi+XgpanVZxLunAJni4QT20xguM
sMusCwIDAQABAkAbmNdaDIPnk/bYFhpFwtS66FHrh6bI63dBbkdX3uiD63NspzWL
BOikw01kLS0+fRG30IrseuTs+HCvCkOh+VvRAiEAznih4sUdLdLMjTF/kyBVLQjH
Uj82A7HZELSutXtDee8CIQDJ2AI8cMq82xl8oGK+vWyL4eCOsSlTjh4MF78fpgw7
pQIhAIxMkoyarsI1jMOgz/S0ssxAO9kalOSb1EkyzckKMobHAiB5EMw+jnS8FDrU
SqsPtzR9Lo1vaQndqReSr0ee5wzdVQIgR9YTB8ypHBPGfkhNo4s4NBMplkpf16ID
bQQpUIlaTnE=
-----END PRIVATE KEY-----
"""


class ConfigTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)

    def write(self, text: str, name: str = "tap.conf") -> Path:
        path = self.dir / name
        path.write_text(text)
        return path

    def load(self, text: str) -> config.Config:
        return load(self.write(text))

    def assertRefused(self, text: str, key: str, *fragments: str) -> ConfigError:
        """Loading `text` fails with one line `FILE: KEY: ...` containing each fragment."""
        path = self.write(text)
        error = self.assertRaises(ConfigError, load, path)
        message = str(error)
        self.assertEqual(error.key, key, message)
        self.assertTrue(message.startswith(f"{path}: {key}: " if key else f"{path}: "), message)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return error


class ExampleTests(ConfigTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.config = load(write_example(self.dir))

    def test_example_top_level_and_tls(self) -> None:
        c = self.config
        self.assertEqual(c.path, self.dir / "tap.conf")
        self.assertEqual(c.hostname, "relay.example.org")
        self.assertEqual(c.spool, Path("/var/spool/mailrelay"))
        self.assertEqual(c.tls, config.TLSConfig(self.dir / "fullchain.pem", self.dir / "privkey.pem"))

    def test_example_listeners_with_submission_requiring_tls(self) -> None:
        self.assertEqual(self.config.listeners, (
            config.Listener("relay", "tcp:25", False),
            config.Listener("submission", "tcp:587", True),
            config.Listener("submissions", "tcp:465", False),
        ))

    def test_example_limits_with_session_timeout_default(self) -> None:
        self.assertEqual(self.config.limits, config.Limits(
            max_message_size=50 * 2**20, max_recipients=100, max_connections=1000, max_connections_per_ip=50,
            messages_per_minute=0, auth_failures_per_minute=5, idle_timeout=300.0, session_timeout=1800.0))

    def test_example_auth_and_ldap(self) -> None:
        auth = self.config.auth
        self.assertEqual(auth.mechanisms, ("PLAIN", "LOGIN"))
        self.assertEqual(auth.password_file, self.dir / "passwords")   # need not exist
        self.assertEqual(auth.ldap, config.LDAPConfig(
            urls=("ldaps://dc1.corp.example:636",), starttls=False, ca_file=self.dir / "corp-ca.pem",
            timeout=5.0, bind_dn="uid={user},ou=people,dc=example,dc=org", search_base="dc=corp,dc=example",
            search_filter="(&(objectClass=person)(uid={user}))", service_dn="cn=relay,ou=services,dc=corp,dc=example",
            service_password_file=self.dir / "ldap.secret",
            require_group="cn=mail-senders,ou=groups,dc=corp,dc=example", cache=300.0))

    def test_example_permits_in_order(self) -> None:
        self.assertEqual(self.config.permits, (
            config.Permit(networks=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")),
                          senders=("app.example.org", "noreply@example.org"), recipients=("*",)),
            config.Permit(users=("*",), senders=("example.org",), check_from_header=True),
            config.Permit(anyone=True, recipients=("example.org",)),
        ))

    def test_example_dkim_queue_delivery(self) -> None:
        c = self.config
        self.assertEqual(c.dkim, config.DKIMConfig("sign", (
            config.DKIMKey("example.org", "relay2026", self.dir / "dkim" / "example.org.relay2026.pem"),)))
        self.assertEqual(c.queue, config.QueueConfig(300.0, 4 * 3600.0, 5 * 86400.0, 4 * 3600.0, True))
        self.assertEqual(c.delivery, config.DeliveryConfig("opportunistic", 100, 10, 25, (), ""))

    def test_example_transports_routes_and_the_rest(self) -> None:
        c = self.config
        self.assertEqual(dict(c.transports), {"ses": config.Transport(
            name="ses", host="email-smtp.eu-west-1.amazonaws.com", port=587, security="starttls", verify=True,
            username="AKIA...", password_file=self.dir / "ses.secret")})
        self.assertEqual(c.routes, (config.Route("ses", ("gmail.com", "*.outlook.com"), ("*",), 0),))
        self.assertEqual(c.metrics.endpoint, "tcp:9425:interface=127.0.0.1")
        self.assertEqual(c.log, config.LogConfig("text", ""))
        self.assertEqual(c.sendmail, config.SendmailConfig("127.0.0.1:587", "starttls", True, "app1",
                                                           self.dir / "app1.secret"))

    def test_loaded_config_is_immutable(self) -> None:
        def add_transport() -> None:
            self.config.transports["x"] = None   # type: ignore[index]
        self.assertRaises(TypeError, add_transport)
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, self.config, "hostname", "other")


class DefaultTests(ConfigTestCase):
    def test_empty_file_gives_the_documented_defaults(self) -> None:
        c = self.load("")
        self.assertEqual(c.hostname, socket.getfqdn())
        self.assertEqual(c.spool, self.dir / "spool")
        self.assertEqual(c.listeners, config.DEFAULT_LISTENERS)
        self.assertEqual(c.permits, config.DEFAULT_PERMITS)
        self.assertEqual((c.limits, c.auth, c.queue, c.delivery), (config.Limits(), config.AuthConfig(),
                                                                   config.QueueConfig(), config.DeliveryConfig()))
        self.assertEqual((dict(c.transports), c.routes, c.tls), ({}, (), config.TLSConfig()))

    def test_relative_paths_resolve_against_the_config_directory_not_the_cwd(self) -> None:
        sub = self.dir / "etc"
        sub.mkdir()
        (sub / "tap.conf").write_text('spool = "q"\n[auth]\npassword_file = "../pw"\n[log]\nfile = "relay.log"\n')
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)
        c = load("etc/tap.conf")
        self.assertEqual(c.spool, sub / "q")
        self.assertEqual(c.auth.password_file, sub / ".." / "pw")
        self.assertEqual(c.log.file, str(sub / "relay.log"))
        self.assertTrue(c.path.is_absolute())

    def test_listener_endpoint_defaults_by_kind(self) -> None:
        c = self.load('[[listen]]\nkind = "submissions"\n[[listen]]\nkind = "submission"\n'
                      '[[listen]]\nkind = "relay"\nrequire_tls = true\n')
        self.assertEqual(c.listeners, (config.Listener("submissions", "tcp:465", False),
                                       config.Listener("submission", "tcp:587", True),
                                       config.Listener("relay", "tcp:25", True)))

    def test_empty_permit_array_keeps_the_default_permits(self) -> None:
        self.assertEqual(self.load("permit = []\n").permits, config.DEFAULT_PERMITS)

    def test_transport_port_defaults_by_security(self) -> None:
        c = self.load('[transports.a]\nhost = "a"\nsecurity = "tls"\n[transports.b]\nhost = "b"\nsecurity = "none"\n'
                      '[transports.c]\nhost = "c"\n')
        self.assertEqual({n: t.port for n, t in c.transports.items()}, {"a": 465, "b": 25, "c": 587})

    def test_ldap_url_list_becomes_urls_in_order(self) -> None:
        (self.dir / "s").write_text("x")
        c = self.load('[auth.ldap]\nurl = ["ldap://a", "ldaps://b:636"]\nsearch_base = "dc=x"\n'
                      'search_filter = "(uid={user})"\nservice_dn = "cn=s"\nservice_password_file = "s"\n')
        self.assertEqual(c.auth.ldap.urls, ("ldap://a", "ldaps://b:636"))
        self.assertIsNone(c.auth.ldap.bind_dn)

    def test_ldap_nested_groups_default_on_and_group_base_optional(self) -> None:
        ldap = '[auth.ldap]\nurl = "ldap://a"\nbind_dn = "uid={user},dc=x"\nrequire_group = "cn=g,dc=x"\n'
        c = self.load(ldap)
        self.assertEqual((c.auth.ldap.nested_groups, c.auth.ldap.group_base), (True, None))
        c = self.load(ldap + 'nested_groups = false\ngroup_base = "ou=groups,dc=x"\n')
        self.assertEqual((c.auth.ldap.nested_groups, c.auth.ldap.group_base), (False, "ou=groups,dc=x"))
        self.assertRefused(ldap + 'nested_groups = "yes"\n', "auth.ldap.nested_groups")

    def test_postmaster_is_an_optional_mailbox(self) -> None:
        self.assertIsNone(self.load('hostname = "relay.test"\n').postmaster)
        self.assertEqual(self.load('postmaster = "admin@example.org"\n').postmaster, "admin@example.org")
        self.assertRefused('postmaster = "admin"\n', "postmaster", "mailbox")
        self.assertRefused('postmaster = "<admin@example.org>"\n', "postmaster", "mailbox")

    def test_networks_accept_host_bits_and_single_addresses(self) -> None:
        c = self.load('[[permit]]\nnetworks = ["10.1.2.3/8", "192.0.2.7", "::1"]\n')
        self.assertEqual(c.permits[0].networks, tuple(ipaddress.ip_network(n) for n in
                                                      ("10.0.0.0/8", "192.0.2.7/32", "::1/128")))

    def test_nameservers_become_host_port_pairs(self) -> None:
        c = self.load('[delivery]\nnameservers = ["127.0.0.1", "127.0.0.1:5353", "[::1]:5354", "::1", "ns.example"]\n')
        self.assertEqual(c.delivery.nameservers, (("127.0.0.1", 53), ("127.0.0.1", 5353), ("::1", 5354),
                                                  ("::1", 53), ("ns.example", 53)))

    def test_zero_delay_warning_means_never_and_session_timeout_is_read(self) -> None:
        c = self.load('[queue]\ndelay_warning = "0"\n[limits]\nsession_timeout = "1h"\nidle_timeout = 90\n')
        self.assertEqual((c.queue.delay_warning, c.limits.session_timeout, c.limits.idle_timeout),
                         (0.0, 3600.0, 90.0))

    def test_sendmail_section_alone_with_files_not_required(self) -> None:
        c = self.load('[sendmail]\nserver = "[::1]:2525"\nsecurity = "tls"\npassword_file = "pw"\nca_file = "ca.pem"\n')
        self.assertEqual(c.sendmail, config.SendmailConfig("[::1]:2525", "tls", True, None, self.dir / "pw",
                                                           self.dir / "ca.pem"))

    def test_patterns_are_lowercased(self) -> None:
        c = self.load('[[permit]]\nusers = ["Alice"]\nsenders = ["Bob@Example.ORG", "*.Example.org"]\n')
        self.assertEqual(c.permits[0].senders, ("Bob@example.org", "*.example.org"))
        self.assertEqual(c.permits[0].users, ("Alice",))


class ValueParserTests(unittest.TestCase):
    def test_parse_duration_units_and_bare_seconds(self) -> None:
        for text, seconds in (("90s", 90), ("5m", 300), ("4h", 14400), ("5d", 432000), ("0", 0), ("42", 42),
                              (42, 42), (1.5, 1.5), ("1h30m", 5400), (" 5M ", 300)):
            self.assertEqual(parse_duration(text), seconds, text)

    def test_parse_duration_refuses_nonsense(self) -> None:
        for bad in ("", "5 minutes", "5x", "-1", "m", "1h-5m", -3, float("inf"), True, None, [1]):
            self.assertRaises(ValueError, parse_duration, bad)

    def test_parse_size_units_and_bytes(self) -> None:
        for text, size in (("50MiB", 50 * 2**20), ("10MB", 10**7), ("512KiB", 2**19), ("1GiB", 2**30),
                           (2048, 2048), ("2048", 2048), ("1 kib", 1024)):
            self.assertEqual(parse_size(text), size, text)

    def test_parse_size_refuses_nonsense(self) -> None:
        for bad in ("", "50 megs", "MiB", "-5", -5, 1.5, True, None):
            self.assertRaises(ValueError, parse_size, bad)

    def test_parse_host_port_refuses_bad_ports_and_brackets(self) -> None:
        for bad in ("h:0", "h:70000", "h:abc", "[::1", "[::1]x", ":53", "[]:53"):
            self.assertRaises(ValueError, parse_host_port, bad, 53)

    def test_config_error_is_always_one_line(self) -> None:
        self.assertEqual(str(ConfigError("f", "k", "two\nlines\r\n here")), "f: k: two lines here")
        self.assertEqual(str(ConfigError("f", "", "whole file")), "f: whole file")


class UnreadableFileTests(ConfigTestCase):
    def test_missing_config_file(self) -> None:
        error = self.assertRaises(ConfigError, load, self.dir / "nope.conf")
        self.assertIn("cannot read: No such file or directory", str(error))

    def test_directory_as_config_file(self) -> None:
        error = self.assertRaises(ConfigError, load, self.dir)
        self.assertEqual(str(error), f"{self.dir}: cannot read: Is a directory")

    def test_toml_syntax_error_is_one_line_with_line_and_column(self) -> None:
        error = self.assertRefused('hostname = "a"\n[limits]\nmax_recipients = = 3\n', "", "line 3, column")
        self.assertIn("TOML syntax error", str(error))

    def test_binary_file_is_refused(self) -> None:
        path = self.dir / "bin.conf"
        path.write_bytes(b"a = \"\xff\xfe\"\n")
        self.assertNotIn("\n", str(self.assertRaises(ConfigError, load, path)))


class UnknownKeyAndTypeTests(ConfigTestCase):
    def test_unknown_key_in_a_section_with_a_suggestion(self) -> None:
        self.assertRefused("[limits]\nmax_recipent = 5\n", "limits.max_recipent", "unknown key",
                           'did you mean "max_recipients"')

    def test_unknown_keys_at_every_level(self) -> None:
        self.assertRefused("hostnme = 'x'\n", "hostnme", "unknown key")
        self.assertRefused("[limit]\n", "limit", "unknown key")
        self.assertRefused("[[permit]]\nanyone = true\nsender = ['*']\n", "permit[0].sender", "unknown key")
        self.assertRefused('[transports.ses]\nhost = "h"\nhots = "x"\n', "transports.ses.hots", "unknown key")
        self.assertRefused('[auth.ldap]\nurl = "ldap://a"\nbind_dn = "{user}"\nurll = 1\n', "auth.ldap.urll")
        self.assertRefused('[[listen]]\nkind = "relay"\nport = 25\n', "listen[0].port")
        self.assertRefused('[[dkim.key]]\nx = 1\n', "dkim.key[0].domain", "missing")

    def test_booleans_are_not_integers(self) -> None:
        self.assertRefused("[limits]\nmax_recipients = true\n", "limits.max_recipients",
                           "expected an integer, got a boolean")

    def test_integers_are_not_booleans_and_strings_not_numbers(self) -> None:
        self.assertRefused("[queue]\nbounces = 1\n", "queue.bounces", "expected true or false, got an integer")
        self.assertRefused('[delivery]\nmx_port = "25"\n', "delivery.mx_port", "expected an integer, got a string")
        self.assertRefused("hostname = 5\n", "hostname", "expected a string")
        self.assertRefused("[limits]\nmax_message_size = 1.5\n", "limits.max_message_size", "got a number")

    def test_sections_of_the_wrong_shape(self) -> None:
        self.assertRefused("limits = 5\n", "limits", "expected a table")
        self.assertRefused('[listen]\nkind = "relay"\n', "listen", "expected an array of tables ([[listen]])")
        self.assertRefused('[transports]\nses = "smtp.example"\n', "transports.ses", "expected a table")
        self.assertRefused("[[permit]]\nnetworks = [5]\n", "permit[0].networks[0]", "expected a string")


class ValueTests(ConfigTestCase):
    def test_bad_cidr_names_the_element(self) -> None:
        self.assertRefused('[[permit]]\nanyone = true\n[[permit]]\nnetworks = ["10.0.0.0/8", "10.0.0.0/33"]\n',
                           "permit[1].networks[1]", '"10.0.0.0/33"')
        self.assertRefused('[[permit]]\nnetworks = ["example.org"]\n', "permit[0].networks[0]")

    def test_bad_durations(self) -> None:
        self.assertRefused('[queue]\nfirst_retry = "5 minutes"\n', "queue.first_retry", "bad duration")
        self.assertRefused('[queue]\nlifetime = "5w"\n', "queue.lifetime", "bad duration")
        self.assertRefused('[limits]\nidle_timeout = true\n', "limits.idle_timeout", "got a boolean")
        self.assertRefused('[limits]\nidle_timeout = -5\n', "limits.idle_timeout")

    def test_zero_duration_only_where_it_means_never(self) -> None:
        self.assertRefused('[queue]\nfirst_retry = "0"\n', "queue.first_retry", "more than 0")
        self.assertRefused('[limits]\nsession_timeout = 0\n', "limits.session_timeout", "more than 0")
        self.assertEqual(self.load('[auth.ldap]\nurl = "ldap://a"\nbind_dn = "{user}"\ncache = "0"\n')
                         .auth.ldap.cache, 0.0)

    def test_max_retry_shorter_than_first_retry(self) -> None:
        self.assertRefused('[queue]\nfirst_retry = "1h"\nmax_retry = "5m"\n', "queue.max_retry")

    def test_bad_sizes(self) -> None:
        self.assertRefused('[limits]\nmax_message_size = "50 megs"\n', "limits.max_message_size", "bad size")
        self.assertRefused('[limits]\nmax_message_size = 0\n', "limits.max_message_size", "more than 0")

    def test_max_line_length_default_and_bounds(self) -> None:
        self.assertEqual(self.load("").limits.max_line_length, 64 * 1024)
        self.assertEqual(self.load('[limits]\nmax_line_length = "1MiB"\n').limits.max_line_length, 2**20)
        self.assertEqual(self.load("[limits]\nmax_line_length = 998\n").limits.max_line_length, 998)
        self.assertRefused("[limits]\nmax_line_length = 997\n", "limits.max_line_length", "from 998", "got 997")
        self.assertRefused('[limits]\nmax_line_length = "2MiB"\n', "limits.max_line_length", "to 1MiB")
        self.assertRefused('[limits]\nmax_line_length = "long"\n', "limits.max_line_length", "bad size")

    def test_ports_out_of_range(self) -> None:
        self.assertRefused('[delivery]\nmx_port = 0\n', "delivery.mx_port", "1..65535")
        self.assertRefused('[transports.t]\nhost = "h"\nport = 65536\n', "transports.t.port", "1..65535")

    def test_delivery_process_nice_is_0_to_19_default_10(self) -> None:
        self.assertEqual(self.load("").delivery.process_nice, 10)
        self.assertEqual(self.load("[delivery]\nprocess_nice = 0\n").delivery.process_nice, 0)
        self.assertRefused("[delivery]\nprocess_nice = 20\n", "delivery.process_nice", "0..19")
        self.assertRefused("[delivery]\nprocess_nice = -5\n", "delivery.process_nice", "0..19")

    def test_delivery_tls_policy_keys(self) -> None:
        d = self.load("").delivery
        self.assertEqual((d.mta_sts, d.mta_sts_port, d.dane, d.ca_file), (True, 443, True, None))
        d = self.load('[delivery]\nmta_sts = false\ndane = false\nmta_sts_port = 8443\nca_file = ""\n').delivery
        self.assertEqual((d.mta_sts, d.mta_sts_port, d.dane, d.ca_file), (False, 8443, False, None))
        self.assertRefused("[delivery]\nmta_sts_port = 0\n", "delivery.mta_sts_port")
        self.assertRefused('[delivery]\nmta_sts = "yes"\n', "delivery.mta_sts")
        self.assertRefused('[delivery]\nca_file = "missing.pem"\n', "delivery.ca_file", "cannot read")
        path = self.write("")
        (path.parent / "junk.pem").write_text("not a certificate")
        self.assertRefused('[delivery]\nca_file = "junk.pem"\n', "delivery.ca_file", "cannot load certificates")

    def test_queue_directory_fsync_is_auto_or_always(self) -> None:
        self.assertEqual(self.load("").queue.directory_fsync, "auto")
        self.assertEqual(self.load('[queue]\ndirectory_fsync = "always"\n').queue.directory_fsync, "always")
        self.assertRefused('[queue]\ndirectory_fsync = "never"\n', "queue.directory_fsync", '"never" is not one of')

    def test_negative_counts(self) -> None:
        self.assertRefused("[limits]\nmessages_per_minute = -1\n", "limits.messages_per_minute")
        self.assertRefused("[delivery]\nconcurrency = 0\n", "delivery.concurrency")
        self.assertRefused('[transports.t]\nhost = "h"\n[[route]]\ntransport = "t"\nafter_attempts = -1\n',
                           "route[0].after_attempts")

    def test_enum_values(self) -> None:
        self.assertRefused('[[listen]]\nkind = "smtp"\n', "listen[0].kind", '"smtp" is not one of')
        self.assertRefused('[delivery]\ntls = "maybe"\n', "delivery.tls", '"verify"')
        self.assertRefused('[transports.t]\nhost = "h"\nsecurity = "ssl"\n', "transports.t.security")
        self.assertRefused('[dkim]\nmode = "verify"\n', "dkim.mode")
        self.assertRefused('[log]\nformat = "xml"\n', "log.format")
        self.assertRefused('[sendmail]\nsecurity = "ssl"\n', "sendmail.security")
        self.assertRefused('[auth]\nmechanisms = ["PLAIN", "CRAM-MD5"]\n', "auth.mechanisms[1]")

    def test_hostname_must_be_a_host_name(self) -> None:
        self.assertRefused('hostname = "relay.example.org\\r\\n250 injected"\n', "hostname", "not a host name")
        self.assertRefused('hostname = "two words"\n', "hostname")

    def test_bad_patterns(self) -> None:
        self.assertRefused('[[permit]]\nanyone = true\nrecipients = ["bob@example.org"]\n',
                           "permit[0].recipients[0]", "only domains")
        self.assertRefused('[[permit]]\nanyone = true\nsenders = ["exa mple.org"]\n', "permit[0].senders[0]")
        self.assertRefused('[[permit]]\nanyone = true\nsenders = []\n', "permit[0].senders", "empty")

    def test_bad_endpoints(self) -> None:
        self.assertRefused('[[listen]]\nkind = "relay"\nendpoint = "tcp:abc"\n', "listen[0].endpoint", "bad endpoint")
        self.assertRefused('[[listen]]\nkind = "relay"\nendpoint = "bogus:1"\n', "listen[0].endpoint")
        self.assertRefused('[metrics]\nendpoint = "tcp:99999"\n', "metrics.endpoint", "out of range")

    def test_two_listeners_on_one_endpoint(self) -> None:
        self.assertRefused('[[listen]]\nkind = "relay"\n[[listen]]\nkind = "submission"\nendpoint = "tcp:25"\n',
                           "listen[1].endpoint", "listen[0]")

    def test_bad_nameserver_and_source_address(self) -> None:
        self.assertRefused('[delivery]\nnameservers = ["127.0.0.1:0"]\n', "delivery.nameservers[0]")
        self.assertRefused('[delivery]\nsource_address = "example.org"\n', "delivery.source_address")

    def test_bad_sendmail_server(self) -> None:
        self.assertRefused('[sendmail]\nserver = "host:port"\n', "sendmail.server")


class RuleTests(ConfigTestCase):
    def test_route_naming_a_missing_transport(self) -> None:
        error = self.assertRefused('[transports.smarthost]\nhost = "smtp.example"\n[[route]]\ntransport = "ses"\n',
                                   "route[0].transport")
        self.assertEqual(error.message, 'no transport named "ses" (defined: smarthost)')

    def test_route_without_any_transports(self) -> None:
        self.assertRefused('[[route]]\ntransport = "ses"\n', "route[0].transport", "defined: none")
        self.assertRefused('[[route]]\nrecipients = ["*"]\n', "route[0].transport", "missing")

    def test_permit_without_who(self) -> None:
        self.assertRefused('[[permit]]\nsenders = ["*"]\n', "permit[0]", 'no "who"')
        self.assertRefused('[[permit]]\nanyone = false\n', "permit[0]", 'no "who"')
        self.assertRefused('[[permit]]\nnetworks = []\n', "permit[0].networks", "empty")

    def test_permit_with_two_whos(self) -> None:
        self.assertRefused('[[permit]]\nanyone = true\n[[permit]]\nnetworks = ["10.0.0.0/8"]\nusers = ["a"]\n',
                           "permit[1]", "networks and users")
        self.assertRefused('[[permit]]\nusers = ["*"]\nanyone = true\n', "permit[0]", "users and anyone")

    def test_submission_listener_cannot_drop_tls(self) -> None:
        self.assertRefused('[[listen]]\nkind = "submission"\nrequire_tls = false\n', "listen[0].require_tls")

    def test_listener_needs_a_kind(self) -> None:
        self.assertRefused('[[listen]]\nendpoint = "tcp:25"\n', "listen[0].kind", "missing")

    def test_ldap_needs_bind_dn_or_search(self) -> None:
        self.assertRefused('[auth.ldap]\nurl = "ldap://a"\n', "auth.ldap", "bind_dn")
        self.assertRefused('[auth.ldap]\nurl = "ldap://a"\nsearch_base = "dc=x"\n', "auth.ldap.search_filter")
        self.assertRefused('[auth.ldap]\nbind_dn = "{user}"\n', "auth.ldap.url", "missing")
        self.assertRefused('[auth.ldap]\nurl = ["ldap://a", "http://b"]\nbind_dn = "{user}"\n', "auth.ldap.url[1]")
        self.assertRefused('[auth.ldap]\nurl = "ldap://a"\nbind_dn = "uid=x"\n', "auth.ldap.bind_dn", "{user}")

    def test_ldap_service_dn_needs_a_readable_password_file(self) -> None:
        search = '[auth.ldap]\nurl = "ldap://a"\nsearch_base = "dc=x"\nsearch_filter = "(uid={user})"\n'
        self.assertRefused(search + 'service_dn = "cn=s"\n', "auth.ldap.service_password_file", "required")
        self.assertRefused(search + 'service_dn = "cn=s"\nservice_password_file = "nope"\n',
                           "auth.ldap.service_password_file", "cannot read", "No such file")

    def test_transport_username_needs_password_file(self) -> None:
        self.assertRefused('[transports.t]\nhost = "h"\nusername = "u"\n', "transports.t.password_file", "required")
        self.assertRefused('[transports.t]\nport = 25\n', "transports.t.host", "missing")


class ReceivedShowsUserTests(ConfigTestCase):
    def test_off_unless_set(self) -> None:
        self.assertFalse(self.load("").auth.received_shows_user)
        self.assertFalse(self.load('[auth]\nmechanisms = ["PLAIN"]\n').auth.received_shows_user)
        self.assertFalse(self.load("[auth]\nreceived_shows_user = false\n").auth.received_shows_user)
        self.assertTrue(self.load("[auth]\nreceived_shows_user = true\n").auth.received_shows_user)

    def test_a_wrong_type_is_one_line_naming_the_key(self) -> None:
        for value in ('"yes"', "1", "[true]"):
            self.assertRefused(f"[auth]\nreceived_shows_user = {value}\n", "auth.received_shows_user",
                               "true or false")


class RequiredFileTests(ConfigTestCase):
    def test_auth_password_file_may_be_missing(self) -> None:
        self.assertEqual(self.load('[auth]\npassword_file = "not-yet"\n').auth.password_file, self.dir / "not-yet")

    def test_tls_cert_and_key_both_or_neither(self) -> None:
        (self.dir / "cert.pem").write_bytes(generate_self_signed("x.example")[0])
        self.assertRefused('[tls]\ncert = "cert.pem"\n', "tls.key", "both")

    def test_tls_files_must_be_readable(self) -> None:
        self.assertRefused('[tls]\ncert = "nope.pem"\nkey = "nope.key"\n', "tls.cert", "cannot read",
                           str(self.dir / "nope.pem"))
        self.assertRefused('[tls]\ncert = "."\nkey = "."\n', "tls.cert", "is a directory")

    def test_a_fifo_is_refused_without_hanging(self) -> None:
        os.mkfifo(self.dir / "fifo")
        self.assertRefused('[tls]\ncert = "fifo"\nkey = "fifo"\n', "tls.cert", "not a regular file")

    def test_tls_key_that_does_not_match_the_cert(self) -> None:
        (self.dir / "cert.pem").write_bytes(generate_self_signed("x.example")[0])
        (self.dir / "other.key").write_bytes(generate_self_signed("y.example")[1])
        self.assertRefused('[tls]\ncert = "cert.pem"\nkey = "other.key"\n', "tls.cert", "do not match")

    def test_dkim_key_file_must_exist_and_be_a_usable_key(self) -> None:
        key = '[[dkim.key]]\ndomain = "example.org"\nselector = "s1"\nkey_file = "{}"\n'
        self.assertRefused(key.format("missing.pem"), "dkim.key[0].key_file", "cannot read")
        (self.dir / "weak.pem").write_bytes(WEAK_RSA_PEM)
        self.assertRefused(key.format("weak.pem"), "dkim.key[0].key_file", "512 bits")
        (self.dir / "ec.pem").write_bytes(private_pem(ec.generate_private_key(ec.SECP256R1())))
        self.assertRefused(key.format("ec.pem"), "dkim.key[0].key_file", "RSA or Ed25519")
        (self.dir / "junk.pem").write_text("not a key")
        self.assertRefused(key.format("junk.pem"), "dkim.key[0].key_file", "not an unencrypted PEM")

    def test_dkim_selector_must_be_valid_and_unique(self) -> None:
        (self.dir / "k.pem").write_bytes(private_pem(ed25519.Ed25519PrivateKey.generate()))
        key = '[[dkim.key]]\ndomain = "example.org"\nselector = "{}"\nkey_file = "k.pem"\n'
        self.assertRefused(key.format("bad selector"), "dkim.key[0].selector")
        self.assertRefused(key.format("s1") + key.format("s1"), "dkim.key[1].selector", "second key")

    def test_ldap_ca_file_must_exist(self) -> None:
        self.assertRefused('[auth.ldap]\nurl = "ldaps://a"\nbind_dn = "{user}"\nca_file = "ca.pem"\n',
                           "auth.ldap.ca_file", "cannot read")

    def test_transport_files_must_exist(self) -> None:
        self.assertRefused('[transports.t]\nhost = "h"\nusername = "u"\npassword_file = "pw"\n',
                           "transports.t.password_file", "cannot read")
        self.assertRefused('[transports.t]\nhost = "h"\nca_file = "ca.pem"\n', "transports.t.ca_file", "cannot read")


class DeliveryOnlyTests(ConfigTestCase):
    """What the delivery process loads: the main process's validated bytes, without opening the files
    only the receiving side reads ([tls], [auth])."""

    RECEIVING = ('[tls]\ncert = "gone.pem"\nkey = "gone.key"\n\n'
                 '[auth.ldap]\nurl = "ldaps://a"\nbind_dn = "{user}"\nca_file = "gone-ca.pem"\n'
                 'service_dn = "cn=relay"\nservice_password_file = "gone.secret"\n')

    def test_receiving_side_files_are_not_opened(self) -> None:
        path = self.write(self.RECEIVING)
        self.assertRaises(ConfigError, load, path)                      # the main process refuses them
        loaded = load(path, delivery_only=True)
        self.assertEqual(loaded.tls.cert, self.dir / "gone.pem")
        self.assertEqual(loaded.auth.ldap.ca_file, self.dir / "gone-ca.pem")

    def test_delivery_side_files_still_are(self) -> None:
        key = '[[dkim.key]]\ndomain = "example.org"\nselector = "s1"\nkey_file = "missing.pem"\n'
        error = self.assertRaises(ConfigError, load, self.write(self.RECEIVING + key), delivery_only=True)
        self.assertEqual(error.key, "dkim.key[0].key_file")
        transport = '[transports.out]\nhost = "smtp.example"\nusername = "u"\npassword_file = "missing"\n'
        error = self.assertRaises(ConfigError, load, self.write(transport), delivery_only=True)
        self.assertEqual(error.key, "transports.out.password_file")

    def test_source_bytes_are_used_instead_of_the_file(self) -> None:
        path = self.write('hostname = "on.disk"\n')
        loaded = load(path, source=b'hostname = "validated"\n')
        self.assertEqual((loaded.hostname, loaded.source), ("validated", b'hostname = "validated"\n'))
        self.assertEqual(load(path).source, b'hostname = "on.disk"\n')
