"""What the command line shows a person (shared.console): summaries, the runs table, lists and fields, progress."""

from __future__ import annotations

import io
from typing import Any

import pytest

from shared import console

RUN_ID = "20261202T124448Z-0d84b221"


def record(**overrides: Any) -> dict[str, Any]:
    """A run record as the engine stores it (before issue 14's `changes`), with what a test changes."""
    base: dict[str, Any] = {
        "run_id": RUN_ID, "destination": "vip-newsletter", "trigger": "cli", "dry_run": False, "status": "completed",
        "error": None, "started_at": "2026-12-02T12:44:48Z", "finished_at": "2026-12-02T12:44:50Z",
        "counts": {"read": 10, "valid": 7, "rejected": {"missing_email": 1, "invalid_email": 2}, "rejected_total": 3,
                   "duplicates": 1, "trimmed": {}, "field_notes": {}, "sent": 7, "rejections_omitted": 0},
        "requests": {"count": 1, "bytes": 1400, "max_bytes": 1400, "max_contacts": 7, "imports": 0, "retries": 0,
                     "rate_limited": 0},
        "jobs": [{"id": "j1", "contacts": 7, "status": "completed"}], "warnings": [], "file_errors": [],
        "rejections": [{"file": "a.csv", "line": 6, "reason": "invalid email 'x'"}],
        "rejections_file": f"runs/vip-newsletter/{RUN_ID}.rejections.csv",
        "timings": {"seconds": 2.5, "first_request_s": 0.04},
    }
    return base | overrides


def assert_clean(text: str) -> None:
    for line in text.splitlines():
        assert line == line.rstrip(), f"trailing space: {line!r}"
    assert "None" not in text and "{" not in text, text  # no unknown value, no dict repr


def test_summary_leads_with_the_status_then_the_changes_and_the_kind_of_sync() -> None:
    text = console.summary(record(changes={"new": 12, "changed": 3, "unchanged": 985, "rejected": 3,
                                           "not_applied": 0},
                                  sync={"kind": "delta", "why": "last full sync 2 days ago"}))
    lines = text.splitlines()
    assert lines[0] == f"run {RUN_ID} of 'vip-newsletter': completed"
    assert lines[1] == ("  changes: 12 new, 3 changed, 985 unchanged, 3 rejected, 0 not applied; delta sync (last full "
                        "sync 2 days ago)")
    assert_clean(text)


def test_changes_line_names_removed_only_when_the_record_has_it() -> None:
    mirror = console.changes_line({"changes": {"new": 1, "changed": 0, "unchanged": 5, "removed": 2, "rejected": 0,
                                               "not_applied": None}})
    assert mirror == "changes: 1 new, 0 changed, 5 unchanged, 2 removed, 0 rejected"  # not_applied not known yet
    assert console.changes_line(record()) is None  # a record from before runs counted changes


def test_a_dry_run_says_what_it_would_do_and_that_nothing_was_sent() -> None:
    text = console.summary(record(
        status="dry_run", dry_run=True, requests={"count": 0, "bytes": 0, "max_bytes": 0, "max_contacts": 0},
        jobs=[], timings={"seconds": 1.2, "first_request_s": None},
        plan={"changes": {"new": 4, "changed": 1, "unchanged": 2, "rejected": 3},
              "to_remove": 50, "guard_rail": "allowed", "removals_file": f"runs/vip-newsletter/{RUN_ID}.removals.csv"}))
    lines = text.splitlines()
    assert lines[1] == ("  would send: 4 new, 1 changed, 2 unchanged, 3 rejected; would remove 50 from the list "
                        f"(guard rail: allowed), listed in runs/vip-newsletter/{RUN_ID}.removals.csv")
    assert "  dry run: nothing was sent and nothing was stored" in lines
    assert "sent 0" not in text and lines[-1] == "  took 1.20 s"  # no "first request after None s"
    assert_clean(text)


def test_a_run_that_read_nothing_has_no_rows_and_no_rejections_file_line() -> None:
    counts = {"read": 0, "valid": 0, "rejected": {}, "rejected_total": 0, "duplicates": 0, "sent": 0}
    text = console.summary(record(status="refused", error="list 0d7f does not exist", counts=counts, jobs=[],
                                  rejections=[], requests={}, timings={"seconds": None, "first_request_s": None}))
    assert text == f"run {RUN_ID} of 'vip-newsletter': refused (list 0d7f does not exist)"


