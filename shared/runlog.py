"""One structured log record per finished run, and one per timer tick naming the destinations: what Application
Insights charts and alerts on (docs/operations.md has the queries, infra/app/alerts.bicep the alert rules).

A record is a log line `run_finished {json}` carrying the same fields as `extra=` attributes. The message form is what
reaches Application Insights through the Functions host by default (the Python worker forwards the formatted
message, not `extra`), so the queries parse it; with OpenTelemetry in the worker the same fields also arrive as
custom dimensions. Values are flat (strings, numbers, booleans), as custom dimensions must be. No record holds a
secret or a person's data: names, ids, statuses, counts and seconds.

Only final statuses are logged, so a run that is interrupted or waits for SendGrid and later succeeds writes one
record, `completed`, and no alert fires for its retries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

import orjson

from .state import parse_iso

log = logging.getLogger(__name__)

RUN_FINISHED = "run_finished"
DESTINATIONS_SEEN = "destinations_seen"
FINAL_STATUSES = frozenset({"completed", "completed_with_errors", "failed", "refused", "dry_run", "superseded"})
COUNTS = ("read", "valid", "sent", "rejected_total", "not_applied")
Value: TypeAlias = "str | int | float | bool"


def duration_seconds(record: Mapping[str, Any]) -> float | None:
    """How long the run took: from its start (or its queueing, when it never started) to its end, in whole seconds
    as the record's times go, or the engine's own measure of its last leg when that is longer (a short run)."""
    start, end = parse_iso(record.get("started_at") or record.get("queued_at")), parse_iso(record.get("finished_at"))
    measured = (record.get("timings") or {}).get("seconds")
    measured = float(measured) if isinstance(measured, int | float) else None
    if start is None or end is None:
        return measured
    return round(max(end - start, measured or 0.0), 3)


def run_fields(record: Mapping[str, Any]) -> dict[str, Value] | None:
    """The record's fields for a finished run, or None when `record` is not one (still open, or an answer such as
    "skipped: another run has this version" that names another run's id)."""
    status, run_id, trigger = record.get("status"), record.get("run_id"), record.get("trigger")
    if status not in FINAL_STATUSES or not isinstance(run_id, str) or not isinstance(trigger, str):
        return None
    fields: dict[str, Value] = {"event": RUN_FINISHED, "destination": str(record.get("destination")),
                                "run_id": run_id, "kind": str(record.get("kind") or "run"), "trigger": trigger,
                                "status": status, "dry_run": bool(record.get("dry_run"))}
    counts = record.get("counts") or {}
    for name in COUNTS:
        if isinstance(counts.get(name), int):
            fields[name] = counts[name]
    for name, value in sorted((record.get("changes") or {}).items()):  # issue 14: new, changed, unchanged, ...
        if isinstance(value, int):
            fields[f"changes_{name}"] = value
    seconds = duration_seconds(record)
    if seconds is not None:
        fields["duration_seconds"] = seconds
    return fields


def _emit(event: str, fields: Mapping[str, Value | list[str]]) -> None:
    log.info("%s %s", event, orjson.dumps(fields, option=orjson.OPT_SORT_KEYS).decode(), extra=dict(fields))


def finished(record: dict[str, Any]) -> dict[str, Any]:
    """Log the record of a run that has just ended (nothing for one still open); returns `record` unchanged."""
    fields = run_fields(record)
    if fields is not None:
        _emit(RUN_FINISHED, fields)
    return record


def destinations_seen(enabled: Iterable[str], disabled: Iterable[str], invalid: Iterable[str]) -> None:
    """One record per timer tick: the destinations that should run (enabled), those an admin stopped (disabled, in
    the file or through the API) and those whose entry is invalid. The "no successful run" alert reads the latest."""
    _emit(DESTINATIONS_SEEN, {"event": DESTINATIONS_SEEN, "enabled": sorted(enabled), "disabled": sorted(disabled),
                              "invalid": sorted(invalid)})
