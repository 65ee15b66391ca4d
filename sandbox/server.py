"""A local SendGrid-compatible Marketing API server for demos, tests, benchmarks and fault injection.

Same paths, shapes, status codes and limits as the official OpenAPI files (tests/contracts/) on everything the engine
uses; in-memory, thread-safe state; stdlib HTTP/1.1 server with keep-alive. Compact storage (per contact: the email,
one JSON text of the other fields, two timestamps; ids are derived from the row number) keeps 5 million contacts at
about 2-3 GB. Every job (upsert, CSV import, list removal, contact deletion) stays `pending` until it is due and
changes nothing before: it is applied lazily by the next request that looks. By default a job is due `job_delay`
seconds after it was accepted (an import: after its upload).

CPU per upserted contact is kept low (about 5-7 us on a small VM, for parsing, checking, storing and applying) so a
benchmark's client keeps the cores: a request whose contacts are all valid is checked in blocks, a field at a time,
with C-level passes, and serialised for the store in one go; any other request is checked contact by contact, which
names every problem. A contact re-sent unchanged costs one comparison of its stored text.

Realistic profile (`Profile`, `REALISTIC`; `--realistic` on the command line). SendGrid applies jobs minutes after it
accepted them (sendgrid-go#366, sendgrid-nodejs#1004), which a fixed 0.3 s hides. What the profile does, and why:
- Job times: each job takes a random time in `job_seconds` (`--job-seconds MIN:MAX`, default 2 to 10 s), drawn from a
  `random.Random(seed)` (`--seed`; printed when not given), and never finishes before the job scheduled before it:
  an account's jobs apply in the order they were accepted (imports: uploaded). Until then a contact is invisible to
  search, list membership and counts, and has no id to remove or delete it by; removals and deletions change nothing
  until their own job completes. `complete_jobs()` still finishes everything at once; `hold_jobs()` keeps every
  job pending until `release_jobs()` (any profile); `pending_jobs()`, `jobs_final()`, `wait_for_jobs(timeout)` and
  GET /_sandbox/jobs show what is pending.
- Job status: GET /v3/marketing/contacts/imports/{id} is documented for the job ids of imports, upserts and contact
  deletions. For list removals (DELETE /v3/marketing/lists/{id}/contacts, "job_id of the async job") it is not
  documented; the sandbox serves them too, the same way, so a client can wait for one, and a client must still
  treat a 404 there as "unknown", not as "failed".
- Identifiers (`strict_identifiers`): "to update a contact, all of its existing identifiers must be present" (PUT
  /v3/marketing/contacts). The API answers 202 before it looks at stored contacts, so the check can only happen in
  the job: such a contact is an errored row in the job's errors file (the job `failed` when every row was), and the
  stored contact is left as it was. So is a contact whose identifiers name two different stored contacts, and one
  whose identifier differs from the stored one (identifiers cannot be changed by an upsert). What SendGrid does
  there is not documented; an errored row is the conservative reading (nothing changes, the client is told).
- Plan cap (`contact_limit`, `--contact-limit N`, any profile): plans cap stored contacts and an export past the cap
  fails inside SendGrid's job, not at the PUT. A job that would take the account past the cap fails whole, every
  row errored with "you have hit your contact limit", the wording users reported (sendgrid-go#413; the API
  documents none). Updates of stored contacts still pass. (SendGrid also counts contacts added in a month, deleted
  or not; the sandbox counts stored ones.)
Error bodies (every profile): 400s are `{"errors": [{"field", "message"}]}` as SendGrid's errors page and the
contracts' ContactsError show (error_id and parameter are optional there and never sent); an invalid address is
`{"field": "contacts[i].identifier", "message": "email '...' is not valid"}`, the shape Segment's SendGrid Audiences
tests use, and unknown custom field ids are listed after "invalid custom field ids supplied - " as the live API does
(sendgrid-nodejs#953). tests/test_sandbox.py holds every 400 the Sandbox class can send to that shape.

Network profile: `Sandbox(latency=seconds)` (`--latency SECONDS`, default 0) makes the server wait that long before
answering every request (API, uploads, control API; also before dropping the connection for a reset fault): the WAN
round trip and SendGrid's front-end handling. `Sandbox(bandwidth_mbit=N)` (`--bandwidth-mbit N`) reads request bodies
(upserts, import uploads, any other) no faster than N Mbit/s in all: each chunk read books its time on one shared
link, first come first served, so concurrent uploads share it as one link would. Neither wait holds a lock, and each
connection has its own thread, so concurrent clients wait in parallel.

Where the real API is silent the sandbox is strict, so client bugs show: unknown contact fields, non-string values,
the same email twice in one request and unknown list ids are refused.

Faults (`inject`, POST /_sandbox/faults): HTTP faults on an API endpoint ("*": every API endpoint), job faults
("job"), and faults on an import's upload URL ("PUT /_sandbox/uploads/{job_id}", never armed by "*"): 500/503
(nothing kept), a reset before the upload is read, or after it was stored (`processed`: the answer is lost and a
resend gets 409), a slow answer. A status fault sends `retry_after` as its Retry-After header, as given (seconds or
an HTTP date); a 429 with `"rate_headers": false` has no X-RateLimit-* headers (a front proxy's 429).

Control and inspection (no bearer; loopback clients only) live under /_sandbox/: GET stats, GET jobs, POST faults,
POST reset, POST keys, GET lists/{id}/emails, GET contacts/{email}. Upload URLs (/_sandbox/uploads/{job}) and error
files (/_sandbox/errors/{job}.csv) are unguessable capability URLs, like presigned S3 URLs, and need no auth either.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gzip
import hashlib
import io
import ipaddress
import itertools
import math
import operator
import os
import random
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import uuid
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, TypeGuard, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

from shared import gcpolicy, limits

MAX_REQUEST_TARGET_BYTES = 8_192  # the API's front proxy answers 414 above this (limits.MAX_URL_BYTES is our margin)
MAX_SMALL_BODY_BYTES = 1_000_000  # any JSON body other than an upsert
MAX_DRAIN_BYTES = 64 * 1024 * 1024  # a refused body up to this size is read so keep-alive clients see the answer
NOMINAL_RATE_LIMIT = 10_000  # reported in X-RateLimit-Limit when no rate limit is enforced
MAX_LISTS = 1_000
IDLE_TIMEOUT_S = 120.0

_JSON = "application/json"
_EMPTY = b""  # the members of an empty object
_UTF8_BOM = "\ufeff"

# Reserved fields as GET /v3/marketing/field_definitions lists them [F example]: (id, name, type, read_only).
RESERVED_FIELDS: tuple[tuple[str, str, str, bool], ...] = (
    ("_rf0_T", "first_name", "Text", False),
    ("_rf1_T", "last_name", "Text", False),
    ("_rf2_T", "email", "Text", False),
    ("_rf3_T", "alternate_emails", "Text", False),
    ("_rf4_T", "address_line_1", "Text", False),
    ("_rf5_T", "address_line_2", "Text", False),
    ("_rf6_T", "city", "Text", False),
    ("_rf7_T", "state_province_region", "Text", False),
    ("_rf8_T", "postal_code", "Text", False),
    ("_rf9_T", "country", "Text", False),
    ("_rf10_T", "phone_number", "Text", False),
    ("_rf11_T", "whatsapp", "Text", False),
    ("_rf12_T", "line", "Text", False),
    ("_rf13_T", "facebook", "Text", False),
    ("_rf14_T", "unique_name", "Text", False),
    ("_rf15_T", "email_domains", "Text", True),
    ("_rf16_D", "last_clicked", "Date", True),
    ("_rf17_D", "last_opened", "Date", True),
    ("_rf18_D", "last_emailed", "Date", True),
    ("_rf19_T", "singlesend_id", "Text", True),
    ("_rf20_T", "automation_id", "Text", True),
    ("_rf21_D", "created_at", "Date", True),
    ("_rf22_D", "updated_at", "Date", True),
    ("_rf23_T", "contact_id", "Text", True),
)
_RESERVED_NAMES = frozenset(name.lower() for _, name, _, _ in RESERVED_FIELDS)
# CSV import columns may map to these reserved ids: writable and accepted by the contact request schema.
_IMPORTABLE = {rid: name for rid, name, _, ro in RESERVED_FIELDS if not ro and name in limits.WRITABLE_RESERVED_FIELDS}

_IDENTIFIERS = ("email", "external_id", "anonymous_id", "phone_number_id")
_SECONDARY_IDS = frozenset(_IDENTIFIERS[1:])
_INDEXED_FIELDS = _SECONDARY_IDS | {"alternate_emails"}
_STRING_FIELDS = frozenset((limits.WRITABLE_RESERVED_FIELDS | {"phone_number_id"}) - {"alternate_emails"})
_MAXLEN = limits.FIELD_MAX_LENGTHS
_STRING_LIMITS = {k: _MAXLEN.get(k, sys.maxsize) for k in _STRING_FIELDS}
_DATE_CACHE: set[str] = set()  # valid dates seen (thread-safe enough: set.add is atomic; bounded)
_VIEW_TEXT_FIELDS = ("first_name", "last_name", "unique_name", "address_line_1", "address_line_2", "city",
                     "state_province_region", "country", "postal_code", "phone_number", "whatsapp", "line", "facebook")

# Basic address syntax (local part without quotes, a dotted domain, an alphabetic or punycode TLD); ".." is
# checked apart because a lookahead for it costs more than the rest of the match.
_LOCAL_CHAR = r"[^@\s\"(),:;<>\[\]\\]"
_EMAIL_DOMAIN = r"[^\W_][\w.-]*\.(?:[^\W\d_]{2,63}|xn--[a-z0-9-]{1,59})"
_EMAIL_RE = re.compile(rf"(?!\.){_LOCAL_CHAR}{{1,64}}(?<!\.)@{_EMAIL_DOMAIN}")
_DOMAIN_RE = re.compile(_EMAIL_DOMAIN)
MAX_LOCAL_PART = 64
# The ASCII characters a local part may hold (derived from the pattern, so the two cannot disagree).
_ASCII_LOCAL_CHARS = bytes(c for c in range(128) if re.fullmatch(_LOCAL_CHAR, chr(c)))
_DATE_RE = re.compile(r"(\d{2})/(\d{2})/(\d{4})")
_FIELD_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# What a job past the plan's contact cap says (sendgrid-go#413: "uploading contact info returns failed and 'you have
# hit your contact limit'"); the API documents no wording of its own.
CONTACT_LIMIT_MESSAGE = "you have hit your contact limit"

HTTP_FAULT_KINDS = frozenset({"429", "500", "503", "reset", "slow", "401", "403", "451"})
UPLOAD_TEMPLATE = "PUT /_sandbox/uploads/{job_id}"  # an import's upload_uri: its stats key and fault endpoint
UPLOAD_FAULT_KINDS = frozenset({"500", "503", "reset", "slow"})  # what a presigned storage URL can do
JOB_FAULT_KINDS = frozenset({"errored", "failed"})


@dataclass(frozen=True, slots=True)
class Profile:
    """How close to SendGrid's own timing and rules a sandbox behaves (see "Realistic profile" in the module docstring).

    The default (every field off) is the fast sandbox the tests were written against: each job takes `job_delay`."""

    job_seconds: tuple[float, float] | None = None  # each job's duration, uniform in [min, max]; None: job_delay
    seed: int | None = None  # for job_seconds; None: a random seed (see Sandbox.seed)
    strict_identifiers: bool = False  # an update must carry all of the contact's existing identifiers

    def __post_init__(self) -> None:
        if self.job_seconds is not None:
            low, high = self.job_seconds
            if not 0 <= low <= high < math.inf:
                raise ValueError(f"job_seconds must be MIN:MAX with 0 <= MIN <= MAX, got {low}:{high}")


REALISTIC_JOB_SECONDS = (2.0, 10.0)
REALISTIC = Profile(job_seconds=REALISTIC_JOB_SECONDS, strict_identifiers=True)


# ---------------------------------------------------------------------------------------------------------- helpers


def _err(message: str, field_name: str | None = None) -> dict[str, Any]:
    return {"errors": [{"field": field_name, "message": message}]}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_email(value: str) -> bool:
    return _EMAIL_RE.fullmatch(value) is not None and ".." not in value


def _is_date(value: object) -> bool:
    """Custom Date fields take MM/DD/YYYY (the documented CSV format) and must be a real calendar day."""
    if type(value) is not str:
        return False
    if value in _DATE_CACHE:  # values repeat: an import's rows check each one here
        return True
    if (m := _DATE_RE.fullmatch(value)) is None:
        return False
    try:
        date(int(m[3]), int(m[1]), int(m[2]))
    except ValueError:
        return False
    if len(_DATE_CACHE) < 200_000:
        _DATE_CACHE.add(value)
    return True


def _is_number(value: object) -> bool:
    return type(value) is int or type(value) is float


def accepts_json(accept: str | None) -> bool:
    """True when an Accept header allows application/json (a missing header does not: the API answers 406)."""
    if not accept:
        return False
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() not in (_JSON, "application/*", "*/*"):
            continue
        q = next((p[2:] for p in params if p.lower().startswith("q=")), "1")
        try:
            if float(q) > 0:
                return True
        except ValueError:
            continue
    return False


def _key_fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class InvalidEmailCheck:
    """A test for lower-cased addresses the sandbox calls invalid: `check(email)`, and `check.any_of(emails)` for a
    whole request. A plain domain-suffix pattern (the default, `@[^@]*\\.invalid$`) becomes a str.endswith (three
    times cheaper than the regex), and for a request one substring search over the joined addresses."""

    def __init__(self, pattern: str) -> None:
        m = re.fullmatch(r"@\[\^@\]\*((?:\\\.[A-Za-z0-9-]+)+)\$", pattern)
        self._suffix = m[1].replace("\\.", ".").lower() if m else ""
        self._regex = None if m else re.compile(pattern, re.IGNORECASE)

    def __call__(self, email: str) -> bool:
        if self._regex is None:
            return email.endswith(self._suffix)
        return self._regex.search(email) is not None

    def any_of(self, emails: list[str]) -> bool:
        """True if any of these addresses (none holding a newline) is invalid."""
        if self._regex is None:  # a suffix without newlines ends an address exactly where a newline follows it
            return f"{self._suffix}\n" in "\n".join(emails) + "\n"
        return any(map(self, emails))


def invalid_email_check(pattern: str) -> InvalidEmailCheck:
    """A test for lower-cased addresses the sandbox calls invalid (see InvalidEmailCheck)."""
    return InvalidEmailCheck(pattern)


# ------------------------------------------------------------------------------------------------ contact storage


def _members(obj: dict[str, Any]) -> bytes:
    """A dict's compact JSON without its braces: what the store keeps of a contact (an exact-size copy, where
    orjson's own small results keep a 4 KB buffer each)."""
    return orjson.dumps(obj)[1:-1]