def test_a_run_without_rejections_ends_its_rows_line_without_a_space_and_points_at_no_file() -> None:
    counts = {"read": 7, "valid": 7, "rejected": {}, "rejected_total": 0, "duplicates": 0, "sent": 7}
    text = console.summary(record(counts=counts, rejections=[]), peak_mb=44.6, state_dir="/tmp/st")
    assert "  rows read 7; valid distinct 7; duplicates 0; rejected 0" in text.splitlines()
    assert "every rejected row" not in text and text.splitlines()[-1] == (
        "  took 2.50 s; first request after 0.04 s; peak memory 45 MB")
    assert_clean(text)


def test_summary_counts_read_as_words_and_point_at_the_rejections_file() -> None:
    text = console.summary(record(counts=record()["counts"] | {"trimmed": {"first_name": 2}}), state_dir="st")
    assert "  rows read 10; valid distinct 7; duplicates 1; rejected 3 (2 invalid_email, 1 missing_email)" in text
    assert "  sent 7 contacts in 1 request(s), 1.4 KB (largest 1.4 KB / 7 contacts)" in text
    assert "  values cut to SendGrid's lengths: 2 first_name" in text
    assert "  SendGrid jobs: 1 completed" in text
    assert f"  every rejected row: st/runs/vip-newsletter/{RUN_ID}.rejections.csv" in text
    assert_clean(text)


def test_a_submitted_run_says_how_to_bring_it_to_its_end() -> None:
    text = console.summary(record(status="submitted", jobs=[{"id": "j", "status": "pending"}]))
    assert f"`python -m shared show {RUN_ID} --config FILE` polls them" in text


def test_text_from_outside_cannot_drive_the_terminal() -> None:
    hostile = "evil\x1b[2J\x1b]0;title\x07\rname\n"
    text = console.summary(record(rejections=[{"file": hostile, "line": 1, "reason": hostile}]))
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    assert "evil\\x1b[2J" in text
    table = console.lists_table([{"id": "l1", "name": hostile, "contact_count": 3}])
    assert "\x1b" not in table and len(table.splitlines()) == 2


def test_the_runs_table_keeps_the_order_and_degrades_for_old_records() -> None:
    newest = record(run_id="20261202T130000Z-00000001", started_at="2026-12-02T13:00:00Z",
                    finished_at="2026-12-02T13:01:05Z", trigger="timer",
                    changes={"new": 1200, "changed": 3, "unchanged": 98_000, "removed": 7, "rejected": 0})
    dry = record(run_id="20261202T125900Z-00000002", status="dry_run", dry_run=True,
                 plan={"changes": {"new": 5, "changed": 0, "unchanged": 10, "rejected": 1}})
    purge = {"run_id": "20261202T125800Z-00000003", "destination": "vip-newsletter", "status": "completed",
             "kind": "purge", "purge": "list", "trigger": "cli", "queued_at": "2026-12-02T12:58:00Z",
             "counts": {"requested": 9, "removed": 9, "not_found": 0}}
    running = record(run_id="20261202T125700Z-00000004", status="running", finished_at=None)
    lines = console.runs_table([newest, dry, purge, record(), running]).splitlines()
    assert lines[0].split() == ["started", "(UTC)", "trigger", "status", "new", "changed", "unchanged", "removed",
                                "rejected", "duration", "run", "id"]
    assert lines[1].split() == ["2026-12-02", "13:00:00", "timer", "completed", "1,200", "3", "98,000", "7", "0",
                                "1", "min", "05", "s", "20261202T130000Z-00000001"]
    assert lines[2].split()[3:8] == ["dry_run", "5", "0", "10", "-"]
    assert lines[3].split()[3:10] == ["completed", "(purge", "list)", "-", "-", "-", "9"]
    assert lines[4].split()[3:9] == ["completed", "-", "-", "-", "-", "3"]  # before `changes`: rejected is known
    assert lines[5].split()[3] == "running" and lines[5].split()[-2] == "-"  # no duration while it runs
    assert all(line == line.rstrip() for line in lines)
    header_end = lines[0].index("rejected") + len("rejected")
    assert all(line[header_end - 1] != " " for line in lines[1:])  # numbers right-aligned under their heading


