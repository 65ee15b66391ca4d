"""Rows to SendGrid contacts: mapping, normalisation, validation, trimming, fingerprints for de-duplication.

This is the hot path (millions of rows per run): everything that does not depend on the row is decided in
ContactMapper.__init__, which generates a straight-line map() for its mapping (about 2 us a row for the
seven-field Customer Insights mapping plus a Number and a Date field). Row values must be str or None.

Choices where SendGrid's contract is silent (see tests/contracts/tsg_mc_contacts_v3.json):
- Every value is stripped; an empty value leaves the field out, so SendGrid keeps what it has.
- Text is cut, never rejected, at limits.FIELD_MAX_LENGTHS (characters, as JSON Schema's maxLength counts), then
  right-stripped. postal_code has no stated limit: we cut at POSTAL_CODE_MAX_LENGTH, and custom Text values at
  CUSTOM_TEXT_MAX_LENGTH, so that every contact stays far below the 6 MB request limit (see batching.Packer).
- Emails: ASCII only, lower-cased, a pragmatic syntax check (see EMAIL_RE). A bad primary email rejects the row;
  a bad alternate email is left out with a note.
- Numbers: plain decimals with optional exponent; "1,234.5" (comma thousands groups of exactly three digits) is
  accepted, "1,5" is not (it could be a decimal comma). NaN and infinities are refused. Integral values become
  JSON integers when exactly representable (|x| <= 2**53), otherwise floats.
- Dates: "YYYY-MM-DD", "YYYY-MM-DD[T ]HH:MM[:SS[.f...]][Z|±hh[:]mm]" or "M/D/YYYY"; the calendar date as written
  is kept (no time-zone conversion) and sent as "MM/DD/YYYY".
"""

from __future__ import annotations

import collections
import csv
import datetime
import functools
import io
import platform
import re
import sys
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal, final

import orjson

from . import limits
from .errors import ConfigError

POSTAL_CODE_MAX_LENGTH = 100  # our choice: the contract states no limit
CUSTOM_TEXT_MAX_LENGTH = 1_000  # our choice: the contract states no limit for custom Text values
SHOWN_VALUE_MAX = 80  # characters of a bad value quoted in a reason or note

# RFC 5322 atext plus '.', i.e. printable ASCII without space and the specials "(),:;<>@[\]. No leading or trailing
# dot; no doubled dot either, but that is checked apart (`".." not in email`, see valid_email): a lookahead for it
# rescans the whole address and cost more than the rest of the match. Domain: LDH labels of 1-63, at least two
# labels, TLD of letters (2+) or an IDN "xn--" label. Applied after lower-casing, so domains only need [a-z].
# Only constructs every CPython 3.11.x and 3.12.x runs alike: no possessive quantifiers or atomic groups (before
# 3.11.5 they did not match at all, gh-106052 / gh-100061). Backtracking stays bounded: the local part holds no '@'
# and a label no '.', so every retry fails at its next character. The domain tries "label.TLD" first (most addresses)
# and repeats a group only for longer domains: a group repeat is the slow part of the match (see tests/test_contacts.py,
# which compares the results with the former pattern, and EMAIL_KNOWN_ANSWERS, checked when a process starts).
_EMAIL_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-][A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{0,63}(?<!\.)"
_EMAIL_LABEL = r"[a-z0-9][a-z0-9-]{0,62}(?<!-)\."
_EMAIL_TLD = r"(?:[a-z]{2,63}|xn--[a-z0-9-]{0,58}[a-z0-9])"
EMAIL_RE = re.compile(
    _EMAIL_LOCAL + "@" + _EMAIL_LABEL + "(?:" + _EMAIL_TLD + "|(?:" + _EMAIL_LABEL + ")+" + _EMAIL_TLD + ")",
    re.ASCII,
)
_ALT_SPLIT_RE = re.compile(r"[,;]")
_GROUPED_NUMBER_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?", re.ASCII)
_ISO_DATE_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})(?:[T ]([01]\d|2[0-3]):[0-5]\d(?::(?:[0-5]\d|60)(?:\.\d+)?)?"
    r"(?:[Zz]|[+-](?:[01]\d|2[0-3]):?[0-5]\d)?)?",
    re.ASCII,
)
_US_DATE_RE = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})", re.ASCII)
_MAX_EXACT_INT = 2**53


