# -*- test-case-name: tests.test_queue_transfer -*-
"""`mailrelay queue transfer`: a node's queue handed to another relay over real SMTP, each message removed
only after the other side's 250 — with a stopped relay, a running twistd (`--hold`), a peer that refuses
some recipients, and a transfer killed with -9 half way and run again."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from mailrelay.queue.state import MessageState
from mailrelay.envelope import Envelope
from mailrelay.spool import Spool
from tests.support.polling import eventually
from tests.support.relay import SEPARATE, RelayFixture, free_port
from tests.support.sink import Sink


def message(n: int) -> bytes:
    return (f"From: app@example.org\r\nTo: user@example.com\r\nMessage-ID: <drain-{n}@example.org>\r\n"
            f"Subject: drain {n}\r\n\r\nbody {n}\r\n.leading dot kept\r\n").encode()


def ids_of(transactions) -> list[int]:
    found = []
    for t in transactions:
        start = t.data.find(b"<drain-")
        found.append(int(t.data[start + 7:t.data.index(b"@", start)]))
    return sorted(found)


def cli(config: Path, *argv: str, wait: bool = True):
    command = [sys.executable, "-m", "mailrelay.cli.main", "queue", *argv, "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


class StoppedRelayTransfer(unittest.TestCase):
    """The relay is stopped: the spool is written here, the CLI holds its lock while it transfers."""
    timeout = 120

    def setUp(self):
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.config = self.dir / "tap.conf"
        self.config.write_text('hostname = "node1.test.example"\nspool = "spool"\n')
        self.spool = Spool(self.dir / "spool")      # never started: synchronous
        self.sink = Sink()
        self.port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)

    def add(self, n: int, recipients=("user@example.com",), state=None, held=False, **envelope) -> str:
        writer = self.spool.new_message(Envelope("app@example.org", tuple(recipients), time.time(), **envelope))
        writer.write(message(n))
        queue_id = self.successResultOf(writer.commit())
        if state is not None:
            self.successResultOf(self.spool.save_state(queue_id, {"version": 1, "recipients": state}))
        if held:
            self.successResultOf(self.spool.hold(queue_id))
        return queue_id

    def transfer(self, *extra: str) -> defer.Deferred:
        return threads.deferToThread(cli, self.config, "transfer", "--to", f"127.0.0.1:{self.port}",
                                     "--security", "none", *extra)

    @defer.inlineCallbacks
    def test_every_pending_recipient_goes_over_and_the_spool_is_emptied(self):
        self.add(1, body="8BITMIME")
        done = {"attempts": 1, "first_attempt": 1.0, "next_attempt": 0.0, "done": "delivered", "reported": False,
                "last_reply": {"code": 250, "status": "2.0.0", "text": "ok", "remote_host": "mx"}}
        self.add(2, recipients=("a@example.com", "b@example.com"), state={"a@example.com": done})
        self.add(3, recipients=("c@example.net", "d@example.net"))
        result = yield self.transfer()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("transferred 3 messages (4 recipients)", result.stdout)
        self.assertEqual(ids_of(self.sink.messages), [1, 2, 3])
        by_id = dict(zip(ids_of(self.sink.messages), self.sink.messages))
        self.assertEqual(by_id[2].rcpt_tos, ["b@example.com"])          # a@ was delivered before: not again
        self.assertEqual(by_id[3].rcpt_tos, ["c@example.net", "d@example.net"])
        self.assertEqual(by_id[1].mail_from, "app@example.org")
        self.assertIn("BODY=8BITMIME", " ".join(by_id[1].mail_params).upper())
        self.assertIn(b"\r\n.leading dot kept\r\n", by_id[1].data)       # dot-stuffed on the wire, intact here
        self.assertEqual(self.spool.queue_ids(), [])

    @defer.inlineCallbacks
    def test_recipients_the_peer_refuses_stay_here_untouched(self):
        self.sink.rcpt_replies = {"refused@example.com": "550 5.7.1 not here"}
        queue_id = self.add(1, recipients=("ok@example.com", "refused@example.com"))
        result = yield self.transfer()
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"{queue_id} kept: 1 recipient(s) not taken: 550 5.7.1 not here", result.stderr)
        self.assertEqual(self.sink.messages[0].rcpt_tos, ["ok@example.com"])
        message_ = self.spool.load(queue_id)
        state = MessageState.from_dict(message_.state, message_.envelope.recipients)
        self.assertEqual(state.get("ok@example.com").done, "delivered")
        refused = state.get("refused@example.com")
        self.assertEqual((refused.done, refused.attempts, refused.last_reply), (None, 0, None))
        again = yield self.transfer()                                    # a second run sends only what is left
        self.assertEqual(again.returncode, 1)
        self.assertEqual([t.rcpt_tos for t in self.sink.messages], [["ok@example.com"]])

    @defer.inlineCallbacks
    def test_held_messages_are_left_and_named(self):
        held = self.add(1, held=True)
        self.add(2)
        result = yield self.transfer()
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"{held} kept: held", result.stderr)
        self.assertEqual(ids_of(self.sink.messages), [2])
        self.assertEqual(self.spool.queue_ids(), [held])

    @defer.inlineCallbacks
    def test_hold_leaves_the_spool_suspended_until_resume(self):
        self.add(1)
        result = yield self.transfer("--hold")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIsNotNone(self.spool.suspension())
        listed = yield threads.deferToThread(cli, self.config, "list")
        self.assertIn("deliveries suspended", listed.stdout)
        resumed = yield threads.deferToThread(cli, self.config, "resume")
        self.assertEqual(resumed.returncode, 0, resumed.stderr)
        self.assertIsNone(self.spool.suspension())

    @defer.inlineCallbacks
    def test_bad_arguments_are_one_line(self):
        bad = yield threads.deferToThread(cli, self.config, "transfer", "--to", "nohostport")
        self.assertEqual(bad.returncode, 1)
        self.assertEqual(len(bad.stderr.strip().splitlines()), 1, bad.stderr)
        self.assertIn("give HOST:PORT", bad.stderr)
        self.add(1)
        down = yield threads.deferToThread(cli, self.config, "transfer", "--to", f"127.0.0.1:{free_port()}",
                                           "--security", "none")
        self.assertEqual(down.returncode, 1)
        self.assertNotIn("Traceback", down.stderr)
        self.assertEqual(len(self.spool.queue_ids()), 1)                 # nobody took it: still here

    @defer.inlineCallbacks
    def test_killed_half_way_and_run_again_loses_nothing_and_doubles_nothing(self):
        for n in range(8):
            self.add(n)
        self.sink.stall_after = 3                    # the fourth final dot is never answered
        process = cli(self.config, "transfer", "--to", f"127.0.0.1:{self.port}", "--security", "none",
                      wait=False)
        yield eventually(lambda: self.sink.stalled, timeout=30, interval=0.05)
        self.assertEqual(self.sink.stalled, 1)
        process.send_signal(signal.SIGKILL)
        yield threads.deferToThread(process.wait)
        process.stdout.close()
        process.stderr.close()
        first = ids_of(self.sink.messages)
        self.assertEqual(len(first), 3)
        self.assertEqual(len(self.spool.queue_ids()), 5)  # the three taken were removed before the fourth went
        second = Sink()
        self.port = second.start(reactor)
        self.addCleanup(second.stop)
        result = yield self.transfer()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(sorted(first + ids_of(second.messages)), list(range(8)))
        self.assertEqual(self.spool.queue_ids(), [])


class RunningRelayTransfer(unittest.TestCase):
    """A real twistd node whose next hop is down, drained with --hold into a second relay."""
    timeout = 240

    def setUp(self):
        self.hop_port = free_port()                  # node 1's next hop: down until the end
        self.node1 = RelayFixture(self.mktemp(), extra=(
            f'[transports.hop]\nhost = "127.0.0.1"\nport = {self.hop_port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "hop"\n\n'
            '[queue]\nfirst_retry = "1s"\nmax_retry = "2s"\n'), process=SEPARATE)
        self.addCleanup(self.node1.kill)
        self.sink = Sink()
        sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.node2 = RelayFixture(self.mktemp(), extra=(
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {sink_port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n'))
        self.node2.start(reactor)
        self.addCleanup(self.node2.stop)

    @defer.inlineCallbacks
    def test_a_running_node_is_drained_into_another_and_every_message_arrives_once(self):
        yield threads.deferToThread(self.node1.spawn)
        for n in range(6):
            code, _ = yield self.node1.submit("relay", "app@example.org", ["user@example.com"], message(n))
            self.assertEqual(code, 250)
        target = f"127.0.0.1:{self.node2.ports['relay']}"
        refused = yield threads.deferToThread(cli, self.node1.path, "transfer", "--to", target)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("is running", refused.stderr)
        result = yield threads.deferToThread(cli, self.node1.path, "transfer", "--to", target, "--hold")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("transferred 6 messages", result.stdout)
        yield self.sink.wait_for(6)
        self.assertEqual(ids_of(self.sink.messages), list(range(6)))
        record = json.loads((self.node1.dir / "spool" / "suspended").read_text())
        self.assertTrue(record["idle"])
        # Still accepting while suspended, delivering nothing — until resumed.
        code, _ = yield self.node1.submit("relay", "app@example.org", ["user@example.com"], message(6))
        self.assertEqual(code, 250)
        hop = Sink()
        hop.start(reactor, port=self.hop_port)
        self.addCleanup(hop.stop)
        yield task.deferLater(reactor, 3.0, lambda: None)   # first_retry is 1 s: a running queue would try
        self.assertEqual(hop.messages, [])
        resumed = yield threads.deferToThread(cli, self.node1.path, "resume")
        self.assertEqual(resumed.returncode, 0, resumed.stderr)
        delivered = yield hop.wait_for(1)
        self.assertEqual(ids_of(delivered), [6])
        self.assertEqual(ids_of(self.sink.messages), list(range(6)))      # nothing went twice
