"""The destinations file: load and validate.

The file is JSON: ``{"destinations": [{...}, ...]}``. A problem with the file as a whole (not JSON, wrong shape,
duplicate destination names) raises ConfigError. A problem with one destination is recorded in ``Config.errors``
under its name (or ``#<index>``, 0-based, when it has no usable name) and the other destinations stay usable.
Every error names the file, the destination and the field.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, TypeGuard

from . import limits, ncrontab
from .errors import ConfigError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")  # used in URLs and storage keys
SECRET_NAME_RE = re.compile(r"^[0-9A-Za-z-]{1,127}$")  # Key Vault secret names
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
CUSTOM_FIELD_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CUSTOM_FIELD_NAME_MAX = 100  # [F] field_definitions POST: name maxLength 100

MODES = ("upsert", "mirror")
REGIONS = ("global", "eu")
DEFAULT_MAX_PROFILES = 100_000  # Customer Insights' own SendGrid export stops at 100,000 profiles

KNOWN_FIELDS = (
    "name", "display_name", "enabled", "consent", "api_key_secret", "list_id", "segments", "mapping",
    "custom_fields", "mode", "max_profiles", "region", "max_removal_fraction", "bulk_threshold", "full_resync_days",
    "max_in_flight", "schedule", "on_new_export", "id_column",
)
FULL_RESYNC_DAYS_DEFAULT = 7  # a full send at least this often, so edits made in SendGrid's UI are overwritten
MAX_IN_FLIGHT_DEFAULT, MAX_IN_FLIGHT_MAX = 2, 4  # requests sent at once


@dataclass(frozen=True)
class Destination:
    name: str
    display_name: str
    enabled: bool
    consent: bool
    api_key_secret: str  # the NAME of a secret, never its value
    list_id: str
    segments: tuple[str, ...]
    mapping: Mapping[str, str]  # SendGrid reserved field -> source column
    custom_fields: Mapping[str, str]  # SendGrid custom field name -> source column
    mode: Literal["upsert", "mirror"]
    max_profiles: int | None
    region: Literal["global", "eu"]
    max_removal_fraction: float = 0.5
    bulk_threshold: int | None = limits.BULK_THRESHOLD_DEFAULT
    full_resync_days: int | None = FULL_RESYNC_DAYS_DEFAULT
    max_in_flight: int = MAX_IN_FLIGHT_DEFAULT
    schedule: str | None = None  # six-field NCRONTAB in UTC (`ncrontab`): the timer re-syncs the latest export then
    on_new_export: bool = True  # a new export of its segments runs it at once (the blob trigger)
    id_column: str | None = None  # a source column (e.g. CustomerId) the rejections CSV adds, to find each profile

    def public(self) -> dict[str, Any]:
        """Every setting, JSON-ready. Safe to show: api_key_secret is the secret's name, not the key."""
        return {
            "name": self.name,
            "display_name": self.display_name,
            "enabled": self.enabled,
            "consent": self.consent,
            "api_key_secret": self.api_key_secret,
            "list_id": self.list_id,
            "segments": list(self.segments),
            "mapping": dict(self.mapping),
            "custom_fields": dict(self.custom_fields),
            "mode": self.mode,
            "max_profiles": self.max_profiles,
            "region": self.region,
            "max_removal_fraction": self.max_removal_fraction,
            "bulk_threshold": self.bulk_threshold,
            "full_resync_days": self.full_resync_days,
            "max_in_flight": self.max_in_flight,
            "schedule": self.schedule,
            "on_new_export": self.on_new_export,
            "id_column": self.id_column,
        }


@dataclass(frozen=True)
class Config:
    origin: str
    destinations: Mapping[str, Destination]
    errors: Mapping[str, ConfigError]  # invalid destinations, by name or "#<index>"


