"""mailrelay.logrelay: the delivery process's log lines, written into the main process's log."""
from __future__ import annotations

import io
import json

from twisted.logger import LogLevel, LogPublisher, formatEventAsClassicLogText, textFileLogObserver
from twisted.trial import unittest

from mailrelay import config
from mailrelay.logger import classic_text, speed_up_text_observers
from mailrelay.logrelay import events_from_text, relay_text
from mailrelay.logs import make_observer

LINES = ("2026-11-28T04:49:26+0000 [mailrelay.delivery.scheduler.Scheduler#info] 1K19VKAPNF18XVGA: delivered "
         "sink@example.net via sink (127.0.0.1): 250 2.0.0 Ok\n"
         "2026-11-28T04:49:27+0000 [mailrelay.delivery.worker#warn] a warning {with braces}\n"
         "2026-11-28T04:49:27+0000 [mailrelay.delivery.worker#critical] it broke\n"
         "\tTraceback (most recent call last):\n"
         "\t  File \"x.py\", line 1\n")


class RawPath(unittest.TestCase):
    def test_twistds_own_text_log_gets_the_lines_byte_for_byte_in_one_write(self):
        publisher, out = LogPublisher(), io.StringIO()
        writes = []
        original = out.write
        out.write = lambda text: (writes.append(text), original(text))[1]
        publisher.addObserver(textFileLogObserver(out))
        sped_up = speed_up_text_observers(publisher)
        relay_text(publisher, LINES, [observer for observer, _ in sped_up])
        self.assertEqual(out.getvalue(), LINES)
        self.assertEqual(writes, [LINES])

    def test_classic_text_still_renders_ordinary_events(self):
        event = {"log_format": "{x}", "x": "hello", "log_namespace": "mailrelay.test",
                 "log_level": LogLevel.info, "log_time": 0.0}
        self.assertEqual(classic_text(event), formatEventAsClassicLogText(event))
        self.assertTrue(classic_text(event).endswith(" [mailrelay.test#info] hello\n"))


class EventPath(unittest.TestCase):
    def test_lines_become_events_with_namespace_level_queue_id_and_continuations(self):
        events = events_from_text(LINES)
        self.assertEqual([(e["log_namespace"], e["log_level"]) for e in events], [
            ("mailrelay.delivery.scheduler.Scheduler", LogLevel.info),
            ("mailrelay.delivery.worker", LogLevel.warn),
            ("mailrelay.delivery.worker", LogLevel.critical)])
        self.assertEqual(events[0]["queue_id"], "1K19VKAPNF18XVGA")
        self.assertNotIn("queue_id", events[1])
        self.assertEqual(events[1]["log_text"], "a warning {with braces}")
        self.assertEqual(events[2]["log_text"], 'it broke\nTraceback (most recent call last):\n  File "x.py", line 1')

    def test_a_line_in_no_known_shape_is_kept_whole(self):
        [event] = events_from_text("something odd\n")
        self.assertEqual((event["log_namespace"], event["log_level"], event["log_text"]),
                         ("mailrelay.delivery.worker", LogLevel.info, "something odd"))

    def test_with_another_observer_every_line_is_an_event_for_all_of_them(self):
        # e.g. [log] format = "json" with no file: JSON on standard output beside twistd's text log.
        publisher, text_out, json_out = LogPublisher(), io.StringIO(), io.StringIO()
        publisher.addObserver(textFileLogObserver(text_out))
        sped_up = speed_up_text_observers(publisher)
        publisher.addObserver(make_observer(config.LogConfig(format="json"), json_out))
        relay_text(publisher, LINES, [observer for observer, _ in sped_up])
        records = [json.loads(line) for line in json_out.getvalue().splitlines()]
        self.assertEqual([r.get("queue_id") for r in records], ["1K19VKAPNF18XVGA", None, None])
        self.assertIn("delivered sink@example.net", records[0]["message"])
        self.assertEqual(records[1]["level"], "warn")
        text = text_out.getvalue().splitlines()
        self.assertEqual(len(text), 5)          # three events, the last with its two traceback lines
        self.assertTrue(text[0].endswith("[mailrelay.delivery.scheduler.Scheduler#info] " + LINES.split("] ", 1)[1]
                                         .split("\n")[0]))
        self.assertIn("a warning {with braces}", text[1])
