# -*- test-case-name: tests.test_server_state -*-
"""What a server session knows, as plain objects: the connection's state and the transaction's.

Its job in the message's journey: none of its own; it is the memory of the session's parts.  The
protocol (session.py) owns one `Connection` and one `Transaction` per client connection and hands both
to its collaborators: the AUTH exchange (auth.py), MAIL/RCPT/DATA and the commit (transaction.py) and
BDAT (bdat.py).  Each part reads what it needs here and writes only what it learns; none of them reaches
into the protocol's attributes.  (The shape of aiosmtpd's Session and Envelope.)

- `Connection`: who the client is (its address and port as the socket or the PROXY header names it, the
  key per-IP limits count it under), what it said in HELO/EHLO, whether TLS is on, who it authenticated
  as, and the counters of the connection.  `forget()` is RFC 3207 4.2: after STARTTLS nothing learned
  before it holds.
- `Transaction`: the envelope under construction, from MAIL FROM to the end of data: the sender and its
  parameters (SIZE, BODY, SMTPUTF8, DSN, REQUIRETLS), the relay identity the policy gave, the accepted
  recipients with their RFC 3461 parameters.  `clear()` ends it (RSET, EHLO, the commit, a refusal).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mailrelay.envelope import ClientInfo
from mailrelay.server.addresses import MailFrom


@dataclass
class Connection:
    """One client connection's state (see the module docstring)."""
    address: str = ""                 # the client's IP as text (IPv4-mapped IPv6 unmapped; PROXY's client)
    port: int = 0
    key: str = ""                     # what per-IP limits count it under (ratelimit.client_key: IPv6 /64)
    listener: str = ""                # the listener's kind: "relay", "submission", "submissions"
    helo: Optional[str] = None        # the name given in HELO/EHLO, None before either
    esmtp: bool = False               # EHLO (not HELO) was the greeting
    tls: bool = False                 # TLS is on: implicit (465), or STARTTLS was accepted
    tls_description: Optional[str] = None   # "<version> <cipher>", once the session has asked the transport
    user: Optional[str] = None        # the authenticated identity, None before a successful AUTH
    user_folded: bool = False         # `user` is a case-insensitive (LDAP) login, already case-folded
    mechanism: str = ""               # the SASL mechanism of the last AUTH begun
    counted: bool = False             # counted in the listener's connection limits (released at close)
    accepted: int = 0                 # messages committed on this connection
    refused: int = 0                  # 4xx/5xx replies counted as refusals on this connection

    def forget(self) -> None:
        """RFC 3207 4.2: after STARTTLS the client starts over; what it said before no longer counts."""
        self.helo, self.esmtp = None, False
        self.user, self.user_folded, self.mechanism = None, False, ""

    def client_info(self) -> ClientInfo:
        """What the policy is told about this client (`tls_description` as last set by the session)."""
        return ClientInfo(address=self.address, port=self.port, helo=self.helo or "", listener=self.listener,
                          user=self.user, user_folded=self.user_folded, tls=self.tls_description)


@dataclass
class Transaction:
    """The envelope under construction (see the module docstring)."""
    mail: Optional[MailFrom] = None   # MAIL FROM as parsed: sender, size, body, smtputf8, params
    identity: Optional[str] = None    # who the client relays as (IRelayPolicy.identify)
    recipients: list[str] = field(default_factory=list)
    rcpt_params: dict[str, dict] = field(default_factory=dict)    # recipient -> NOTIFY / ORCPT (RFC 3461)

    @property
    def open(self) -> bool:
        """MAIL was accepted and the transaction has not ended."""
        return self.mail is not None

    @property
    def sender(self) -> str:
        return self.mail.sender if self.mail is not None else ""

    @property
    def declared_size(self) -> Optional[int]:
        """MAIL FROM's SIZE= (RFC 1870), None when not given."""
        return self.mail.size if self.mail is not None else None

    def begin(self, mail: MailFrom, identity: Optional[str]) -> None:
        self.mail, self.identity = mail, identity
        self.recipients, self.rcpt_params = [], {}

    def add_recipient(self, recipient: str, params: Optional[dict] = None) -> None:
        """An accepted RCPT TO; a recipient given twice is kept once, with its first parameters."""
        if recipient not in self.recipients:
            self.recipients.append(recipient)
            if params:
                self.rcpt_params[recipient] = params     # NOTIFY, ORCPT (RFC 3461 4.1, 4.2)

    def envelope_params(self) -> dict:
        """The DSN and REQUIRETLS requests as the spool keeps them (layout: mailrelay/dsnparams.py)."""
        params = dict(self.mail.params) if self.mail is not None else {}
        rcpts = {r: p for r, p in self.rcpt_params.items() if r in self.recipients}
        if rcpts:
            params["RCPT"] = rcpts
        return params

    def clear(self) -> None:
        """The transaction is over (committed, refused, RSET, HELO/EHLO, STARTTLS)."""
        self.mail, self.identity = None, None
        self.recipients, self.rcpt_params = [], {}
