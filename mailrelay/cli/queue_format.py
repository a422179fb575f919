# -*- test-case-name: tests.test_throttle_cli, tests.test_cli_queue -*-
"""What `mailrelay queue list|show` prints: the spool as an operator reads it.

Not a stage of the message's journey but a window on the middle of it: in, `QueueEntry` values (a
spooled message's envelope, size, hold flag and the scheduler's per-recipient state, see
queue/state.py) and the current time; out, text lines or JSON-able dicts.  Pure functions, no I/O:
the caller reads the spool (cli/queue.py) and passes `now`, so tests need no clock.

Everything shown comes from outside: addresses and reply texts from remote servers, header fields from
the message.  The human formats escape control characters so that none of it can drive the operator's
terminal; the JSON format escapes them itself (json.dumps).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from mailrelay.queue.state import MessageState, RecipientState
from mailrelay.envelope import Envelope, domain_of

HEADER_CAP = 64 * 1024        # `show` prints at most this many bytes of the header section
REPLY_WIDTH = 50              # `list` truncates the last reply to this many characters
LISTED_RECIPIENTS = 3         # `list` names up to this many pending recipients, then counts them

# ESC, CSI and the other C0/C1 controls (tab aside) are escaped: a header or a remote server's reply
# text carrying "\x1b]..." must not retitle, recolour or rewrite the operator's terminal
# (CVE-2003-0063 class: terminal escape-sequence injection).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class QueueEntry:
    """One message as the queue CLI sees it.  `problem` says why part of it could not be read (then
    `state`, and maybe `envelope`, is None)."""
    queue_id: str
    envelope: Optional[Envelope]
    size: int
    held: bool
    state: Optional[MessageState]
    problem: Optional[str] = None


def printable(text: str) -> str:
    """`text` with control characters shown as \\xNN (never sent raw to a terminal)."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def human_duration(seconds: float) -> str:
    """A compact length of time, two units at most, rounded down: 45 → "45s", 3725 → "1h2m"."""
    total = max(0, int(seconds))
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if total >= size:
            rest = (total % size) // smaller_size
            return f"{total // size}{unit}" + (f"{rest}{smaller}" if rest else "")
    return f"{total // 60}m" if total >= 60 else f"{total}s"


def human_size(size: int) -> str:
    """842 → "842B", 1536 → "1.5K", 3_500_000 → "3.3M"."""
    for unit, factor in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if size >= factor:
            return f"{size / factor:.1f}{unit}"
    return f"{size}B"


def relative_time(when: float, now: float) -> str:
    """"now" when `when` has come, else "in 20m"."""
    return "now" if when <= now else f"in {human_duration(when - now)}"


def sender_text(envelope: Envelope) -> str:
    return printable(envelope.sender) if envelope.sender else "<>"


def iso_time(when: Optional[float]) -> Optional[str]:
    if when is None:
        return None
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def reply_text(rcpt: RecipientState) -> str:
    last = rcpt.last_reply
    if last is None:
        return ""
    host = f" ({last.remote_host})" if last.remote_host else ""
    return printable(f"{last.code} {last.status} {last.text}{host}".strip())


def truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


# -- list -------------------------------------------------------------------------------------------

def summary_line(count: int, held: int, oldest: Optional[float], now: float) -> str:
    """The last line of `queue list`: how many messages, how many held, how long the oldest has waited."""
    if not count:
        return "queue is empty"
    age = f", oldest {human_duration(now - oldest)}" if oldest is not None else ""
    return f"{count} {'message' if count == 1 else 'messages'}, {held} held{age}"


def list_line(entry: QueueEntry, now: float) -> str:
    held = "  HELD" if entry.held else ""
    if entry.envelope is None:
        return f"{entry.queue_id}  unreadable: {printable(entry.problem or '?')}{held}"
    envelope = entry.envelope
    age = human_duration(now - envelope.received_at)
    head = f"{entry.queue_id}  {age:>5}  {human_size(entry.size):>6}  {sender_text(envelope)} -> "
    if entry.state is None:
        problem = printable(entry.problem or "?")
        return f"{head}{_recipients_text(envelope.recipients)}  state unreadable: {problem}{held}"
    pending = entry.state.pending
    if not pending:
        waiting = "a bounce to report" if entry.state.unreported else "waiting to be removed"
        return f"{head}(no recipient pending: {waiting}){held}"
    attempts = max(r.attempts for r in pending)
    next_attempt = relative_time(min(r.next_attempt for r in pending), now)
    tried = [r for r in pending if r.last_reply is not None]
    last = truncate(reply_text(max(tried, key=lambda r: r.attempts)), REPLY_WIDTH) if tried else "-"
    return (f"{head}{_recipients_text([r.recipient for r in pending])}  attempts {attempts}  "
            f"next {next_attempt}  last {last}{held}")


