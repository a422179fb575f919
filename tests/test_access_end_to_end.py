"""Access control end to end, over real loopback sockets: who may relay what, and how much.

The whole relay (`make_service`, through tests.support.relay.RelayFixture) in front of a real SMTP sink,
its only next hop (`[[route]]` "*").  Clients are real sockets bound to 127.0.0.2 (the allowlisted
host) or 127.0.0.3 (a foreign host).  Each test asserts the exact reply codes AND what reached the sink:
a client that must not relay never gets a message there, an allowed one always does.

- The open-relay battery (RFC 5321 §3.6, §4.1.1.3, RFC 1123 §5.2.16, RFC 976): every classic routing
  trick as RCPT against a relay whose only rule is an allowlisted network and one whose only rule is
  `users = ["*"]`, from both hosts, with and without AUTH.
- Sender binding (553 5.7.1 at MAIL) and the From: header check (550 5.7.1 after DATA; RFC 6409 §6.1).
- Session limits (`[limits]`): connections per IP and in all (421 4.7.0), messages per minute per
  identity (450 4.7.1), recipients per message (452 4.5.3, RFC 5321 §4.5.3.1.8), AUTH failures per IP
  (421 and close).
"""
from __future__ import annotations

import socket
import ssl

from twisted.internet import defer

from tests.support.access import (
    ALLOWED_HOST, FOREIGN_HOST, NETWORK_ONLY, SENDER, USERS_ONLY, Client, RelayTestCase, message, status,
)
from tests.support.polling import until
from tests.support.relay import PASSWORD, RelayFixture


# Recipients the restricted rules (RECIPIENT_RULES, in NETWORK_ONLY and USERS_ONLY) allow, and the
# address the sink must see for each.
ALLOWED = {
    "user@allowed.example": "user@allowed.example",
    "UPPER@ALLOWED.EXAMPLE": "UPPER@ALLOWED.EXAMPLE",                 # domains compare case-insensitively
    "user@mx.corp.example": "user@mx.corp.example",                   # "*.corp.example": its subdomains
    "user@DEEP.MX.Corp.Example": "user@DEEP.MX.Corp.Example",
    "user@xn--bcher-kva.example": "user@xn--bcher-kva.example",       # the A-label of "bücher.example"
    "@victim.example:route@allowed.example": "route@allowed.example",  # route dropped (RFC 5321 §4.1.1.3)
}

# Plain recipients outside the restricted rules: (RCPT path, reply code, enhanced status).
OTHER_DOMAINS = [
    ("user@victim.example", 550, "5.7.1"),
    ("user@corp.example", 550, "5.7.1"),                     # "*.corp.example" is not corp.example itself
    ("user@evilcorp.example", 550, "5.7.1"),                 # ... nor a name merely ending in it
    ("user@allowed.example.victim.example", 550, "5.7.1"),
    ("user@xn--victim-cta.example", 550, "5.7.1"),            # an A-label of a domain not allowed
    # Source routes (RFC 5321 §4.1.1.3) are dropped: what is left is judged like any mailbox.
    ("@allowed.example:user@victim.example", 550, "5.7.1"),
    ("@allowed.example,@allowed.example:user@victim.example", 550, "5.7.1"),
]

