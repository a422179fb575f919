"""Command-line tools: `mailrelay` (check, passwd, queue, dkim, route-test) and `mailrelay-sendmail`."""
