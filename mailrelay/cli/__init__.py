# -*- test-case-name: tests.test_cli_passwd, tests.test_cli_check, tests.test_throttle_cli -*-
"""Command-line tools: `mailrelay` (check, passwd, queue, dkim, route-test) and `mailrelay-sendmail`."""
