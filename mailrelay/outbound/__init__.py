# -*- test-case-name: tests.test_delivery_client, tests.test_mx, tests.test_tlsrpt, tests.test_dane -*-
"""How a message is sent: the SMTP and LMTP client, the connection pool, dot-stuffing and 7-bit
conversion, DNS and MX, smarthosts (with SASL and OAuth2 tokens), DKIM on the way out, and the TLS
policy (MTA-STS, DANE, REQUIRE-TLS) with its SMTP TLS Reporting. It knows nothing of the queue: a job
comes in, results per recipient go back."""
