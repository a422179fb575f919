# -*- test-case-name: tests.test_dkim, tests.test_dkim_permit, tests.test_dkim_end_to_end -*-
"""DKIM at the side of the journey (RFC 6376, RFC 8463): sign for our domains, verify what arrives.

`keys` loads RSA and Ed25519 PEM keys, `bodyhash` hashes a spooled body without holding it in memory,
`signer` makes DKIM-Signature headers with dkimpy, `verifier` checks incoming signatures, and `hop` applies
both on the way out, in a thread, to every message a next hop sends.
"""
