# -*- test-case-name: tests.test_config, tests.test_logrelay, tests.test_capabilities -*-
"""mailrelay: an SMTP relay on Twisted.

Embedding: `mailrelay.service.make_service(config)` returns one IService that runs the whole relay.
"""
__version__ = "0.1.0"
