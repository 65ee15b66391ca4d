"""What the run-history page shows, read from the state store (`page` renders it): each destination's settings,
whether it runs, when its schedule next runs it and its newest runs; a dry run's removals preview; a run's
rejections CSV as a stream. The HTTP door and the command line read through these, so both show the same."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from typing import Any

from . import page, schedules
from .config import Config
from .errors import StateError
from .redaction import redact
from .services import refusal
from .state import DESTINATION_PATTERN, StateStore
from .storage import NotFound, check_key

PREVIEW_ROWS = 100  # emails of a dry run's removals file shown on its page
CHUNK_BYTES = 64 * 1024


def destination_views(config: Config | None, state: StateStore, now: float,
                      runs: int = page.RUNS_SHOWN) -> list[page.DestinationView]:
    """Every destination of the destinations file (valid or not), or without one every destination the state store
    holds runs of, with its newest `runs` runs."""
    views: list[page.DestinationView] = []
    if config is None:
        for name in _names_with_runs(state):
            newest = state.list_runs(name, limit=runs)
            last = newest[0] if newest else {}
            views.append(page.DestinationView(name, str(last.get("display_name") or name), newest,
                                              mode=last.get("mode"), list_id=last.get("list_id")))
        return views
    for name, dest in sorted(config.destinations.items()):
        disabled = state.disabled(name)
        views.append(page.DestinationView(
            name, dest.display_name, state.list_runs(name, limit=runs), enabled=dest.enabled,
            blocked=refusal(dest, disabled), mode=dest.mode, list_id=dest.list_id, schedule=dest.schedule,
            on_new_export=dest.on_new_export, next_due=schedules.next_run(state, dest, disabled, now)))
    for name, exc in sorted(config.errors.items()):
        has_state = DESTINATION_PATTERN.fullmatch(name) is not None  # "#3": an entry without a usable name
        views.append(page.DestinationView(name, name, state.list_runs(name, limit=runs) if has_state else [],
                                          error=str(exc)))
    return views


def _names_with_runs(state: StateStore) -> list[str]:
    names = {info.key.split("/")[1] for info in state.store.list("runs/") if info.key.count("/") == 2}
    return sorted(n for n in names if DESTINATION_PATTERN.fullmatch(n))


def _own_key(record: Mapping[str, Any], key: Any) -> str | None:
    """A file the record names, when it is one of its destination's run files (never another place in the store)."""
    destination = record.get("destination")
    if not isinstance(key, str) or not isinstance(destination, str) or not key.startswith(f"runs/{destination}/"):
        return None
    try:
        return check_key(key)
    except StateError:
        return None


def removals_preview(state: StateStore, record: Mapping[str, Any], limit: int = PREVIEW_ROWS) -> list[str] | None:
    """The first `limit` emails of a dry run's removals file (`plan.removals_file`), or None without one (or when it
    is gone). Its first cell per row; a header row `email` is skipped."""
    plan = record.get("plan")
    key = _own_key(record, plan.get("removals_file")) if isinstance(plan, Mapping) else None
    if key is None:
        return None
    try:
        stream = state.store.open_read(key)
    except NotFound:
        return None
    emails: list[str] = []
    with stream, io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="") as text:
        for row in csv.reader(text):
            if len(emails) >= limit:
                break
            if row and row[0] and not (not emails and row[0].strip().lower() == "email"):
                emails.append(row[0])
    return emails


def rejections_key(record: Mapping[str, Any]) -> str | None:
    """Where a run's rejections CSV is, when it has one."""
    return _own_key(record, record.get("rejections_file"))


def rejections_chunks(state: StateStore, key: str) -> Iterator[bytes]:
    """The rejections CSV as it is read from the store, line by line (each line redacted, as every answer is), in
    chunks of about CHUNK_BYTES: never the whole file at once. NotFound before the first chunk when it is gone."""
    stream = state.store.open_read(key)

    def chunks() -> Iterator[bytes]:
        with stream:
            pending: list[bytes] = []
            size = 0
            for line in stream:
                pending.append(redact(line.decode("utf-8", "replace")).encode())
                size += len(pending[-1])
                if size >= CHUNK_BYTES:
                    yield b"".join(pending)
                    pending, size = [], 0
            if pending:
                yield b"".join(pending)

    return chunks()


__all__ = ["destination_views", "rejections_chunks", "rejections_key", "removals_preview"]
