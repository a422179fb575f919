# -*- test-case-name: tests.test_tlsrpt -*-
"""TLS reports as RFC 8460 defines them: the reporting policy a domain publishes, the JSON report, and
the mail message that carries it.  Pure functions and plain values; no I/O (the sender,
outbound.tlsrpt_send, looks up, spools and posts).

- `parse_record`: `_smtp._tls.DOMAIN` TXT → the `rua` URIs (RFC 8460 section 3).
- `build_report`: the counts of one policy domain for one period (outbound.tlsrpt_store) → the JSON
  report of section 4 (organization-name, date-range, contact-info, report-id, policies[] with summary
  and failure-details).
- `report_filename`, `report_subject`, `build_message`: section 5.1 (the file name), 5.3 (the mail:
  multipart/report; report-type="tlsrpt" with the gzipped report as application/tlsrpt+gzip, the
  TLS-Report-Domain and TLS-Report-Submitter header fields and the "Report Domain: ... Submitter: ...
  Report-ID: <...>" subject).
"""
from __future__ import annotations

import gzip
import json
import re
import secrets
from datetime import datetime, timezone
from email.message import EmailMessage, MIMEPart
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import Any, Iterable, Optional
from urllib.parse import unquote, urlsplit

from mailrelay.outbound.tlsrpt_store import DETAIL_FIELDS, PolicyKey, Tally

MEDIA_TYPE = "application/tlsrpt+gzip"      # RFC 8460 6.4
_VERSION = re.compile(r"v=TLSRPTv1\s*(;|$)")
_ADDRESS = re.compile(r"[^@\s<>()\[\],;:\"]+@[A-Za-z0-9.-]+\Z")


def parse_record(texts: Iterable[str]) -> Optional[list[str]]:
    """The `rua` URIs of a domain's TLSRPT policy, from the TXT strings at _smtp._tls.DOMAIN (each
    record's strings already joined); None when the domain publishes no valid policy.

    RFC 8460 3: records not beginning with "v=TLSRPTv1" are discarded, and unless exactly one remains
    the domain has no policy; fields are "name=value" separated by ";", `rua` a comma-separated list of
    mailto: and https: URIs (others ignored, section 3: "tlsrpt-uri")."""
    records = [t.strip() for t in texts if _VERSION.match(t.strip())]
    if len(records) != 1:
        return None
    fields = {}
    for part in records[0].split(";")[1:]:
        name, sep, value = part.strip().partition("=")
        if sep and name.strip().lower() not in fields:
            fields[name.strip().lower()] = value.strip()
    uris = []
    for uri in fields.get("rua", "").split(","):
        uri = uri.strip()
        scheme = uri.split(":", 1)[0].lower()
        if scheme == "mailto" and mailto_address(uri) is not None:
            uris.append(uri)
        elif scheme == "https" and urlsplit(uri).hostname:
            uris.append(uri)
    return uris or None


def mailto_address(uri: str) -> Optional[str]:
    """The address of a mailto: URI (RFC 6068: percent-decoded, any ?headers dropped), or None."""
    address = unquote(uri.split(":", 1)[1].split("?", 1)[0]).strip()
    return address if _ADDRESS.match(address) else None