class _Invalid(Exception):
    """One field's problem inside a destination (collected, then turned into a ConfigError)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(field, f"must be true or false, not {_type_name(value)}")
    return value


def _string(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(field, f"must be a non-empty string, not {value!r}")
    return value


def _matching(field: str, value: Any, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        shown = repr(value) if isinstance(value, str) else _type_name(value)
        raise _Invalid(field, f"{shown} is not {what}")
    return value


def _secret_name(value: Any) -> str:
    """Like _matching, but never echoes the value: a pasted API key must not end up in an error message or log."""
    if isinstance(value, str) and SECRET_NAME_RE.fullmatch(value):
        return value
    if isinstance(value, str) and value.startswith("SG."):
        raise _Invalid("api_key_secret", "looks like an API key itself; store the key in Key Vault (or the"
                                         " environment) and give the secret's name here")
    raise _Invalid("api_key_secret", "is not a Key Vault secret name (1-127 letters, digits and '-');"
                                     " the value is not shown in case it is a key")


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed or not isinstance(value, str):
        raise _Invalid(field, f"{value!r} is not allowed; use one of {', '.join(repr(a) for a in allowed)}")
    return value


def _positive_int_or_null(field: str, value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value <= 0:
        raise _Invalid(field, f"must be a positive whole number or null, not {value!r}")
    return value


def _segments(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid("segments", "must be a non-empty list of segment names")
    seen: set[str] = set()
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise _Invalid("segments", f"every segment name must be a non-empty string, not {item!r}")
        if item in seen:
            raise _Invalid("segments", f"segment {item!r} is listed twice")
        seen.add(item)
    return tuple(value)


def _mapping(value: Any) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise _Invalid("mapping", f"must be an object of SendGrid field -> source column, not {_type_name(value)}")
    allowed = ", ".join(sorted(limits.WRITABLE_RESERVED_FIELDS))
    for key, column in value.items():
        if key not in limits.WRITABLE_RESERVED_FIELDS:
            raise _Invalid("mapping", f"{key!r} is not a writable SendGrid field; allowed fields are {allowed}"
                                      " (put your own fields under custom_fields)")
        if not isinstance(column, str) or not column.strip():
            raise _Invalid("mapping", f"{key!r} must name a source column (a non-empty string), not {column!r}")
    if "email" not in value:
        raise _Invalid("mapping", "'email' is required: SendGrid identifies contacts by email")
    return MappingProxyType(dict(value))


def _custom_fields(value: Any) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise _Invalid("custom_fields", f"must be an object of custom field name -> source column, not "
                                        f"{_type_name(value)}")
    if len(value) > limits.MAX_CUSTOM_FIELDS:
        raise _Invalid("custom_fields", f"{len(value)} fields; SendGrid allows at most {limits.MAX_CUSTOM_FIELDS}")
    folded: dict[str, str] = {}
    for key, column in value.items():
        if not CUSTOM_FIELD_NAME_RE.fullmatch(key) or len(key) > CUSTOM_FIELD_NAME_MAX:
            raise _Invalid("custom_fields", f"{key!r} is not a SendGrid custom field name (letters, digits and '_',"
                                            f" not starting with a digit, at most {CUSTOM_FIELD_NAME_MAX} characters)")
        if key.lower() in limits.WRITABLE_RESERVED_FIELDS:
            raise _Invalid("custom_fields", f"{key!r} is a reserved SendGrid field; map it under 'mapping'")
        if key.lower() in folded:  # SendGrid field names are unique case-insensitively: both would be one field
            raise _Invalid("custom_fields", f"{key!r} and {folded[key.lower()]!r} name the same SendGrid field")
        folded[key.lower()] = key
        if not isinstance(column, str) or not column.strip():
            raise _Invalid("custom_fields", f"{key!r} must name a source column (a non-empty string), not {column!r}")
    return MappingProxyType(dict(value))


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value <= 1):
        raise _Invalid("max_removal_fraction", f"must be a number greater than 0 and at most 1, not {value!r}")
    return float(value)


def _schedule(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return ncrontab.parse(value).expression
    except ncrontab.CronError as exc:
        raise _Invalid("schedule", f"is not a six-field NCRONTAB schedule in UTC: {exc}") from None


# field -> (default or _MISSING when required, validator). Every field is checked, even after a failure.
_MISSING = object()
_FIELDS: dict[str, tuple[Any, Callable[[Any], Any]]] = {
    "enabled": (True, lambda v: _bool("enabled", v)),
    "consent": (False, lambda v: _bool("consent", v)),
    "api_key_secret": (_MISSING, lambda v: _secret_name(v)),
    "list_id": (_MISSING, lambda v: _matching("list_id", v, UUID_RE, "a SendGrid list id (a UUID)").lower()),
    "segments": (_MISSING, _segments),
    "mapping": (_MISSING, _mapping),
    "custom_fields": ({}, _custom_fields),
    "mode": ("upsert", lambda v: _choice("mode", v, MODES)),
    "max_profiles": (DEFAULT_MAX_PROFILES, lambda v: _positive_int_or_null("max_profiles", v)),
    "region": ("global", lambda v: _choice("region", v, REGIONS)),
    "max_removal_fraction": (0.5, _fraction),
    "bulk_threshold": (limits.BULK_THRESHOLD_DEFAULT, lambda v: _positive_int_or_null("bulk_threshold", v)),
    "full_resync_days": (FULL_RESYNC_DAYS_DEFAULT, lambda v: _positive_int_or_null("full_resync_days", v)),
    "max_in_flight": (MAX_IN_FLIGHT_DEFAULT, lambda v: _in_flight(v)),
    "schedule": (None, _schedule),
    "on_new_export": (True, lambda v: _bool("on_new_export", v)),
    "id_column": (None, lambda v: None if v is None else _string("id_column", v)),
}


def _in_flight(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IN_FLIGHT_MAX:
        raise _Invalid("max_in_flight", f"must be a whole number from 1 to {MAX_IN_FLIGHT_MAX}, not {value!r}")
    return value


def _destination(raw: dict[str, Any], name: str) -> tuple[Destination | None, list[_Invalid]]:
    problems: list[_Invalid] = []
    known = ", ".join(KNOWN_FIELDS)
    problems.extend(_Invalid(key, f"unknown field {key!r}; known fields are {known}")
                    for key in raw if key not in KNOWN_FIELDS)
    values: dict[str, Any] = {"name": name}
    try:
        values["display_name"] = _string("display_name", raw["display_name"]) if "display_name" in raw else name
    except _Invalid as exc:
        problems.append(exc)
    for field, (default, check) in _FIELDS.items():
        if field not in raw:
            if default is _MISSING:
                problems.append(_Invalid(field, "is required"))
            else:
                values[field] = default
            continue
        try:
            values[field] = check(raw[field])
        except _Invalid as exc:
            problems.append(exc)
    if problems:
        return None, problems
    return Destination(**values), []


def _as_error(origin: str, destination: str, problems: list[_Invalid]) -> ConfigError:
    """One ConfigError per destination: the first problem's field, every problem in the message."""
    first, rest = problems[0], problems[1:]
    message = first.message + "".join(f"; also field {p.field!r}: {p.message}" for p in rest)
    return ConfigError(message, file=origin, destination=destination, field=first.field)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in one JSON object")
        out[key] = value
    return out


