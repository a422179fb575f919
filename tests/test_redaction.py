"""mailrelay.redaction: the cheap check (plain_fields) never lets a credential through."""
from __future__ import annotations

from collections import OrderedDict, namedtuple

from twisted.trial import unittest

from mailrelay.redaction import MAX_DEPTH, REDACTED, needs_redaction, plain_fields, redact, scrub


class Opaque:
    pass


class PlainFields(unittest.TestCase):
    def event(self, **fields):
        return dict(fields, log_format="{x}", log_namespace="mailrelay.test", log_time=1.0)

    def test_fields_without_credentials_are_named(self):
        self.assertEqual(plain_fields(self.event(x=1, queue_id="Q")), ("x", "queue_id"))
        self.assertEqual(plain_fields(self.event(x=1, queue_id="Q")), ("x", "queue_id"))      # remembered

    def test_a_credential_name_at_any_depth_and_in_any_container_type_is_found(self):
        Pair = namedtuple("Pair", "a b")
        for value in ({"password": "pw"}, [{"Api_Token": "t"}], OrderedDict(secret="s"),
                      Pair(1, {"auth_data": "x"}), ({"nested": {"passwd": "p"}},)):
            for _ in range(2):          # the second time, with what the first one taught it
                self.assertIsNone(plain_fields(self.event(x=Opaque(), value=value)), value)
                self.assertTrue(needs_redaction(self.event(x=Opaque(), value=value)))
        self.assertIsNone(plain_fields(self.event(x=1, user_password="pw")))

    def test_types_learnt_as_leaves_do_not_hide_a_container_later(self):
        self.assertIsNotNone(plain_fields(self.event(x=Opaque(), y="s")))
        self.assertIsNone(plain_fields(self.event(x=Opaque(), y={"token": "t"})))

    def test_a_loop_or_very_deep_value_is_redacted_not_a_crash(self):
        loop: list = []
        loop.append(loop)
        self.assertIsNone(plain_fields(self.event(x=loop)))
        clean, _ = redact(self.event(x=loop))
        depth, value = 0, clean["x"]
        while isinstance(value, list):
            depth, value = depth + 1, value[0]
        self.assertEqual((depth, value), (MAX_DEPTH, REDACTED))

    def test_redacted_values_are_scrubbed_from_text(self):
        clean, secrets = redact(self.event(x="ok", password="hunter2-long"))
        self.assertEqual(clean["password"], REDACTED)
        self.assertEqual(scrub("said hunter2-long twice: hunter2-long", secrets), "said [redacted] twice: [redacted]")
