"""mailrelay.server.passwords: the password-file checker and the atomic writer."""
from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import argon2
import bcrypt
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailrelay.server import passwords
from mailrelay.server.passwords import PasswordFileChecker, hash_password, set_password
from mailrelay.server.realm import IRelayUser, RelayUser, TemporaryAuthFailure, build_portal


def cheap_argon2id(password: str) -> str:
    """A real argon2id hash with tiny parameters, so the tests stay fast."""
    return argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(password)


def cheap_bcrypt(password: str, prefix: bytes = b"$2b$") -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4))
    return (prefix + hashed[4:]).decode()


class CheckerTestCase(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "passwords"
        self.pool = ThreadPool(minthreads=2, maxthreads=4, name="test-passwords")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.events = []
        self.patch(passwords, "hash_password", cheap_argon2id)   # set_password stays fast

    def checker(self, path=None) -> PasswordFileChecker:
        checker = PasswordFileChecker(path or self.path, threadpool=self.pool)
        checker.log = Logger(observer=self.events.append)
        return checker

    def write(self, *lines: str) -> None:
        self.path.write_text("".join(line + "\n" for line in lines))

    def login(self, checker, user, password):
        return checker.requestAvatarId(UsernamePassword(user, password))

    def log_texts(self) -> list[str]:
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events]

    def count_verifications(self) -> list:
        """Wrap verify_password; return the list of threads it ran in."""
        threads = []
        real = passwords.verify_password

        def wrapped(stored, password):
            threads.append(threading.current_thread())
            return real(stored, password)

        self.patch(passwords, "verify_password", wrapped)
        return threads


class LoginTests(CheckerTestCase):
    @defer.inlineCallbacks
    def test_argon2id_entry_logs_in_and_yields_the_user_name(self):
        self.write(f"alice:{cheap_argon2id('correct horse')}")
        avatar = yield self.login(self.checker(), b"alice", b"correct horse")
        self.assertEqual(avatar, "alice")
        self.assertIsInstance(avatar, str)

    @defer.inlineCallbacks
    def test_bcrypt_2b_2a_and_2y_entries_log_in(self):
        self.write(f"b:{cheap_bcrypt('pw-b', b'$2b$')}", f"a:{cheap_bcrypt('pw-a', b'$2a$')}",
                   f"y:{cheap_bcrypt('pw-y', b'$2y$')}")
        checker = self.checker()
        for user in ("b", "a", "y"):
            avatar = yield self.login(checker, user.encode(), f"pw-{user}".encode())
            self.assertEqual(avatar, user)

    @defer.inlineCallbacks
    def test_bcrypt_password_longer_than_72_bytes_is_checked_on_its_first_72(self):
        long_password = "x" * 72
        self.write(f"carol:{cheap_bcrypt(long_password)}")
        avatar = yield self.login(self.checker(), b"carol", (long_password + "tail").encode())
        self.assertEqual(avatar, "carol")

    @defer.inlineCallbacks
    def test_text_credentials_work_as_well_as_bytes(self):
        self.write(f"dörte:{cheap_argon2id('pässword')}")
        avatar = yield self.login(self.checker(), "dörte", "pässword")
        self.assertEqual(avatar, "dörte")

    def test_wrong_password_is_unauthorized(self):
        self.write(f"alice:{cheap_argon2id('right')}", f"bob:{cheap_bcrypt('right')}")
        checker = self.checker()
        return defer.gatherResults([
            self.assertFailure(self.login(checker, b"alice", b"wrong"), UnauthorizedLogin),
            self.assertFailure(self.login(checker, b"bob", b"wrong"), UnauthorizedLogin),
        ])

    @defer.inlineCallbacks
    def test_unknown_user_is_unauthorized_after_one_full_verification(self):
        self.write(f"alice:{cheap_argon2id('right')}")
        threads = self.count_verifications()
        # even with another user's password: the decoy verification's result never counts
        yield self.assertFailure(self.login(self.checker(), b"mallory", b"right"), UnauthorizedLogin)
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.current_thread())

    @defer.inlineCallbacks
    def test_user_name_that_is_not_utf8_is_unauthorized(self):
        self.write(f"alice:{cheap_argon2id('right')}")
        yield self.assertFailure(self.login(self.checker(), b"\xffalice", b"right"), UnauthorizedLogin)

    def test_empty_password_fails_at_once_without_touching_the_file_or_a_hash(self):
        threads = self.count_verifications()
        checker = self.checker(path=self.dir)      # a directory: reading it would be an error
        d = self.login(checker, b"alice", b"")
        self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(threads, [])
        self.assertEqual(self.events, [])

    @defer.inlineCallbacks
    def test_works_through_the_portal_and_realm(self):
        self.write(f"alice:{cheap_argon2id('pw')}")
        portal = build_portal([self.checker()])
        interface, avatar, logout = yield portal.login(UsernamePassword(b"alice", b"pw"), None, IRelayUser)
        self.assertIs(interface, IRelayUser)
        self.assertEqual(avatar, RelayUser("alice"))

    def test_unreadable_file_is_a_temporary_failure(self):
        checker = self.checker(path=self.dir)      # exists, cannot be read as a file
        self.failureResultOf(self.login(checker, b"alice", b"pw"), TemporaryAuthFailure)


