"""Tests for mailrelay.spool: the durable queue directory (real files, real thread pool, real reactor)."""
from __future__ import annotations

import hashlib
import os
import stat
import threading
import tracemalloc
from pathlib import Path

from twisted.internet import reactor, task
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay.envelope import Envelope
from mailrelay.interfaces import IIncomingQueue, IMessageWriter, ISpool
from mailrelay.spool import CorruptMessage, Spool, SpoolLocked, UnknownMessage, files, store, writer
from mailrelay.spool.control import parse_request_name, request_name
from mailrelay.spool.ids import QueueIdGenerator, is_valid_queue_id
from mailrelay.spool.message import MAGIC, check_file
from mailrelay.spool.writer import BUFFER_LIMIT
from tests.support.polling import eventually

BINARY_BODY = (b"Subject: all the bytes\r\n\r\n" + bytes(range(256)) + b"\r\n.\r\n..\r\nbare\nlf\rcr\x00\r\n")


def make_envelope(**overrides) -> Envelope:
    values = dict(sender="alice@example.org", recipients=("bob@example.net", "carol@example.com"),
                  received_at=1767225600.25, client_address="127.0.0.1", client_helo="client.test",
                  identity="alice", body="8BITMIME", params={"ENVID": "x1"})
    values.update(overrides)
    return Envelope(**values)


def read_body(message) -> bytes:
    with message.open() as f:
        return f.read()


