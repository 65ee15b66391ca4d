"""Six-field NCRONTAB expressions, as Azure Functions' timer trigger reads them, evaluated in UTC.

`second minute hour day month day-of-week`, each field `*`, a number, a range `a-b`, a step `*/n`, `a/n` (a to the
field's end) or `a-b/n`, or a comma-separated list of those; months and days of the week also by name (`Jan`,
`January`; `Mon`, `Monday`; any prefix of three letters or more, in any case). Days of the week run 0-6, Sunday
being 0. As in NCrontab (the library Functions uses), an occurrence must match every field: the day of the month
AND the day of the week (classic cron takes either).

Stricter than NCrontab where an expression is most likely a mistake: a range written backwards (`5-2`, which
NCrontab swaps), a step of 0 (which it reads as 1), and an expression that matches no date at all (`0 0 0 30 2 *`,
which it accepts and never fires) are refused. Every refusal says which field and why. Pure: no clock, no I/O.
"""

from __future__ import annotations

import calendar
import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

FIELDS = ("second", "minute", "hour", "day", "month", "day-of-week")
_BOUNDS = ((0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
_NAMES: dict[str, tuple[str, ...]] = {
    "month": ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
              "november", "december"),
    "day-of-week": ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"),
}
_NUMBER = re.compile(r"[0-9]{1,4}")  # ASCII digits only ("٣" is a digit to int())
_WORD = re.compile(r"[A-Za-z]+")
SEARCH_YEARS = 30  # every (month, day) a schedule names falls on every weekday within 28 years (Feb 29 included)


class CronError(ValueError):
    """An expression that is not a six-field NCRONTAB schedule; the message names the field and says why."""


@dataclass(frozen=True)
class Schedule:
    expression: str
    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: frozenset[int]  # 0 = Sunday, as NCrontab counts

    def matches(self, when: datetime) -> bool:
        """Whether `when` (UTC, to the second) is an occurrence."""
        when = _utc(when)
        return (when.second in self.seconds and when.minute in self.minutes and when.hour in self.hours
                and when.day in self.days and when.month in self.months and _weekday(when) in self.weekdays)

    def next_after(self, when: datetime) -> datetime:
        """The first occurrence strictly after `when` (UTC, whole seconds): what NCrontab's GetNextOccurrence
        gives. Every parsed schedule has one within SEARCH_YEARS."""
        start = _utc(when).replace(microsecond=0) + timedelta(seconds=1)
        for year in range(start.year, start.year + SEARCH_YEARS + 1):
            for month in self.months:
                if (year, month) < (start.year, start.month):
                    continue
                found = self._in_month(year, month, start)
                if found is not None:
                    return found
        raise AssertionError(f"{self.expression!r} has no occurrence within {SEARCH_YEARS} years")  # parse refuses it

    def _in_month(self, year: int, month: int, start: datetime) -> datetime | None:
        last_day = calendar.monthrange(year, month)[1]
        same_month = (year, month) == (start.year, start.month)
        for day in self.days:
            if day > last_day:
                break
            if (same_month and day < start.day) or _weekday(datetime(year, month, day)) not in self.weekdays:
                continue
            earliest = (start.hour, start.minute, start.second) if same_month and day == start.day else (0, 0, 0)
            moment = self._time_from(earliest)
            if moment is not None:
                return datetime(year, month, day, *moment, tzinfo=UTC)
        return None

    def _time_from(self, earliest: tuple[int, int, int]) -> tuple[int, int, int] | None:
        """The first (hour, minute, second) of the schedule at or after `earliest` within one day."""
        for hour in self.hours:
            if hour < earliest[0]:
                continue
            for minute in self.minutes:
                if (hour, minute) < earliest[:2]:
                    continue
                for second in self.seconds:
                    if (hour, minute, second) >= earliest:
                        return hour, minute, second
        return None


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _weekday(when: datetime) -> int:
    return (when.weekday() + 1) % 7  # Python's Monday = 0; NCrontab's Sunday = 0


def _value(text: str, field: str, low: int, high: int) -> int:
    if _NUMBER.fullmatch(text):
        value = int(text)
    elif _WORD.fullmatch(text) and field in _NAMES:
        names = _NAMES[field]
        matches = [i for i, name in enumerate(names) if len(text) >= 3 and name.startswith(text.lower())]
        if not matches:
            raise CronError(f"{field} field: {text!r} is not a {field} name (use e.g. "
                            f"{names[0][:3].title()} or {names[0].title()})")
        value = matches[0] + low
    else:
        what = "a number" + (" or a name" if field in _NAMES else "")
        raise CronError(f"{field} field: {text!r} is not {what}")
    if not low <= value <= high:
        raise CronError(f"{field} field: {value} is outside {low}-{high}")
    return value


def _part(text: str, field: str, low: int, high: int) -> set[int]:
    """One element of a list: `*`, `n`, `a-b`, each optionally `/step`."""
    base, _, step_text = text.partition("/")
    step = 1
    if step_text or text.endswith("/"):
        if not _NUMBER.fullmatch(step_text) or int(step_text) == 0:
            raise CronError(f"{field} field: the step in {text!r} must be a whole number of 1 or more")
        step = int(step_text)
    if base == "*":
        first, last = low, high
    elif "-" in base:
        a, _, b = base.partition("-")
        first, last = _value(a, field, low, high), _value(b, field, low, high)
        if first > last:
            raise CronError(f"{field} field: the range {base!r} runs backwards; write it lowest first")
    else:
        first = _value(base, field, low, high)
        last = high if step_text else first  # NCrontab: "a/n" runs from a to the field's end
    return set(range(first, last + 1, step))


def _field(text: str, index: int) -> tuple[int, ...]:
    field, (low, high) = FIELDS[index], _BOUNDS[index]
    if not text:
        raise CronError(f"{field} field is empty")
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{field} field: {text!r} has an empty element")
        values |= _part(part, field, low, high)
    return tuple(sorted(values))


@functools.lru_cache(maxsize=256)
def parse(expression: str) -> Schedule:
    """The schedule of a six-field NCRONTAB expression (fields separated by spaces), or CronError."""
    if not isinstance(expression, str):
        raise CronError(f"must be a string of six fields, not {type(expression).__name__}")
    parts = expression.split()
    if len(parts) != len(FIELDS):
        hint = (" (a five-field cron expression has no seconds: put 0 in front)" if len(parts) == 5 else
                " (a time span such as 00:05:00 is not accepted here)" if ":" in expression else "")
        raise CronError(f"{expression!r} has {len(parts)} field(s); NCRONTAB needs six: "
                        f"{' '.join(FIELDS)}, e.g. '0 0 6 * * *' for 06:00 UTC every day{hint}")
    seconds, minutes, hours, days, months, weekdays = (_field(text, i) for i, text in enumerate(parts))
    schedule = Schedule(" ".join(parts), seconds, minutes, hours, days, months, frozenset(weekdays))
    longest = {month: 29 if month == 2 else calendar.monthrange(2001, month)[1] for month in schedule.months}
    if not any(day <= longest[month] for month in schedule.months for day in schedule.days):
        raise CronError(f"{expression!r} names no date that exists (day {_listed(schedule.days)} of month "
                        f"{_listed(schedule.months)}): it would never run")
    return schedule


def _listed(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


__all__ = ["CronError", "Schedule", "parse"]