# Routing tricks: never relayed for anybody, under any rule.
TRICKS = [
    ("user%victim.example@allowed.example", 550, "5.7.1"),   # percent hack, RFC 1123 §5.2.16
    ("victim.example!user@allowed.example", 550, "5.7.1"),   # UUCP bang path, RFC 976
    ("victim.example!user", 501, "5.1.3"),                   # a bang path without any domain
    ("user@victim.example@allowed.example", 501, "5.1.3"),   # two @: not a Mailbox (RFC 5321 §4.1.2)
    ("@allowed.example:user@victim.example@x.example", 501, "5.1.3"),
    ('"user@victim.example"@allowed.example', 550, "5.7.1"),  # quoted local part hiding an @
    ('"user%victim.example"@allowed.example', 550, "5.7.1"),  # ... hiding a %
    ('"victim.example!user"@allowed.example', 550, "5.7.1"),  # ... hiding a !
    ('"user@victim.example,"@allowed.example', 550, "5.7.1"),
    ("user@[127.0.0.1]", 550, "5.7.1"),                       # address literals, RFC 5321 §4.1.3
    ("user@[IPv6:::1]", 550, "5.7.1"),
    ("user@allowed.example.", 550, "5.7.1"),                  # trailing dot
    ("user@victim.example.", 550, "5.7.1"),
    ("user@localhost", 550, "5.7.1"),
    ("user@b\u00fccher.example", 553, "5.6.7"),               # raw UTF-8 without MAIL ... SMTPUTF8 (RFC 6531)
    ("postmaster", 550, "5.7.1"),                             # no domain: nothing a relay can route
    ("PostMaster", 550, "5.7.1"),
]
DENIED = OTHER_DOMAINS + TRICKS


def login_client(relay: RelayFixture, source: str, kind: str = "relay") -> Client:
    client = Client(relay, kind, source)
    if kind != "submissions":
        client.starttls()
    reply = client.login("app1", PASSWORD)
    assert reply[0] == 235, reply
    return client


# -- the open-relay battery ------------------------------------------------------------------------------


def battery(client: Client, sender: str = SENDER) -> dict:
    """Every recipient of ALLOWED and DENIED in one transaction, then DATA: {path: (code, status)}."""
    results = {"MAIL": status(client.mail(sender))}
    for path in list(ALLOWED) + [path for path, _, _ in DENIED]:
        results[path] = status(client.rcpt(path))
    results["DATA"] = status(client.data(message(subject="battery")))
    client.quit()
    return results


def refused_everything() -> dict:
    """What a client that may not relay gets: MAIL accepted (refusal comes per recipient), every RCPT
    refused (syntax errors as such), and DATA refused for want of recipients."""
    expected = {"MAIL": (250, "2.1.0"), "DATA": (503, "5.5.1")}
    expected.update({path: (550, "5.7.1") for path in ALLOWED})
    expected.update({path: (code, st) for path, code, st in DENIED})
    return expected


def relayed_allowed_only() -> dict:
    """What a client allowed by a restricted rule gets: exactly the allowed recipients, and the 250."""
    expected = {"MAIL": (250, "2.1.0"), "DATA": (250, "2.0.0")}
    expected.update({path: (250, "2.1.5") for path in ALLOWED})
    expected.update({path: (code, st) for path, code, st in DENIED})
    return expected