def _decode(data: bytes | str, origin: str) -> Any:
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"not UTF-8 text (byte {exc.start})", file=origin) from None
    try:
        return json.loads(data, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", file=origin) from None
    except ValueError as exc:
        raise ConfigError(f"not valid JSON: {exc}", file=origin) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_config(data: bytes | str, origin: str) -> Config:
    """Validate a destinations file. Raises ConfigError only for file-level problems."""
    doc = _decode(data, origin)
    if not isinstance(doc, dict):
        raise ConfigError(f'must be a JSON object {{"destinations": [...]}}, not {_type_name(doc)}', file=origin)
    unknown = [k for k in doc if k != "destinations"]
    if unknown:
        raise ConfigError(f"unknown top-level key {unknown[0]!r}; the only one is 'destinations'", file=origin,
                          field=unknown[0])
    entries = doc.get("destinations")
    if not isinstance(entries, list):
        raise ConfigError(f"must be a list of destinations, not {_type_name(entries)}", file=origin,
                          field="destinations")

    seen: dict[str, int] = {}
    for index, raw in enumerate(entries):
        name = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(name, str) and NAME_RE.fullmatch(name):
            if name in seen:
                raise ConfigError(f"destination name used twice (entries #{seen[name]} and #{index})", file=origin,
                                  destination=name, field="name")
            seen[name] = index

    destinations: dict[str, Destination] = {}
    errors: dict[str, ConfigError] = {}
    for index, raw in enumerate(entries):
        label = f"#{index}"
        if not isinstance(raw, dict):
            errors[label] = ConfigError(f"must be an object, not {_type_name(raw)}", file=origin, destination=label)
            continue
        name = raw.get("name", _MISSING)
        if isinstance(name, str) and NAME_RE.fullmatch(name):
            key, bad_name = name, None
        elif name is _MISSING:
            key, bad_name = label, _Invalid("name", "is required")
        else:
            key, bad_name = label, _Invalid("name", f"{name!r} is not a valid name: 1-63 lower-case letters, digits "
                                                    "and '-', starting with a letter or digit (it is used in URLs and "
                                                    "storage keys)")
        destination, problems = _destination(raw, key)
        if bad_name:
            errors[key] = _as_error(origin, key, [bad_name, *problems])
        elif destination is None:
            errors[key] = _as_error(origin, key, problems)
        else:
            destinations[key] = destination
    return Config(origin=origin, destinations=MappingProxyType(destinations), errors=MappingProxyType(errors))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a destinations file from disk."""
    origin = os.fspath(path)
    try:
        with open(origin, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ConfigError("file not found", file=origin) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=origin) from None
    return parse_config(data, origin)


__all__ = ["Config", "Destination", "load_config", "parse_config"]
