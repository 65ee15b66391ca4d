"""A destination's own schedule: whether the timer's tick should run it, and the marker that keeps each occurrence
to one run.

One marker per scheduled destination, `schedules/<destination>.json` in the state store: `{"schedule": expression,
"through": time, "at": time}`. `through` is the moment up to which the schedule's occurrences are handled. The
first tick that sees a schedule (or a changed one) notes `through` = now and runs nothing: a schedule runs at its
occurrences after it was set, as a Functions timer does. A later tick is due when the schedule's first occurrence
after `through` has come; it takes the occurrence by moving `through` to now, written on condition that the marker
is still the one it read (If-Match), so of two timer instances only one runs it. Occurrences that fell between two
ticks (a schedule finer than the timer, a tick that came late, a destination disabled for a while) make one run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

from . import ncrontab
from .config import Destination
from .state import StateStore, parse_iso
from .storage import PreconditionFailed

log = logging.getLogger(__name__)


class Decision(StrEnum):
    NEW = "new"  # the timer has not seen this schedule yet: note it, run nothing
    DUE = "due"  # an occurrence came since the marker's `through`
    NOT_DUE = "not_due"


@dataclass(frozen=True)
class Marker:
    schedule: str
    through: float  # seconds since the epoch
    etag: str | None = None  # of the stored marker: the condition of the next write


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def decide(schedule: str, marker: Marker | None, now: float) -> Decision:
    """What a tick at `now` does for a destination with this schedule, given its marker."""
    if marker is None or marker.schedule != schedule:
        return Decision.NEW
    if ncrontab.parse(schedule).next_after(_at(marker.through)) <= _at(now):
        return Decision.DUE
    return Decision.NOT_DUE


def next_due(schedule: str | None, marker: Marker | None, now: float) -> str | None:
    """When the destination's next scheduled run is due (UTC, ISO 8601), or None without a schedule. A time in the
    past means due: the timer's next tick runs it."""
    if schedule is None:
        return None
    since = marker.through if marker is not None and marker.schedule == schedule else now
    return _stamp(ncrontab.parse(schedule).next_after(_at(since)).timestamp())


def next_run(state: StateStore, dest: Destination, disabled: Mapping[str, Any] | None, now: float) -> str | None:
    """When the timer next runs the destination by its schedule (next_due); None without one, or while it is
    disabled in the file or by an admin."""
    if dest.schedule is None or not dest.enabled or disabled:
        return None
    return next_due(dest.schedule, Markers(state).read(dest.name), now)


class Markers:
    """The markers in the state store."""

    def __init__(self, state: StateStore) -> None:
        self.store = state.store

    @staticmethod
    def key(destination: str) -> str:
        return StateStore.schedule_key(destination)

    def read(self, destination: str) -> Marker | None:
        """The stored marker, or None (none yet, or one this version cannot read: the next tick notes a new one)."""
        found = self.store.read_with_etag(self.key(destination))
        if found is None:
            return None
        try:
            data = orjson.loads(found[0])
            through = parse_iso(data["through"])
            schedule = data["schedule"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            through, schedule = None, None
        if through is None or not isinstance(schedule, str):
            log.warning("%s: its schedule marker %s is unreadable; the timer notes a new one", destination,
                        self.key(destination))
            return Marker("", 0.0, found[1])
        return Marker(schedule, through, found[1])

    def advance(self, destination: str, schedule: str, now: float, read: Marker | None) -> Marker | None:
        """Move the marker to `now` if it is still `read` (None: if there is none). The new marker, or None when
        another tick changed it first (that tick has the occurrence)."""
        data = orjson.dumps({"schedule": schedule, "through": _stamp(now), "at": _stamp(now)})
        try:
            etag = self.store.write_bytes(self.key(destination), data, if_match=read.etag if read else None,
                                          if_none_match=read is None)
        except PreconditionFailed:
            return None
        return Marker(schedule, float(int(now)), etag)

    def give_back(self, destination: str, taken: Marker, previous: Marker) -> None:
        """Undo `advance` (the run could not start): the occurrence stays due for the next tick. Nothing happens
        when the marker changed again meanwhile."""
        data = orjson.dumps({"schedule": previous.schedule, "through": _stamp(previous.through),
                             "at": _stamp(taken.through)})
        try:
            self.store.write_bytes(self.key(destination), data, if_match=taken.etag)
        except PreconditionFailed:
            log.info("%s: its schedule marker changed while its run waited; left as it is", destination)


__all__ = ["Decision", "Marker", "Markers", "decide", "next_due", "next_run"]