def files_in(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


class SpoolTestCase(unittest.TestCase):
    """A started spool in a fresh directory, stopped (and its threads joined) after each test."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.spool = self.start_spool()

    def start_spool(self, **kwargs) -> Spool:
        spool = Spool(self.directory, **kwargs)
        spool.startService()
        self.addCleanup(lambda: spool.stopService() if spool.running else None)
        return spool

    @inlineCallbacks
    def store_message(self, body: bytes = b"Subject: hi\r\n\r\nhello\r\n", **envelope_fields):
        message_writer = self.spool.new_message(make_envelope(**envelope_fields))
        message_writer.write(body)
        queue_id = yield message_writer.commit()
        return queue_id


class RoundTripTests(SpoolTestCase):

    def test_spool_provides_the_stage_interfaces(self) -> None:
        self.assertTrue(ISpool.providedBy(self.spool))
        self.assertTrue(IIncomingQueue.providedBy(self.spool))
        self.assertTrue(verifyObject(IMessageWriter, self.spool.new_message(make_envelope())))

    @inlineCallbacks
    def test_binary_body_and_envelope_survive_commit_and_load(self):
        message_writer = self.spool.new_message(make_envelope())
        queue_id = message_writer.queue_id
        self.assertTrue(is_valid_queue_id(queue_id))
        message_writer.write(BINARY_BODY[:7])
        message_writer.write(BINARY_BODY[7:])
        committed = yield message_writer.commit()
        self.assertEqual(committed, queue_id)
        message = self.spool.load(queue_id)
        self.assertEqual(message.queue_id, queue_id)
        self.assertEqual(message.envelope, make_envelope(octets="8bit", long_lines=False,     # what it saw
                                                         utf8_headers=False))
        self.assertEqual(message.size, len(BINARY_BODY))
        self.assertEqual(read_body(message), BINARY_BODY)
        self.assertEqual(message.state, {})
        self.assertFalse(message.held)

    @inlineCallbacks
    def test_a_fresh_commit_is_loaded_once_from_memory_exactly_as_from_disk(self):
        queue_id = yield self.store_message(BINARY_BODY)
        fresh = self.spool.take_fresh(queue_id)
        self.assertEqual(fresh, self.spool.load(queue_id))
        self.assertEqual(read_body(fresh), BINARY_BODY)
        self.assertIsNone(self.spool.take_fresh(queue_id))       # once only

    @inlineCallbacks
    def test_state_or_hold_since_the_commit_means_no_fresh_copy(self):
        saved = yield self.store_message()
        yield self.spool.save_state(saved, {"v": 1})
        held = yield self.store_message()
        yield self.spool.hold(held)
        self.assertEqual((self.spool.take_fresh(saved), self.spool.take_fresh(held)), (None, None))
        self.assertEqual(self.spool.load(saved).state, {"v": 1})

    @inlineCallbacks
    def test_pieces_of_any_size_round_trip_across_the_buffer_limit(self):
        pieces = [os.urandom(n) for n in (1, BUFFER_LIMIT - 1, 2, 3 * BUFFER_LIMIT, 0, 17, BUFFER_LIMIT)]
        message_writer = self.spool.new_message(make_envelope())
        for piece in pieces:
            message_writer.write(piece)
            self.assertLessEqual(message_writer.buffered, BUFFER_LIMIT)
        queue_id = yield message_writer.commit()
        self.assertEqual(read_body(self.spool.load(queue_id)), b"".join(pieces))

    @inlineCallbacks
    def test_empty_message_round_trips(self):
        queue_id = yield self.store_message(b"")
        message = self.spool.load(queue_id)
        self.assertEqual((message.size, read_body(message)), (0, b""))

    @inlineCallbacks
    def test_open_is_positioned_at_the_first_message_byte_and_ends_at_the_last(self):
        queue_id = yield self.store_message(b"From: a\r\n\r\nbody\r\n")
        with self.spool.load(queue_id).open() as f:
            self.assertEqual(f.read(4), b"From")
            self.assertEqual(f.read(), b": a\r\n\r\nbody\r\n")

    def test_a_message_being_received_cannot_be_held(self):
        from mailrelay.spool.message import UnknownMessage

        message_writer = self.spool.new_message(make_envelope())
        message_writer.write(b"x" * (BUFFER_LIMIT + 1))    # its file is in queue/, in progress
        self.assertRaises(UnknownMessage, self.spool.hold, message_writer.queue_id)
        self.assertEqual(files_in(self.directory / "hold"), [])
        message_writer.abort()

    def test_a_message_is_not_loadable_before_its_commit_fires(self):
        from mailrelay.spool.message import InProgress

        import threading

        gate = threading.Event()        # the commit's thread job waits until the checks below are done
        run = self.spool._pool.run
        self.patch(self.spool._pool, "run", lambda f, *args: run(lambda *a: (gate.wait(10), f(*a))[1], *args))
        message_writer = self.spool.new_message(make_envelope())
        message_writer.write(b"x" * (BUFFER_LIMIT + 1))    # spilled: its file is in queue/ already
        d = message_writer.commit()
        self.assertFalse(d.called)                      # durability is never synchronous when running
        self.assertEqual(self.spool.queue_ids(), [message_writer.queue_id])
        with self.assertRaises(InProgress):             # an UnknownMessage: readers skip it
            self.spool.load(message_writer.queue_id)
        gate.set()

        def committed(queue_id):
            self.assertEqual(self.spool.load(queue_id).size, BUFFER_LIMIT + 1)
            self.assertEqual(files_in(self.directory / "tmp"), [])
        return d.addCallback(committed)

    @inlineCallbacks
    def test_queue_ids_are_oldest_first(self):
        ids = []
        for n in range(5):
            ids.append((yield self.store_message(b"n%d" % n)))
        self.assertEqual(self.spool.queue_ids(), ids)
        self.assertEqual(sorted(ids), ids)

    @inlineCallbacks
    def test_files_are_0600_and_directories_0700(self):
        queue_id = yield self.store_message()
        yield self.spool.save_state(queue_id, {"tries": 1})
        yield self.spool.hold(queue_id)
        for name in ("tmp", "queue", "state", "hold", "corrupt", "control"):
            self.assertEqual(stat.S_IMODE(os.stat(self.directory / name).st_mode), 0o700, name)
        for path in (f"queue/{queue_id}", f"state/{queue_id}.json", f"hold/{queue_id}"):
            self.assertEqual(stat.S_IMODE(os.stat(self.directory / path).st_mode), 0o600, path)

    def test_write_after_commit_is_refused(self):
        message_writer = self.spool.new_message(make_envelope())
        d = message_writer.commit()
        self.assertRaises(RuntimeError, message_writer.write, b"late")
        return d

    def test_queue_ids_are_16_characters_unique_and_increasing_even_with_a_stuck_clock(self):
        generator = QueueIdGenerator(lambda: 1767225600.0)
        ids = [generator.next_id() for _ in range(1000)]
        self.assertTrue(all(len(i) == 16 and is_valid_queue_id(i) for i in ids))
        self.assertEqual(sorted(set(ids)), ids)

    def test_malformed_queue_ids_never_reach_the_file_system(self):
        for bad in ("../queue/x", "", "0" * 15, "0" * 15 + "/", "0" * 15 + "I", None):
            self.assertFalse(self.spool.exists(bad))
            self.assertRaises(UnknownMessage, self.spool.load, bad)
            self.assertRaises(UnknownMessage, self.spool.remove, bad)
            self.assertRaises(UnknownMessage, self.spool.hold, bad)

    def test_unknown_message_is_a_key_error(self):
        self.assertRaises(KeyError, self.spool.load, "0" * 16)


class LargeMessageTests(SpoolTestCase):

    @inlineCallbacks
    def test_20_mib_message_is_streamed_through_a_bounded_buffer(self):
        base = os.urandom(64 * 1024)
        expected = hashlib.sha256()
        message_writer = self.spool.new_message(make_envelope())
        tracemalloc.start()
        try:
            for n in range(320):
                piece = n.to_bytes(4, "big") + base[4:]
                expected.update(piece)
                message_writer.write(piece)
                self.assertLessEqual(message_writer.buffered, BUFFER_LIMIT)
                del piece
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 1024 * 1024)               # 20 MiB went through well under 1 MiB
        queue_id = yield message_writer.commit()
        message = self.spool.load(queue_id)
        self.assertEqual(message.size, 20 * 1024 * 1024)
        actual = hashlib.sha256()
        with message.open() as f:
            for chunk in iter(lambda: f.read(1024 * 1024), b""):
                actual.update(chunk)
        self.assertEqual(actual.hexdigest(), expected.hexdigest())


class OctetsTests(SpoolTestCase):
    """The spool notes whether the content has 8-bit octets and keeps it in the envelope (`octets`)."""

    @inlineCallbacks
    def test_ascii_content_is_7bit_and_8bit_content_is_8bit_whatever_body_says(self):
        ids = []
        for content, declared in ((b"Subject: hi\r\n\r\nplain\r\n", "8BITMIME"),
                                  (b"Subject: hi\r\n\r\ncaf\xc3\xa9\r\n", "7BIT")):
            message_writer = self.spool.new_message(make_envelope(body=declared))
            message_writer.write(content)
            ids.append((yield message_writer.commit()))
        seven, eight = ids
        self.assertEqual(self.spool.load(seven).envelope.octets, "7bit")
        self.assertEqual(self.spool.load(eight).envelope.octets, "8bit")      # undeclared, but known

    @inlineCallbacks
    def test_a_spilled_message_gets_its_envelope_patched_at_commit(self):
        for last in (b"\xff\r\n", b"ascii\r\n"):
            message_writer = self.spool.new_message(make_envelope())
            message_writer.write(b"x" * 998 + b"\r\n")
            for _ in range(3 * BUFFER_LIMIT // 1000):
                message_writer.write(b"y" * 998 + b"\r\n")     # on disk before any 8-bit octet came
            path = self.directory / "queue" / message_writer.queue_id
            self.assertIn(b'"octets":"????"', path.read_bytes()[:4096])
            message_writer.write(last)
            queue_id = yield message_writer.commit()
            message = Spool(self.directory).load(queue_id)      # a fresh reader: from the file, not memory
            self.assertEqual(message.envelope.octets, "8bit" if last.startswith(b"\xff") else "7bit")
            with message.open() as f:
                self.assertTrue(f.read().endswith(b"y\r\n" + last))

    def test_a_spool_file_from_before_the_field_still_loads_as_unknown(self):
        old = make_envelope()
        line = old.to_json().replace(b',"octets":null', b"")
        self.assertNotIn(b"octets", line)
        body = b"Subject: old\r\n\r\ncaf\xc3\xa9\r\n"
        (self.directory / "queue" / "0000000001AB").write_bytes(
            MAGIC + files.encode_size(len(body)) + b"\n" + line + b"\n" + body)
        self.assertEqual(check_file(self.directory / "queue" / "0000000001AB").envelope, old)
        self.assertIsNone(old.octets)


class LongLinesTests(SpoolTestCase):
    """The spool notes whether a line is longer than 998 octets (`long_lines`), as it notes `octets`."""

    @inlineCallbacks
    def test_a_message_in_memory_notes_its_long_lines(self):
        for content, expected in ((b"Subject: hi\r\n\r\n" + b"x" * 998 + b"\r\n", False),
                                  (b"Subject: hi\r\n\r\n" + b"x" * 999 + b"\r\n", True)):
            message_writer = self.spool.new_message(make_envelope())
            for i in range(0, len(content), 100):
                message_writer.write(content[i:i + 100])        # lines split across pieces
            queue_id = yield message_writer.commit()
            self.assertIs(Spool(self.directory).load(queue_id).envelope.long_lines, expected)

    @inlineCallbacks
    def test_a_spilled_message_gets_long_lines_patched_in_and_loads(self):
        for last, expected in ((b"y" * 5000 + b"\r\n", True), (b"short\r\n", False)):
            message_writer = self.spool.new_message(make_envelope())
            for _ in range(3 * BUFFER_LIMIT // 1000):
                message_writer.write(b"y" * 998 + b"\r\n")     # on disk before the long line came
            path = self.directory / "queue" / message_writer.queue_id
            self.assertIn(b'"long_lines":false', path.read_bytes()[:4096])
            message_writer.write(last)
            queue_id = yield message_writer.commit()
            message = Spool(self.directory).load(queue_id)      # a fresh reader: from the file, not memory
            self.assertIs(message.envelope.long_lines, expected)
            with message.open() as f:
                self.assertTrue(f.read().endswith(b"y\r\n" + last))

    def test_a_spool_file_from_before_the_field_loads_as_unknown(self):
        old = make_envelope(octets="7bit")
        line = old.to_json().replace(b',"long_lines":null', b"")
        self.assertNotIn(b"long_lines", line)
        body = b"Subject: old\r\n\r\nbody\r\n"
        (self.directory / "queue" / "0000000001AB").write_bytes(
            MAGIC + files.encode_size(len(body)) + b"\n" + line + b"\n" + body)
        self.assertIsNone(check_file(self.directory / "queue" / "0000000001AB").envelope.long_lines)

    def test_the_line_watch_agrees_with_splitting_lines_however_the_pieces_fall(self):
        import random
        rng = random.Random(7)
        for _ in range(3000):
            lines = [b"a" * rng.choice((0, 5, 499, 500, 501, 997, 998, 999, 1000, 1498, 1999, 3000))
                     + rng.choice((b"\r\n", b"\n")) for _ in range(rng.randint(1, 12))]
            data = b"".join(lines) + b"t" * rng.choice((0, 998, 1000, 1001))
            expected = any(len(line) - (2 if line.endswith(b"\r\n") else 1) > 998 for line in lines) or \
                len(data) - len(b"".join(lines)) > 999    # an unfinished last line: its CRLF may still come
            watch = writer.LineWatch()
            cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 8))))
            for a, b in zip([0] + cuts, cuts + [len(data)]):
                watch.feed(data[a:b])
            self.assertEqual(watch.found, expected, (lines, cuts))


class GroupCommitTests(SpoolTestCase):
    """With `directory_fsync = "always"`: POSIX's way, whatever the filesystem."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.spool = self.start_spool(directory_fsync="always")

    def count_fsyncs(self) -> dict:
        counts = {"file": 0, "directory": 0, "on_reactor_thread": 0}
        real_fsync = os.fsync

        def fsync(fd):
            kind = "directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
            counts[kind] += 1
            counts["on_reactor_thread"] += threading.current_thread() is threading.main_thread()
            return real_fsync(fd)
        self.patch(os, "fsync", fsync)
        return counts

    def test_a_commit_on_an_idle_spool_starts_at_once(self):
        message_writer = self.spool.new_message(make_envelope())
        message_writer.write(b"alone\r\n")
        d = message_writer.commit()
        self.assertEqual((self.spool._jobs, self.spool.batch_count), (1, 1))   # in the pool already
        return d

    @inlineCallbacks
    def test_commits_in_one_reactor_turn_share_one_batch_and_one_directory_fsync(self):
        counts = self.count_fsyncs()
        writers = [self.spool.new_message(make_envelope()) for _ in range(10)]
        for n, message_writer in enumerate(writers):
            message_writer.write(b"message %d\r\n" % n)
        ids = yield gatherResults([w.commit() for w in writers])
        self.assertEqual(ids, [w.queue_id for w in writers])
        # The first found the disk idle and went at once; the nine asked for while it ran went together.
        self.assertEqual((self.spool.batch_count, self.spool.largest_batch), (2, 9))
        self.assertEqual((counts["file"], counts["directory"]), (10, 2))
        for n, queue_id in enumerate(ids):
            self.assertEqual(read_body(self.spool.load(queue_id)), b"message %d\r\n" % n)

    @inlineCallbacks
    def test_commits_in_different_turns_are_different_batches(self):
        yield self.store_message(b"one")
        yield task.deferLater(reactor, 0, lambda: None)
        yield self.store_message(b"two")
        self.assertEqual(self.spool.batch_count, 2)

    @inlineCallbacks
    def test_each_commit_fires_only_once_its_own_file_is_in_the_queue(self):
        writers = [self.spool.new_message(make_envelope()) for _ in range(3)]
        seen = []

        def check(queue_id):
            seen.append(queue_id)
            self.assertTrue((self.directory / "queue" / queue_id).is_file())
        yield gatherResults([w.commit().addCallback(check) for w in writers])
        self.assertEqual(len(seen), 3)

    @inlineCallbacks
    def test_fsync_never_runs_on_the_reactor_thread(self):
        counts = self.count_fsyncs()
        queue_id = yield self.store_message(b"x" * (3 * BUFFER_LIMIT))
        yield self.spool.save_state(queue_id, {"a": 1})
        yield self.spool.hold(queue_id)
        yield self.spool.release(queue_id)
        yield self.spool.remove(queue_id)
        self.assertGreater(counts["file"] + counts["directory"], 5)
        self.assertEqual(counts["on_reactor_thread"], 0)

    @inlineCallbacks
    def test_failed_file_fsync_fails_that_commit_only_and_leaves_nothing(self):
        real_finish = files.finish_message
        good, bad = self.spool.new_message(make_envelope()), self.spool.new_message(make_envelope())

        def finish(job):
            if job.queue_id != bad.queue_id:
                return real_finish(job)
            os.close(job.fd)
            raise OSError(5, "Input/output error")
        self.patch(files, "finish_message", finish)
        good.write(b"good")
        bad.write(b"x" * (BUFFER_LIMIT + 10))            # has its file in queue/ already, in progress
        self.assertEqual(files_in(self.directory / "queue"), [bad.queue_id])
        bad_result = bad.commit()
        good_id = yield good.commit()
        yield self.assertFailure(bad_result, OSError)
        bad.abort()
        bad.abort()
        self.assertEqual(self.spool.queue_ids(), [good_id])
        self.assertEqual(files_in(self.directory / "tmp"), [])

    @inlineCallbacks
    def test_failed_directory_fsync_fails_the_batch_and_takes_the_files_back(self):
        def broken(path):
            raise OSError(5, "Input/output error")
        self.patch(files, "fsync_directory", broken)
        writers = [self.spool.new_message(make_envelope()) for _ in range(2)]
        results = [w.commit() for w in writers]
        for d in results:
            yield self.assertFailure(d, OSError)
        self.assertEqual(self.spool.queue_ids(), [])
        self.assertEqual(files_in(self.directory / "tmp"), [])

    @inlineCallbacks
    def test_write_error_is_reported_by_commit_not_by_write(self):
        def disk_full(fd, data):
            raise OSError(28, "No space left on device")
        self.patch(writer, "write_all", disk_full)
        message_writer = self.spool.new_message(make_envelope())
        message_writer.write(b"x" * (BUFFER_LIMIT + 1))    # must not raise into the SMTP session
        message_writer.write(b"more")
        yield self.assertFailure(message_writer.commit(), OSError)
        message_writer.abort()
        self.assertEqual(files_in(self.directory / "tmp"), [])
        self.assertEqual(self.spool.queue_ids(), [])

    @inlineCallbacks
    def test_stop_service_waits_for_commits_in_flight(self):
        message_writer = self.spool.new_message(make_envelope())
        message_writer.write(b"in flight")
        committed = message_writer.commit()
        yield self.spool.stopService()
        self.assertTrue(committed.called)
        self.assertEqual(self.spool.queue_ids(), [message_writer.queue_id])
        yield committed


class AbortTests(SpoolTestCase):

    def test_abort_removes_the_file_being_written_and_is_idempotent(self):
        message_writer = self.spool.new_message(make_envelope())
        message_writer.write(b"x" * (2 * BUFFER_LIMIT))
        self.assertEqual(files_in(self.directory / "queue"), [message_writer.queue_id])   # in progress
        message_writer.abort()
        message_writer.abort()
        self.assertEqual(files_in(self.directory / "queue"), [])
        self.assertEqual(self.spool.queue_ids(), [])
        self.assertRaises(RuntimeError, message_writer.commit)

    @inlineCallbacks
    def test_abort_after_a_successful_commit_keeps_the_message(self):
        message_writer = self.spool.new_message(make_envelope())
        queue_id = yield message_writer.commit()
        message_writer.abort()
        self.assertTrue(self.spool.exists(queue_id))


class PoolFailureTests(SpoolTestCase):

    @inlineCallbacks
    def test_a_thread_pool_that_refuses_work_fails_the_commit_instead_of_hanging_it(self):
        def refuse(*args, **kwargs):
            raise RuntimeError("pool stopped")

        self.patch(self.spool._pool, "run", refuse)
        writer = self.spool.new_message(Envelope("a@example.org", ("b@example.net",), 0.0))
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        with self.assertRaises(RuntimeError):
            yield writer.commit()
        self.assertEqual(self.spool._jobs, 0)        # stopService will not wait for a job that never ran
        self.flushLoggedErrors(RuntimeError)


class DirectoryFsyncTests(SpoolTestCase):
    """`[queue] directory_fsync = "auto"`: no fsync of queue/ where the file's own fsync makes its name
    durable (ext4, XFS: spool/fsinfo.py), the directory fsync everywhere else."""

    count_fsyncs = GroupCommitTests.count_fsyncs

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())

    @inlineCallbacks
    def commit_three(self, durable: bool, mode: str = "auto") -> dict:
        self.patch(store, "names_durable_with_file_fsync", lambda path: durable)
        self.spool = self.start_spool(directory_fsync=mode)
        counts = self.count_fsyncs()
        writers = [self.spool.new_message(make_envelope()) for _ in range(3)]
        for each in writers:
            each.write(b"body\r\n")
        ids = yield gatherResults([w.commit() for w in writers])
        for queue_id in ids:
            self.assertEqual(read_body(self.spool.load(queue_id)), b"body\r\n")
        return counts

    @inlineCallbacks
    def test_auto_on_ext4_or_xfs_leaves_the_directory_fsync_out(self):
        counts = yield self.commit_three(durable=True)
        self.assertEqual((counts["file"], counts["directory"]), (3, 0))
        self.assertFalse(self.spool.sync_directory)

    @inlineCallbacks
    def test_auto_elsewhere_keeps_one_directory_fsync_per_batch(self):
        counts = yield self.commit_three(durable=False)
        self.assertEqual((counts["file"], counts["directory"]), (3, 2))

    @inlineCallbacks
    def test_always_keeps_it_even_on_ext4(self):
        counts = yield self.commit_three(durable=True, mode="always")
        self.assertEqual((counts["file"], counts["directory"]), (3, 2))


