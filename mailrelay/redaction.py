# -*- test-case-name: tests.test_redaction -*-
"""What a log line never shows: the values of credential fields, wherever they are written (the `[log]`
lines, twistd's own text log, the delivery process's events on their way up the pipe).

A field whose name contains password, secret, passwd, credential, auth_data or token (any case, at any
depth of a dict) is written as "[redacted]"; the values of such fields (4 characters or longer) are
scrubbed from any other text, a message or a traceback included. Twisted's own keys (`log_*`) are kept.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Optional

REDACTED = "[redacted]"
SENSITIVE_WORDS = ("password", "secret", "passwd", "credential", "auth_data", "token")
MIN_SCRUB_LENGTH = 4      # shorter secret values are not searched for in free text (they would eat it)
MAX_DEPTH = 16            # dicts and lists nested deeper (or a loop) are written as [redacted]


def is_sensitive(name: object) -> bool:
    """True for a field name that may carry a credential."""
    return _is_sensitive_name(str(name))


@functools.lru_cache(maxsize=1024)      # field names are few; every event asks about each of them
def _is_sensitive_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SENSITIVE_WORDS)


def needs_redaction(event: Mapping[str, Any]) -> bool:
    """True when `event` has a sensitive field at its top level or in a dict or list of its fields."""
    return plain_fields(event) is None


def plain_fields(event: Mapping[str, Any]) -> Optional[tuple]:
    """The names of `event`'s fields (not Twisted's `log_*`) when none needs redacting, else None.
    Cheap: one call site's events have the same names, so what the names say is remembered by the
    tuple of them; values are looked into only when one is not of a type known to hold no dict or list."""
    names = tuple(event)
    fields = _by_names.get(names)
    if fields is None:
        fields = _judge_names(names)
    if fields is _SENSITIVE:
        return None
    if _LEAF_TYPES.issuperset(map(type, event.values())):
        return fields
    for name, value in event.items():
        if isinstance(value, (dict, list, tuple)):
            if name[:4] != "log_" and _nested_sensitive(value, 1):
                return None
        elif len(_LEAF_TYPES) < _LEAF_TYPES_KEPT:
            _LEAF_TYPES.add(type(value))
    return fields


# Types seen in events that are not dicts, lists or tuples (nor subclasses): such a value holds no field.
_LEAF_TYPES: set[type] = {str, int, float, bool, type(None), bytes}
_LEAF_TYPES_KEPT = 256


_SENSITIVE = ("[sensitive]",)
_by_names: dict[tuple, tuple] = {}
_NAMES_KEPT = 4096        # distinct field-name tuples remembered (call sites are far fewer)


def _judge_names(names: tuple) -> tuple:
    fields = tuple(name for name in names if not (isinstance(name, str) and name.startswith("log_")))
    judged = _SENSITIVE if any(is_sensitive(name) for name in fields) else fields
    if len(_by_names) >= _NAMES_KEPT:
        _by_names.clear()
    _by_names[names] = judged
    return judged


def _nested_sensitive(value: Any, depth: int) -> bool:
    if isinstance(value, (dict, list, tuple)) and depth > MAX_DEPTH:
        return True
    if isinstance(value, dict):
        return any(is_sensitive(k) or _nested_sensitive(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_nested_sensitive(v, depth + 1) for v in value)
    return False


def _redact_value(value: Any, secrets: list[str], depth: int = 1) -> Any:
    """`value` with every sensitive dict key's value replaced (collected into `secrets`)."""
    if isinstance(value, (dict, list, tuple)) and depth > MAX_DEPTH:
        return REDACTED
    if isinstance(value, dict):
        return {k: _hide(v, secrets) if is_sensitive(k) else _redact_value(v, secrets, depth + 1)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v, secrets, depth + 1) for v in value)
    return value


def _hide(value: Any, secrets: list[str]) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str) and len(value) >= MIN_SCRUB_LENGTH:
        secrets.append(value)
    return REDACTED


def redact(event: Mapping[str, Any]) -> tuple[dict, tuple[str, ...]]:
    """A copy of `event` with sensitive fields hidden, and the hidden values (for scrubbing text)."""
    secrets: list[str] = []
    clean = {}
    for key, value in event.items():
        if key.startswith("log_"):
            clean[key] = value
        elif is_sensitive(key):
            clean[key] = _hide(value, secrets)
        else:
            clean[key] = _redact_value(value, secrets)
    return clean, tuple(sorted(set(secrets), key=len, reverse=True))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret value replaced by [redacted]."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def scrub_value(value: Any, secrets: tuple[str, ...]) -> Any:
    """`value` (a string, or dicts and lists of them) with every secret value replaced."""
    if not secrets:
        return value
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, dict):
        return {k: scrub_value(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_value(v, secrets) for v in value]
    return value
