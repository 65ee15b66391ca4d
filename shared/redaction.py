"""Scrubbing secrets out of text, exceptions and log records. Pure, dependency-free: errors and secrets build on it.

`redact()` replaces every value registered as a secret (each value a secret provider hands out), anything shaped like
a SendGrid key (`SG.<id>.<secret>`, or its `SG.<id>` prefix when a message was cut short), and bearer tokens.

Where it is applied, so that no handler can see raw text whenever it was attached:
- where text is made: `errors.ConnectorError` redacts its message when constructed, `sendgrid` redacts SendGrid's
  messages before cutting them short;
- on every log record, at creation: `install_log_redaction()` sets a log-record factory that formats the message
  and redacts it, and scrubs the arguments of the record's exception (its causes and contexts too), so handlers added
  later (the Functions worker's, OpenTelemetry's `LoggingHandler`, which reads the exception object itself) get only
  clean text. Exceptions whose text does not come from their arguments are covered in the record's formatted
  traceback (`exc_text`) only.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from typing import Any

REDACTED = "[REDACTED]"
_MIN_REGISTERED_LENGTH = 4  # shorter values would shred ordinary log text; no real key is that short
# A SendGrid key is "SG." + a key id + "." + the secret; a message cut short may keep only "SG.<id>" or part of it.
_SENDGRID_KEY = re.compile(r"(?<![A-Za-z0-9_-])SG\.[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*)?")
_BEARER = re.compile(r"\b(Bearer)\s+[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE)
_FACTORY_MARK = "_redacts_secrets"

_registry: set[str] = set()
_registry_lock = threading.Lock()
_registry_pattern: re.Pattern[str] | None = None


def register_secret_value(value: str) -> None:
    """Remember a revealed value so `redact` scrubs it. Values under 4 characters are ignored (see above)."""
    global _registry_pattern
    if not isinstance(value, str) or len(value) < _MIN_REGISTERED_LENGTH:
        return
    with _registry_lock:
        if value in _registry:
            return
        _registry.add(value)
        # Longest first, so a value that contains another is replaced whole.
        alternatives = sorted(_registry, key=len, reverse=True)
        _registry_pattern = re.compile("|".join(re.escape(v) for v in alternatives))


def redact(text: str) -> str:
    """Replace registered secret values, SendGrid-shaped keys (or their prefixes) and bearer tokens with [REDACTED]."""
    if not text:
        return text
    pattern = _registry_pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    text = _SENDGRID_KEY.sub(REDACTED, text)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def _redacted(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


def scrub_exception(exc: BaseException) -> None:
    """Redact, in place, the text arguments, `message` attribute and notes of an exception and of every exception it
    was raised from or while handling: tracebacks and exporters that read the object see only clean text."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        args = tuple(_redacted(a) for a in current.args)
        if args != current.args:
            current.args = args
        message = getattr(current, "message", None)
        if isinstance(message, str) and redact(message) != message:
            with contextlib.suppress(AttributeError):  # read-only: its text is in the formatted traceback only
                # BaseException declares no `message`; this exception's class has one (getattr above found it).
                current.message = redact(message)  # type: ignore[attr-defined]
        notes = getattr(current, "__notes__", None)
        if isinstance(notes, list):
            notes[:] = [_redacted(n) for n in notes]
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]


def scrub_record(record: logging.LogRecord) -> None:
    """Redact a log record in place: the message formatted with its arguments (which are then dropped), the
    exception with its chain, the formatted traceback and the stack."""
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: leave it to the handler's own error reporting, but scrub the parts
        record.msg, record.args = redact(str(record.msg)), None
    else:
        record.msg, record.args = redact(message), None
    info = record.exc_info
    if isinstance(info, tuple) and info[1] is not None:
        scrub_exception(info[1])
        text = str(info[1])
        if redact(text) != text and not record.exc_text:  # its text does not come from its arguments
            record.exc_text = logging.Formatter().formatException(info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class RedactingFilter(logging.Filter):
    """scrub_record as a handler filter (for a handler outside this process's record factory)."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_install_lock = threading.Lock()


def install_log_redaction() -> None:
    """Make every log record of this process redacted when it is created (`scrub_record`), whichever logger makes
    it and whichever handlers take it, now or later. Idempotent; keeps (wraps) the factory installed before."""
    with _install_lock:
        previous = logging.getLogRecordFactory()
        if getattr(previous, _FACTORY_MARK, False):
            return

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            scrub_record(record)
            return record

        setattr(factory, _FACTORY_MARK, True)
        logging.setLogRecordFactory(factory)