class RemovalTests(SpoolTestCase):

    @inlineCallbacks
    def test_removal_is_done_once_unlinked_and_its_directory_fsyncs_are_shared(self):
        import threading


        from mailrelay.spool import store

        synced, release = [], threading.Event()
        real = store._fsync_all

        def blocking_fsync(directories):
            synced.append(directories)
            if len(synced) == 1:
                release.wait(10)      # the first directory fsync is slow: removals pile up behind it
            real(directories)

        self.patch(store, "_fsync_all", blocking_fsync)
        self.patch(store, "REMOVAL_SYNC_DELAY", 0.05)
        ids = []
        for _ in range(6):
            queue_id = yield self.store_message()
            ids.append(queue_id)
        yield self.spool.save_state(ids[0], {"bob@example.net": {"attempts": 1}})
        yield gatherResults([self.spool.remove(queue_id) for queue_id in ids[:3]])
        self.assertFalse(any(self.spool.exists(queue_id) for queue_id in ids[:3]))  # gone before any fsync
        self.assertEqual(synced, [])
        yield eventually(lambda: synced, timeout=2, interval=0.01)
        # One fsync for the three, of exactly the directories they changed (no hold flags were there).
        self.assertEqual(synced, [tuple(sorted((self.directory / "queue", self.directory / "state")))])
        yield gatherResults([self.spool.remove(queue_id) for queue_id in ids[3:]])  # during the slow one
        release.set()
        yield eventually(lambda: len(synced) == 2, timeout=2, interval=0.01)
        self.assertEqual(synced[1], (self.directory / "queue",))   # one more, for all three
        yield self.spool.stopService()
        self.assertEqual(len(synced), 2)

    @inlineCallbacks
    def test_a_clean_stop_syncs_removals_still_waiting_for_their_fsync(self):
        from mailrelay.spool import store

        synced = []
        self.patch(store, "_fsync_all", synced.append)
        self.patch(store, "REMOVAL_SYNC_DELAY", 3600)
        queue_id = yield self.store_message()
        yield self.spool.remove(queue_id)
        self.assertEqual(synced, [])
        yield self.spool.stopService()
        self.assertEqual(synced, [(self.directory / "queue",)])