class OpenRelayBatteryTests(RelayTestCase):
    """Nothing but the allowed recipients ever reaches the sink, whoever the client and whatever the trick."""

    @defer.inlineCallbacks
    def test_network_rule_relays_only_allowed_recipients_for_the_allowlisted_host(self):
        relay = self.start_relay(NETWORK_ONLY)
        results = yield self.run_client(lambda: battery(Client(relay, source=ALLOWED_HOST)))
        self.assertEqual(results, relayed_allowed_only())
        yield self.settle(relay, list(ALLOWED.values()))
        self.assertEqual({m.mail_from for m in self.sink.messages}, {SENDER})

    @defer.inlineCallbacks
    def test_network_rule_relays_nothing_for_a_foreign_host(self):
        relay = self.start_relay(NETWORK_ONLY)
        results = yield self.run_client(lambda: battery(Client(relay, source=FOREIGN_HOST)))
        self.assertEqual(results, refused_everything())
        yield self.settle(relay, [])

    @defer.inlineCallbacks
    def test_network_rule_relays_nothing_for_authenticated_clients_from_either_host(self):
        # A login never falls back to the network rule: with no `users` rule, a logged-in client (even
        # on the allowlisted host) may relay nothing.
        relay = self.start_relay(NETWORK_ONLY)
        for source in (ALLOWED_HOST, FOREIGN_HOST):
            results = yield self.run_client(lambda source=source: battery(login_client(relay, source)))
            self.assertEqual(results, refused_everything(), source)
        yield self.settle(relay, [])

    @defer.inlineCallbacks
    def test_users_rule_relays_nothing_without_auth_from_either_host(self):
        relay = self.start_relay(USERS_ONLY)
        for source in (ALLOWED_HOST, FOREIGN_HOST):
            results = yield self.run_client(lambda source=source: battery(Client(relay, source=source)))
            self.assertEqual(results, refused_everything(), source)
        yield self.settle(relay, [])

    @defer.inlineCallbacks
    def test_users_rule_relays_only_allowed_recipients_for_authenticated_clients(self):
        relay = self.start_relay(USERS_ONLY)
        for source in (ALLOWED_HOST, FOREIGN_HOST):
            results = yield self.run_client(lambda source=source: battery(login_client(relay, source)))
            self.assertEqual(results, relayed_allowed_only(), source)
        yield self.settle(relay, list(ALLOWED.values()) * 2)

    @defer.inlineCallbacks
    def test_submission_port_without_auth_refuses_mail_and_relays_nothing(self):
        relay = self.start_relay(USERS_ONLY)

        def converse():
            client = Client(relay, "submission", ALLOWED_HOST)
            before_tls = status(client.mail(SENDER))
            client.starttls()
            after_tls = status(client.mail(SENDER))
            rcpt = status(client.rcpt("user@allowed.example"))
            client.quit()
            return before_tls, after_tls, rcpt

        before_tls, after_tls, rcpt = yield self.run_client(converse)
        self.assertEqual(before_tls, (530, "5.7.0"))     # RFC 3207 §4: STARTTLS first
        self.assertEqual(after_tls, (530, "5.7.0"))      # RFC 6409 §4.3: then AUTH
        self.assertEqual(rcpt, (503, "5.5.1"))
        yield self.settle(relay, [])

    @defer.inlineCallbacks
    def test_tricks_never_relay_even_under_rules_allowing_any_recipient(self):
        # recipients = "*" (the default): every routing trick is still refused, for every client; a
        # source route is dropped and the mailbox after it relayed, as this client may relay anywhere.
        relay = self.start_relay(f'[[permit]]\nnetworks = ["{ALLOWED_HOST}/32"]\n\n'
                                 '[[permit]]\nusers = ["*"]\n')

        def converse(client):
            replies = {"MAIL": status(client.mail(SENDER))}
            for path, _, _ in TRICKS:
                replies[path] = status(client.rcpt(path))
            for path in ("user@victim.example", "@allowed.example:routed@victim.example"):
                replies[path] = status(client.rcpt(path))
            replies["DATA"] = status(client.data(message(subject="anything")))
            client.quit()
            return replies

        expected = {path: (code, st) for path, code, st in TRICKS}
        expected.update({"MAIL": (250, "2.1.0"), "user@victim.example": (250, "2.1.5"),
                         "@allowed.example:routed@victim.example": (250, "2.1.5"), "DATA": (250, "2.0.0")})
        for make in (lambda: Client(relay, source=ALLOWED_HOST), lambda: login_client(relay, FOREIGN_HOST)):
            replies = yield self.run_client(lambda make=make: converse(make()))
            self.assertEqual(replies, expected)
        yield self.settle(relay, ["routed@victim.example", "user@victim.example"] * 2)


# -- senders and the From: header -----------------------------------------------------------------------


class SenderTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_sender_outside_the_rule_is_refused_at_mail_for_host_and_user(self):
        relay = self.start_relay(NETWORK_ONLY + "\n" + USERS_ONLY)

        def converse(client):
            replies = [status(client.mail("ceo@other.example")),
                       status(client.mail("app@example.org.other.example")),
                       status(client.rcpt("user@allowed.example"))]
            client.quit()
            return replies

        for make in (lambda: Client(relay, source=ALLOWED_HOST), lambda: login_client(relay, FOREIGN_HOST)):
            replies = yield self.run_client(lambda make=make: converse(make()))
            self.assertEqual(replies, [(553, "5.7.1"), (553, "5.7.1"), (503, "5.5.1")])
        yield self.settle(relay, [])

    @defer.inlineCallbacks
    def test_null_sender_relays_to_allowed_recipients_only(self):
        relay = self.start_relay(NETWORK_ONLY)

        def converse(source):
            client = Client(relay, source=source)
            replies = [status(client.mail("")), status(client.rcpt("bounce@allowed.example")),
                       status(client.rcpt("bounce@victim.example")),
                       status(client.data(message(sender="mailer-daemon@example.org", subject="bounce")))]
            client.quit()
            return replies

        allowed = yield self.run_client(converse, ALLOWED_HOST)
        foreign = yield self.run_client(converse, FOREIGN_HOST)
        self.assertEqual(allowed, [(250, "2.1.0"), (250, "2.1.5"), (550, "5.7.1"), (250, "2.0.0")])
        self.assertEqual(foreign, [(250, "2.1.0"), (550, "5.7.1"), (550, "5.7.1"), (503, "5.5.1")])
        yield self.settle(relay, ["bounce@allowed.example"])
        self.assertEqual(self.sink.messages[0].mail_from, "")

    @defer.inlineCallbacks
    def test_postmaster_is_accepted_from_anyone_and_goes_to_the_configured_mailbox(self):
        relay = self.start_relay(NETWORK_ONLY, top='postmaster = "admin@allowed.example"\n')

        def converse(source):
            client = Client(relay, source=source)
            replies = [status(client.mail("someone@elsewhere.example")), status(client.rcpt("PostMaster")),
                       status(client.rcpt("postmaster@RELAY.TEST")), status(client.rcpt("user@victim.example")),
                       status(client.data(message(sender="someone@elsewhere.example", subject="abuse report")))]
            client.quit()
            return replies

        foreign = yield self.run_client(converse, FOREIGN_HOST)     # no rule matches this host at all
        # RFC 5321 4.5.1: the postmaster takes mail from anyone; everything else is still refused.
        self.assertEqual(foreign, [(250, "2.1.0"), (250, "2.1.5"), (250, "2.1.5"), (550, "5.7.1"), (250, "2.0.0")])
        yield self.settle(relay, ["admin@allowed.example"])      # both spellings: one mailbox, one copy

    @defer.inlineCallbacks
    def test_from_header_of_another_domain_is_refused_after_data_for_a_user(self):
        relay = self.start_relay(USERS_ONLY)

        def converse():
            client = login_client(relay, FOREIGN_HOST)
            replies = [status(client.mail(SENDER)), status(client.rcpt("user@allowed.example")),
                       status(client.data(message(sender="ceo@other.example", subject="forged"))),
                       # the session goes on: a proper message in the same connection is relayed
                       status(client.mail(SENDER)), status(client.rcpt("user@allowed.example")),
                       status(client.data(message(sender="app@sub.example.org", subject="proper")))]
            client.quit()
            return replies

        replies = yield self.run_client(converse)
        self.assertEqual(replies, [(250, "2.1.0"), (250, "2.1.5"), (550, "5.7.1"),
                                   (250, "2.1.0"), (250, "2.1.5"), (250, "2.0.0")])
        yield self.settle(relay, ["user@allowed.example"])
        self.assertIn(b"Subject: proper", self.sink.messages[0].data)

    @defer.inlineCallbacks
    def test_from_header_of_another_domain_is_accepted_when_the_check_is_off(self):
        relay = self.start_relay(USERS_ONLY + "check_from_header = false\n")

        def converse():
            client = login_client(relay, FOREIGN_HOST)
            replies = [status(client.mail(SENDER)), status(client.rcpt("user@allowed.example")),
                       status(client.data(message(sender="ceo@other.example", subject="allowed")))]
            client.quit()
            return replies

        replies = yield self.run_client(converse)
        self.assertEqual(replies, [(250, "2.1.0"), (250, "2.1.5"), (250, "2.0.0")])
        yield self.settle(relay, ["user@allowed.example"])
        self.assertIn(b"From: <ceo@other.example>", self.sink.messages[0].data)

    @defer.inlineCallbacks
    def test_from_header_is_not_checked_for_the_allowlisted_host(self):
        # The From: check binds a login to its senders (RFC 6409 §6.1); an IP-allowlisted application
        # server is trusted by address and only its envelope sender is held to `senders`.
        relay = self.start_relay(NETWORK_ONLY)

        def converse():
            client = Client(relay, source=ALLOWED_HOST)
            replies = [status(client.mail(SENDER)), status(client.rcpt("user@allowed.example")),
                       status(client.data(message(sender="someone@other.example", subject="app")))]
            client.quit()
            return replies

        replies = yield self.run_client(converse)
        self.assertEqual(replies, [(250, "2.1.0"), (250, "2.1.5"), (250, "2.0.0")])
        yield self.settle(relay, ["user@allowed.example"])


