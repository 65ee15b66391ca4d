"""What the command line shows a person: a run's summary, the table of past runs, the account's lists and custom
fields (pure functions of records and answers), and the progress line on stderr (`Progress`).

Text that comes from outside (file names, list names, SendGrid's messages) is shown with its control characters
escaped, so nothing read from an export or an account can move the cursor or recolour the terminal. No line ends in a
space, and a value that is not known is left out rather than shown as "None".
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TextIO

from .runlog import run_fields

CHANGES = ("new", "changed", "unchanged", "removed", "rejected", "not_applied")
_SUCCESS = ("completed", "completed_with_errors", "submitted", "dry_run")
_SAMPLE = 5  # rejected rows shown in a summary; the rejections file has them all


# ------------------------------------------------------------------------------------------------------ values


def printable(value: object) -> str:
    """`value` as one line a terminal shows as it is: control characters (and other non-printables) escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def number(value: object) -> str:
    """A count with thousands separators; '-' when it is not known."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def duration(seconds: float | None) -> str:
    """'0.69 s', '4 min 05 s', '2 h 03 min'; '-' when it is not known."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def when(stamp: object) -> str:
    """A record's time stamp ('2026-12-02T12:39:38Z') as '2026-12-02 12:39:38'; '-' when there is none."""
    return printable(stamp).replace("T", " ").rstrip("Z") if isinstance(stamp, str) and stamp else "-"


def tally(counts: Mapping[str, Any] | None) -> str:
    """{'invalid_email': 33, 'missing_email': 7} as '33 invalid_email, 7 missing_email' (largest first)."""
    items = sorted(((k, v) for k, v in (counts or {}).items() if isinstance(v, int) and v), key=lambda kv: -kv[1])
    return ", ".join(f"{number(v)} {printable(k)}" for k, v in items)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, right: Iterable[int] = ()) -> str:
    """Columns padded to their widest cell (those in `right` right-aligned); no line ends in a space."""
    body = [[printable(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    aligned = set(right)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in aligned else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                   strict=True)))

    return "\n".join(line(r).rstrip() for r in [list(headers), *body])


# -------------------------------------------------------------------------------------------- one run's summary


def changes_line(record: Mapping[str, Any]) -> str | None:
    """The run's `changes` in one line, with the kind of sync and why; for a dry run, its plan. None for a record
    made before runs counted their changes."""
    plan = record.get("plan")
    if isinstance(plan, Mapping):
        return _plan_line(plan)
    changes = record.get("changes")
    if not isinstance(changes, Mapping):
        return None
    line = "changes: " + _changes(changes)
    sync = record.get("sync")
    if isinstance(sync, Mapping) and sync.get("kind"):
        line += f"; {printable(sync['kind'])} sync" + (f" ({printable(sync['why'])})" if sync.get("why") else "")
    return line


def _changes(changes: Mapping[str, Any]) -> str:
    return ", ".join(f"{number(changes[k])} {k.replace('_', ' ')}" for k in CHANGES
                     if isinstance(changes.get(k), int)) or "none counted"


def _plan_line(plan: Mapping[str, Any]) -> str:
    line = "would send: " + _changes(plan.get("changes") or {})
    if isinstance(plan.get("to_remove"), int):
        verdict = plan.get("guard_rail")
        line += f"; would remove {number(plan['to_remove'])} from the list" + (
            f" (guard rail: {printable(verdict)})" if verdict else "")
        if plan.get("removals_file"):
            line += f", listed in {printable(plan['removals_file'])}"
    return line


def summary(record: Mapping[str, Any], *, peak_mb: float | None = None, state_dir: str | None = None) -> str:
    """A run's record as a person reads it at the end of the run (and `show` prints it): what it did first. With
    `state_dir` (a local state folder), the rejections file is named by its path."""
    if record.get("kind") == "purge":
        return purge_line(record)
    status = str(record.get("status"))
    lines = [f"run {printable(record.get('run_id'))} of '{printable(record.get('destination'))}': {status}"
             + (f" ({printable(record['error'])})" if record.get("error") else "")]
    if record.get("note"):
        lines.append(f"  note: {printable(record['note'])}")
    if (changes := changes_line(record)) is not None:
        lines.append(f"  {changes}")
    counts = record.get("counts") or {}
    if counts.get("read") or status in _SUCCESS:
        lines += _rows_lines(record, counts)
    lines += _after_lines(record, state_dir)
    lines += _timing_lines(record, peak_mb)
    return "\n".join(lines)