class StateTests(SpoolTestCase):

    @inlineCallbacks
    def test_save_state_replaces_the_whole_state(self):
        queue_id = yield self.store_message()
        yield self.spool.save_state(queue_id, {"bob@example.net": {"attempts": 1}, "carol@example.com": {}})
        yield self.spool.save_state(queue_id, {"bob@example.net": {"attempts": 2}})
        self.assertEqual(self.spool.load(queue_id).state, {"bob@example.net": {"attempts": 2}})
        self.assertEqual(files_in(self.directory / "tmp"), [])
        self.assertEqual(files_in(self.directory / "state"), [f"{queue_id}.json"])

    @inlineCallbacks
    def test_saves_asked_for_together_land_in_order(self):
        queue_id = yield self.store_message()
        yield gatherResults([self.spool.save_state(queue_id, {"version": n}) for n in range(20)])
        self.assertEqual(self.spool.load(queue_id).state, {"version": 19})

    @inlineCallbacks
    def test_an_unreadable_state_is_reported_never_guessed(self):
        queue_id = yield self.store_message()
        for garbage in (b'{"half', b"[1, 2]"):
            write_raw(self.directory / "state" / f"{queue_id}.json", garbage)
            self.assertRaises(CorruptMessage, self.spool.load, queue_id)
        self.assertTrue(self.spool.exists(queue_id))

    @inlineCallbacks
    def test_save_state_of_an_unknown_message_fails(self):
        yield self.assertFailure(self.spool.save_state("0" * 16, {}), UnknownMessage)
        self.assertEqual(files_in(self.directory / "state"), [])

    @inlineCallbacks
    def test_save_state_refuses_what_json_cannot_hold(self):
        queue_id = yield self.store_message()
        yield self.assertFailure(self.spool.save_state(queue_id, {"x": object()}), TypeError)

    @inlineCallbacks
    def test_remove_deletes_message_state_and_hold_flag(self):
        queue_id = yield self.store_message()
        yield self.spool.save_state(queue_id, {"a": 1})
        yield self.spool.hold(queue_id)
        yield self.spool.remove(queue_id)
        self.assertFalse(self.spool.exists(queue_id))
        self.assertRaises(UnknownMessage, self.spool.load, queue_id)
        yield self.assertFailure(self.spool.remove(queue_id), UnknownMessage)
        for name in ("queue", "state", "hold"):
            self.assertEqual(files_in(self.directory / name), [], name)

    @inlineCallbacks
    def test_a_state_save_racing_a_remove_leaves_no_orphan(self):
        queue_id = yield self.store_message()
        saved = self.spool.save_state(queue_id, {"a": 1})
        yield self.spool.remove(queue_id)
        yield saved
        self.assertEqual(files_in(self.directory / "state"), [])