def test_lists_and_fields_tables_and_their_empty_answers() -> None:
    lists = [{"id": "b" * 36, "name": "Zeta", "contact_count": 1234}, {"id": "a" * 36, "name": "alpha",
                                                                       "contact_count": 0}]
    assert console.lists_table(lists).splitlines() == [
        "list_id" + " " * 31 + "name   contacts",
        "a" * 36 + "  alpha         0",
        "b" * 36 + "  Zeta      1,234",
    ]
    fields = {"custom_fields": [{"id": "e2_D", "name": "signup_date", "field_type": "Date"},
                                {"id": "e1_N", "name": "lifetime_value", "field_type": "Number"}],
              "reserved_fields": [{"id": "_rf0_T", "name": "first_name", "field_type": "Text"}]}
    assert console.fields_table(fields).splitlines() == [
        "name            type    id", "lifetime_value  Number  e1_N", "signup_date     Date    e2_D"]
    assert console.lists_table([]).startswith("no lists in this SendGrid account")
    assert console.fields_table({"custom_fields": []}).startswith("no custom fields in this SendGrid account")


@pytest.mark.parametrize(("event", "text"), [
    ({"phase": "reading", "rows": 120_000, "sent": 90_000, "bytes": 50_000_000, "total_bytes": 200_000_000},
     "reading: 120,000 rows (25% of 200.0 MB), 90,000 contacts sent"),
    ({"phase": "reading", "rows": 5, "sent": 0, "bytes": None, "total_bytes": None},
     "reading: 5 rows, 0 contacts sent"),
    ({"read": 1000, "sent": 500, "rate": 2500.4}, "reading: 1,000 rows, 500 contacts sent, 2,500 rows/s"),
    ({"phase": "jobs", "pending": 2, "completed": 5}, "waiting for SendGrid's jobs: 2 pending, 5 completed"),
    ({"phase": "removing", "done": 300, "total": 1000, "pass": 1},
     "looking up and removing contacts: 300 of 1,000 (pass 1)"),
    ({"phase": "purging", "done": 0, "total": 20, "pass": 2}, "purging contacts: 0 of 20 (pass 2)"),
    ({"phase": "erasing", "accounts_done": 1, "accounts": 2}, "erasing: 1 of 2 SendGrid accounts done"),
    ({"phase": "folding", "parts": 3}, "folding: parts 3"),
])
def test_progress_text_of_every_phase(event: dict[str, Any], text: str) -> None:
    assert console.progress_text(event) == text


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_off_a_terminal_is_a_line_per_phase_and_then_one_every_ten_seconds() -> None:
    out, clock = io.StringIO(), Clock()
    progress = console.Progress(out, tty=False, clock=clock)
    for t in range(0, 24, 2):  # the engine reports every 2 s
        clock.now = 100.0 + t
        progress({"phase": "reading", "rows": t * 1000, "sent": 0, "bytes": None, "total_bytes": None})
    clock.now = 125.0
    progress({"phase": "jobs", "pending": 1, "completed": 0})
    progress.close()
    assert out.getvalue().splitlines() == [
        "after 0.00 s: reading: 0 rows, 0 contacts sent",
        "after 10 s: reading: 10,000 rows, 0 contacts sent, 1,000 rows/s",
        "after 20 s: reading: 20,000 rows, 0 contacts sent, 1,000 rows/s",
        "after 25 s: waiting for SendGrid's jobs: 1 pending, 0 completed",
    ]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_progress_on_a_terminal_redraws_one_line_and_clears_it_at_the_end() -> None:
    out, clock = io.StringIO(), Clock()
    with console.Progress(out, tty=True, clock=clock) as progress:
        progress({"phase": "jobs", "pending": 2, "completed": 0})
        clock.now += 1
        progress({"phase": "jobs", "pending": 1, "completed": 1})
    assert out.getvalue() == ("\rwaiting for SendGrid's jobs: 2 pending, 0 completed\x1b[K"
                              "\rwaiting for SendGrid's jobs: 1 pending, 1 completed\x1b[K\r\x1b[K")


def test_numbers_durations_and_sizes_read_as_words() -> None:
    assert [console.duration(s) for s in (None, 0.5, 12.4, 65, 3725)] == ["-", "0.50 s", "12 s", "1 min 05 s",
                                                                          "1 h 02 min"]
    assert [console.size(n) for n in (0, 999, 1400, 5_560_000, 3e9)] == ["0 bytes", "999 bytes", "1.4 KB", "5.6 MB",
                                                                        "3.0 GB"]
    assert [console.number(v) for v in (None, True, 1234, "x")] == ["-", "-", "1,234", "-"]
