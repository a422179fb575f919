# -*- test-case-name: tests.test_spool, tests.test_spool_crash, tests.test_suppression -*-
"""The durable spool (see store.py): Spool, the messages it holds, and its errors."""
from mailrelay.spool.message import CorruptMessage, SpooledMessage, UnknownMessage
from mailrelay.spool.store import Spool
from mailrelay.spool.files import SpoolLocked

__all__ = ["CorruptMessage", "Spool", "SpoolLocked", "SpooledMessage", "UnknownMessage"]