class HoldTests(SpoolTestCase):

    @inlineCallbacks
    def test_hold_and_release_persist_across_spool_instances(self):
        queue_id = yield self.store_message()
        yield self.spool.hold(queue_id)
        self.assertTrue(self.spool.load(queue_id).held)
        yield self.spool.stopService()

        second = self.start_spool()
        self.assertTrue(second.load(queue_id).held)
        self.assertEqual(second.queue_ids(), [queue_id])         # held messages are still listed
        yield second.release(queue_id)
        yield second.stopService()

        self.assertFalse(Spool(self.directory).load(queue_id).held)

    def test_hold_of_an_unknown_message_is_refused(self):
        self.assertRaises(UnknownMessage, self.spool.hold, "0" * 16)
        self.assertRaises(UnknownMessage, self.spool.release, "0" * 16)


def write_raw(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600)


class RecoveryTests(unittest.TestCase):

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.offline = Spool(self.directory)      # not started: every operation runs synchronously

    def commit_offline(self, body: bytes) -> str:
        message_writer = self.offline.new_message(make_envelope())
        message_writer.write(body)
        return self.successResultOf(message_writer.commit())

    def test_recovery_removes_torn_temp_files_and_orphans_and_quarantines_bad_queue_files(self):
        first, second = self.commit_offline(b"first"), self.commit_offline(b"second")
        self.successResultOf(self.offline.save_state(first, {"kept": True}))
        queue, orphan = self.directory / "queue", "0" * 16
        good_bytes = (queue / second).read_bytes()
        write_raw(queue / ("1" * 16), good_bytes[:-3])                                    # torn
        write_raw(queue / ("2" * 16), b"From: someone else's file\r\n")                  # foreign
        write_raw(queue / "not-a-queue-id", good_bytes)                                   # foreign name
        write_raw(self.directory / "tmp" / f"{'3' * 16}.msg", good_bytes[:40])            # torn temp
        write_raw(self.directory / "tmp" / "state.json.1a2b.tmp", b'{"half')              # torn state
        write_raw(self.directory / "state" / f"{orphan}.json", b"{}")
        write_raw(self.directory / "state" / f"{'1' * 16}.json", b'{"of": "torn"}')
        write_raw(self.directory / "hold" / orphan, b"")

        self.assertRaises(CorruptMessage, self.offline.load, "1" * 16)
        recovered = Spool(self.directory).recover()

        self.assertEqual(recovered, [first, second])
        self.assertEqual(files_in(queue), [first, second])
        self.assertEqual(files_in(self.directory / "tmp"), [])
        self.assertEqual(files_in(self.directory / "state"), [f"{first}.json"])
        self.assertEqual(files_in(self.directory / "hold"), [])
        self.assertEqual(files_in(self.directory / "corrupt"),
                         ["1" * 16, f"{'1' * 16}.json", "2" * 16, "not-a-queue-id"])
        self.assertEqual((self.directory / "corrupt" / ("1" * 16)).read_bytes(), good_bytes[:-3])
        self.assertEqual(self.offline.load(first).state, {"kept": True})
        self.assertEqual(read_body(self.offline.load(second)), b"second")

    def test_messages_cut_short_while_being_received_are_removed_not_quarantined(self):
        from mailrelay.spool.message import IN_PROGRESS, SIZE_DIGITS, SIZE_OFFSET

        kept = self.commit_offline(b"kept")
        queue = self.directory / "queue"
        good = (queue / kept).read_bytes()
        in_progress = good[:SIZE_OFFSET] + IN_PROGRESS + good[SIZE_OFFSET + SIZE_DIGITS:]
        write_raw(queue / ("4" * 16), in_progress)               # its commit never wrote the size
        write_raw(queue / ("5" * 16), b"")                        # created, nothing written yet
        write_raw(queue / ("6" * 16), good[:12])                  # half a magic line
        write_raw(self.directory / "hold" / ("4" * 16), b"")      # (a hold flag for it goes too)
        report = Spool(self.directory)
        self.assertEqual(report.recover(), [kept])
        self.assertEqual(files_in(queue), [kept])
        self.assertEqual(files_in(self.directory / "corrupt"), [])
        self.assertEqual(files_in(self.directory / "hold"), [])
        self.assertEqual(report.recovery_report.torn_temp_files, 3)

    def test_start_service_runs_recovery(self):
        queue_id = self.commit_offline(b"kept")
        write_raw(self.directory / "tmp" / "x.msg", b"torn")
        spool = Spool(self.directory)
        spool.startService()
        self.addCleanup(spool.stopService)
        self.assertEqual(spool.recovery_report.queued, (queue_id,))
        self.assertEqual(spool.recovery_report.torn_temp_files, 1)
        self.assertRaises(RuntimeError, spool.recover)     # never while receiving

    @inlineCallbacks
    def test_a_deep_spool_is_recovered_in_a_thread_and_mail_received_meanwhile_is_untouched(self):
        from mailrelay.spool.message import IN_PROGRESS, SIZE_DIGITS, SIZE_OFFSET

        self.patch(store, "RECOVER_IN_BACKGROUND", 2)
        kept = [self.commit_offline(b"kept %d" % n) for n in range(3)]
        queue = self.directory / "queue"
        good = (queue / kept[0]).read_bytes()
        write_raw(queue / ("4" * 16), good[:SIZE_OFFSET] + IN_PROGRESS + good[SIZE_OFFSET + SIZE_DIGITS:])
        write_raw(queue / ("2" * 16), b"From: someone else's file\r\n")
        write_raw(self.directory / "state" / f"{'0' * 16}.json", b"{}")                 # orphan
        spool = Spool(self.directory, reactor=reactor)
        gate = threading.Event()
        self.patch(store.recovery, "recover",
                   lambda paths, names, recover=store.recovery.recover: gate.wait(10) and recover(paths, names))
        spool.startService()
        self.addCleanup(spool.stopService)
        self.assertIsNone(spool.recovery_report)             # not yet: the relay already serves
        self.assertRaises(UnknownMessage, spool.load, "4" * 16)  # a leftover in progress: "not there yet"
        writer = spool.new_message(Envelope("a@example.org", ("b@example.net",), 0.0))
        writer.write(b"received while recovering\r\n")
        fresh = yield writer.commit()
        yield spool.save_state(fresh, {"new": True})
        gate.set()
        report = yield spool.recovered
        self.assertEqual(report.queued, tuple(kept))
        self.assertEqual(files_in(queue), sorted([*kept, fresh]))
        self.assertEqual(files_in(self.directory / "state"), [f"{fresh}.json"])
        self.assertEqual(files_in(self.directory / "corrupt"), ["2" * 16])
        self.assertEqual(spool.load(fresh).state, {"new": True})

    def test_a_quarantined_name_never_overwrites_an_earlier_one(self):
        (self.directory / "queue").mkdir(parents=True)
        write_raw(self.directory / "queue" / "junk", b"one")
        Spool(self.directory).recover()
        write_raw(self.directory / "queue" / "junk", b"two")
        Spool(self.directory).recover()
        self.assertEqual((self.directory / "corrupt" / "junk").read_bytes(), b"one")
        self.assertEqual((self.directory / "corrupt" / "junk.1").read_bytes(), b"two")

    def test_a_file_with_a_wrong_size_or_envelope_is_corrupt(self):
        queue_id = self.commit_offline(b"body")
        path = self.directory / "queue" / queue_id
        good = path.read_bytes()
        for bad in (good + b"extra", good.replace(b"size=0", b"size=x", 1),
                    good.replace(b'"sender"', b'"Sender"', 1), b"MAILRELAY-SPOOL/2" + good[17:]):
            write_raw(path, bad)
            self.assertRaises(CorruptMessage, self.offline.load, queue_id)


