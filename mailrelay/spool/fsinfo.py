# -*- test-case-name: tests.test_spool_fsinfo -*-
"""Which filesystem holds the spool, and whether a new file's own fsync makes its name durable.

Where it sits: inside the spool stage. Spool.startService asks once, for queue/, and `[queue]
directory_fsync = "auto"` uses the answer. In: a path. Out: the type of the filesystem it is on (from
/proc/self/mountinfo, matched by device number), or None when that cannot be told.

POSIX makes a new name durable only through an fsync of its directory (fsync(2)). Two Linux filesystems
make it durable with the new file's own fsync, and their code says so:
- **ext4.** ext4_sync_file() commits the journal transaction in which the inode last changed. The create
  that added the name is in that transaction or an earlier one. Without a journal it calls
  ext4_sync_parent() for a new inode (Linux commit 14ece1028b3e, 2010).
- **XFS.** xfs_file_fsync() forces the log up to the inode's last change, which comes after the create.

Postfix relies on this: it never fsyncs a queue directory. Everything else keeps the directory fsync:
overlay, NFS, btrfs, ext2, tmpfs, and any type that cannot be told.
"""
from __future__ import annotations

import os
from typing import Optional

# Filesystem types (as /proc/self/mountinfo names them) where fsync(file) makes a new file's name durable.
NAME_DURABLE_WITH_FILE_FSYNC = frozenset({"ext4", "xfs"})
MOUNTINFO = "/proc/self/mountinfo"


def filesystem_type(path, mountinfo: str = MOUNTINFO) -> Optional[str]:
    """The type of the filesystem `path` is on ("ext4", "xfs", "overlay", ...), or None."""
    try:
        device = os.stat(path).st_dev
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(device)}:{os.minor(device)}"
    found = None
    for line in lines:
        # proc(5): ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPEROPTIONS
        fields = line.split(" ")
        if len(fields) < 10 or fields[2] != wanted or "-" not in fields[6:]:
            continue
        found = fields[fields.index("-", 6) + 1]        # the last mount of the device is the visible one
    return found


def names_durable_with_file_fsync(path) -> bool:
    """True when a new file under `path` has its name made durable by the file's own fsync."""
    return filesystem_type(path) in NAME_DURABLE_WITH_FILE_FSYNC
