"""mailrelay.spool.fsinfo: the spool's filesystem, and whether a file's fsync makes its name durable."""
from __future__ import annotations

import os
from pathlib import Path

from twisted.trial import unittest

from mailrelay.spool.fsinfo import filesystem_type, names_durable_with_file_fsync


class FilesystemType(unittest.TestCase):
    def mountinfo(self, path: Path, fstype: str, extra_optional: str = "") -> str:
        """A mountinfo file (proc(5)) with `path`'s device mounted as `fstype`, after another mount."""
        device = os.stat(path).st_dev
        lines = ["22 27 0:21 / /proc rw,relatime - proc proc rw",
                 f"27 1 {os.major(device)}:{os.minor(device)} / / rw,relatime {extra_optional}- {fstype} /dev/x rw"]
        name = self.mktemp()
        Path(name).write_text("\n".join(lines) + "\n")
        return name

    def test_the_type_is_read_for_the_paths_device(self):
        here = Path(self.mktemp())
        here.mkdir()
        self.assertEqual(filesystem_type(here, self.mountinfo(here, "xfs")), "xfs")
        # optional fields (shared:N master:N) come before the "-" separator
        self.assertEqual(filesystem_type(here, self.mountinfo(here, "ext4", "shared:1 master:2 ")), "ext4")

    def test_no_line_for_the_device_or_no_such_path_is_unknown(self):
        here = Path(self.mktemp())
        here.mkdir()
        other = self.mktemp()
        Path(other).write_text("22 27 0:21 / /proc rw,relatime - proc proc rw\n")
        self.assertIsNone(filesystem_type(here, other))
        self.assertIsNone(filesystem_type(here / "missing", self.mountinfo(here, "ext4")))
        self.assertIsNone(filesystem_type(here, here / "no-mountinfo"))

    def test_this_machines_own_mounts(self):
        if not os.path.exists("/proc/self/mountinfo"):
            raise unittest.SkipTest("no /proc/self/mountinfo")
        self.assertEqual(filesystem_type("/proc"), "proc")
        self.assertFalse(names_durable_with_file_fsync("/proc"))
        here = Path(self.mktemp())
        here.mkdir()
        self.assertEqual(names_durable_with_file_fsync(here), filesystem_type(here) in ("ext4", "xfs"))
