# -*- test-case-name: tests.test_server_state -*-
"""mailrelay.server.state: the connection's and the transaction's state as plain objects, and what the
session's parts make of them (forget after STARTTLS, the client for the policy, the envelope's params)."""
from __future__ import annotations

from twisted.trial import unittest

from mailrelay.envelope import ClientInfo
from mailrelay.server.addresses import MailFrom
from mailrelay.server.state import Connection, Transaction
from tests.support.session import Harness, b64, login
from tests.support.fakes import memory_portal


class ConnectionTests(unittest.TestCase):
    def test_forget_drops_what_the_client_said_and_keeps_who_it_is(self):
        connection = Connection(address="192.0.2.7", port=4100, key="192.0.2.7", listener="submission",
                                helo="client.test", esmtp=True, tls=True, user="alice", user_folded=True,
                                mechanism="PLAIN", counted=True, accepted=2, refused=1)
        connection.forget()
        self.assertEqual(connection, Connection(address="192.0.2.7", port=4100, key="192.0.2.7",
                                                listener="submission", tls=True, counted=True, accepted=2,
                                                refused=1))

    def test_client_info_is_what_the_policy_is_told(self):
        connection = Connection(address="2001:db8::5", port=4100, listener="relay", helo="client.test",
                                user="alice", user_folded=True, tls_description="TLSv1.3 TLS_AES_128_GCM_SHA256")
        self.assertEqual(connection.client_info(), ClientInfo(
            address="2001:db8::5", port=4100, helo="client.test", listener="relay", user="alice",
            user_folded=True, tls="TLSv1.3 TLS_AES_128_GCM_SHA256"))
        self.assertEqual(Connection(address="192.0.2.7").client_info().helo, "")


class TransactionTests(unittest.TestCase):
    def test_a_recipient_given_twice_is_kept_once_with_its_first_parameters(self):
        transaction = Transaction()
        self.assertFalse(transaction.open)
        transaction.begin(MailFrom("a@example.org", size=2048, params={"RET": "HDRS"}), "permit[0]")
        transaction.add_recipient("b@example.net", {"NOTIFY": "NEVER"})
        transaction.add_recipient("b@example.net", {"NOTIFY": "SUCCESS"})
        transaction.add_recipient("c@example.net")
        self.assertTrue(transaction.open)
        self.assertEqual((transaction.sender, transaction.declared_size, transaction.identity),
                         ("a@example.org", 2048, "permit[0]"))
        self.assertEqual(transaction.recipients, ["b@example.net", "c@example.net"])
        self.assertEqual(transaction.envelope_params(),
                         {"RET": "HDRS", "RCPT": {"b@example.net": {"NOTIFY": "NEVER"}}})

    def test_envelope_params_do_not_change_the_mail_parameters(self):
        mail = MailFrom("a@example.org", params={"ENVID": "x"})
        transaction = Transaction()
        transaction.begin(mail, None)
        transaction.add_recipient("b@example.net", {"ORCPT": "rfc822;b@example.net"})
        transaction.envelope_params()
        self.assertEqual(mail.params, {"ENVID": "x"})

    def test_clear_ends_the_transaction(self):
        transaction = Transaction()
        transaction.begin(MailFrom("a@example.org"), "permit[0]")
        transaction.add_recipient("b@example.net", {"NOTIFY": "NEVER"})
        transaction.clear()
        self.assertEqual(transaction, Transaction())
        self.assertEqual((transaction.sender, transaction.declared_size, transaction.envelope_params()),
                         ("", None, {}))


class SessionStateTests(unittest.TestCase):
    """The protocol keeps its state in these objects, shared with its parts."""

    def test_the_session_fills_the_connection_state(self):
        client = Harness().connect(peer="::ffff:192.0.2.7")
        connection = client.protocol.connection
        self.assertEqual((connection.address, connection.port, connection.listener, connection.counted),
                         ("192.0.2.7", 40000, "relay", True))
        client.cmd("EHLO client.test")
        self.assertEqual((connection.helo, connection.esmtp), ("client.test", True))
        client.cmd("HELO other.test")
        self.assertEqual((connection.helo, connection.esmtp), ("other.test", False))

    def test_starttls_forgets_the_helo_and_the_transaction(self):
        client = Harness().connect()
        client.cmd("EHLO client.test")
        client.cmd("MAIL FROM:<a@example.org>")
        self.assertTrue(client.protocol.transaction.open)
        client.cmd("STARTTLS")
        self.assertEqual((client.protocol.connection.helo, client.protocol.connection.tls), (None, True))
        self.assertFalse(client.protocol.transaction.open)

    def test_counters_of_the_connection(self):
        harness = Harness(portal=memory_portal(alice="s3cret"))
        client = login(harness)
        connection = client.protocol.connection
        self.assertEqual((connection.user, connection.mechanism), ("alice", "PLAIN"))
        for _ in range(2):
            client.cmd("MAIL FROM:<a@example.org>")
            client.cmd("RCPT TO:<b@example.org>")
            client.cmd("DATA")
            self.assertIn("250 2.0.0 Ok: queued as", client.send(b"Subject: hi\r\n\r\nHello\r\n.\r\n"))
        self.assertEqual(client.codes("RCPT TO:<b@example.org>\r\n"), ["503 5.5.1"])    # not counted
        self.assertEqual(client.codes("AUTH PLAIN " + b64(b"\0alice\0x") + "\r\n"), ["503 5.5.1"])
        self.assertEqual((connection.accepted, connection.refused), (2, 1))