class ThreadingTests(CheckerTestCase):
    @defer.inlineCallbacks
    def test_verification_runs_in_the_given_pool_not_the_reactor_thread(self):
        self.write(f"alice:{cheap_argon2id('pw')}")
        threads = self.count_verifications()
        yield self.login(self.checker(), b"alice", b"pw")
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.current_thread())
        self.assertIn(threads[0], self.pool.threads)

    @defer.inlineCallbacks
    def test_a_slow_verification_does_not_hold_up_another_login(self):
        slow_hash = cheap_argon2id("pw")
        self.write(f"slow:{slow_hash}", f"fast:{cheap_argon2id('pw')}")
        release = threading.Event()
        self.addCleanup(release.set)
        real = passwords.verify_password

        def verify(stored, password):
            if stored == slow_hash:
                release.wait(10)      # stands for a very slow hash; the test sets it well before
            return real(stored, password)

        self.patch(passwords, "verify_password", verify)
        checker = self.checker()
        slow = self.login(checker, b"slow", b"pw")
        fast = yield self.login(checker, b"fast", b"pw")
        self.assertEqual(fast, "fast")
        self.assertNoResult(slow)
        release.set()
        self.assertEqual((yield slow), "slow")

    @defer.inlineCallbacks
    def test_default_pool_is_the_reactors(self):
        from twisted.internet import reactor
        self.write(f"alice:{cheap_argon2id('pw')}")
        threads = self.count_verifications()
        checker = PasswordFileChecker(self.path)
        self.assertEqual((yield self.login(checker, b"alice", b"pw")), "alice")
        self.assertIn(threads[0], reactor.getThreadPool().threads)


class FileTests(CheckerTestCase):
    @defer.inlineCallbacks
    def test_file_is_reread_when_it_changes(self):
        self.write(f"alice:{cheap_argon2id('old')}")
        checker = self.checker()
        self.assertEqual((yield self.login(checker, b"alice", b"old")), "alice")
        set_password(self.path, "alice", "new")
        yield self.assertFailure(self.login(checker, b"alice", b"old"), UnauthorizedLogin)
        self.assertEqual((yield self.login(checker, b"alice", b"new")), "alice")

    @defer.inlineCallbacks
    def test_in_place_edit_of_the_same_size_is_noticed_by_mtime(self):
        self.write(f"alice:{cheap_argon2id('pw')}")
        checker = self.checker()
        yield self.login(checker, b"alice", b"pw")
        entry = self.path.read_text()
        self.path.write_text(entry.replace("alice", "alicf"))
        st = os.stat(self.path)
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        yield self.assertFailure(self.login(checker, b"alice", b"pw"), UnauthorizedLogin)
        self.assertEqual((yield self.login(checker, b"alicf", b"pw")), "alicf")

    @defer.inlineCallbacks
    def test_unchanged_file_is_parsed_once(self):
        self.write(f"alice:{cheap_argon2id('pw')}")
        parses = []
        real = passwords.parse_password_file
        self.patch(passwords, "parse_password_file", lambda *a: parses.append(1) or real(*a))
        checker = self.checker()
        for _ in range(3):
            yield self.login(checker, b"alice", b"pw")
        self.assertEqual(len(parses), 1)

    @defer.inlineCallbacks
    def test_missing_file_means_no_users_logged_once_and_picked_up_when_created(self):
        checker = self.checker()
        yield self.assertFailure(self.login(checker, b"alice", b"pw"), UnauthorizedLogin)
        yield self.assertFailure(self.login(checker, b"alice", b"pw"), UnauthorizedLogin)
        missing = [t for t in self.log_texts() if "does not exist" in t]
        self.assertEqual(len(missing), 1)
        self.assertIn(str(self.path), missing[0])
        set_password(self.path, "alice", "pw")
        self.assertEqual((yield self.login(checker, b"alice", b"pw")), "alice")

    @defer.inlineCallbacks
    def test_malformed_lines_are_skipped_and_logged_by_line_without_the_hash(self):
        good = cheap_argon2id("pw")
        bad_hash = "$argon2id$v=19$m=1024,t=1,p=1$notbase64!!$xx"
        self.write("# users", "", f"alice:{good}", f"bob:{bad_hash}", "no colon here",
                   f"bad user:{good}", "carol:$argon2i$v=19$m=1024,t=1,p=1$c29tZXNhbHQ$aGFzaA",
                   f"dave:{cheap_bcrypt('pw')[:-3]}", f"alice:{cheap_argon2id('other')}")
        checker = self.checker()
        self.assertEqual((yield self.login(checker, b"alice", b"pw")), "alice")
        yield self.assertFailure(self.login(checker, b"bob", b"pw"), UnauthorizedLogin)
        texts = self.log_texts()
        for line in (4, 5, 6, 7, 8):
            self.assertTrue(any(f"{self.path}:{line}: malformed" in t for t in texts), (line, texts))
        self.assertTrue(any(f"{self.path}:9: duplicate" in t for t in texts), texts)
        self.assertFalse(any(p in t for t in texts for p in ("$argon2", "$2b$", "notbase64", good)))

    @defer.inlineCallbacks
    def test_comments_blank_lines_and_surrounding_spaces_are_ignored(self):
        self.write("# comment", "   ", f"  alice:{cheap_argon2id('pw')}  ", "#bob:whatever")
        self.assertEqual((yield self.login(self.checker(), b"alice", b"pw")), "alice")


class WriterTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "passwords"
        self.patch(passwords, "hash_password", cheap_argon2id)   # the defaults: tested once, below

    def stored(self, user: str) -> str:
        return passwords.parse_password_file(self.path.read_bytes(), str(self.path))[user]

    def test_hash_password_is_argon2id_with_library_defaults(self):
        hashed = hash_password("secret")          # the real one, imported before the patch
        self.assertTrue(hashed.startswith("$argon2id$"))
        params, defaults = argon2.extract_parameters(hashed), argon2.PasswordHasher()
        self.assertEqual((params.time_cost, params.memory_cost, params.parallelism),
                         (defaults.time_cost, defaults.memory_cost, defaults.parallelism))
        self.assertTrue(passwords.verify_password(hashed, b"secret"))
        self.assertFalse(passwords.verify_password(hashed, b"Secret"))

    def test_set_password_creates_the_file_with_mode_0600(self):
        set_password(self.path, "alice", "pw")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertTrue(passwords.verify_password(self.stored("alice"), b"pw"))

    def test_set_password_replaces_one_entry_and_keeps_other_lines(self):
        bob = cheap_bcrypt("bob-pw")
        self.path.write_text(f"# relay users\nalice:{cheap_argon2id('old')}\n\n# apps\nbob:{bob}\n")
        os.chmod(self.path, 0o644)
        set_password(self.path, "alice", "new")
        lines = self.path.read_text().splitlines()
        self.assertEqual(lines[0], "# relay users")
        self.assertTrue(lines[1].startswith("alice:$argon2id$"))
        self.assertEqual(lines[2:], ["", "# apps", f"bob:{bob}"])
        self.assertTrue(passwords.verify_password(self.stored("alice"), b"new"))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_set_password_appends_a_new_user(self):
        self.path.write_text("# header\nalice:" + cheap_argon2id("a") + "\n")
        set_password(self.path, "bob", "b")
        lines = self.path.read_text().splitlines()
        self.assertEqual(len(lines), 3)
        self.assertTrue(lines[2].startswith("bob:$argon2id$"))

    def test_set_password_leaves_no_temporary_file_and_replaces_the_inode(self):
        set_password(self.path, "alice", "one")
        inode = os.stat(self.path).st_ino
        set_password(self.path, "alice", "two")
        self.assertNotEqual(os.stat(self.path).st_ino, inode)
        self.assertEqual(os.listdir(self.dir), ["passwords"])

    def test_set_password_refuses_bad_user_names_and_empty_passwords(self):
        for user in ("", "a:b", "a b", "a\tb", "a\nb", "a\x00b", "a\x7fb"):
            self.assertRaises(ValueError, set_password, self.path, user, "pw")
        self.assertRaises(ValueError, set_password, self.path, "alice", "")
        self.assertFalse(self.path.exists())

    def test_failed_write_leaves_the_old_file_and_no_temporary(self):
        self.path.write_text("alice:" + cheap_argon2id("a") + "\n")
        before = self.path.read_bytes()

        def broken_fsync(fd):
            raise OSError(5, "Input/output error")

        self.patch(os, "fsync", broken_fsync)
        self.assertRaises(OSError, set_password, self.path, "alice", "new")
        self.assertEqual(self.path.read_bytes(), before)
        self.assertEqual(os.listdir(self.dir), ["passwords"])