def paused_note(entry: QueueEntry, paused: dict[str, float], now: float) -> str:
    if entry.state is None or not paused:
        return ""
    domains = sorted({d for d in (domain_of(r.recipient) for r in entry.state.pending) if paused.get(d, 0) > now})
    return "".join(f"  waiting: {printable(d)} paused {human_duration(paused[d] - now)} more" for d in domains)


def _recipients_text(recipients) -> str:
    if len(recipients) > LISTED_RECIPIENTS:
        return f"{len(recipients)} recipients"
    return ", ".join(printable(r) for r in recipients)


# -- JSON -------------------------------------------------------------------------------------------

def entry_dict(entry: QueueEntry) -> dict:
    """Full detail of one message for `--json` (no message content)."""
    result: dict = {"id": entry.queue_id, "size": entry.size, "held": entry.held, "problem": entry.problem}
    envelope = entry.envelope
    if envelope is not None:
        result.update(
            arrival=envelope.received_at, arrival_iso=iso_time(envelope.received_at), sender=envelope.sender,
            client_address=envelope.client_address, client_helo=envelope.client_helo,
            identity=envelope.identity, tls=envelope.tls, body=envelope.body, smtputf8=envelope.smtputf8,
            params=envelope.params,          # the DSN and REQUIRETLS requests (mailrelay/dsnparams.py)
        )
    if entry.state is not None:
        result["delay_warned"] = entry.state.delay_warned
        result["recipients"] = [dict(address=r.recipient, pending=r.pending, **r.to_dict())
                                for r in entry.state.recipients]
    elif envelope is not None:
        result["recipients"] = [{"address": r} for r in envelope.recipients]
    return result


# -- show -------------------------------------------------------------------------------------------

def show_lines(entry: QueueEntry, headers: bytes, truncated: bool, now: float) -> list[str]:
    """The envelope, every recipient's state, the hold flag, then the header section."""
    held = "  HELD (not delivered until released)" if entry.held else ""
    lines = [f"id:          {entry.queue_id}{held}"]
    envelope = entry.envelope
    if envelope is None:
        return lines + [f"unreadable:  {printable(entry.problem or '?')}"]
    lines += [
        f"arrival:     {iso_time(envelope.received_at)} ({human_duration(now - envelope.received_at)} ago)",
        f"size:        {entry.size} bytes",
        f"sender:      {sender_text(envelope)}",
        f"client:      {printable(envelope.client_address or '-')}"
        f" (HELO {printable(envelope.client_helo or '-')})",
        f"identity:    {printable(envelope.identity or '-')}",
        f"tls:         {printable(envelope.tls or 'none')}",
        f"body:        {envelope.body}" + (", SMTPUTF8" if envelope.smtputf8 else ""),
    ]
    if entry.state is None:
        lines.append(f"state:       unreadable: {printable(entry.problem or '?')}")
        lines += [f"recipient:   {printable(r)}" for r in envelope.recipients]
    else:
        if entry.state.delay_warned:
            lines.append("delay DSN:   sent")
        for rcpt in entry.state.recipients:
            lines += _recipient_lines(rcpt, now)
    lines.append("")
    # Split on LF only (a bare CR or LF was refused or normalised at DATA, RFC 5321 §2.3.8): Unicode
    # line breaks inside a field stay in their line and are escaped there.
    text = headers.decode("utf-8", "replace")
    lines += [printable(line.removesuffix("\r")) for line in text.split("\n") if line.strip("\r")]
    if truncated:
        lines.append(f"[header section longer than {HEADER_CAP // 1024} KiB: the rest is not shown]")
    return lines