@dataclass(frozen=True)
class CustomField:
    name: str  # SendGrid custom field name (for counts and messages)
    id: str  # SendGrid custom field id, the key in contact["custom_fields"]
    field_type: Literal["Text", "Number", "Date"]
    column: str  # source column


def _shown(value: str) -> str:
    return repr(value[:SHOWN_VALUE_MAX])


def valid_email(email: str) -> bool:
    """True for a lower-cased, stripped address that passes the pragmatic check."""
    return (len(email) <= limits.MAX_EMAIL_LENGTH and email.isascii() and ".." not in email
            and EMAIL_RE.fullmatch(email) is not None)


def single_address(text: object) -> str:
    """The one address `text` holds, normalised as exports normalise a row's email (stripped, lower-cased), for an
    erasure; ConfigError (field 'email') unless it is exactly one valid address: "@@@", two addresses, a line break
    or a NUL inside are refused, never looked up."""
    address = text.strip().lower() if isinstance(text, str) else ""
    if not valid_email(address):
        raise ConfigError("an erasure needs exactly one valid email address, like person@example.com",
                          field="email")
    return address


# Addresses whose answer is known, one for each part of the check (local part, labels, TLD, lengths). A process
# refuses to start when its interpreter disagrees (see email_validator_problem): a regex engine that rejects valid
# addresses would drop every contact while the run still ends `completed`.
EMAIL_KNOWN_ANSWERS: tuple[tuple[str, bool], ...] = (
    ("a@example.com", True),
    ("john.doe+news@mail.example.co.uk", True),
    ("o'brien_x-y!#$%&*/=?^`{|}~@example.org", True),
    ("a@b.co", True),
    ("user@xn--bcher-kva.example", True),
    ("user@example.xn--p1ai", True),
    ("0@9.museum", True),
    ("a" * 64 + "@" + "b" * 63 + ".com", True),
    ("a.b@a-b.c-d.example.com", True),
    ("a@example", False),
    ("a..b@example.com", False),
    (".a@example.com", False),
    ("a.@example.com", False),
    ("a b@example.com", False),
    ("a@-example.com", False),
    ("a@example-.com", False),
    ("a@example..com", False),
    ("a@example.c0m", False),
    ("a@example.com.", False),
    ("a@@example.com", False),
    ("a" * 65 + "@example.com", False),
    ("a@" + "b" * 64 + ".com", False),
    ("zo\u00eb@example.com", False),
    ("a@example.com\x00", False),
)


def email_validator_problem() -> str | None:
    """None when valid_email and ContactMapper give EMAIL_KNOWN_ANSWERS on this interpreter; otherwise why the
    connector must not run here (the CLI and the Functions app refuse to start with this text)."""
    mapper = ContactMapper({"email": "email"})
    for address, expected in EMAIL_KNOWN_ANSWERS:
        mapped = not isinstance(mapper.map([address]), str)
        if valid_email(address) != expected or mapped != expected:
            return (f"this Python ({platform.python_implementation()} {platform.python_version()}, {sys.executable}) "
                    f"checks email addresses wrongly: {address!r} should be {'valid' if expected else 'invalid'}; "
                    "the connector refuses to run rather than reject valid contacts. Use CPython 3.11 or 3.12 "
                    "(see README, Supported versions)")
    return None


def parse_number(text: str) -> int | float | None:
    """A stripped text as a JSON-ready number, or None when it is not a finite number."""
    try:
        value = float(text)
    except ValueError:
        if _GROUPED_NUMBER_RE.fullmatch(text) is None:
            return None
        value = float(text.replace(",", ""))
    else:
        if "_" in text or not text.isascii():  # float() also takes "1_000" and non-ASCII digits
            return None
    if value - value != 0.0:  # not finite ("nan", "inf", "1e999"): inf - inf and nan - nan are nan
        return None
    if value.is_integer() and -_MAX_EXACT_INT <= value <= _MAX_EXACT_INT:
        return int(value)
    return value