def _rows_lines(record: Mapping[str, Any], counts: Mapping[str, Any]) -> list[str]:
    rejected = counts.get("rejected_total") or 0
    lines = [f"  rows read {number(counts.get('read', 0))}; valid distinct {number(counts.get('valid', 0))}; "
             f"duplicates {number(counts.get('duplicates', 0))}; rejected {number(rejected)}"
             + (f" ({tally(counts.get('rejected'))})" if rejected else "")]
    req = record.get("requests") or {}
    if record.get("dry_run"):
        lines.append("  dry run: nothing was sent and nothing was stored")
    elif req.get("count"):
        imports = f", {number(req['imports'])} of them CSV imports" if req.get("imports") else ""
        lines.append(f"  sent {number(counts.get('sent', 0))} contacts in {number(req['count'])} request(s)"
                     f"{imports}, {size(req.get('bytes') or 0)} (largest {size(req.get('max_bytes') or 0)} / "
                     f"{number(req.get('max_contacts', 0))} contacts)")
    else:
        lines.append("  sent nothing")
    for what, key in (("values cut to SendGrid's lengths", "trimmed"),
                      ("custom field values left out (did not parse)", "field_notes")):
        if tally(counts.get(key)):
            lines.append(f"  {what}: {tally(counts.get(key))}")
    return lines


def _after_lines(record: Mapping[str, Any], state_dir: str | None) -> list[str]:
    lines = []
    states: dict[str, int] = {}
    for job in record.get("jobs") or []:
        states[str(job.get("status"))] = states.get(str(job.get("status")), 0) + 1
    if states:
        lines.append(f"  SendGrid jobs: {tally(states)}")
    if record.get("status") == "submitted":
        lines.append(f"  SendGrid's jobs are not final yet: `python -m shared show {printable(record.get('run_id'))} "
                     "--config FILE` polls them (so does the next run)")
    if mirror := record.get("mirror"):
        lines.append(_mirror_line(mirror))
    for w in [*(record.get("warnings") or []), *(record.get("file_errors") or [])]:
        lines.append(f"  warning: {printable(w)}")
    counts = record.get("counts") or {}
    for rej in (record.get("rejections") or [])[:_SAMPLE]:
        line = f" line {rej['line']}" if rej.get("line") else ""
        lines.append(f"  rejected: {printable(rej.get('file'))}{line}: {printable(rej.get('reason'))}")
    if record.get("rejections_file") and counts.get("read") and counts.get("rejected_total"):
        where = (f"{os.path.join(state_dir, record['rejections_file'])}" if state_dir else
                 f"{record['rejections_file']} in the state store")
        lines.append(f"  every rejected row: {printable(where)}")
    return lines


def _mirror_line(mirror: Mapping[str, Any]) -> str:
    if mirror.get("guard_rail") == "refused":
        return f"  mirror: removed nobody ({printable(mirror.get('reason'))})"
    if "to_remove" in mirror:
        return (f"  mirror: {number(mirror.get('removed', 0))} of {number(mirror['to_remove'])} leaver(s) removed from "
                f"the list, {number(mirror.get('not_found', 0))} not in SendGrid; {number(mirror.get('previous', 0))} "
                f"held before, {number(mirror.get('current', 0))} now")
    return "  mirror: " + ", ".join(f"{printable(k)} {printable(v)}" for k, v in mirror.items())


def _timing_lines(record: Mapping[str, Any], peak_mb: float | None) -> list[str]:
    timings = record.get("timings") or {}
    parts = []
    if isinstance(timings.get("seconds"), int | float):
        parts.append(f"took {duration(float(timings['seconds']))}")
    if isinstance(timings.get("first_request_s"), int | float):
        parts.append(f"first request after {duration(float(timings['first_request_s']))}")
    if peak_mb is not None:
        parts.append(f"peak memory {peak_mb:.0f} MB")
    return [f"  {'; '.join(parts)}"] if parts else []


def purge_line(record: Mapping[str, Any]) -> str:
    """A purge's record in one line: what it took out of SendGrid."""
    c = record.get("counts") or {}
    return (f"purge={printable(record.get('purge'))} run {printable(record.get('run_id'))}: {record.get('status')}"
            + (f" ({printable(record['error'])})" if record.get("error") else "")
            + f"; {number(c.get('removed', c.get('deleted', 0)))} contacts taken out, "
              f"{number(c.get('not_found', 0))} not found")


# --------------------------------------------------------------------------------------------------- the tables


def runs_table(records: Iterable[Mapping[str, Any]]) -> str:
    """Past runs, in the order given (newest first): started, trigger, status, what each changed, duration, id."""
    rows = []
    for r in records:
        changes = _changes_of(r)
        status = str(r.get("status"))
        if r.get("kind") == "purge":
            status += f" (purge {r.get('purge')})"
        fields = run_fields(r)
        seconds = fields.get("duration_seconds") if fields else None
        rows.append([when(r.get("started_at") or r.get("queued_at")), str(r.get("trigger") or "-"), status,
                     *(number(changes.get(k)) for k in ("new", "changed", "unchanged", "removed", "rejected")),
                     duration(float(seconds)) if isinstance(seconds, int | float) else "-", str(r.get("run_id"))])
    return table(["started (UTC)", "trigger", "status", "new", "changed", "unchanged", "removed", "rejected",
                  "duration", "run id"], rows, right=range(3, 9))


