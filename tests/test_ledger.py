"""mailrelay.outbound.ledger: one session's results as replies settle them, and what the recipients no
reply settled get.  The client's use of it is in test_delivery_client, test_lmtp and test_chunking."""
from __future__ import annotations

from twisted.trial import unittest

from mailrelay.queue.job import Job
from mailrelay.outbound.ledger import Ledger
from mailrelay.outbound.starttls import StartTLS
from tests.support.conversation import message

RECIPIENTS = ("a@example.net", "b\r\nRSET@example.net", "c@example.net")


def ledger() -> Ledger:
    return Ledger([Job(message(recipients=RECIPIENTS), RECIPIENTS), Job(message(), ("d@example.net",))])


class LedgerTests(unittest.TestCase):
    def test_an_address_that_could_inject_a_command_is_refused_and_never_offered(self):
        book = ledger()
        self.assertEqual(book.settle_invalid(0, "mx"), [0, 2])
        self.assertEqual((book.results[0][1].code, book.results[0][1].status), (553, "5.1.3"))
        self.assertIsNone(book.results[0][0])

    def test_the_reply_after_the_data_settles_the_accepted_and_dsn_is_passed_on(self):
        book = ledger()
        book.settle_reply(0, 2, 550, b"5.1.1 no such user", "mx")
        book.settle_accepted(0, [0], 250, b"2.0.0 queued", "mx", dsn=True)
        a, _, c = book.results[0]
        self.assertEqual((a.code, a.dsn_passed, c.code, c.status), (250, True, 550, "5.1.1"))
        book.settle_accepted(1, [0], 250, b"2.0.0 queued", "mx", dsn=False)
        self.assertFalse(book.results[1][0].dsn_passed)

    def test_the_unsettled_get_the_servers_reply_made_temporary(self):
        book = ledger()
        book.settle_accepted(0, [0], 250, b"2.0.0 queued", "mx", dsn=False)
        book.fail_with_reply(554, b"5.3.0 go away", "MAIL FROM", "mx[127.0.0.1]")
        book.fail(421, "4.4.2", "timed out")            # a later cause does not replace the first
        result = book.session_result("mx[127.0.0.1]", StartTLS("none", None, "mx"), before_mail=False, reused=False)
        codes = [(r.code, r.status) for job in result.jobs for r in job]
        self.assertEqual(codes, [(250, "2.0.0"), (451, "4.3.0"), (451, "4.3.0"), (451, "4.3.0")])
        self.assertEqual(result.jobs[1][0].text, "mx[127.0.0.1] said 554 go away (after MAIL FROM)")
        self.assertFalse(result.jobs[1][0].remote_reply)         # a 5xx made 4xx is not the server's 4xx

    def test_a_servers_own_4xx_is_marked_as_its_reply(self):
        book = ledger()
        book.fail_with_reply(421, b"4.7.0 too many connections", "connect", "mx")
        result = book.session_result("mx", StartTLS("none", None, "mx"), before_mail=True, reused=False)
        self.assertEqual({(r.code, r.status, r.remote_reply) for job in result.jobs for r in job},
                         {(421, "4.7.0", True)})
        self.assertTrue(result.before_mail)

    def test_a_settled_jobs_results_fill_no_reply_and_the_rest_of_a_job_settles_together(self):
        book = ledger()
        book.settle_reply(0, 0, 250, b"2.1.5 ok", "mx")
        book.settle_rest(0, "mx", 552, "5.3.4", "message too big", sender_refused=True)
        results = book.job_results(0, "mx", StartTLS("none", None, "mx"))
        self.assertEqual([(r.code, r.sender_refused) for r in results], [(250, False), (552, True), (552, True)])
        self.assertEqual([(r.code, r.status) for r in book.job_results(1, "mx", StartTLS("none", None, "mx"))],
                         [(451, "4.3.0")])