@functools.lru_cache(maxsize=1 << 16)  # exports repeat dates (days, often whole timestamps): a hit is ~20x cheaper
def parse_date(text: str) -> str | None:
    """A stripped text as SendGrid's "MM/DD/YYYY", or None when it is not a real calendar date."""
    m = _ISO_DATE_RE.fullmatch(text)
    if m is not None:
        year, month, day = int(m[1]), int(m[2]), int(m[3])
    else:
        m = _US_DATE_RE.fullmatch(text)
        if m is None:
            return None
        month, day, year = int(m[1]), int(m[2]), int(m[3])
    try:
        datetime.date(year, month, day)
    except ValueError:
        return None
    return f"{month:02d}/{day:02d}/{year:04d}"


_DATE_CACHE: dict[str, str | None] = {}  # parse_date's results for map(): a dict lookup is cheaper than lru_cache's
_DATE_CACHE_MAX = 1 << 16
_MISS = object()


def _date_miss(text: str) -> str | None:
    """parse_date(text), remembered in _DATE_CACHE (emptied when full: exports repeat few distinct dates)."""
    if len(_DATE_CACHE) >= _DATE_CACHE_MAX:
        _DATE_CACHE.clear()
    result = _DATE_CACHE[text] = parse_date(text)
    return result


class Reason(StrEnum):
    """Why a row did not become a contact: counted per reason in the report (`counts.rejected`)."""

    MISSING_EMAIL = "missing_email"
    EMAIL_TOO_LONG = "email_too_long"
    INVALID_EMAIL = "invalid_email"
    REFUSED_BY_SENDGRID = "refused_by_sendgrid"
    UNREADABLE_ROW = "unreadable_row"


@final  # so `type(x) is Rejected` tells a rejection from a mapped contact (pipeline.map_rows)
class Rejected(str):
    """A rejection: the text a person reads (the rejections CSV), carrying its `reason` - counts group by the reason,
    never by parsing the text."""

    reason: Reason

    def __new__(cls, text: str, reason: Reason = Reason.UNREADABLE_ROW) -> Rejected:
        obj = super().__new__(cls, text)
        obj.reason = reason
        return obj


class Note(str):
    """A contact sent without some value: the text a person reads, carrying the `fields` (columns) it is about -
    counts group by field, never by parsing the text."""

    fields: tuple[str, ...]

    def __new__(cls, text: str, fields: tuple[str, ...] = ()) -> Note:
        obj = super().__new__(cls, text)
        obj.fields = fields
        return obj


_MISSING_EMAIL = Rejected("missing email", Reason.MISSING_EMAIL)
_EMAIL_TOO_LONG = Rejected(f"email longer than {limits.MAX_EMAIL_LENGTH} characters", Reason.EMAIL_TOO_LONG)


def _invalid_email(shown: str) -> Rejected:
    return Rejected("invalid email " + shown, Reason.INVALID_EMAIL)


Mapped = tuple[str, dict[str, Any], Note | None] | Rejected  # (email, contact, note) or why the row was rejected
MappedLine = tuple[str, str, Note | None] | Rejected  # (email, import CSV line, note) or why the row was rejected
MappedBoth = tuple[str, dict[str, Any], Note | None, str] | Rejected  # map's result and map_line's line


