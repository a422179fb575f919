# -*- test-case-name: tests.test_tlsrpt, tests.test_dane, tests.test_chunking -*-