class LockTests(SpoolTestCase):

    def test_a_second_spool_on_the_same_directory_refuses_to_start(self):
        self.assertTrue(Spool.in_use(self.directory))
        self.assertRaises(SpoolLocked, Spool(self.directory).startService)

    def test_recovery_is_refused_while_a_relay_runs_on_the_spool(self):
        message_writer = self.spool.new_message(make_envelope())
        message_writer.write(b"x" * (BUFFER_LIMIT + 1))       # a message being received, in queue/
        self.assertRaises(SpoolLocked, Spool(self.directory).recover)
        self.assertEqual(files_in(self.directory / "queue"), [message_writer.queue_id])
        message_writer.abort()

    @inlineCallbacks
    def test_the_lock_is_released_at_stop(self):
        yield self.spool.stopService()
        self.assertFalse(Spool.in_use(self.directory))


class ControlTests(SpoolTestCase):

    def test_requests_round_trip_oldest_first_and_are_taken_once(self):
        cli = Spool(self.directory)               # the CLI's own instance, never started
        cli.post_request("flush")
        cli.post_request("hold", "0123456789ABCDEF")
        self.assertEqual(self.spool.take_requests(), [("flush", None), ("hold", "0123456789ABCDEF")])
        self.assertEqual(self.spool.take_requests(), [])
        self.assertEqual(self.spool.request_dir, self.directory / "control")

    def test_junk_in_the_control_directory_is_dropped_and_dot_files_left_alone(self):
        control = self.spool.request_dir
        write_raw(control / "junk", b"")
        write_raw(control / "00000000000000000001-zzzzzzzz.flush", b"")
        write_raw(control / ".being-written", b"")
        self.spool.post_request("flush")
        self.assertEqual(self.spool.take_requests(), [("flush", None)])
        self.assertEqual(files_in(control), [".being-written"])

    def test_bad_verbs_and_ids_are_refused_by_the_poster(self):
        self.assertRaises(ValueError, self.spool.post_request, "flush;rm")
        self.assertRaises(ValueError, self.spool.post_request, "hold", "../../etc/passwd")
        self.assertEqual(files_in(self.spool.request_dir), [])

    def test_request_names_parse_back(self):
        name = request_name("release", "0123456789ABCDEF", now_ns=5)
        self.assertEqual(parse_request_name(name), ("release", "0123456789ABCDEF"))
        self.assertIsNone(parse_request_name(name + "x"))

    def test_running_relay_sees_a_request_within_one_poll_interval(self):
        clock = task.Clock()
        self.directory = Path(self.mktemp())
        spool = self.start_spool(clock=clock)
        handled = []

        def handler(verb, queue_id):
            handled.append((verb, queue_id))
            if verb == "explode":
                raise ValueError("handler bug")
        spool.watch_requests(handler)
        spool.post_request("explode")
        clock.advance(0.5)
        spool.post_request("flush")
        clock.advance(0.5)
        self.assertEqual(handled, [("explode", None), ("flush", None)])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        spool.stopService()
        spool.post_request("flush")
        clock.advance(5)
        self.assertEqual(len(handled), 2)                 # polling stopped with the service