# -- limits at the session --------------------------------------------------------------------------------


def greeting(relay: RelayFixture, source: str, kind: str = "relay") -> tuple[socket.socket, bytes]:
    """Open a raw connection from `source` and read the server's first line; the socket stays open."""
    sock = socket.create_connection(("127.0.0.1", relay.ports[kind]), timeout=30, source_address=(source, 0))
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        line += chunk
    return sock, line


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the server has closed the connection (read gives EOF after any pending lines)."""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return True
    except (ConnectionResetError, ssl.SSLError):
        return True
    except socket.timeout:
        return False


class ConnectionLimitTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_extra_connection_from_one_ip_is_421_while_another_ip_still_connects(self):
        relay = self.start_relay(NETWORK_ONLY, "[limits]\nmax_connections_per_ip = 2\n")

        def crowd():
            first = greeting(relay, ALLOWED_HOST)
            second = greeting(relay, ALLOWED_HOST)
            extra = greeting(relay, ALLOWED_HOST)
            other = greeting(relay, FOREIGN_HOST)
            extra_closed = closed_by_peer(extra[0])
            for sock, _ in (first, second, extra, other):
                sock.close()
            return [first[1], second[1], extra[1], other[1]], extra_closed

        def again():
            client = Client(relay, source=ALLOWED_HOST)
            replies = [status(client.mail(SENDER)), status(client.rcpt("user@allowed.example")),
                       status(client.data(message()))]
            client.quit()
            return replies

        lines, extra_closed = yield self.run_client(crowd)
        self.assertTrue(lines[0].startswith(b"220 ") and lines[1].startswith(b"220 "), lines)
        self.assertTrue(lines[2].startswith(b"421 4.7.0 "), lines[2])
        self.assertTrue(lines[3].startswith(b"220 "), lines[3])
        self.assertTrue(extra_closed)
        # Once the relay has seen those connections close, the host may connect again.
        yield until(lambda: relay.service.factories[0].connections.total == 0, "the closed connections to be counted",
                    timeout=20)
        replies = yield self.run_client(again)
        self.assertEqual(replies, [(250, "2.1.0"), (250, "2.1.5"), (250, "2.0.0")])
        yield self.settle(relay, ["user@allowed.example"])

    @defer.inlineCallbacks
    def test_max_connections_caps_a_listener_whatever_the_ip(self):
        relay = self.start_relay(NETWORK_ONLY, "[limits]\nmax_connections = 2\n")

        def converse():
            socks = [greeting(relay, ALLOWED_HOST), greeting(relay, FOREIGN_HOST), greeting(relay, "127.0.0.4")]
            lines = [line for _, line in socks]
            for sock, _ in socks:
                sock.close()
            return lines

        lines = yield self.run_client(converse)
        self.assertEqual([line[:4] for line in lines], [b"220 ", b"220 ", b"421 "])
        self.assertTrue(lines[2].startswith(b"421 4.7.0 "))

    @defer.inlineCallbacks
    def test_max_connections_counts_all_listeners_together(self):
        relay = self.start_relay(NETWORK_ONLY, "[limits]\nmax_connections = 2\n")

        def converse():
            socks = [greeting(relay, ALLOWED_HOST, "relay"), greeting(relay, FOREIGN_HOST, "relay"),
                     greeting(relay, "127.0.0.4", "submission")]
            lines = [line for _, line in socks]
            for sock, _ in socks:
                sock.close()
            return lines

        lines = yield self.run_client(converse)
        self.assertTrue(lines[2].startswith(b"421 4.7.0 "), lines)


class MessageRateTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_the_message_after_the_budget_is_450_at_mail_per_identity(self):
        # Two rules, two identities: the network rule (shared by every host it matches) and a user.
        relay = self.start_relay(
            '[[permit]]\nnetworks = ["127.0.0.0/29"]\n\n[[permit]]\nusers = ["*"]\n',
            "[limits]\nmessages_per_minute = 2\n")

        def send(client, subject):
            replies = [status(client.mail(SENDER))]
            if replies[0][0] == 250:
                replies += [status(client.rcpt(f"{subject}@allowed.example")),
                            status(client.data(message(subject=subject)))]
            return replies

        def converse():
            host = Client(relay, source=ALLOWED_HOST)
            replies = [send(host, "first"), send(host, "second"), send(host, "third")]
            host.quit()
            # 127.0.0.3 matches the same rule: the same identity, the same spent budget.
            neighbour = Client(relay, source=FOREIGN_HOST)
            replies.append(send(neighbour, "neighbour"))
            neighbour.quit()
            user = login_client(relay, FOREIGN_HOST)
            replies.append(send(user, "user"))
            user.quit()
            return replies

        replies = yield self.run_client(converse)
        ok = [(250, "2.1.0"), (250, "2.1.5"), (250, "2.0.0")]
        self.assertEqual(replies, [ok, ok, [(450, "4.7.1")], [(450, "4.7.1")], ok])
        yield self.settle(relay, ["first@allowed.example", "second@allowed.example", "user@allowed.example"])


class RecipientLimitTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_recipient_beyond_max_recipients_is_452_and_the_rest_is_delivered(self):
        relay = self.start_relay(NETWORK_ONLY, "[limits]\nmax_recipients = 3\n")

        def converse():
            client = Client(relay, source=ALLOWED_HOST)
            replies = [status(client.mail(SENDER))]
            replies += [status(client.rcpt(f"r{i}@allowed.example")) for i in range(5)]
            replies.append(status(client.data(message())))
            client.quit()
            return replies

        replies = yield self.run_client(converse)
        self.assertEqual(replies, [(250, "2.1.0")] + [(250, "2.1.5")] * 3 + [(452, "4.5.3")] * 2
                         + [(250, "2.0.0")])
        yield self.settle(relay, [f"r{i}@allowed.example" for i in range(3)])


class AuthFailureLimitTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_failures_beyond_the_limit_get_421_and_close_while_other_hosts_log_in(self):
        relay = self.start_relay(USERS_ONLY, "[limits]\nauth_failures_per_minute = 2\n")

        def converse():
            client = Client(relay, "submission", ALLOWED_HOST)
            client.starttls()
            replies = [status(client.login("app1", f"wrong {i}")) for i in range(3)]
            closed = closed_by_peer(client.smtp.sock)
            client.smtp.close()
            # A new connection from the same host, even on another listener, is turned away at its first
            # AUTH with the right password: the budget is per IP, not per connection or port.
            again = Client(relay, "submissions", ALLOWED_HOST)
            replies.append(status(again.login("app1", PASSWORD)))
            again.smtp.close()
            other = Client(relay, "submission", FOREIGN_HOST)
            other.starttls()
            replies.append(status(other.login("app1", PASSWORD)))
            replies += [status(other.mail(SENDER)), status(other.rcpt("user@allowed.example")),
                        status(other.data(message()))]
            other.quit()
            return replies, closed

        replies, closed = yield self.run_client(converse)
        self.assertEqual(replies, [(535, "5.7.8"), (535, "5.7.8"), (421, "4.7.0"), (421, "4.7.0"),
                                   (235, "2.7.0"), (250, "2.1.0"), (250, "2.1.5"), (250, "2.0.0")])
        self.assertTrue(closed)
        yield self.settle(relay, ["user@allowed.example"])