class ContactMapper:
    """Turns one row (values in ``columns`` order) into a SendGrid contact, or a rejection reason.

    The per-row rules (trimming, email checks, alternates, numbers, dates) are one set, written once in
    _MapSource, which generates for each mapping straight-line functions (one block per field; no per-row loops over
    the plan, no lookups of the plan) that differ only in what they return:

    - map(values): the contact as a dict, for the JSON upsert (`encode`);
    - map_line(values): the contact as a line of the bulk import's CSV file (`import_fields` order, CRLF), so the
      bulk path writes what the mapper gives without building or decoding a dict;
    - line_of(contact): the import line of a contact map() made (the contacts mapped before a run switched to the
      import: the same cells and formatting as map_line's);
    - map_with_line(values): map's result and map_line's line in one pass (the JSON path's content digests are
      taken over the line: a third of the record's cost was line_of decoding the dict map had just built).

    Only ints of our own making are written into the generated source; every name, id and column travels as a
    bound constant, never as code.
    """

    def __init__(self, mapping: Mapping[str, str], custom: Sequence[CustomField] = (), id_column: str | None = None
                 ) -> None:
        if "email" not in mapping:
            raise ValueError("mapping needs an 'email' column")
        unknown = set(mapping) - limits.WRITABLE_RESERVED_FIELDS
        if unknown:
            raise ValueError(f"not writable SendGrid fields: {', '.join(sorted(unknown))}")
        for f in custom:
            if f.field_type not in limits.CUSTOM_FIELD_TYPES:
                raise ValueError(f"custom field {f.name!r}: unknown type {f.field_type!r}")
        columns: list[str] = [mapping["email"]]
        index: dict[str, int] = {mapping["email"]: 0}

        def col(name: str) -> int:
            if name not in index:
                index[name] = len(columns)
                columns.append(name)
            return index[name]

        text = [(field, col(column), limits.FIELD_MAX_LENGTHS.get(field, POSTAL_CODE_MAX_LENGTH))
                for field, column in mapping.items() if field not in ("email", "alternate_emails")]
        alternates = col(mapping["alternate_emails"]) if "alternate_emails" in mapping else None
        custom_plan = [(f, col(f.column)) for f in custom]
        self.columns: tuple[str, ...] = tuple(columns)
        # a column read beside the mapped ones that names the profile in the rejections CSV (destination id_column):
        # read_columns are what the readers give; id_index is its place there (after the mapped columns, which map()
        # takes without it, unless it is one of them)
        self.read_columns = self.columns if id_column is None or id_column in index else (*self.columns, id_column)
        self.id_index: int | None = None if id_column is None else self.read_columns.index(id_column)
        self.import_fields: tuple[str, ...] = (*mapping, *(f.name for f in custom))  # map_line's cells, in order
        self._trimmed: collections.Counter[str] = collections.Counter()
        source = _MapSource(list(mapping), text, alternates, custom_plan, self._trimmed, self._alternate_emails)
        self.map, self.map_line, self.line_of, self.map_with_line = source.compile(len(columns))

    @property
    def trimmed(self) -> collections.Counter[str]:
        """Field name -> how many values were cut to SendGrid's length. Reset it with .clear() (map() holds it)."""
        return self._trimmed

    map: Callable[[Sequence[str | None]], Mapped]
    """(email, contact, note) or the rejection reason. note mentions values left out; None when nothing was. The
    function __init__ generates for this instance."""

    map_line: Callable[[Sequence[str | None]], MappedLine]
    """(email, the contact's import CSV line ending in CRLF, note) or the rejection reason: map()'s rules and
    results, as the bulk import file's row. Generated for this instance."""

    line_of: Callable[[Mapping[str, Any]], str]
    """The import CSV line (CRLF) of a contact map() made: map_line's line for the same row. Generated for this
    instance."""

    map_with_line: Callable[[Sequence[str | None]], MappedBoth]
    """(email, contact, note, import CSV line) or the rejection reason: map() and map_line() of the row at once.
    Generated for this instance."""

    def _alternate_emails(self, text: str, primary: str) -> tuple[list[str], str | None]:
        """Valid, lower-cased, distinct alternates (not the primary), at most MAX_ALTERNATE_EMAILS; and a note."""
        good: list[str] = []
        bad: list[str] = []
        for part in _ALT_SPLIT_RE.split(text):
            part = part.strip()
            if not part:
                continue
            lowered = part.lower()
            if not valid_email(lowered):
                bad.append(part)
            elif lowered != primary and lowered not in good:
                good.append(lowered)
        if len(good) > limits.MAX_ALTERNATE_EMAILS:
            del good[limits.MAX_ALTERNATE_EMAILS:]
            self._trimmed["alternate_emails"] += 1
        note = f"alternate_emails: {', '.join(_shown(b) for b in bad)} not valid; left out" if bad else None
        return good, note


def _add_note(note: Note | None, more: str, field: str) -> Note:
    if note is None:
        return Note(more, (field,))
    return Note(f"{note}; {more}", (*note.fields, field))