def _members_each(objs: list[dict[str, Any]]) -> list[bytes]:
    """[_members(o) for o in objs] from one serialisation of the list, cut at the "},{" between its items. Contacts
    nest no arrays of objects, so only a string holding "},{" makes another cut, and the count shows that."""
    if not objs:
        return []
    parts = orjson.dumps(objs).split(b"},{")
    if len(parts) != len(objs):
        return list(map(_members, objs))
    parts[0] = parts[0][2:]  # the list's '[{' and '}]'
    parts[-1] = parts[-1][:-2]
    return parts


def _object(members: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = orjson.loads(b"{" + members + b"}")  # members of an object: an object
    return obj


class _Store:
    """Contacts, compactly: row i has an email (or None), the JSON members of its other fields and two timestamps.

    Contact ids are derived from the row number under a random prefix, so they cost nothing to store and map back
    to the row in O(1). Deleted rows stay as tombstones; ids are never reused.
    """

    def __init__(self) -> None:
        p = secrets.token_hex(9)
        self.id_prefix = f"{p[:8]}-{p[8:12]}-4{p[12:15]}-a{p[15:18]}-"
        self.emails: list[str | None] = []
        self.data: list[bytes] = []  # _members(fields): orjson's compact form, so equal fields give equal bytes
        self.created = array("d")
        self.updated = array("d")
        self.live = bytearray()
        self.alive = 0
        self.by_email: dict[str, int] = {}
        self.by_ident: dict[str, dict[str, int]] = {k: {} for k in _SECONDARY_IDS}
        self.by_alt: dict[str, int] = {}
        self.secondary_rows: set[int] = set()  # live rows holding an identifier other than email

    def id_of(self, idx: int) -> str:
        return f"{self.id_prefix}{idx:012x}"

    def index_of(self, contact_id: str) -> int | None:
        if len(contact_id) != 36 or not contact_id.startswith(self.id_prefix):
            return None
        try:
            idx = int(contact_id[24:], 16)
        except ValueError:
            return None
        return idx if idx < len(self.live) and self.live[idx] else None

    def find_email(self, email: str) -> int | None:
        idx = self.by_email.get(email)
        return self.by_alt.get(email) if idx is None else idx

    def _locate_secondary(self, fields: dict[str, Any]) -> int | None:
        for key in _IDENTIFIERS[1:]:
            value = fields.get(key)
            if value is not None and (idx := self.by_ident[key].get(value)) is not None:
                return idx
        return None

    def upsert(self, email: str | None, fields: dict[str, Any], now: float) -> tuple[int, bool, bool]:
        """Insert or merge one contact (fields exclude the email). Returns (row, created, changed)."""
        idx = self.by_email.get(email) if email is not None else None
        indexed = not fields.keys().isdisjoint(_INDEXED_FIELDS)
        if idx is None and indexed:
            idx = self._locate_secondary(fields)
        if idx is None:
            idx = len(self.emails)
            self.emails.append(email)
            self.data.append(_members(fields))
            self.created.append(now)
            self.updated.append(now)
            self.live.append(1)
            self.alive += 1
            if email is not None:
                self.by_email[email] = idx
            if indexed:
                self._index(idx, {}, fields)
            return idx, True, True
        changed = False
        old_email = self.emails[idx]
        if email is not None and email != old_email:
            if old_email is not None:
                self.by_email.pop(old_email, None)
            self.by_email[email] = idx
            self.emails[idx] = email
            changed = True
        if self.merge(idx, fields, now, indexed) or changed:
            self.updated[idx] = now
            return idx, False, True
        return idx, False, False

    def merge(self, idx: int, fields: dict[str, Any], now: float, indexed: bool = False) -> bool:
        """Merge fields into a stored contact (omitted fields keep their values). True if anything changed."""
        if not fields:
            return False
        old_text = self.data[idx]
        old = _object(old_text) if old_text else {}
        merged = {**old, **fields}
        if "custom_fields" in fields and "custom_fields" in old:
            merged["custom_fields"] = {**old["custom_fields"], **fields["custom_fields"]}
        if merged == old:
            return False
        self.data[idx] = _members(merged)
        self.updated[idx] = now
        if indexed:
            self._index(idx, old, fields)
        return True

    def bulk_upsert(self, emails: list[str], texts: list[bytes],
                    now: float) -> tuple[range, list[int], list[int]]:
        """A plain batch (see _PlainContacts) in a few C-level passes. Returns (new rows, existing rows that changed,
        existing rows left as they were)."""
        found = list(map(self.by_email.get, emails))
        old_rows: list[int]
        if found.count(None) == len(found):
            new_emails, new_texts, old_rows, old_texts = emails, texts, [], []
        elif _no_none(found):
            new_emails, new_texts, old_rows, old_texts = [], [], found, texts
        else:
            new_emails = [e for e, row in zip(emails, found, strict=True) if row is None]
            new_texts = [t for t, row in zip(texts, found, strict=True) if row is None]
            old_rows = [row for row in found if row is not None]
            old_texts = [t for t, row in zip(texts, found, strict=True) if row is not None]
        start, n = len(self.emails), len(new_emails)
        self.emails.extend(new_emails)
        self.data.extend(new_texts)
        stamps = array("d", [now]) * n
        self.created.extend(stamps)
        self.updated.extend(stamps)
        self.live.extend(b"\x01" * n)
        self.by_email.update(zip(new_emails, range(start, start + n), strict=True))
        self.alive += n
        # An existing contact sent with exactly its stored fields (a re-send) cannot change: compare the texts.
        same = list(map(bytes.__eq__, map(self.data.__getitem__, old_rows), old_texts))
        if all(same):
            return range(start, start + n), [], old_rows
        changed: list[int] = []
        kept: list[int] = []
        for row, text, unchanged in zip(old_rows, old_texts, same, strict=True):
            (changed if not unchanged and self.merge(row, _object(text), now) else kept).append(row)
        return range(start, start + n), changed, kept

    def _index(self, idx: int, old: dict[str, Any], new: dict[str, Any]) -> None:
        for key in _SECONDARY_IDS.intersection(new):
            if (prev := old.get(key)) is not None:
                self.by_ident[key].pop(prev, None)
            self.by_ident[key][new[key]] = idx
            self.secondary_rows.add(idx)
        if "alternate_emails" in new:
            for alt in old.get("alternate_emails", ()):
                self.by_alt.pop(alt, None)
            for alt in new["alternate_emails"]:
                self.by_alt[alt.lower()] = idx

    def delete(self, idx: int) -> None:
        fields = _object(self.data[idx])
        for key in _SECONDARY_IDS.intersection(fields):
            self.by_ident[key].pop(fields[key], None)
        for alt in fields.get("alternate_emails", ()):
            self.by_alt.pop(alt.lower(), None)
        email = self.emails[idx]
        if email is not None:
            self.by_email.pop(email, None)
        self.emails[idx] = None
        self.data[idx] = _EMPTY
        self.live[idx] = 0
        self.alive -= 1
        self.secondary_rows.discard(idx)

    def rows_of(self, email: str | None, ids: dict[str, str]) -> set[int]:
        """The stored contacts an upsert with these identifiers names (one, none, or several that disagree)."""
        rows = {row for key, value in ids.items() if (row := self.by_ident[key].get(value)) is not None}
        if email is not None and (row := self.by_email.get(email)) is not None:
            rows.add(row)
        return rows

    def count_new(self, emails: Sequence[str | None], secondary: list[dict[str, str]] | None,
                  skipped: Callable[[int], bool]) -> int:
        """How many contacts an upsert of these would create (distinct ones no stored contact answers to)."""
        if secondary is None:
            return len({e for i, e in enumerate(emails) if e not in self.by_email and not skipped(i)})
        fresh: set[Any] = set()
        for i, email in enumerate(emails):
            if not skipped(i) and not self.rows_of(email, secondary[i]):
                fresh.add(email if email is not None else tuple(sorted(secondary[i].items())))
        return len(fresh)

    def identifier_problem(self, email: str | None, ids: dict[str, str]) -> str | None:
        """Why an upsert with these identifiers may not update the contact they name (SendGrid: "to update a contact,
        all of its existing identifiers must be present"), or None. `ids`: its identifiers other than email."""
        rows = self.rows_of(email, ids)
        if len(rows) > 1:
            return "the identifiers name different contacts: " + ", ".join(["email", *ids] if email else ids)
        if not rows:
            return None
        (row,) = rows
        if row not in self.secondary_rows and email is not None:
            return None  # an email-only contact named by its email
        stored = {key: value for key, value in self.fields(row).items() if key in _SECONDARY_IDS}
        if (stored_email := self.emails[row]) is not None:
            stored["email"] = stored_email
        given = {**ids, "email": email}
        missing = [key for key in _IDENTIFIERS if key in stored and given.get(key) != stored[key]]
        if not missing:
            return None
        return ("to update a contact, all of its existing identifiers must be present: missing or different: "
                + ", ".join(missing))

    def fields(self, idx: int) -> dict[str, Any]:
        return _object(self.data[idx])


@dataclass(slots=True)
class _List:
    id: str
    name: str
    members: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _Job:
    id: str
    job_type: str
    started_at: float
    due: float | None  # None while a CSV import waits for its upload
    apply: Callable[[_Job], None] | None
    status: str = "pending"
    requested: int = 0
    created: int = 0
    updated: int = 0
    deleted: int = 0
    errored: int = 0
    finished_at: float | None = None
    errors_csv: bytes | None = None
    order: int = 0  # when its due time was set: ties in due time apply in this order


@dataclass(slots=True)
class _Import:
    job_id: str
    token: str
    mappings: list[str | None]
    list_ids: list[str]
    fault: dict[str, Any] | None
    state: str = "waiting"  # -> "uploading" -> "received"; back to "waiting" if an upload breaks off


@dataclass(slots=True)
class _Contacts:
    """Validated contacts in order: lower-case emails (None for a contact without one) and their other fields, for
    a batch that is not plain (see _PlainContacts)."""

    emails: Sequence[str | None]
    fields: list[dict[str, Any]]

    @classmethod
    def of(cls, emails: list[str | None], fields: list[dict[str, Any]]) -> _Batch:
        if _no_none(emails) and len(set(emails)) == len(emails) and \
                all(f.keys().isdisjoint(_INDEXED_FIELDS) for f in fields):
            return _PlainContacts(emails, _members_each(fields))
        return cls(emails, fields)

    def secondary_ids(self) -> list[dict[str, str]] | None:
        """Each contact's identifiers other than email, or None when no contact has any."""
        ids = [{key: f[key] for key in _SECONDARY_IDS if key in f} for f in self.fields]
        return ids if any(ids) else None

    def without(self, skip: Container[int]) -> _Contacts:
        keep = [i for i in range(len(self.emails)) if i not in skip]
        return _Contacts([self.emails[i] for i in keep], [self.fields[i] for i in keep])


@dataclass(slots=True)
class _PlainContacts:
    """A plain batch (distinct emails, none None, no secondary identifier or alternate emails: _Store.bulk_upsert's
    case), its fields as the texts the store keeps (_members), made in one pass and cheaper to hold while the job is
    pending."""

    emails: list[str]
    texts: list[bytes]

    def secondary_ids(self) -> None:
        return None  # a plain batch has none

    def without(self, skip: Container[int]) -> _PlainContacts:
        keep = [i for i in range(len(self.emails)) if i not in skip]
        return _PlainContacts([self.emails[i] for i in keep], [self.texts[i] for i in keep])


_T = TypeVar("_T")
_Batch = _Contacts | _PlainContacts  # an upsert's validated contacts


def _no_none(values: list[_T | None]) -> TypeGuard[list[_T]]:
    """Whether no value is None (a contact without an email, an email no stored contact has)."""
    return None not in values


@dataclass(slots=True)
class _Request:
    params: dict[str, str]
    query: dict[str, list[str]]
    body: bytes
    base_url: str


Reply = tuple[int, Any]


# ------------------------------------------------------------------------------------------------------ Sandbox


class Sandbox:
    """SendGrid Marketing API state and behaviour (served over HTTP by `serve`). All methods are thread-safe.

    `stats` keys: requests ("METHOD /path-template" -> count), status_counts, upsert_contacts_received (in accepted
    PUTs), import_rows_received, bytes_received, max_body_bytes, max_contacts_per_request, responses_429,
    faults_fired, jobs_created, jobs_finished (status -> count).
    """

    max_import_rows: int = limits.MAX_CONTACTS_PER_IMPORT_FILE  # instance-overridable for tests
    max_import_bytes: int = limits.MAX_IMPORT_FILE_BYTES
    default_profile: ClassVar[Profile] = Profile()  # for sandboxes made without one (tests/conftest.py can switch it)

    def __init__(self, api_keys: Iterable[str], job_delay: float = 0.3, rate_limit: int | None = None,
                 rate_window: float = 1.0, invalid_email_pattern: str = r"@[^@]*\.invalid$",
                 count_sends: bool = False, latency: float = 0.0, profile: Profile | None = None,
                 contact_limit: int | None = None, bandwidth_mbit: float | None = None) -> None:
        if rate_limit is not None and rate_limit < 1:
            raise ValueError("rate_limit must be at least 1 (or None for no limit)")
        if rate_window <= 0:
            raise ValueError("rate_window must be positive")
        if not 0 <= latency < math.inf:
            raise ValueError("latency must be a finite number of seconds, 0 or more")
        if contact_limit is not None and contact_limit < 0:
            raise ValueError("contact_limit must be 0 or more (or None for no limit)")
        if bandwidth_mbit is not None and not 0 < bandwidth_mbit < math.inf:
            raise ValueError("bandwidth_mbit must be a positive number of megabits per second (or None)")
        # One upload link every request body crosses (see the module docstring); None: loopback speed.
        self.link = _Link(bandwidth_mbit * 125_000) if bandwidth_mbit is not None else None
        self.contact_limit = contact_limit  # the plan's cap on stored contacts: a job that would pass it fails
        self.job_delay = job_delay  # seconds each job takes, unless the profile sets job_seconds
        self.profile = profile if profile is not None else Sandbox.default_profile
        self.seed = self.profile.seed if self.profile.seed is not None else secrets.randbits(32)
        self._rng = random.Random(self.seed)
        self.latency = latency  # seconds every answer waits (see the module docstring)
        self.count_sends = count_sends  # keep per-email send counts (see send_counts); off: it costs memory
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self._epoch = time.time()  # rate windows start here
        self._is_invalid = invalid_email_check(invalid_email_pattern)
        self._lock = threading.RLock()
        self._held = False  # hold_jobs(): no job finishes as time passes (complete_jobs still finishes them)
        self._keys: frozenset[str] = frozenset()
        self.rotate_keys(api_keys)
        self._reset_state()

    def __repr__(self) -> str:  # never the keys
        return f"Sandbox(keys={len(self._keys)}, contacts={self._store.alive}, lists={len(self._lists)})"

    def _reset_state(self) -> None:
        with self._lock:
            self._store = _Store()
            self._lists: dict[str, _List] = {}
            self._fields: dict[str, tuple[str, str]] = {}  # id -> (name, type); replaced, never mutated
            self._field_seq = 0
            self._jobs: dict[str, _Job] = {}
            self._pending: list[_Job] = []
            self._job_seq = 0
            self._last_due = 0.0  # the latest due time given under job_seconds: jobs finish in order
            self._imports: dict[str, _Import] = {}
            self._faults: list[dict[str, Any]] = []
            self._job_faults: list[dict[str, Any]] = []
            self._send_counts: Counter[str] = Counter()
            self._buckets: dict[tuple[str, str], tuple[int, int]] = {}
            self._stats: dict[str, Any] = {
                "requests": {}, "status_counts": {}, "upsert_contacts_received": 0, "import_rows_received": 0,
                "bytes_received": 0, "max_body_bytes": 0, "max_contacts_per_request": 0, "responses_429": 0,
                "faults_fired": 0, "jobs_created": 0, "jobs_finished": {},
            }

    # ---- Python API

    def reset(self) -> None:
        """Forget contacts, lists, fields, jobs, faults and stats (keys and configuration stay)."""
        self._reset_state()

    def rotate_keys(self, new_keys: Iterable[str]) -> None:
        keys = frozenset(new_keys)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError("at least one non-empty API key is required")
        with self._lock:
            self._keys = keys

    def pause(self) -> None:
        """The latency model: the HTTP layer calls this before answering each request (and holds no lock)."""
        if self.latency > 0:
            time.sleep(self.latency)

    def key_ok(self, key: str | None) -> bool:
        return key is not None and key in self._keys

    def create_list(self, name: str, list_id: str | None = None) -> str:
        with self._lock:
            error = self._check_list_name(name)
            if error:
                raise ValueError(error)
            list_id = list_id or str(uuid.uuid4())
            if list_id in self._lists:
                raise ValueError(f"list id {list_id} already exists")
            self._lists[list_id] = _List(list_id, name)
            return list_id

    def create_field(self, name: str, field_type: str) -> str:
        with self._lock:
            result = self._add_field(name, field_type)
        if isinstance(result, str):
            return result
        raise ValueError(result[1])

    def list_emails(self, list_id: str) -> list[str]:
        with self._lock:
            self._settle()
            members = self._lists[list_id].members
            emails = self._store.emails
            return sorted(e for i in members if (e := emails[i]) is not None)

    def contact(self, email: str) -> dict[str, Any] | None:
        """The stored contact (custom_fields keyed by field id, timestamps as ISO strings), or None."""
        with self._lock:
            self._settle()
            idx = self._store.by_email.get(email.lower())
            if idx is None:
                return None
            view = self._store.fields(idx)
            view.update(id=self._store.id_of(idx), email=self._store.emails[idx], list_ids=self._list_ids_of(idx),
                        created_at=_iso(self._store.created[idx]), updated_at=_iso(self._store.updated[idx]))
            view.setdefault("custom_fields", {})
            return view

    def contact_count(self) -> int:
        with self._lock:
            self._settle()
            return self._store.alive

    def job(self, job_id: str) -> dict[str, Any] | None:
        """The job as GET /v3/marketing/contacts/imports/{id} shows it (errors_url relative)."""
        with self._lock:
            self._settle()
            job = self._jobs.get(job_id)
            return None if job is None else self._job_view(job, "")

    def pending_jobs(self) -> list[dict[str, Any]]:
        """The jobs not final yet, oldest first, as job() shows them (an import waiting for its upload among them)."""
        with self._lock:
            self._settle()
            return [self._job_view(job, "") for job in self._pending]

    def jobs_final(self) -> bool:
        """True when every job is final (completed, errored or failed): nothing the API accepted is still to apply."""
        return not self.pending_jobs()

    def hold_jobs(self) -> None:
        """Keep every job pending, however long ago it was due, until release_jobs() (complete_jobs() still finishes
        them): a test knows what a client that looks at its jobs meanwhile sees, whatever the profile's job times."""
        with self._lock:
            self._held = True

    def release_jobs(self) -> None:
        """Undo hold_jobs(): from now on jobs finish when they are due (those due already, at the next look)."""
        with self._lock:
            self._held = False

    def wait_for_jobs(self, timeout: float) -> None:
        """Wait until every job is final, as time passes (nothing is forced: see complete_jobs for that). Sleeps until
        the next job is due, not in fixed steps; TimeoutError naming the pending jobs when `timeout` seconds pass."""
        if self._held:
            raise RuntimeError("jobs are held (hold_jobs): they never finish by themselves; release_jobs() first")
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._settle()
                dues = [job.due for job in self._pending]
            if not dues:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                pending = ", ".join(f"{j['id']} ({j['job_type']})" for j in self.pending_jobs()[:10])
                raise TimeoutError(f"{len(dues)} job(s) still pending after {timeout} s: {pending}")
            known = [due for due in dues if due is not None]  # None: an import still waiting for its upload
            wait = min(known) - time.time() if known else left
            time.sleep(min(max(wait, 0.005), left))

    @property
    def stats(self) -> dict[str, Any]:
        with self._lock:
            copy: dict[str, Any] = orjson.loads(orjson.dumps(self._stats))  # a deep copy of a dict
            return copy

    def send_counts(self) -> Counter[str]:
        """Email -> how many accepted upserts and import uploads carried it (only with count_sends=True): shows
        whether a contact was sent more than once across retries, crashes and resumes."""
        with self._lock:
            return Counter(self._send_counts)

    def inject(self, fault: dict[str, Any]) -> None:
        """Arm a fault for the next `times` matching requests (or upsert/import jobs for endpoint "job")."""
        normal = _normalise_fault(fault)
        with self._lock:
            (self._job_faults if normal["endpoint"] == "job" else self._faults).append(normal)

    # ---- internals shared by the HTTP layer

    def complete_jobs(self) -> int:
        """Finish every pending job now, whatever its delay (imports still waiting for their upload stay pending).
        A fast-forward for tests and demos; returns how many jobs finished."""
        with self._lock:
            return self._settle(force=True)

    def _settle(self, force: bool = False) -> int:
        """Finish every job whose time has come, oldest first (callers hold the lock); while held, only if forced."""
        if not self._pending or (self._held and not force):
            return 0
        now = time.time()
        due = sorted((j for j in self._pending if j.due is not None and (force or j.due <= now)),
                     key=lambda j: (j.due or 0.0, j.order))
        with gcpolicy.pause:
            for job in due:
                self._finish(job, now)
        return len(due)

    def _finish(self, job: _Job, now: float) -> None:
        self._pending.remove(job)
        if job.apply is not None:
            apply, job.apply = job.apply, None
            try:
                apply(job)
            except Exception:
                job.status = "failed"
                raise
        if job.status == "pending":
            job.status = "errored" if job.errored else "completed"
        job.finished_at = now
        finished = self._stats["jobs_finished"]
        finished[job.status] = finished.get(job.status, 0) + 1

    def _new_job(self, job_type: str, apply: Callable[[_Job], None] | None, requested: int,
                 waits_for_upload: bool = False) -> _Job:
        now = time.time()
        job = _Job(str(uuid.uuid4()), job_type, now, None, apply, requested=requested)
        if not waits_for_upload:
            self._schedule(job, now)
        self._jobs[job.id] = job
        self._pending.append(job)
        self._stats["jobs_created"] += 1
        return job

    def _schedule(self, job: _Job, now: float) -> None:
        """Set when a job finishes (callers hold the lock): `job_delay` from now, or under the profile's job_seconds a
        random duration, never before the job scheduled before it (an account's jobs are applied in order)."""
        timing = self.profile.job_seconds
        if timing is None:
            job.due = now + self.job_delay
        else:
            job.due = self._last_due = max(now + self._rng.uniform(*timing), self._last_due)
        self._job_seq += 1
        job.order = self._job_seq

    def _take_fault(self, template: str) -> dict[str, Any] | None:
        with self._lock:
            return _take(self._faults, template, self._stats)

    def _take_job_fault(self) -> dict[str, Any] | None:
        return _take(self._job_faults, "job", self._stats)

    def _rate(self, key: str | None, template: str, count: bool) -> tuple[bool, list[tuple[str, str]]]:
        """Fixed windows per key per endpoint. Returns (allowed, X-RateLimit-* headers)."""
        now = time.time()
        limit = self.rate_limit or NOMINAL_RATE_LIMIT
        window = math.floor((now - self._epoch) / self.rate_window)
        used = 0
        with self._lock:
            if key is not None:
                bucket = (_key_fingerprint(key), template)
                seen_window, seen = self._buckets.get(bucket, (window, 0))
                used = seen if seen_window == window else 0
                if count:
                    used += 1
                    self._buckets[bucket] = (window, used)
        allowed = self.rate_limit is None or used <= limit
        reset = math.ceil(self._epoch + (window + 1) * self.rate_window)
        return allowed, [("X-RateLimit-Limit", str(limit)), ("X-RateLimit-Remaining", str(max(0, limit - used))),
                         ("X-RateLimit-Reset", str(reset))]

    def _record(self, template: str, status: int, body_bytes: int) -> None:
        with self._lock:
            s = self._stats
            s["requests"][template] = s["requests"].get(template, 0) + 1
            code = str(status) if status else "no answer"
            s["status_counts"][code] = s["status_counts"].get(code, 0) + 1
            s["bytes_received"] += body_bytes
            s["max_body_bytes"] = max(s["max_body_bytes"], body_bytes)
            if status == 429:
                s["responses_429"] += 1

    def _list_ids_of(self, idx: int) -> list[str]:
        return sorted(lid for lid, lst in self._lists.items() if idx in lst.members)

    def _check_list_name(self, name: object) -> str | None:
        if not isinstance(name, str) or not 1 <= len(name) <= 100:
            return "name must be a string of 1 to 100 characters"
        if len(self._lists) >= MAX_LISTS:
            return f"an account can have at most {MAX_LISTS} lists"
        return None

    def _add_field(self, name: object, field_type: object) -> str | tuple[str, str]:
        """Create a custom field; returns its id or (error field, message)."""
        if not isinstance(name, str) or not 1 <= len(name) <= 100 or not _FIELD_NAME_RE.fullmatch(name):
            return "name", "name must be 1 to 100 characters of A-Z, a-z, 0-9 and _, starting with a letter or _"
        if field_type not in limits.CUSTOM_FIELD_TYPES:
            return "field_type", "field_type must be one of Date, Number, Text"
        if name.lower() in _RESERVED_NAMES:
            return "name", f"'{name}' is a reserved field name"
        if any(n.lower() == name.lower() for n, _ in self._fields.values()):
            return "name", f"a custom field named '{name}' already exists (names are case-insensitive)"
        if len(self._fields) >= limits.MAX_CUSTOM_FIELDS:
            return "name", f"an account can have at most {limits.MAX_CUSTOM_FIELDS} custom fields"
        self._field_seq += 1
        field_id = f"e{self._field_seq}_{field_type[0]}"
        self._fields = {**self._fields, field_id: (name, str(field_type))}
        return field_id

    def _job_view(self, job: _Job, base_url: str) -> dict[str, Any]:
        results: dict[str, Any] = {"requested_count": job.requested, "created_count": job.created,
                                   "updated_count": job.updated, "deleted_count": job.deleted,
                                   "errored_count": job.errored}
        if job.errors_csv is not None:
            results["errors_url"] = f"{base_url}/_sandbox/errors/{job.id}.csv"
        view = {"id": job.id, "status": job.status, "job_type": job.job_type, "results": results,
                "started_at": _iso(job.started_at)}
        if job.finished_at is not None:
            view["finished_at"] = _iso(job.finished_at)
        return view

    def _contact_view(self, idx: int, base_url: str) -> dict[str, Any]:
        """A contact as the API shows it (ContactDetails3): custom_fields keyed by field name, as the live API does."""
        store = self._store
        fields = store.fields(idx)
        view: dict[str, Any] = dict.fromkeys(_VIEW_TEXT_FIELDS, "")
        view.update(fields)
        names = self._fields
        view["custom_fields"] = {names[k][0]: v for k, v in fields.get("custom_fields", {}).items() if k in names}
        view.setdefault("alternate_emails", [])
        contact_id = store.id_of(idx)
        view.update(id=contact_id, email=store.emails[idx] or "", list_ids=self._list_ids_of(idx), segment_ids=[],
                    created_at=_iso(store.created[idx]), updated_at=_iso(store.updated[idx]),
                    _metadata={"self": f"{base_url}/v3/marketing/contacts/{contact_id}"})
        return view

    # ---- operations: one per endpoint; each takes a _Request and returns (status, JSON-able payload)

    def op_upsert(self, req: _Request) -> Reply:
        with gcpolicy.pause:  # the request's many objects come and go without collector passes over them
            checked = self._check_upsert(req.body)
        if isinstance(checked[0], int):
            return checked
        batch, list_ids = checked
        count = len(batch.emails)
        with self._lock:
            self._settle()
            missing = [x for x in list_ids if x not in self._lists]
            if missing:
                return 404, _err(f"list ids do not exist: {', '.join(missing)}", "list_ids")
            lists = [self._lists[x] for x in dict.fromkeys(list_ids)]
            fault = self._take_job_fault()
            job = self._new_job("upsert_contacts", self._upsert_applier(batch, lists, fault), count)
            self._stats["upsert_contacts_received"] += count
            if self.count_sends:
                self._send_counts.update(filter(None, batch.emails))
            self._stats["max_contacts_per_request"] = max(self._stats["max_contacts_per_request"], count)
        return 202, {"job_id": job.id}

    def _check_upsert(self, body: bytes) -> tuple[_Batch, list[str]] | Reply:
        """(validated contacts, list ids) of an upsert body, or the 400 answer."""
        doc = _load_json(body)
        if not isinstance(doc, dict):
            return 400, _err("request body must be a JSON object", "body")
        contacts, list_ids = doc.get("contacts"), doc.get("list_ids", [])
        if not isinstance(contacts, list) or not 1 <= len(contacts) <= limits.MAX_CONTACTS_PER_REQUEST:
            return 400, _err(f"contacts must be an array of 1 to {limits.MAX_CONTACTS_PER_REQUEST} contacts",
                             "contacts")
        if not isinstance(list_ids, list) or not all(isinstance(x, str) for x in list_ids):
            return 400, _err("list_ids must be an array of list id strings", "list_ids")
        errors, batch = validate_contacts(contacts, self._fields, self._is_invalid)
        return (400, {"errors": errors}) if errors else (batch, list_ids)

    def _upsert_applier(self, batch: _Batch, lists: list[_List],
                        fault: dict[str, Any] | None) -> Callable[[_Job], None]:
        def apply(job: _Job) -> None:
            count = len(batch.emails)
            skip = _fault_skip(job, fault, count)
            refused = self._refused(batch.emails, batch.secondary_ids(), skip) \
                if self._job_rules and job.status != "failed" else {}
            if refused:
                skip |= refused
                job.errored = len(skip)
                if len(skip) == count:
                    job.status = "failed"
            if skip:
                job.errors_csv = _errors_csv(["index", "email", "error"],
                                             ([i, batch.emails[i] or "", reason] for i, reason in sorted(skip.items())))
            self._apply_contacts(job, [batch.without(skip) if skip else batch], lists)
        return apply

    @property
    def _job_rules(self) -> bool:
        """Whether any rule refuses contacts when their job runs (see _refused)."""
        return self.profile.strict_identifiers or self.contact_limit is not None

    def _refused(self, emails: Sequence[str | None], secondary: list[dict[str, str]] | None,
                 skip: Container[int]) -> dict[int, str]:
        """{index: reason} for the contacts of a job (callers hold the lock) that SendGrid's rules refuse when the job
        runs, not when the request arrives: under strict_identifiers, an update that leaves out one of the contact's
        existing identifiers; past contact_limit, every contact of the job that would pass it. `secondary`: each
        contact's identifiers other than email (None: email only)."""
        store = self._store
        out: dict[int, str] = {}
        if self.profile.strict_identifiers and (secondary is not None or store.secondary_rows):
            for i, email in enumerate(emails):  # (email-only contacts named by email only have nothing to refuse)
                if i not in skip and (problem := store.identifier_problem(email, secondary[i] if secondary else {})):
                    out[i] = problem
        if self.contact_limit is not None:
            new = store.count_new(emails, secondary, lambda i: i in skip or i in out)
            if new and store.alive + new > self.contact_limit:
                return {i: CONTACT_LIMIT_MESSAGE for i in range(len(emails)) if i not in skip}
        return out

    def _apply_contacts(self, job: _Job, batches: Iterable[_Batch], lists: list[_List]) -> None:
        """Store contacts and add them to lists; counts only contacts that changed (as the API does)."""
        store, now = self._store, time.time()
        member_sets = [lst.members for lst in lists]
        for batch in batches:
            if isinstance(batch, _PlainContacts):
                rows, changed, kept = store.bulk_upsert(batch.emails, batch.texts, now)
                created, updated = len(rows), len(changed)
                if kept and member_sets:  # an unchanged contact joining a list counts as updated
                    stay = set(kept)
                    joining = set().union(*(stay - members for members in member_sets))
                    for idx in joining:
                        store.updated[idx] = now
                    updated += len(joining)
                for members in member_sets:
                    members.update(rows)
                    members.update(changed)
                    members.update(kept)
            else:
                created, updated = self._apply_each(store, batch, member_sets, now)
            job.created += created
            job.updated += updated

    @staticmethod
    def _apply_each(store: _Store, batch: _Contacts, member_sets: list[set[int]], now: float) -> tuple[int, int]:
        """Contact by contact (secondary identifiers, alternate emails, repeats). Returns (created, updated)."""
        rows, created, existing = [], 0, []
        for email, fields in zip(batch.emails, batch.fields, strict=True):
            idx, new, changed = store.upsert(email, fields, now)
            rows.append(idx)
            if new:
                created += 1
            else:
                existing.append((idx, changed))
        updated = 0
        for idx, changed in existing:
            if changed:
                updated += 1
            elif any(idx not in members for members in member_sets):
                updated += 1
                store.updated[idx] = now
        for members in member_sets:
            members.update(rows)
        return created, updated

    def op_job_status(self, req: _Request) -> Reply:
        with self._lock:
            self._settle()
            job = self._jobs.get(req.params["id"])
            if job is None:
                return 404, _err("job not found", "id")
            return 200, self._job_view(job, req.base_url)

    def op_import(self, req: _Request) -> Reply:
        doc = _load_json(req.body)
        if not isinstance(doc, dict):
            return 400, _err("request body must be a JSON object", "body")
        if doc.get("file_type") != "csv":
            return 400, _err("file_type must be 'csv'", "file_type")
        mappings, list_ids = doc.get("field_mappings"), doc.get("list_ids", [])
        if not isinstance(mappings, list) or not mappings or not all(m is None or isinstance(m, str)
                                                                     for m in mappings):
            return 400, _err("field_mappings must be a non-empty array of field ids or null", "field_mappings")
        if not isinstance(list_ids, list) or not all(isinstance(x, str) for x in list_ids):
            return 400, _err("list_ids must be an array of list id strings", "list_ids")
        with self._lock:
            self._settle()
            fields = self._fields
            for i, m in enumerate(mappings):
                if m is not None and m not in _IMPORTABLE and m not in fields:
                    return 400, _err(f"'{m}' is not a writable reserved or custom field id", f"field_mappings[{i}]")
            used = [m for m in mappings if m is not None]
            if len(used) != len(set(used)):
                return 400, _err("a field id may be mapped to one column only", "field_mappings")
            if not any(_IMPORTABLE.get(m) in _IDENTIFIERS for m in used):
                return 400, _err("at least one identifier (email) must be mapped", "field_mappings")
            missing = [x for x in list_ids if x not in self._lists]
            if missing:
                return 404, _err(f"list ids do not exist: {', '.join(missing)}", "list_ids")
            fault = self._take_job_fault()
            job = self._new_job("import", None, 0, waits_for_upload=True)
            token = secrets.token_urlsafe(16)
            self._imports[job.id] = _Import(job.id, token, list(mappings), list(dict.fromkeys(list_ids)), fault)
        return 200, {"job_id": job.id, "upload_uri": f"{req.base_url}/_sandbox/uploads/{job.id}",
                     "upload_headers": [{"header": "Content-Type", "value": "text/csv"},
                                        {"header": "X-Sandbox-Upload-Token", "value": token}]}

    def upload_headers_ok(self, job_id: str, headers: Any) -> int:
        """200 when the upload may proceed, 404 unknown job, 403 missing/wrong signed header, 409 already sent
        (or being sent). An upload that broke off may be sent again."""
        with self._lock:
            imp = self._imports.get(job_id)
            if imp is None:
                return 404
            if not secrets.compare_digest(headers.get("X-Sandbox-Upload-Token", ""), imp.token) or \
                    (headers.get("Content-Type") or "").split(";")[0].strip().lower() != "text/csv":
                return 403
            if imp.state != "waiting":
                return 409
            imp.state = "uploading"
            return 200

    def abort_upload(self, job_id: str) -> None:
        with self._lock:
            self._imports[job_id].state = "waiting"

    def finish_upload(self, job_id: str, parsed: _ParsedImport) -> None:
        """Register a parsed upload: the import job becomes due `job_delay` seconds from now."""
        with self._lock:
            imp = self._imports[job_id]
            imp.state = "received"
            job = self._jobs[job_id]
            self._stats["import_rows_received"] += parsed.rows
            if self.count_sends:
                self._send_counts.update(row[1] for row in parsed.valid if row[1] is not None)
            job.requested = parsed.rows
            job.apply = self._import_applier(imp, parsed)
            self._schedule(job, time.time())

    def _import_applier(self, imp: _Import, parsed: _ParsedImport) -> Callable[[_Job], None]:
        def apply(job: _Job) -> None:
            errors = list(parsed.errors)
            if parsed.failure is not None:
                job.status, job.errored = "failed", parsed.rows
                job.errors_csv = _errors_csv(["line", "email", "error"], [*errors, [0, "", parsed.failure]])
                return
            skip = _fault_skip(job, imp.fault, len(parsed.valid))
            if self._job_rules and job.status != "failed":  # imports carry no identifier but email (_IMPORTABLE)
                skip |= self._refused([row[1] for row in parsed.valid], None, skip)
            errors += [[parsed.valid[i][0], parsed.valid[i][1] or "", reason] for i, reason in skip.items()]
            lists = [self._lists[x] for x in imp.list_ids if x in self._lists]
            items = (_row_contact(row, parsed.columns, self._fields) for i, row in enumerate(parsed.valid)
                     if i not in skip)
            self._apply_contacts(job, _in_batches(items), lists)
            job.errored = len(errors)
            if errors:
                job.errors_csv = _errors_csv(["line", "email", "error"], sorted(errors, key=lambda e: e[0]))
            if job.status == "pending" and parsed.rows and job.errored >= parsed.rows:
                job.status = "failed"
        return apply

    def op_fields_get(self, req: _Request) -> Reply:
        with self._lock:
            custom = [{"id": fid, "name": n, "field_type": t} for fid, (n, t) in self._fields.items()]
        reserved = [{"id": rid, "name": n, "field_type": t, "read_only": ro} for rid, n, t, ro in RESERVED_FIELDS]
        return 200, {"custom_fields": custom, "reserved_fields": reserved,
                     "_metadata": {"self": f"{req.base_url}/v3/marketing/field_definitions"}}

    def op_fields_post(self, req: _Request) -> Reply:
        doc = _load_json(req.body)
        if not isinstance(doc, dict):
            return 400, _err("request body must be a JSON object", "body")
        with self._lock:
            result = self._add_field(doc.get("name"), doc.get("field_type"))
        if not isinstance(result, str):
            return 400, _err(result[1], result[0])
        name, ftype = self._fields[result]
        return 200, {"id": result, "name": name, "field_type": ftype,
                     "_metadata": {"self": f"{req.base_url}/v3/marketing/field_definitions/{result}"}}

    def _list_view(self, lst: _List, base_url: str) -> dict[str, Any]:
        return {"id": lst.id, "name": lst.name, "contact_count": len(lst.members),
                "_metadata": {"self": f"{base_url}/v3/marketing/lists/{lst.id}"}}

    def op_lists_get(self, req: _Request) -> Reply:
        size_text = req.query.get("page_size", ["100"])[-1]
        token = req.query.get("page_token", [""])[-1]
        try:
            size = int(size_text)
            offset = int(token) if token else 0
        except ValueError:
            return 400, _err("page_size must be a number from 1 to 1000 and page_token one this API returned",
                             "page_size")
        if not 1 <= size <= 1000 or offset < 0:
            return 400, _err("page_size must be a number from 1 to 1000", "page_size")
        with self._lock:
            self._settle()
            every = list(self._lists.values())
            page = [self._list_view(lst, req.base_url) for lst in every[offset:offset + size]]
        url = f"{req.base_url}/v3/marketing/lists?page_size={size}"
        meta: dict[str, Any] = {"self": f"{url}&page_token={token}", "count": len(every)}
        if offset + size < len(every):
            meta["next"] = f"{url}&page_token={offset + size}"
        if offset > 0:
            meta["prev"] = f"{url}&page_token={max(0, offset - size)}"
        return 200, {"result": page, "_metadata": meta}

    def op_lists_post(self, req: _Request) -> Reply:
        doc = _load_json(req.body)
        if not isinstance(doc, dict):
            return 400, _err("request body must be a JSON object", "body")
        with self._lock:
            error = self._check_list_name(doc.get("name"))
            if error:
                return 400, _err(error, "name")
            lst = self._lists[self.create_list(doc["name"])]
            return 201, self._list_view(lst, req.base_url)

    def op_list_get(self, req: _Request) -> Reply:
        with self._lock:
            self._settle()
            lst = self._lists.get(req.params["id"])
            return (404, _err("list not found", "id")) if lst is None else (200, self._list_view(lst, req.base_url))

    def op_list_count(self, req: _Request) -> Reply:
        with self._lock:
            self._settle()
            lst = self._lists.get(req.params["id"])
            if lst is None:
                return 404, _err("list not found", "id")
            return 200, {"contact_count": len(lst.members), "billable_count": len(lst.members)}

    def op_list_remove(self, req: _Request) -> Reply:
        ids = _split_ids(req.query.get("contact_ids", []))
        with self._lock:
            self._settle()
            lst = self._lists.get(req.params["id"])
            if lst is None:
                return 404, _err("list not found", "id")
            if not ids:
                return 400, _err("contact_ids is required: a comma-separated list of contact ids", "contact_ids")
            rows = [self._store.index_of(i) for i in ids]
            unknown = [i for i, row in zip(ids, rows, strict=True) if row is None]
            if unknown:
                return 404, _err(f"contact ids do not exist: {', '.join(unknown[:10])}", "contact_ids")

            def apply(job: _Job) -> None:
                for row in rows:
                    if row is not None and row in lst.members:
                        lst.members.discard(row)
                        job.deleted += 1

            job = self._new_job("remove_list_contacts", apply, len(ids))
        return 202, {"job_id": job.id}

    def op_contacts_delete(self, req: _Request) -> Reply:
        ids = _split_ids(req.query.get("ids", []))
        delete_all = req.query.get("delete_all_contacts", [""])[-1] == "true"
        if bool(ids) == delete_all:
            return 400, _err("set either ids (comma-separated contact ids) or delete_all_contacts=true", "ids")
        with self._lock:
            self._settle()

            def apply(job: _Job) -> None:
                store = self._store
                rows = range(len(store.live)) if delete_all else (store.index_of(i) for i in ids)
                for row in rows:
                    if row is not None and store.live[row]:
                        store.delete(row)
                        for lst in self._lists.values():
                            lst.members.discard(row)
                        job.deleted += 1

            job = self._new_job("delete_contacts", apply, len(ids) if ids else self._store.alive)
        return 202, {"job_id": job.id}

    def op_contacts_count(self, req: _Request) -> Reply:
        with self._lock:
            self._settle()
            return 200, {"contact_count": self._store.alive, "billable_count": self._store.alive}

    def op_search_emails(self, req: _Request) -> Reply:
        doc = _load_json(req.body)
        emails = doc.get("emails") if isinstance(doc, dict) else None
        if not isinstance(emails, list) or not all(isinstance(e, str) for e in emails):
            return 400, _err("emails must be an array of email addresses", "emails")
        if len(emails) > limits.MAX_SEARCH_EMAILS:
            return 400, _err(f"at most {limits.MAX_SEARCH_EMAILS} emails can be searched at once", "emails")
        wanted = [e for e in emails if e]
        if not wanted:
            return 400, _err("emails must contain at least one email address", "emails")
        bad = [{"field": f"emails[{i}]", "message": f"email '{e}' is not valid"}
               for i, e in enumerate(emails) if e and (len(e) > 100 or not _is_email(e))]
        if bad:
            return 400, {"errors": bad}
        result: dict[str, Any] = {}
        found = 0
        with self._lock:
            self._settle()
            for e in wanted:
                low = e.lower()
                idx = self._store.find_email(low)
                if idx is None:
                    result[low] = {"error": "contact not found"}
                else:
                    result[low] = {"contact": self._contact_view(idx, req.base_url)}
                    found += 1
        if not found:
            return 404, _err("no contacts found for the given emails")
        return 200, {"result": result}

    def errors_file(self, job_id: str) -> bytes | None:
        with self._lock:
            self._settle()
            job = self._jobs.get(job_id)
            return None if job is None else job.errors_csv


# ------------------------------------------------------------------------------------------- validation (hot path)


_BATCH_KEYS = frozenset(_STRING_LIMITS) | {"custom_fields"}  # the contact fields _valid_batch knows
_BLOCK = 1024  # contacts checked together: a block's objects stay in the CPU cache across its column passes


def validate_contacts(contacts: list[Any], field_types: dict[str, tuple[str, str]],
                      is_invalid: InvalidEmailCheck) -> tuple[list[dict[str, str]], _Batch]:
    """Check an upsert's contacts like the API does. Returns (errors, the contacts with lower-case emails).

    Mutates the contact dicts (pops "email"); they are the request's own. One error per problem, all collected, so
    a client can drop every rejected address in one go. The common request, every contact valid with the usual
    fields, is certified by _valid_batch without Python code per contact; any other goes contact by contact.
    """
    batch = _valid_batch(contacts, field_types, is_invalid)
    return ([], batch) if batch is not None else _validate_each(contacts, field_types, is_invalid)


def _valid_batch(contacts: list[Any], field_types: dict[str, tuple[str, str]],
                 is_invalid: InvalidEmailCheck) -> _Batch | None:
    """The contacts, if every one has a valid email and otherwise only valid string fields and custom_fields; else
    None (nothing changed), and _validate_each finds what is wrong. Checks a block of contacts a field (column) at a
    time with C-level passes (map, set, max, join): about half the cost of the per-contact loop."""
    emails: list[str] = []
    keys: set[str] = set()
    for start in range(0, len(contacts), _BLOCK):
        block = contacts[start:start + _BLOCK]
        if set(map(type, block)) != {dict}:
            return None
        block_keys = set().union(*block)
        if not block_keys <= _BATCH_KEYS:
            return None
        for key in block_keys:
            values = _column(block, key)
            if key == "email":
                if len(values) != len(block) or not _emails_ok(values):
                    return None
                emails += values
            elif key == "custom_fields":
                if not _custom_fields_ok(values, field_types):
                    return None
            elif not _all_str(values) or max(map(len, values)) > _STRING_LIMITS[key]:
                return None
        keys |= block_keys
    lows = list(map(str.lower, emails))
    if len(lows) != len(contacts) or len(set(lows)) != len(lows) or is_invalid.any_of(lows):
        return None
    for c in contacts:
        del c["email"]
    return _PlainContacts(lows, _members_each(contacts)) if keys.isdisjoint(_INDEXED_FIELDS) else \
        _Contacts(lows, contacts)


def _all_str(values: list[Any]) -> bool:
    """True if every value is a str (one join: cheaper than collecting their types)."""
    try:
        "".join(values)
    except TypeError:
        return False
    return True


def _column(rows: list[dict[str, Any]], key: str) -> list[Any]:
    """The rows' values under key (rows without it are left out)."""
    try:
        return list(map(operator.itemgetter(key), rows))
    except KeyError:
        return [r[key] for r in rows if key in r]


def _custom_fields_ok(values: list[Any], field_types: dict[str, tuple[str, str]]) -> bool:
    """Every value an object of known custom field ids, each holding its type (Date: a real MM/DD/YYYY day)."""
    if set(map(type, values)) != {dict}:
        return False
    for fid in set().union(*values):
        spec = field_types.get(fid)
        if spec is None:
            return False
        column = _column(values, fid)
        if spec[1] == "Number":
            if not set(map(type, column)) <= {int, float}:
                return False
        elif not _all_str(column) or (spec[1] == "Date" and not all(map(_is_date, set(column) - _DATE_CACHE))):
            return False
    return True


def _emails_ok(emails: list[Any]) -> bool:
    """True if every value is a string that _is_email accepts and within the length limit. ASCII addresses are
    checked all at once: one byte deletion shows the local parts hold only allowed characters and one "@" each, a
    few substring searches find misplaced dots, and each distinct domain is matched once."""
    try:
        joined = "\n".join(emails)
    except TypeError:  # not all strings
        return False
    if max(map(len, emails)) > limits.MAX_EMAIL_LENGTH:
        return False
    if not joined.isascii():
        return all(map(_is_email, emails))
    raw = joined.encode()
    if raw.translate(None, _ASCII_LOCAL_CHARS) != b"\n".join([b"@"] * len(emails)):
        return False  # a character no address may hold (a newline among them), or not exactly one "@"
    if ".." in joined or raw.startswith((b".", b"@")) or b"\n." in raw or b"\n@" in raw or b".@" in raw:
        return False  # a local part that is empty or starts or ends with a dot
    parts = joined.replace("@", "\n").split("\n")  # local part, domain, local part, domain, ...
    return max(map(len, parts[0::2])) <= MAX_LOCAL_PART and all(map(_DOMAIN_RE.fullmatch, set(parts[1::2])))


def _validate_each(contacts: list[Any], field_types: dict[str, tuple[str, str]],
                   is_invalid: Callable[[str], bool]) -> tuple[list[dict[str, str]], _Batch]:
    """validate_contacts contact by contact, naming every problem. Checks are inlined and messages are only built
    on the failure path."""
    errors: list[dict[str, str]] = []
    items: list[tuple[str | None, dict[str, Any]]] = []
    append, lows, where = items.append, [], []
    unknown_ids: dict[str, None] = {}  # custom field ids no field has, in the order met
    limit_of, email_match = _STRING_LIMITS.get, _EMAIL_RE.fullmatch
    kind_of = {fid: ftype[0] for fid, (_, ftype) in field_types.items()}.get
    dates = _DATE_CACHE
    for i, c in enumerate(contacts):
        if type(c) is not dict:
            errors.append({"field": f"contacts[{i}]", "message": "contact must be an object"})
            continue
        for key, value in c.items():
            lim = limit_of(key)
            if lim is not None:
                if type(value) is not str or len(value) > lim:
                    errors.append(_string_error(i, key, value))
                continue
            if key == "custom_fields":
                if type(value) is dict:
                    for fid, v in value.items():
                        kind = kind_of(fid)
                        if not (type(v) is str if kind == "T" else
                                (type(v) is int or type(v) is float) if kind == "N" else
                                (type(v) is str and (v in dates or _is_date(v))) if kind == "D" else False):
                            break
                    else:
                        continue
                problem = _check_custom(value, field_types)
                if problem == "ids":
                    unknown_ids.update(dict.fromkeys(fid for fid in value if fid not in field_types))
                elif problem:
                    errors.append({"field": f"contacts[{i}].custom_fields", "message": problem})
            elif key == "alternate_emails":
                problem = _check_alternates(value)
                if problem:
                    errors.append({"field": f"contacts[{i}].alternate_emails", "message": problem})
            else:
                errors.append({"field": f"contacts[{i}].{key}", "message": f"unknown contact field '{key}'"})
        email = c.pop("email", None)
        if email is None:
            if c.keys().isdisjoint(_SECONDARY_IDS):
                errors.append({"field": f"contacts[{i}]", "message": "a contact needs at least one identifier: "
                               "email, phone_number_id, external_id or anonymous_id"})
            append((None, c))
            continue
        if type(email) is not str or len(email) > limits.MAX_EMAIL_LENGTH:
            continue  # reported above
        low = email.lower()
        if email_match(email) is None or ".." in email or is_invalid(low):
            errors.append({"field": f"contacts[{i}].identifier", "message": f"email '{email}' is not valid"})
            continue
        lows.append(low)
        where.append(i)
        append((low, c))
    if len(set(lows)) != len(lows):
        errors += _duplicate_errors(lows, where)
    if unknown_ids:  # the live API's wording (sendgrid-nodejs#953), which names them
        errors.append({"field": "custom_fields",
                       "message": f"invalid custom field ids supplied - {','.join(unknown_ids)}"})
    return errors, _Contacts.of([e for e, _ in items], [f for _, f in items])


def _duplicate_errors(lows: list[str], where: list[int]) -> list[dict[str, str]]:
    """One error per repeat of an address (case-insensitive), naming where it first appeared."""
    first: dict[str, int] = {}
    errors = []
    for low, i in zip(lows, where, strict=True):
        j = first.setdefault(low, i)
        if j != i:
            errors.append({"field": f"contacts[{i}].email",
                           "message": f"email '{low}' appears more than once (first at contacts[{j}])"})
    return errors


def _string_error(i: int, key: str, value: object) -> dict[str, str]:
    if type(value) is not str:
        return {"field": f"contacts[{i}].{key}", "message": f"{key} must be a string"}
    return {"field": f"contacts[{i}].{key}", "message": f"{key} must be at most {_MAXLEN[key]} characters"}


def _check_custom(value: object, field_types: dict[str, tuple[str, str]]) -> str | None:
    """None if fine, "ids" for an unknown field id, else a message."""
    if type(value) is not dict:
        return "custom_fields must be an object keyed by custom field id"
    for fid, v in value.items():
        spec = field_types.get(fid)
        if spec is None:
            return "ids"
        name, ftype = spec
        if ftype == "Number":
            if not _is_number(v):
                return f"custom field {fid} ({name}) is a Number field: the value must be a JSON number"
        elif ftype == "Date":
            if not _is_date(v):
                return f"custom field {fid} ({name}) is a Date field: the value must be a date as MM/DD/YYYY"
        elif type(v) is not str:
            return f"custom field {fid} ({name}) is a Text field: the value must be a string"
    return None


def _check_alternates(value: object) -> str | None:
    if type(value) is not list or not all(type(e) is str for e in value):
        return "alternate_emails must be an array of strings"
    if len(value) > limits.MAX_ALTERNATE_EMAILS:
        return f"alternate_emails can hold at most {limits.MAX_ALTERNATE_EMAILS} addresses"
    for e in value:
        if len(e) > limits.MAX_EMAIL_LENGTH or not _is_email(e):
            return f"alternate email '{e}' is not valid"
    return None


# ---------------------------------------------------------------------------------------------- CSV import parsing


@dataclass(slots=True)
class _ParsedImport:
    columns: list[tuple[int, str, str]]  # (column, kind "email"|"reserved"|"custom", reserved name or field id)
    rows: int = 0
    valid: list[tuple[Any, ...]] = field(default_factory=list)  # (line, email, value per mapped column...)
    errors: list[list[Any]] = field(default_factory=list)  # [line, email, reason]
    failure: str | None = None


def _import_columns(mappings: list[str | None]) -> list[tuple[int, str, str]]:
    columns = []
    for col, m in enumerate(mappings):
        if m is None:
            continue
        name = _IMPORTABLE.get(m)
        if name == "email":
            columns.append((col, "email", "email"))
        else:
            columns.append((col, "reserved", name) if name is not None else (col, "custom", m))
    return columns


def parse_import(text_rows: Iterator[list[str]], mappings: list[str | None], fields: dict[str, tuple[str, str]],
                 is_invalid: Callable[[str], bool], max_rows: int) -> _ParsedImport:
    """Validate CSV rows (the first is the header). Keeps valid rows as compact tuples; errors by 1-based line."""
    columns = _import_columns(mappings)
    out = _ParsedImport(columns)
    header = next(text_rows, None)
    if header is None:
        out.failure = "the file is empty: a header row is required"
        return out
    if len(header) != len(mappings):
        out.failure = f"field_mappings has {len(mappings)} entries but the file has {len(header)} columns"
        return out
    email_col = next((c for c, kind, _ in columns if kind == "email"), None)
    for line, row in enumerate(text_rows, start=2):
        out.rows += 1
        if out.rows > max_rows:
            out.failure = f"the file has more than {max_rows} contacts"
            return out
        email = row[email_col].strip() if email_col is not None and email_col < len(row) else ""
        if len(row) != len(mappings):
            out.errors.append([line, email, f"expected {len(mappings)} columns, found {len(row)}"])
            continue
        problem = _check_row(row, columns, fields, is_invalid)
        if problem:
            out.errors.append([line, email, problem])
            continue
        out.valid.append((line, email.lower() or None, *(row[c] for c, _, _ in columns)))
    return out


def _check_row(row: list[str], columns: list[tuple[int, str, str]], fields: dict[str, tuple[str, str]],
               is_invalid: Callable[[str], bool]) -> str | None:
    has_id = False
    for col, kind, key in columns:
        value = row[col]
        if not value:
            continue
        if kind == "email":
            has_id = True
            value = value.strip()
            if len(value) > limits.MAX_EMAIL_LENGTH or not _is_email(value) or is_invalid(value.lower()):
                return f"email '{value}' is not valid"
        elif kind == "reserved":
            if (lim := _MAXLEN.get(key)) is not None and len(value) > lim:
                return f"{key} must be at most {lim} characters"
            if key == "alternate_emails" and (problem := _check_alternates(_split_alternates(value))):
                return problem
            has_id = has_id or key in _SECONDARY_IDS
        else:
            ftype = fields[key][1]
            if ftype == "Number":
                try:
                    finite = math.isfinite(float(value))
                except ValueError:
                    finite = False
                if not finite:
                    return f"custom field {key} is a Number field: '{value}' is not a number"
            elif ftype == "Date" and not _is_date(value):
                return f"custom field {key} is a Date field: '{value}' is not MM/DD/YYYY"
    return None if has_id else "a contact needs at least one identifier"


def _split_alternates(value: str) -> list[str]:
    return [e.strip() for e in value.split(",") if e.strip()]


def _in_batches(items: Iterable[tuple[str | None, dict[str, Any]]]) -> Iterator[_Batch]:
    """Contacts in batches of at most one request's worth (bounded memory)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, limits.MAX_CONTACTS_PER_REQUEST)):
        yield _Contacts.of([e for e, _ in chunk], [f for _, f in chunk])


def _row_contact(row: tuple[Any, ...], columns: list[tuple[int, str, str]],
                 fields: dict[str, tuple[str, str]]) -> tuple[str | None, dict[str, Any]]:
    contact: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    for (_, kind, key), value in zip(columns, row[2:], strict=True):
        if not value or kind == "email":
            continue
        if kind == "reserved":
            if key == "alternate_emails":
                contact[key] = _split_alternates(value)
            else:
                contact[key] = value
        elif fields.get(key, ("", "Text"))[1] == "Number":
            number = float(value)
            custom[key] = int(number) if number.is_integer() and "." not in value else number
        else:
            custom[key] = value
    if custom:
        contact["custom_fields"] = custom
    return row[1], contact


# ----------------------------------------------------------------------------------------------- small utilities


def _load_json(body: bytes) -> Any:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None


def _split_ids(values: list[str]) -> list[str]:
    return [i for v in values for i in (p.strip() for p in v.split(",")) if i]


def _errors_csv(header: list[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def _fault_skip(job: _Job, fault: dict[str, Any] | None, count: int) -> dict[int, str]:
    """Apply a job fault: returns {item index: reason} for the items not to apply (all of them when failed)."""
    if fault is None:
        return {}
    if fault["kind"] == "failed":
        job.status, job.errored = "failed", count
        return dict.fromkeys(range(count), "sandbox fault: job failed")
    k = min(fault["error_count"], count)
    job.status, job.errored = "errored", k
    return dict.fromkeys(range(k), "sandbox fault: contact errored")


def _normalise_fault(fault: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(fault, dict):
        raise ValueError("a fault is an object")
    endpoint, kind = fault.get("endpoint", "*"), str(fault.get("kind", ""))
    times = fault.get("times", 1)
    if not isinstance(times, int) or isinstance(times, bool) or times < 1:
        raise ValueError("times must be a positive integer")
    out: dict[str, Any] = {"endpoint": endpoint, "kind": kind, "times": times}
    if endpoint == "job":
        if kind not in JOB_FAULT_KINDS:
            raise ValueError(f"job fault kind must be one of {sorted(JOB_FAULT_KINDS)}")
        out["error_count"] = int(fault.get("error_count", 1))
        if out["error_count"] < 0:
            raise ValueError("error_count must not be negative")
        return out
    if endpoint == UPLOAD_TEMPLATE:
        if kind not in UPLOAD_FAULT_KINDS:
            raise ValueError(f"upload fault kind must be one of {sorted(UPLOAD_FAULT_KINDS)}")
    elif endpoint != "*" and endpoint not in API_TEMPLATES:
        raise ValueError(f"unknown endpoint {endpoint!r}: use '*', 'job', {UPLOAD_TEMPLATE!r} or one of "
                         f"{sorted(API_TEMPLATES)}")
    elif kind not in HTTP_FAULT_KINDS:
        raise ValueError(f"fault kind must be one of {sorted(HTTP_FAULT_KINDS)}")
    out["reset_after"] = float(fault.get("reset_after", 1.0))
    out["retry_after"] = fault.get("retry_after")  # sent as given (seconds or an HTTP date) on any status fault
    out["rate_headers"] = bool(fault.get("rate_headers", True))  # False: a 429 with no X-RateLimit-* (a front proxy's)
    out["delay"] = float(fault.get("delay", 1.0))
    out["processed"] = bool(fault.get("processed", False))
    return out


def _take(faults: list[dict[str, Any]], template: str, stats: dict[str, Any]) -> dict[str, Any] | None:
    """The first fault armed for this endpoint, counted as fired. "*" means every API endpoint, never the upload URL
    (another host in SendGrid's case)."""
    for f in faults:
        if f["endpoint"] == template or (f["endpoint"] == "*" and template != UPLOAD_TEMPLATE):
            f["times"] -= 1
            if f["times"] <= 0:
                faults.remove(f)
            stats["faults_fired"] += 1
            return f
    return None


# ---------------------------------------------------------------------------------------------------- HTTP layer

# (method, template, operation, body cap). Templates are the stats and fault keys.
_ROUTES: tuple[tuple[str, str, str, int], ...] = (
    ("PUT", "/v3/marketing/contacts", "op_upsert", limits.MAX_REQUEST_BYTES),
    ("DELETE", "/v3/marketing/contacts", "op_contacts_delete", MAX_SMALL_BODY_BYTES),
    ("GET", "/v3/marketing/contacts/count", "op_contacts_count", MAX_SMALL_BODY_BYTES),
    ("POST", "/v3/marketing/contacts/search/emails", "op_search_emails", MAX_SMALL_BODY_BYTES),
    ("PUT", "/v3/marketing/contacts/imports", "op_import", MAX_SMALL_BODY_BYTES),
    ("GET", "/v3/marketing/contacts/imports/{id}", "op_job_status", MAX_SMALL_BODY_BYTES),
    ("GET", "/v3/marketing/field_definitions", "op_fields_get", MAX_SMALL_BODY_BYTES),
    ("POST", "/v3/marketing/field_definitions", "op_fields_post", MAX_SMALL_BODY_BYTES),
    ("GET", "/v3/marketing/lists", "op_lists_get", MAX_SMALL_BODY_BYTES),
    ("POST", "/v3/marketing/lists", "op_lists_post", MAX_SMALL_BODY_BYTES),
    ("GET", "/v3/marketing/lists/{id}", "op_list_get", MAX_SMALL_BODY_BYTES),
    ("DELETE", "/v3/marketing/lists/{id}/contacts", "op_list_remove", MAX_SMALL_BODY_BYTES),
    ("GET", "/v3/marketing/lists/{id}/contacts/count", "op_list_count", MAX_SMALL_BODY_BYTES),
)
API_TEMPLATES = frozenset(f"{m} {t}" for m, t, _, _ in _ROUTES)


def _template_re(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "/?$")


_COMPILED = [(m, t, _template_re(t), op, cap) for m, t, op, cap in _ROUTES]


def route(method: str, path: str) -> tuple[str | None, str | None, dict[str, str], int]:
    """(template, operation, path params, body cap); operation None with a template = wrong method (405)."""
    known = None
    for m, template, pattern, op, cap in _COMPILED:
        match = pattern.match(path)
        if match:
            if m == method:
                return template, op, match.groupdict(), cap
            known = template
    return known, None, {}, MAX_SMALL_BODY_BYTES


class BodyTooLarge(Exception):
    """More body bytes than the endpoint accepts."""


class _Link:
    """An upload link of `bytes_per_s` that every request body crosses: each chunk read books its transmission time
    on the link, first come first served, so concurrent bodies share the rate as they would share one link. The
    lock guards the booking (a few arithmetic operations); the wait for the booked time holds no lock."""

    def __init__(self, bytes_per_s: float, clock: Callable[[], float] | None = None) -> None:
        self.bytes_per_s = bytes_per_s
        self._clock = clock or time.monotonic
        self._free_at = 0.0  # when the link has carried everything booked so far
        self._lock = threading.Lock()
        self.bytes = 0  # booked in all

    def book(self, nbytes: int) -> float:
        """Book nbytes on the link; returns the clock time their transmission ends."""
        with self._lock:
            self._free_at = max(self._clock(), self._free_at) + nbytes / self.bytes_per_s
            self.bytes += nbytes
            return self._free_at

    def carry(self, nbytes: int) -> None:
        """Return once nbytes, read just now, would have crossed the link."""
        wait = self.book(nbytes) - self._clock()
        if wait > 0:
            time.sleep(wait)


class _WireReader(io.RawIOBase):
    """A request body as a stream (Content-Length or chunked), counting bytes and refusing more than `cap`."""

    def __init__(self, rfile: io.BufferedIOBase, length: int | None, cap: int | None,
                 link: _Link | None = None) -> None:
        super().__init__()
        self._rfile, self._remaining, self._chunk_left = rfile, length, 0
        self._chunked, self._eof, self.count, self.cap = length is None, length == 0, 0, cap
        self._link = link

    def readable(self) -> bool:
        return True

    @property
    def chunked(self) -> bool:
        return self._chunked

    def readinto(self, buffer: Any) -> int:
        if self._eof:
            return 0
        view = memoryview(buffer)
        if self._chunked:
            if self._chunk_left == 0 and not self._next_chunk():
                return 0
            want = min(len(view), self._chunk_left)
        else:
            want = min(len(view), self._remaining or 0)
        got = self._rfile.readinto(view[:want])
        if not got:
            raise ConnectionError("the client closed the connection mid-body")
        self.count += got
        if self._link is not None:
            self._link.carry(got)
        if self._chunked:
            self._chunk_left -= got
            if self._chunk_left == 0:
                self._rfile.readline(4)
        else:
            self._remaining = (self._remaining or 0) - got
            self._eof = self._remaining == 0
        if self.cap is not None and self.count > self.cap:
            raise BodyTooLarge
        return got

    def _next_chunk(self) -> bool:
        line = self._rfile.readline(1024)
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError as exc:
            raise ConnectionError("malformed chunked body") from exc
        if size == 0:
            while self._rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            self._eof = True
            return False
        self._chunk_left = size
        return True

    def read_all(self) -> bytes:
        """The whole body; a Content-Length body over the cap is refused before reading it."""
        if self._chunked:
            return self.read()
        length = self._remaining or 0
        if self.cap is not None and length > self.cap:
            raise BodyTooLarge
        if self._link is not None:  # 64 KB at a time, each crossing the link
            out, chunk = bytearray(), memoryview(bytearray(1 << 16))
            while got := self.readinto(chunk):
                out += chunk[:got]
            return bytes(out)
        data = self._rfile.read(length) if length else b""
        if len(data) < length:
            raise ConnectionError("the client closed the connection mid-body")
        self.count += len(data)
        self._remaining, self._eof = 0, True
        return data

    def drain(self, limit: int) -> bool:
        """Read and drop the rest (up to `limit` bytes more). False if the body was longer."""
        self.cap = None
        start, buf = self.count, bytearray(65536)
        while self.readinto(buf):
            if self.count - start > limit:
                return False
        return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm on, the body waits for the client's delayed ACK,
    # about 40 ms a request on loopback. A real API front end does not stall like that.
    disable_nagle_algorithm = True
    server_version = "SendGridSandbox/1.0"
    timeout = IDLE_TIMEOUT_S
    server: _Server
    _pending_stat: str | None = None  # the stats key of the request being answered, until it is counted

    def log_message(self, format: str, *args: Any) -> None:  # quiet; and never the Authorization header
        return

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.track(self.connection, False)

    def do_GET(self) -> None:
        try:
            self._dispatch()
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # a sandbox bug: say so (500 + traceback on stderr) rather than drop the connection
            traceback.print_exc()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._answer(500, _err("sandbox internal error (see its stderr)"))

    do_PUT = do_POST = do_DELETE = do_PATCH = do_GET

    # ---- plumbing

    @property
    def sandbox(self) -> Sandbox:
        return self.server.sandbox

    def _wire(self, cap: int | None) -> _WireReader:
        link = self.sandbox.link
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return _WireReader(self.rfile, None, cap, link)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return _WireReader(self.rfile, max(0, length), cap, link)

    def _read_body(self, cap: int) -> tuple[bytes, bool]:
        """(body, too_large). A too-large body is drained (so the client reads our answer) or the connection closed."""
        wire = self._wire(cap)
        try:
            return wire.read_all(), False
        except BodyTooLarge:
            if not wire.drain(MAX_DRAIN_BYTES):
                self.close_connection = True
            return b"", True
        finally:
            self._body_bytes = wire.count

    def _answer(self, status: int, payload: Any, headers: Iterable[tuple[str, str]] = (),
                content_type: str = _JSON) -> None:
        body = payload if isinstance(payload, bytes) else (b"" if payload is None else orjson.dumps(payload))
        self.sandbox.pause()
        self._record_pending(status)
        self.send_response(status)
        if body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _base_url(self) -> str:
        host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
        return f"http://{host}"

    def _bearer(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    # ---- dispatch

    def _record_pending(self, status: int) -> None:
        """Count the request in the stats once, before its answer is written: a client that reads the stats right
        after its call returns must see that call counted."""
        template, self._pending_stat = self._pending_stat, None
        if template is not None:
            self.sandbox._record(template, status, self._body_bytes)

    def _dispatch(self) -> None:
        self._body_bytes = 0
        self._pending_stat = None
        split = urlsplit(self.path)
        path = split.path
        if len(self.path.encode("latin-1", "replace")) > MAX_REQUEST_TARGET_BYTES:
            self._read_body(MAX_SMALL_BODY_BYTES)
            self.close_connection = True
            _, headers = self.sandbox._rate(None, "", count=False)
            self._pending_stat = f"{self.command} (uri too large)"
            self._answer(414, _err("request-uri too large"), headers)
            return
        if path.startswith("/_sandbox/"):
            self._control(path)
            return
        template, op, params, cap = route(self.command, path)
        key = template and f"{self.command} {template}"
        body, too_large = self._read_body(cap if op else MAX_SMALL_BODY_BYTES)
        self._pending_stat = key if op else f"{self.command} (unknown)"
        status = self._api(key, op, params, parse_qs(split.query), body, too_large)
        self._record_pending(status)  # no answer was written (a dropped connection)

    def _api(self, key: str | None, op: str | None, params: dict[str, str], query: dict[str, list[str]],
             body: bytes, too_large: bool) -> int:
        sandbox = self.sandbox
        api_key = self._bearer()
        if op is None or key is None:
            _, headers = sandbox._rate(None, "", count=False)
            status = 405 if key else 404
            self._answer(status, _err("method not allowed" if key else "resource not found"), headers)
            return status
        if not sandbox.key_ok(api_key):
            _, headers = sandbox._rate(None, key, count=False)
            self._answer(401, _err("authorization required"), headers)
            return 401
        if not accepts_json(self.headers.get("Accept")):
            _, headers = sandbox._rate(api_key, key, count=False)
            self._answer(406, _err("the Accept header must allow application/json"), headers)
            return 406
        fault = sandbox._take_fault(key)
        if fault is not None:
            served = self._fault(fault, api_key, key)
            if served is not None:
                return served
        allowed, headers = sandbox._rate(api_key, key, count=True)
        if not allowed:
            self._answer(429, _err("too many requests"), headers)
            return 429
        if too_large:
            self._answer(413, _err(f"request body must be at most {limits.MAX_REQUEST_BYTES} bytes"), headers)
            return 413
        handle: Callable[[_Request], Reply] = getattr(sandbox, op)
        status, payload = handle(_Request(params, query, body, self._base_url()))
        if fault is not None and fault["kind"] == "reset":  # processed, then the connection drops
            self.sandbox.pause()
            self.close_connection = True
            return 0
        self._answer(status, payload, headers)
        return status

    def _reset(self) -> int:
        """Drop the connection without an answer (a reset: RST, not FIN). Returns 0, the stats' "no answer"."""
        self.sandbox.pause()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return 0

    def _fault(self, fault: dict[str, Any], api_key: str | None, key: str) -> int | None:
        """Serve an injected fault. None = go on handling the request (slow, or reset after processing)."""
        kind = fault["kind"]
        if kind == "slow":
            time.sleep(fault["delay"])
            return None
        if kind == "reset":
            return None if fault["processed"] else self._reset()
        _, headers = self.sandbox._rate(api_key, key, count=False)
        if kind == "429":
            limit = headers[0][1]
            headers = [("X-RateLimit-Limit", limit), ("X-RateLimit-Remaining", "0"),
                       ("X-RateLimit-Reset", str(math.ceil(time.time() + fault["reset_after"])))]
            if not fault["rate_headers"]:
                headers = []
        if fault.get("retry_after") is not None:
            headers.append(("Retry-After", str(fault["retry_after"])))
        messages = {"429": "too many requests", "500": "internal server error", "503": "service unavailable",
                    "401": "authorization required", "403": "too many bad requests, temporary block",
                    "451": "unavailable for legal reasons"}
        self._answer(int(kind), _err(messages[kind]), headers)
        return int(kind)

    # ---- /_sandbox/: uploads and error files (capability URLs), control and inspection (loopback only)

    def _control(self, path: str) -> None:
        parts, method = path.strip("/").split("/"), self.command
        if method == "PUT" and len(parts) == 3 and parts[1] == "uploads":
            self._pending_stat = UPLOAD_TEMPLATE
            self._record_pending(self._upload(parts[2]))
            return
        body, _ = self._read_body(MAX_SMALL_BODY_BYTES)
        self._pending_stat = f"{method} /_sandbox/{parts[1] if len(parts) > 1 else ''}"
        status, payload, ctype = self._control_reply(parts, method, body)
        self._answer(status, payload, content_type=ctype)

    def _control_reply(self, parts: list[str], method: str, body: bytes) -> tuple[int, Any, str]:
        sandbox = self.sandbox
        if method == "GET" and len(parts) == 3 and parts[1] == "errors" and parts[2].endswith(".csv"):
            data = sandbox.errors_file(parts[2][:-4])
            return (200, data, "text/csv") if data is not None else (404, _err("no such errors file"), _JSON)
        if not ipaddress.ip_address(self.client_address[0]).is_loopback:
            return 403, _err("the sandbox control API answers loopback clients only"), _JSON
        route_key = (method, *parts[1:2])
        try:
            if route_key == ("GET", "stats"):
                return 200, sandbox.stats, _JSON
            if route_key == ("GET", "jobs"):
                return 200, {"pending": sandbox.pending_jobs()}, _JSON
            if route_key == ("POST", "reset"):
                sandbox.reset()
                return 200, {"reset": True}, _JSON
            if route_key == ("POST", "faults"):
                sandbox.inject(_load_json(body))
                return 200, {"injected": True}, _JSON
            if route_key == ("POST", "keys"):
                doc = _load_json(body)
                keys = doc.get("keys") if isinstance(doc, dict) else None
                if not isinstance(keys, list):
                    raise ValueError("body must be {\"keys\": [...]}")
                sandbox.rotate_keys(keys)
                return 200, {"keys": len(keys)}, _JSON
            if method == "GET" and len(parts) == 4 and parts[1] == "lists" and parts[3] == "emails":
                return 200, {"list_id": parts[2], "emails": sandbox.list_emails(parts[2])}, _JSON
            if method == "GET" and len(parts) == 3 and parts[1] == "contacts":
                contact = sandbox.contact(unquote(parts[2]))
                return (200, contact, _JSON) if contact else (404, _err("contact not found"), _JSON)
        except KeyError:
            return 404, _err("list not found"), _JSON
        except ValueError as exc:
            return 400, _err(str(exc)), _JSON
        return 404, _err("resource not found"), _JSON

    def _upload(self, job_id: str) -> int:
        """The presigned-URL upload of a CSV import, with the faults armed for UPLOAD_TEMPLATE: "slow" answers late,
        "500"/"503" refuse it (nothing kept: it may be sent again), "reset" drops the connection before reading it
        or, with processed, after the upload was stored (the answer is lost; sending it again gets 409)."""
        fault = self.sandbox._take_fault(UPLOAD_TEMPLATE) or {}
        kind = fault.get("kind")
        if kind == "slow":
            time.sleep(fault["delay"])
        elif kind == "reset" and not fault["processed"]:
            return self._reset()
        wire = self._wire(self.sandbox.max_import_bytes)
        if kind in ("500", "503"):
            self.close_connection = not wire.drain(MAX_DRAIN_BYTES)
            self._body_bytes = wire.count
            reason = b"InternalError: please try again" if kind == "500" else b"SlowDown: please reduce your rate"
            told = [("Retry-After", str(fault["retry_after"]))] if fault.get("retry_after") is not None else []
            self._answer(int(kind), reason, told, content_type="text/plain")
            return int(kind)
        status, body, headers = self._receive_upload(job_id, wire)
        if kind == "reset":  # processed: the upload is kept, its answer lost
            return self._reset()
        self._answer(status, body, headers, content_type="text/plain")
        return status

    def _receive_upload(self, job_id: str, wire: _WireReader) -> tuple[int, bytes | None, list[tuple[str, str]]]:
        """Read, parse and register an upload: streamed, gzip when declared or recognised. (status, body, headers)."""
        sandbox = self.sandbox
        if not self.headers.get("Content-Length") and not wire.chunked:
            wire.drain(MAX_DRAIN_BYTES)
            self._body_bytes = wire.count
            return 411, b"Length Required", []
        verdict = sandbox.upload_headers_ok(job_id, self.headers)
        if verdict != 200:
            self.close_connection = self.close_connection or not wire.drain(MAX_DRAIN_BYTES)
            self._body_bytes = wire.count
            reasons = {404: b"NoSuchUpload", 403: b"SignatureDoesNotMatch: send every upload header",
                       409: b"UploadAlreadyReceived"}
            return verdict, reasons[verdict], []
        with sandbox._lock:
            mappings, fields = sandbox._imports[job_id].mappings, sandbox._fields
        too_large = False
        try:
            if not wire.chunked and int(self.headers.get("Content-Length") or 0) > sandbox.max_import_bytes:
                raise BodyTooLarge
            parsed = self._parse_upload(wire, mappings, fields)
            wire.drain(sandbox.max_import_bytes)
        except BodyTooLarge:
            parsed = _ParsedImport([], failure=f"the file is larger than {sandbox.max_import_bytes} bytes")
            self.close_connection = too_large = True
        except BaseException:
            sandbox.abort_upload(job_id)
            raise
        finally:
            self._body_bytes = wire.count
        sandbox.finish_upload(job_id, parsed)
        if too_large:  # like S3: refused, and the connection is closed rather than read to the end
            return 400, b"EntityTooLarge", []
        return 200, None, [("ETag", f'"{job_id}"')]

    def _parse_upload(self, wire: _WireReader, mappings: list[str | None],
                      fields: dict[str, tuple[str, str]]) -> _ParsedImport:
        sandbox = self.sandbox
        raw = io.BufferedReader(wire, 1 << 16)
        declared = "gzip" in (self.headers.get("Content-Encoding") or "").lower()
        stream: Any = gzip.GzipFile(fileobj=raw) if declared or raw.peek(2)[:2] == b"\x1f\x8b" else raw
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
        try:
            with gcpolicy.pause:
                return parse_import(csv.reader(text), mappings, fields, sandbox._is_invalid, sandbox.max_import_rows)
        except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error) as exc:
            if isinstance(exc, ConnectionError):
                raise
            return _ParsedImport([], failure=f"the file could not be read: {type(exc).__name__}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket, is_open: bool) -> None:
        with self._conns_lock:
            (self._conns.add if is_open else self._conns.discard)(conn)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class SandboxServer:
    """A running sandbox: `url`, `stop()`; a context manager."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        host, port = server.server_address[:2]  # a bound TCP socket's: typeshed also allows bytes for bind()
        self.url = f"http://{host if isinstance(host, str) else bytes(host).decode()}:{port}"
        self.sandbox = server.sandbox
        self._stopped = False
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"sandbox:{port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close every open connection (idle keep-alive ones too). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> SandboxServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SandboxServer({self.url})"


def serve(sandbox: Sandbox, host: str = "127.0.0.1", port: int = 0) -> SandboxServer:
    """Serve `sandbox` over HTTP on a daemon thread (port 0 picks a free port)."""
    return SandboxServer(_Server((host, port), sandbox))


# ----------------------------------------------------------------------------------------------------------- CLI


def _field_arg(text: str) -> tuple[str, str]:
    name, sep, ftype = text.partition(":")
    if not sep or ftype not in limits.CUSTOM_FIELD_TYPES:
        raise argparse.ArgumentTypeError(f"expected name:Type with Type one of Text, Number, Date, got {text!r}")
    return name, ftype


def _range_arg(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    try:
        if sep:
            return float(low), float(high)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected MIN:MAX in seconds, got {text!r}")


def _profile_of(args: argparse.Namespace) -> Profile:
    base = REALISTIC if args.realistic else Profile()
    return dataclasses.replace(base, job_seconds=args.job_seconds or base.job_seconds, seed=args.seed)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared sandbox", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default 0: a free one, printed)")
    parser.add_argument("--job-delay", type=float, default=0.3, metavar="SECONDS",
                        help="each job (upsert, import, removal) completes this long after it starts (default 0.3)")
    parser.add_argument("--rate-limit", type=int, default=None, metavar="N",
                        help="answer 429 past N requests per endpoint in each --rate-window (default: no limit)")
    parser.add_argument("--rate-window", type=float, default=1.0, metavar="SECONDS",
                        help="the rate limit's window (default 1 s)")
    parser.add_argument("--latency", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long before answering every request (models the WAN round trip; default 0)")
    parser.add_argument("--realistic", action="store_true",
                        help="SendGrid's timing and rules: each job (upsert, import, list removal, deletion) takes "
                             "{:g} to {:g} s (see --job-seconds) and jobs apply in order; an update must carry all of "
                             "the contact's existing identifiers".format(*REALISTIC_JOB_SECONDS))
    parser.add_argument("--job-seconds", type=_range_arg, metavar="MIN:MAX",
                        help="each job takes a random time in this range, jobs applying in order (instead of "
                             "--job-delay)")
    parser.add_argument("--seed", type=int,
                        help="seed of the job times (printed at start as 'seed N', so a run can be replayed)")
    parser.add_argument("--contact-limit", type=int, metavar="N",
                        help="the plan's cap on stored contacts: a job that would pass it fails")
    parser.add_argument("--bandwidth-mbit", type=float, metavar="N",
                        help="read request bodies (upserts, import uploads) no faster than N Mbit/s in all, "
                             "concurrent ones sharing it as one link (default: loopback speed)")
    parser.add_argument("--api-key-env", default="SENDGRID_API_KEY", help="environment variable holding the key")
    parser.add_argument("--list-id", help="create a list with this id")
    parser.add_argument("--list-name", help="create a list with this name")
    parser.add_argument("--field", action="append", type=_field_arg, default=[], metavar="NAME:TYPE",
                        help="create a custom field (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m shared sandbox`: serve a sandbox until SIGINT/SIGTERM. The accepted key comes from the environment."""
    args = _parser().parse_args(argv)
    key = os.environ.get(args.api_key_env)
    if not key:
        print(f"sandbox: environment variable {args.api_key_env} is not set (it holds the accepted API key)",
              file=sys.stderr)
        return 2
    try:
        sandbox = Sandbox([key], job_delay=args.job_delay, rate_limit=args.rate_limit, rate_window=args.rate_window,
                          latency=args.latency, profile=_profile_of(args), contact_limit=args.contact_limit,
                          bandwidth_mbit=args.bandwidth_mbit)
        list_id = None
        if args.list_id or args.list_name:
            list_id = sandbox.create_list(args.list_name or "sandbox", args.list_id)
        field_ids = {name: sandbox.create_field(name, ftype) for name, ftype in args.field}
        server = serve(sandbox, args.host, args.port)
    except (ValueError, OSError) as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(server.url, flush=True)
        if list_id:
            print(f"list_id {list_id}", flush=True)
        for name, fid in field_ids.items():
            print(f"field {name} {fid}", flush=True)
        if sandbox.profile.job_seconds is not None:
            print(f"seed {sandbox.seed}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