def _changes_of(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """The record's changes (a dry run's planned ones); for a record made before runs counted them, what it holds
    of the same: removed (mirror, purge) and rejected."""
    plan = record.get("plan")
    planned = plan.get("changes") if isinstance(plan, Mapping) else None
    if isinstance(planned, Mapping):
        return planned
    changes = record.get("changes")
    if isinstance(changes, Mapping):
        return changes
    counts, mirror = record.get("counts") or {}, record.get("mirror") or {}
    known: dict[str, Any] = {"rejected": counts.get("rejected_total")}
    removed = mirror.get("removed", counts.get("removed", counts.get("deleted")))
    if isinstance(removed, int):
        known["removed"] = removed
    return known


def lists_table(lists: Iterable[Mapping[str, Any]]) -> str:
    rows = [[str(item.get("id")), str(item.get("name")), number(item.get("contact_count"))]
            for item in sorted(lists, key=lambda i: str(i.get("name")).lower())]
    if not rows:
        return "no lists in this SendGrid account: create one in SendGrid (Marketing > Contacts > Create a list)"
    return table(["list_id", "name", "contacts"], rows, right=[2])


def fields_table(definitions: Mapping[str, Any]) -> str:
    custom = sorted(definitions.get("custom_fields") or [], key=lambda f: str(f.get("name")).lower())
    if not custom:
        return "no custom fields in this SendGrid account: create them in SendGrid (Marketing > Custom Fields)"
    return table(["name", "type", "id"], [[str(f.get("name")), str(f.get("field_type")), str(f.get("id"))]
                                          for f in custom])


# ------------------------------------------------------------------------------------------------------ progress


def progress_text(event: Mapping[str, Any], rate: float | None = None) -> str:
    """One progress event (Services.progress) in words."""
    phase = event.get("phase")
    if phase is None and "read" in event:  # the engine's first form: {read, sent, rate}
        phase, event = "reading", {"rows": event["read"], "sent": event.get("sent")} | (
            {"rate": event["rate"]} if isinstance(event.get("rate"), int | float) else {})
    if phase == "reading":
        text = f"reading: {number(event.get('rows'))} rows"
        done, total = event.get("bytes"), event.get("total_bytes")
        if isinstance(total, int) and total > 0:
            text += (f" ({min(100.0, 100 * done / total):.0f}% of {size(total)})" if isinstance(done, int)
                     else f" of {size(total)}")
        if isinstance(event.get("sent"), int):
            text += f", {number(event['sent'])} contacts sent"
        rate = event.get("rate", rate)
        return text + (f", {rate:,.0f} rows/s" if isinstance(rate, int | float) and rate > 0 else "")
    if phase == "jobs":
        return (f"waiting for SendGrid's jobs: {number(event.get('pending'))} pending, "
                f"{number(event.get('completed'))} completed")
    if phase in ("removing", "purging"):
        what = "looking up and removing contacts" if phase == "removing" else "purging contacts"
        return (f"{what}: {number(event.get('done'))} of {number(event.get('total'))}"
                + (f" (pass {event['pass']})" if isinstance(event.get("pass"), int) else ""))
    if phase == "erasing":
        return (f"erasing: {number(event.get('accounts_done'))} of {number(event.get('accounts'))} SendGrid accounts "
                "done")
    return f"{printable(phase)}: " + ", ".join(f"{printable(k)} {number(v) if isinstance(v, int) else printable(v)}"
                                               for k, v in event.items() if k != "phase")


class Progress:
    """The progress of long work on a stream (stderr): on a terminal one line, redrawn in place at each event; else
    (a log file, a pipe, CI) a line when a phase starts and then at most one every `interval` seconds.
    Call `close()` (or leave the `with` block) before printing anything else on the terminal."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.interval, self.clock = stream, interval, clock
        self.tty = stream.isatty() if tty is None else tty
        self.started = clock()
        self._phase: object = None
        self._phase_started = self._last_line = self.started
        self._drawn = False
        self._lock = threading.Lock()

    def __call__(self, event: Mapping[str, Any]) -> None:
        with self._lock:
            now = self.clock()
            phase = event.get("phase", "reading")
            new_phase = phase != self._phase
            if new_phase:
                self._phase, self._phase_started = phase, now
            elapsed = now - self._phase_started
            rows = event.get("rows")
            text = progress_text(event, rows / elapsed if isinstance(rows, int) and elapsed > 0 else None)
            if self.tty:
                width = shutil.get_terminal_size().columns - 1
                self.stream.write("\r" + text[:width] + "\x1b[K")
                self._drawn = True
            elif new_phase or now - self._last_line >= self.interval:
                self.stream.write(f"after {duration(now - self.started)}: {text}\n")
                self._last_line = now
            self.stream.flush()

    def close(self) -> None:
        """End the redrawn line, so what is printed next starts at the left margin."""
        with self._lock:
            if self._drawn:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