def csv_line(cells: Sequence[str]) -> str:
    """One CSV line (no line break) as csv.writer writes it (RFC 4180, quotes only where needed): what the
    generated map_line and line_of fall back to for the rare cell holding a comma, a quote or a line break."""
    out = io.StringIO()
    csv.writer(out).writerow(cells)  # its line break (CRLF) decides what is quoted too: keep it, then cut it
    return out.getvalue()[:-2]


class _MapSource:
    """The source of ContactMapper's generated functions: the field rules once, and the endings that differ.

    map and map_line come in two versions with the same results. The fast one unpacks the row and strips every
    value up front, inside a try (free when nothing is raised), assuming what the readers give nearly always: one
    str per column. The first row that breaks this (a None, e.g. an absent column or a JSON null, or a wrong length)
    goes to the guarded version, which tests each value before stripping it; and the function then becomes the
    guarded version (its code is swapped, so callers that hold the function switch too): no later row pays for an
    exception. map ends alike in both: when every field has a value the contact is built as one dict display
    (presized, no store per field); otherwise field by field. Numbers take an inline float() path and dates a dict
    cache. Variables: email/lowered, t{k} text fields, alt the alternates, c{k} custom values (v{k}: their texts).
    """

    def __init__(self, fields: list[str], text: list[tuple[str, int, int]], alternates: int | None,
                 custom: list[tuple[CustomField, int]], trimmed: collections.Counter[str],
                 alternate_emails: Callable[[str, str], tuple[list[str], str | None]]) -> None:
        self.fields, self.text, self.alternates, self.custom = fields, text, alternates, custom
        self.env: dict[str, Any] = {
            "fullmatch": EMAIL_RE.fullmatch, "shown": _shown, "trimmed": trimmed, "add_note": _add_note,
            "parse_number": parse_number, "alternate_emails": alternate_emails, "float": float,
            "date_get": _DATE_CACHE.get, "date_miss": _date_miss, "MISS": _MISS, "csv_line": csv_line,
            "MISSING_EMAIL": _MISSING_EMAIL, "EMAIL_TOO_LONG": _EMAIL_TOO_LONG, "invalid_email": _invalid_email,
            "NO_FIELDS": _NO_FIELDS,
        }
        for k, (field, _, _) in enumerate(text):
            self.env[f"F{k}"] = field
        for k, (f, _) in enumerate(custom):
            self.env[f"ID{k}"], self.env[f"N{k}"] = f.id, f.name
            self.env[f"PRE{k}"], self.env[f"COL{k}"] = f"{f.column}: ", f.column
            what = "a number" if f.field_type == "Number" else "a date (YYYY-MM-DD or MM/DD/YYYY)"
            self.env[f"POST{k}"] = f" is not {what}; field left out"

    def compile(self, n_columns: int) -> tuple[Callable[[Sequence[str | None]], Mapped],
                                               Callable[[Sequence[str | None]], MappedLine],
                                               Callable[[Mapping[str, Any]], str],
                                               Callable[[Sequence[str | None]], MappedBoth]]:
        """map, map_line, line_of and map_with_line for this plan."""
        both = [f"{line}, line + '\\r\\n'" if line.lstrip().startswith("return lowered,") else line
                for line in self._as_contact()]
        src = [*self._entry("map", self._as_contact(), n_columns), "",
               *self._entry("map_line", [*self._line(), "    return lowered, line + '\\r\\n', note"], n_columns), "",
               *self._line_of(), "",
               *self._entry("map_with_line", [*self._line(), *both], n_columns)]
        env = self.env
        exec(compile("\n".join(src), "<ContactMapper.map>", "exec"), env)
        return env["map"], env["map_line"], env["line_of"], env["map_with_line"]  # compiled from `src` just above

    def _entry(self, name: str, ending: list[str], n_columns: int) -> list[str]:
        """The fast and the guarded version of one function, and the fallback that swaps the first for the second."""
        variables: list[tuple[str, int]] = [("email", 0)] + [(f"t{k}", i) for k, (_, i, _) in enumerate(self.text)]
        if self.alternates is not None:
            variables.append(("alt", self.alternates))
        variables += [(f"c{k}" if f.field_type == "Text" else f"v{k}", i) for k, (f, i) in enumerate(self.custom)]
        names: dict[int, str] = {}  # column -> the variable the fast version unpacks it into
        copies: list[str] = []  # a column used by several fields: the later ones copy the stripped text
        for var, i in variables:
            if i in names:
                copies.append(f"    {var} = {names[i]}")
            else:
                names[i] = var
        unpacked = [names[i] for i in range(n_columns)]  # every column is some field's
        return [
            f"def {name}(values):",
            "    try:",
            f"        {', '.join(unpacked)}, = values",
            *(f"        {var} = {var}.strip()" for var in unpacked),
            "    except (ValueError, AttributeError):",
            f"        return {name}_fallback(values)",
            *copies,
            *self._rules(fast=True),
            *ending,
            "",
            f"def {name}_guarded(values):",
            "    email = values[0]",
            "    if email:",
            "        email = email.strip()",
            *self._rules(fast=False),
            *ending,
            "",
            f"def {name}_fallback(values):",
            f"    {name}.__code__ = {name}_guarded.__code__  # for every holder of this function, at no cost per row",
            f"    return {name}_guarded(values)",
        ]

    def _rules(self, fast: bool) -> list[str]:
        """Everything after the email's fetch and strip up to the ending; a field's value is its stripped text or,
        only when not fast, None or "" too."""

        def value(var: str, i: int, lines: list[str]) -> list[str]:  # lines run when var is a str (stripped)
            if fast:
                return _indent(lines, 1)
            return [f"    {var} = values[{int(i)}]", f"    if {var}:", f"        {var} = {var}.strip()",
                    *_indent(lines, 2)]

        src = [
            "    if not email:",
            "        return MISSING_EMAIL",
            f"    if len(email) > {int(limits.MAX_EMAIL_LENGTH)}:",
            "        return EMAIL_TOO_LONG",
            "    lowered = email.lower()",
            "    if not email.isascii() or fullmatch(lowered) is None or '..' in lowered:",
            "        return invalid_email(shown(email))",
            "    note = None",
        ]
        for k, (_, i, limit) in enumerate(self.text):  # t{k}: the value; false ("" or None) when empty
            src += value(f"t{k}", i, [
                f"if len(t{k}) > {int(limit)}:",
                f"    t{k} = t{k}[:{int(limit)}].rstrip()",
                f"    trimmed[F{k}] += 1",
            ])
        if self.alternates is not None:  # alt: the list of good alternates; false when none
            src += value("alt", self.alternates, [
                "if alt:",
                "    alt, alt_note = alternate_emails(alt, lowered)",
                "    if alt_note:",
                "        note = add_note(note, alt_note, 'alternate_emails')",
            ])
        for k, (f, i) in enumerate(self.custom):  # c{k}: the value; None when empty or left out
            if f.field_type == "Text":
                src += value(f"c{k}", i, [
                    f"if len(c{k}) > {int(CUSTOM_TEXT_MAX_LENGTH)}:",
                    f"    c{k} = c{k}[:{int(CUSTOM_TEXT_MAX_LENGTH)}].rstrip()",
                    f"    trimmed[N{k}] += 1",
                ])
                src += [f"    if not c{k}:", f"        c{k} = None"]
                continue
            src.append(f"    c{k} = None")
            src += value(f"v{k}", i, [
                f"if v{k}:",
                *_indent(self._parse(k, f.field_type), 1),
                f"    if c{k} is None:",
                f"        note = add_note(note, PRE{k} + shown(v{k}) + POST{k}, COL{k})",
            ])
        return src

    @staticmethod
    def _parse(k: int, field_type: str) -> list[str]:
        """c{k} from the text v{k}: a number (parse_number, inline where float() takes the text: same results) or a
        date (parse_date through _DATE_CACHE); None when it is not one."""
        if field_type == "Number":
            return [
                "try:",
                f"    c{k} = float(v{k})",
                "except ValueError:",
                f"    c{k} = parse_number(v{k})",
                "else:",
                f"    if c{k} - c{k} != 0.0 or '_' in v{k} or not v{k}.isascii():",
                f"        c{k} = None",
                f"    elif c{k}.is_integer() and {-_MAX_EXACT_INT} <= c{k} <= {_MAX_EXACT_INT}:",
                f"        c{k} = int(c{k})",
            ]
        return [f"c{k} = date_get(v{k}, MISS)", f"if c{k} is MISS:", f"    c{k} = date_miss(v{k})"]

    def _as_contact(self) -> list[str]:
        """map's ending: the contact dict, without the fields that have no value."""
        texts = [f"t{k}" for k in range(len(self.text))]
        customs = [f"c{k}" for k in range(len(self.custom))]
        whole = ["'email': lowered", *(f"F{k}: t{k}" for k in range(len(self.text)))]
        if customs:
            whole.append(f"'custom_fields': {{{', '.join(f'ID{k}: c{k}' for k in range(len(customs)))}}}")
        every = [*texts, *(["not alt"] if self.alternates is not None else []), *(f"{c} is not None" for c in customs)]
        src = []
        if every:
            src += [f"    if {' and '.join(every)}:", f"        return lowered, {{{', '.join(whole)}}}, note"]
        src.append("    contact = {'email': lowered}")
        for k, t in enumerate(texts):
            src += [f"    if {t}:", f"        contact[F{k}] = {t}"]
        if self.alternates is not None:
            src += ["    if alt:", "        contact['alternate_emails'] = alt"]
        if customs:
            src.append("    fields = {}")
            for k, c in enumerate(customs):
                src += [f"    if {c} is not None:", f"        fields[ID{k}] = {c}"]
            src += ["    if fields:", "        contact['custom_fields'] = fields"]
        src.append("    return lowered, contact, note")
        return src

    def _line(self) -> list[str]:
        """`line`: the import row of the fields' values (None or "" for no value) in import_fields order, as
        csv.writer writes it: a plain join unless a cell holds a comma, a quote or a line break (one check of the
        joined line); numbers as str() writes them, as csv.writer does."""
        cells: list[str] = []
        texts = iter(range(len(self.text)))
        for field in self.fields:
            if field == "email":
                cells.append("lowered")
            elif field == "alternate_emails":
                cells.append("(','.join(alt) if alt else '')")
            else:
                cells.append(f"(t{next(texts)} or '')")
        for k, (f, _) in enumerate(self.custom):
            cells.append(f"('' if c{k} is None else str(c{k}))" if f.field_type == "Number" else f"(c{k} or '')")
        return [
            f"    cells = ({', '.join(cells)},)",
            "    line = ','.join(cells)",
            f"    if line.count(',') != {len(cells) - 1} or '\"' in line or '\\n' in line or '\\r' in line:",
            "        line = csv_line(cells)",
        ]

    def _line_of(self) -> list[str]:
        """line_of: a contact dict's values into the variables the rules leave, then the same line."""
        src = ["def line_of(contact):", "    lowered = contact['email']"]
        src += [f"    t{k} = contact.get(F{k})" for k in range(len(self.text))]
        if self.alternates is not None:
            src.append("    alt = contact.get('alternate_emails')")
        if self.custom:
            src.append("    fields = contact.get('custom_fields') or NO_FIELDS")
            src += [f"    c{k} = fields.get(ID{k})" for k in range(len(self.custom))]
        return [*src, *self._line(), "    return line + '\\r\\n'"]


def _indent(lines: list[str], depth: int) -> list[str]:
    return [" " * (4 * depth) + line for line in lines]


_NO_FIELDS: Mapping[str, Any] = MappingProxyType({})


def encode(contact: dict[str, Any]) -> bytes:
    """Compact JSON, as it goes into the request body."""
    return orjson.dumps(contact)


def email_fps(emails: Iterable[str]) -> array[int]:
    """64-bit fingerprints of (normalised) emails for a run's de-duplication (dedup.Deduper) and a delta run's send
    set: hash(), SipHash keyed per process, ~0.05 us an email against ~0.3 for blake2b. So they are made where they
    are used, in the exporting process, never in a worker, and never stored: a resumed run replays its export and
    makes them again in its own process."""
    return array("q", map(hash, emails))