def _recipient_lines(rcpt: RecipientState, now: float) -> list[str]:
    if rcpt.pending:
        status = f"pending, next attempt {relative_time(rcpt.next_attempt, now)}"
    else:
        reported = "" if rcpt.done == "delivered" else (", DSN sent" if rcpt.reported else ", DSN to send")
        status = f"{rcpt.done}{reported}"
    lines = [f"recipient:   {printable(rcpt.recipient)}: {status}"]
    if rcpt.attempts:
        first = f", first {iso_time(rcpt.first_attempt)}" if rcpt.first_attempt is not None else ""
        lines.append(f"  attempts:  {rcpt.attempts}{first}")
    if rcpt.last_reply is not None:
        lines.append(f"  last:      {reply_text(rcpt)}")
    return lines


# -- webhook backlogs -------------------------------------------------------------------------------

def webhook_lines(backlogs: list, configured: set[str], now: float) -> list[str]:
    """One line per webhook outbox in the spool (events.store.Backlog): pending count, oldest, last error;
    `configured`: the URLs (as shown) of the config's [[webhook]] tables."""
    lines = []
    for b in backlogs:
        if not b.pending and b.url in configured and not b.last_error:
            lines.append(f"webhook {printable(b.url)}: no events waiting")
            continue
        oldest = f", oldest {human_duration(now - b.oldest)}" if b.oldest is not None else ""
        error = ""
        if b.last_error and b.pending:
            ago = f" {human_duration(now - b.last_error_at)} ago" if b.last_error_at else ""
            error = f", last error{ago}: {printable(b.last_error)}"
        gone = "" if b.url in configured else " (not configured: kept, not sent)"
        noun = "event" if b.pending == 1 else "events"
        lines.append(f"webhook {printable(b.url)}{gone}: {b.pending} {noun} waiting{oldest}{error}")
    return lines


def webhook_dict(backlog, configured: set[str]) -> dict:
    return {"url": backlog.url, "configured": backlog.url in configured, "pending": backlog.pending,
            "oldest": iso_time(backlog.oldest), "last_error": backlog.last_error or None,
            "last_error_at": iso_time(backlog.last_error_at), "directory": str(backlog.directory)}


# -- throttles --------------------------------------------------------------------------------------

def paused_destinations(status: Optional[dict], now: float) -> dict[str, float]:
    """destination -> end of its pause, for the pauses in force in a throttle status (queue.shaping)."""
    if not status:
        return {}
    return {str(row.get("destination")): float(row.get("paused_until") or 0)
            for row in status.get("destinations", ()) if isinstance(row, dict)
            and float(row.get("paused_until") or 0) > now}


def throttle_lines(status: Optional[dict], now: float, running: bool) -> list[str]:
    """`mailrelay queue throttle`: one line per throttled destination of the running relay, and a summary."""
    if not running:
        return ["the relay is not running: no destination is paused (pauses are not kept across a restart)"]
    if status is None:
        return ["no throttle status: no [[throttle]] rule, or the relay has not written it yet"]
    rows = [row for row in status.get("destinations", ()) if isinstance(row, dict)]
    lines = [_throttle_line(row, now) for row in rows]
    paused = sum(1 for row in rows if float(row.get("paused_until") or 0) > now)
    noun = "destination" if len(rows) == 1 else "destinations"
    written = float(status.get("written_at") or now)
    lines.append(f"{len(rows)} throttled {noun} with something to show, {paused} paused "
                 f"(as of {human_duration(now - written)} ago)")
    return lines


def _throttle_line(row: dict, now: float) -> str:
    until, cap = float(row.get("paused_until") or 0), int(row.get("connections_cap") or 0)
    parts = [printable(str(row.get("destination", "?")))]
    if until > now:
        in_a_row = int(row.get("pauses_in_a_row") or 1)
        parts.append(f"PAUSED {human_duration(until - now)} more (until {iso_time(until)}, {in_a_row} in a row, "
                     f"after {truncate(printable(str(row.get('reason', ''))), REPLY_WIDTH)})")
    rate = int(row.get("messages_per_minute") or 0)
    parts.append(f"rate {rate}/min" if rate else "no rate limit")
    parts.append(f"connections {int(row.get('connections') or 0)}" + (f"/{cap}" if cap else ""))
    waiting, ids = int(row.get("waiting") or 0), [printable(str(q)) for q in row.get("waiting_ids") or ()]
    more = f" +{waiting - len(ids)}" if waiting > len(ids) else ""
    parts.append(f"waiting {waiting}" + (f": {', '.join(ids)}{more}" if ids else ""))
    return "  ".join(parts)
