"""The fault suite's summary table (tests/fault_report.py): what it counts and what it flags."""

from __future__ import annotations

from pathlib import Path

import orjson

from tests.fault_report import FaultTally, default_scenario, format_table, read_tally


def test_rows_per_scenario_and_runs_of_a_failed_test_do_not_count_as_ended_as_expected(tmp_path: Path) -> None:
    ok = FaultTally(tmp_path / "w1.jsonl", "tests/test_faults.py::test_kill[x]", order=2)
    ok.record(faults=5, runs=6, expected=10, in_list=10)
    ok.record(scenario="storage: 503", faults=1, runs=2, expected=4, in_list=4)
    ok.flush(passed=True)
    bad = FaultTally(tmp_path / "w2.jsonl", "tests/test_faults.py::test_lease", order=1)
    bad.record(scenario="storage: 503", faults=1, runs=2, expected=4, in_list=3, lost=1)
    bad.flush(passed=False)
    rows = read_tally(tmp_path)
    assert [r.scenario for r in rows] == ["storage: 503", "kill [x]"]  # in the session's order
    assert (rows[0].figures["runs"], rows[0].runs_all, rows[0].failed) == (2, 4, True)
    table = "\n".join(format_table(rows))
    assert "runs that ended as expected: 8 of 10" in table
    assert "test FAILED" in table and "lost must be 0" in table


def test_records_are_written_when_the_test_ends(tmp_path: Path) -> None:
    tally = FaultTally(tmp_path / "w.jsonl", "tests/test_faults.py::test_x")
    tally.record(runs=1)
    assert not (tmp_path / "w.jsonl").exists()
    tally.flush(passed=True)
    [line] = (tmp_path / "w.jsonl").read_bytes().splitlines()
    assert orjson.loads(line)["passed"] is True and default_scenario("a.py::test_long_name[p 1]") == "long name [p 1]"