def rfc3339(when: float) -> str:
    """RFC 3339 date-time in UTC, as RFC 8460 4.4's example writes it: 2016-04-01T00:00:00Z."""
    return datetime.fromtimestamp(int(when), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_report_id(begin: float, domain: str, hostname: str) -> str:
    """A unique report-id, shaped like a msg-id (RFC 5322 3.6.4): the subject carries it in <...>."""
    day = datetime.fromtimestamp(int(begin), timezone.utc).strftime("%Y%m%d")
    return f"{day}.{secrets.token_hex(6)}.{domain}@{hostname}"


def build_report(hostname: str, domain: str, begin: float, end: float, tallies: dict[PolicyKey, Tally],
                 report_id: str) -> dict:
    """The RFC 8460 section 4 report of `tallies` (all of policy domain `domain`) for [begin, end)."""
    policies = []
    for (policy_domain, kind, strings, host), tally in sorted(tallies.items()):
        policy = {"policy-type": kind, "policy-string": list(strings), "policy-domain": policy_domain}
        if kind == "sts":
            # RFC 8460 4.4 (erratum 6241: a list): an MTA-STS policy's own "mx" patterns.
            policy["mx-host"] = [s.split(":", 1)[1].strip() for s in strings if s.lower().startswith("mx:")]
        elif host:
            policy["mx-host"] = [host]
        entry: dict[str, Any] = {"policy": policy,
                 "summary": {"total-successful-session-count": tally.successes,
                             "total-failure-session-count": tally.failures}}
        details = [_detail(row, count) for row, count in sorted(tally.details.items())]
        if details:
            entry["failure-details"] = details
        policies.append(entry)
    return {
        "organization-name": hostname,
        "date-range": {"start-datetime": rfc3339(begin), "end-datetime": rfc3339(max(begin, end - 1))},
        "contact-info": f"postmaster@{hostname}",
        "report-id": report_id,
        "policies": policies,
    }


def _detail(row: tuple, count: int) -> dict:
    """One failure-details entry (RFC 8460 4.4): only the fields known, and the session count."""
    detail = {"result-type": row[0]}
    if row[1]:
        detail["receiving-mx-hostname"] = row[1]
    for name, value in zip(DETAIL_FIELDS, row[2:]):
        if value:
            detail[name] = value
    detail["failed-session-count"] = count
    return detail


def report_bytes(report: dict) -> bytes:
    """The report gzipped (RFC 8460 5.1: "application/tlsrpt+gzip"); mtime 0, so equal reports are equal."""
    return gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)


def report_filename(hostname: str, domain: str, begin: float, end: float, unique: str) -> str:
    """RFC 8460 5.1: sender "!" policy-domain "!" begin-timestamp "!" end-timestamp "!" unique-id
    ".json.gz" — timestamps in seconds since the epoch, unique-id of [A-Za-z0-9+/=]."""
    unique = re.sub(r"[^A-Za-z0-9+/=]", "", unique) or secrets.token_hex(6)
    return f"{hostname}!{domain}!{int(begin)}!{int(max(begin, end - 1))}!{unique}.json.gz"


def report_subject(domain: str, hostname: str, report_id: str) -> str:
    """RFC 8460 5.3: "Report Domain: <policy domain> Submitter: <our domain> Report-ID: <id>"."""
    return f"Report Domain: {domain} Submitter: {hostname} Report-ID: <{report_id}>"


def build_message(hostname: str, domain: str, recipients: list[str], report: dict, gz: bytes,
                  filename: str, now: float) -> bytes:
    """The report as a mail (RFC 8460 5.3), CRLF line ends, ready for the spool.  From postmaster at our
    host name (the "contact-info" of the report); the relay DKIM-signs it like its DSNs when it has a
    key for that domain (RFC 8460 5.3: a report without a valid DKIM signature is ignored)."""
    message = EmailMessage(policy=SMTP)
    message["From"] = f"postmaster@{hostname}"
    message["To"] = ", ".join(recipients)
    message["Date"] = format_datetime(datetime.fromtimestamp(now, timezone.utc))
    message["Subject"] = report_subject(domain, hostname, report["report-id"])
    message["Message-ID"] = make_msgid(domain=hostname)
    message["TLS-Report-Domain"] = domain                 # RFC 8460 5.3
    message["TLS-Report-Submitter"] = hostname
    message["Auto-Submitted"] = "auto-generated"           # RFC 3834 5: no automatic replies to this
    # RFC 8460 5.3: reports must be delivered despite TLS failures; RFC 8689 5 is how a message says so.
    message["TLS-Required"] = "No"
    span = f"{report['date-range']['start-datetime']} to {report['date-range']['end-datetime']}"
    message.set_content(f"This is an aggregate TLS report (RFC 8460) from {hostname}\n"
                        f"about its connections to the mail servers of {domain},\n{span}.\n"
                        f"The report is attached as {filename}\n", cte="7bit")
    message.make_mixed()
    message.set_type("multipart/report")                   # RFC 6522 3, RFC 8460 5.3
    message.set_param("report-type", "tlsrpt")
    part = MIMEPart(policy=SMTP)
    part.set_content(gz, maintype="application", subtype="tlsrpt+gzip", disposition="attachment",
                     filename=filename)
    # typeshed's EmailMessage.attach takes only an EmailMessage; the stdlib attaches any part (a MIMEPart on
    # purpose: EmailMessage.set_content would add a MIME-Version field to the attachment).
    message.attach(part)  # type: ignore[arg-type]
    return message.as_bytes(policy=SMTP)
