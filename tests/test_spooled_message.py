# -*- test-case-name: tests.test_spooled_message -*-
"""ISpooledMessage and ISelfConvertingMessage: what a next hop is given, declared rather than probed.

The spool's own message, the forms made of it on the way out (DKIM's prefixed and signed messages, the
7-bit converted one) and the shared test doubles all provide the interface; downgrade() asks a message that
declares it converts itself, and converts any other."""
from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.outbound.sevenbit import SEVEN_BIT, ConvertedMessage, convert_message, downgrade
from mailrelay.outbound.signing import PrefixedMessage, SignedMessage
from mailrelay.envelope import Envelope
from mailrelay.interfaces import ISelfConvertingMessage, ISpooledMessage
from mailrelay.spool.store import Spool
from tests.support import conversation, messages
from tests.support.dsn import original
from tests.support.esmtp import message as esmtp_message
from tests.support.scheduling import NOW, BodyMessage, MemorySpool

EIGHT_BIT = "Subject: greetings\r\n\r\nGr\u00fc\u00dfe aus K\u00f6ln\r\n".encode("utf-8")


class RealMessagesTests(unittest.TestCase):
    def setUp(self):
        self.spool = Spool(Path(self.mktemp()))
        self.spool.startService()
        self.addCleanup(self.spool.stopService)

    @defer.inlineCallbacks
    def spooled(self, body: bytes = EIGHT_BIT):
        writer = self.spool.new_message(Envelope("a@example.org", ("b@example.net",), NOW, body="8BITMIME"))
        writer.write(body)
        queue_id = yield writer.commit()
        return self.spool.load(queue_id)

    @defer.inlineCallbacks
    def test_the_spools_message_provides_it_with_its_queue_file(self):
        message = yield self.spooled()
        self.assertTrue(verifyObject(ISpooledMessage, message))
        self.assertEqual(message.path.parent.name, "queue")
        self.assertFalse(ISelfConvertingMessage.providedBy(message))

    @defer.inlineCallbacks
    def test_a_prefixed_message_keeps_the_originals_queue_id_envelope_and_path(self):
        message = yield self.spooled()
        prefixed = PrefixedMessage(message, b"X-Test: 1\r\n")
        self.assertTrue(verifyObject(ISpooledMessage, prefixed))
        self.assertFalse(ISelfConvertingMessage.providedBy(prefixed))
        self.assertEqual((prefixed.queue_id, prefixed.envelope, prefixed.path),
                         (message.queue_id, message.envelope, message.path))
        self.assertEqual(prefixed.size, message.size + len(b"X-Test: 1\r\n"))
        with prefixed.open() as f:
            self.assertEqual(f.read(), b"X-Test: 1\r\n" + EIGHT_BIT)

    @defer.inlineCallbacks
    def test_a_signed_message_declares_that_it_converts_itself(self):
        message = yield self.spooled()
        asked = []
        signed = SignedMessage(message, b"DKIM-Signature: x\r\n",
                               lambda needs: asked.append(needs) or defer.succeed("own"))
        self.assertTrue(verifyObject(ISelfConvertingMessage, signed))
        self.assertEqual(self.successResultOf(signed.seven_bit(SEVEN_BIT)), "own")
        self.assertEqual(asked, [SEVEN_BIT])

    @defer.inlineCallbacks
    def test_a_converted_message_keeps_the_originals_queue_id_and_path(self):
        message = yield self.spooled()
        converted = convert_message(message)
        self.addCleanup(converted._file.close)
        self.assertIsInstance(converted, ConvertedMessage)
        self.assertTrue(verifyObject(ISpooledMessage, converted))
        self.assertEqual((converted.queue_id, converted.path), (message.queue_id, message.path))
        self.assertEqual(converted.envelope.octets, "7bit")
        with converted.open() as f:
            self.assertTrue(f.read().isascii())


class DowngradeAsksTests(unittest.TestCase):
    def test_a_self_converting_message_is_asked_not_converted(self):
        @implementer(ISelfConvertingMessage)
        class Own(messages.FakeMessage):
            def seven_bit(self, needs):
                return defer.succeed(("own form", needs))

        message = Own("Q9", Envelope("a@example.org", ("b@example.net",), NOW, body="8BITMIME"), EIGHT_BIT)
        verifyObject(ISelfConvertingMessage, message)
        d = downgrade(message, "mx.example.net", {})
        self.assertEqual(self.successResultOf(d), ("own form", SEVEN_BIT))


class TestDoublesTests(unittest.TestCase):
    """The shared doubles (tests/support) are messages a next hop can be given."""

    def test_each_provides_ispooledmessage(self):
        memory = MemorySpool()
        memory.add("q1", ["a@example.net"])
        for double in (messages.message_to("b@example.net"), conversation.message(), esmtp_message(),
                       BodyMessage.to("a@example.net"), original(), memory.load("q1")):
            self.assertTrue(verifyObject(ISpooledMessage, double), type(double).__qualname__)
            self.assertIsNone(double.path, type(double).__qualname__)
