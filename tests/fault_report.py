"""A pytest plugin: the fault suite's tally and its summary table (registered from conftest via `pytest_plugins`).

Tests record what they did through the `fault_tally` fixture, one record per scenario (default: the test's name).
Records are kept until the test ends and then written, with whether the test passed, as JSON lines to a file of the
process that ran it, so it works the same with pytest-xdist (workers are separate processes). The controller (the
only process without `config.workerinput`) clears the folder when the session starts and prints one row per
scenario at the end: faults injected, runs that ended as expected, contacts expected, in the list, lost, and sent
beyond the requests in flight at a fault.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

# (key, column heading, must be zero)
FIGURES: tuple[tuple[str, str, bool], ...] = (
    ("faults", "faults", False),
    ("bad_inputs", "bad input", False),
    ("runs", "runs ok", False),
    ("expected", "expected", False),
    ("in_list", "in list", False),
    ("lost", "lost", True),
    ("dup_beyond", "beyond", True),
)
KEYS = frozenset(k for k, _, _ in FIGURES)
LEGEND = ("faults: faults injected; bad input: bad inputs tried; runs ok: runs that ended as expected (killed too)",
          "expected, in list, lost: contacts; beyond: contacts sent twice beyond the requests in flight at a fault")
_PASSED = pytest.StashKey[bool]()


def tally_dir(config: pytest.Config) -> Path:
    """The same folder in the controller and in every worker: the cache folder when the cache plugin runs."""
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("fault-tally"))
    return Path(config.rootpath) / ".pytest_cache" / "fault-tally"


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


def default_scenario(nodeid: str) -> str:
    """'tests/test_faults.py::test_cli_rides_out_transient_faults[500 and 503]' -> 'cli rides out transient faults
    [500 and 503]'."""
    name = nodeid.rsplit("::", 1)[-1].removeprefix("test_")
    base, _, param = name.partition("[")
    return base.replace("_", " ") + (f" [{param}" if param else "")


@dataclass
class FaultTally:
    """Collects one record per `record` call; the fixture writes them when the test has ended."""

    path: Path
    test: str
    order: int = 0  # the test's place in the session (the same in every xdist worker): the table's row order
    records: list[dict[str, Any]] = field(default_factory=list)

    def record(self, *, scenario: str | None = None, **figures: int) -> None:
        unknown = set(figures) - KEYS
        if unknown:
            raise ValueError(f"unknown tally figure(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(KEYS))}")
        self.records.append({"test": self.test, "order": self.order,
                             "scenario": scenario or default_scenario(self.test),
                             **{k: int(v) for k, v in figures.items()}})

    def flush(self, passed: bool) -> None:
        if not self.records:
            return
        with open(self.path, "ab") as fh:
            for record in self.records:
                fh.write(orjson.dumps({**record, "passed": passed}) + b"\n")
        self.records.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.stash[_PASSED] = report.passed


@pytest.fixture
def fault_tally(request: pytest.FixtureRequest) -> Iterator[FaultTally]:
    folder = tally_dir(request.config)
    folder.mkdir(parents=True, exist_ok=True)
    worker = getattr(request.config, "workerinput", {}).get("workerid", "main")
    items = request.session.items
    order = items.index(request.node) if request.node in items else len(items)
    tally = FaultTally(folder / f"{worker}-{os.getpid()}.jsonl", request.node.nodeid, order)
    yield tally
    tally.flush(passed=request.node.stash.get(_PASSED, False))


def pytest_sessionstart(session: pytest.Session) -> None:
    if _is_controller(session.config):
        folder = tally_dir(session.config)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)


@dataclass
class Row:
    scenario: str
    figures: dict[str, int]
    runs_all: int = 0  # runs recorded, whether or not their test passed
    failed: bool = False


def read_tally(folder: Path) -> list[Row]:
    """One row per scenario (records of one scenario summed), in the session's test order."""
    rows: dict[str, Row] = {}
    order: dict[str, int] = {}
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            entry: dict[str, Any] = orjson.loads(line)
            scenario = entry.get("scenario") or default_scenario(entry.get("test", "?"))
            row = rows.setdefault(scenario, Row(scenario, dict.fromkeys(KEYS, 0)))
            order[scenario] = min(order.get(scenario, 1 << 30), int(entry.get("order", 1 << 30)))
            passed = bool(entry.get("passed", True))
            for key in KEYS:
                if key != "runs" or passed:
                    row.figures[key] += int(entry.get(key, 0))
            row.runs_all += int(entry.get("runs", 0))
            row.failed |= not passed
    return sorted(rows.values(), key=lambda r: (order[r.scenario], r.scenario))


def format_table(rows: list[Row]) -> list[str]:
    width = min(max([len(r.scenario) for r in rows] + [len("scenario")]), 64)
    cols = [max(len(label), 8) for _, label, _ in FIGURES]
    head = f"{'scenario':<{width}}" + "".join(f"  {label:>{w}}" for (_, label, _), w in zip(FIGURES, cols, strict=True))
    lines = [head, "-" * len(head)]
    totals = dict.fromkeys(KEYS, 0)
    for row in rows:
        cells = "".join(f"  {row.figures[k]:>{w},}" for (k, _, _), w in zip(FIGURES, cols, strict=True))
        flags = [label for key, label, zero in FIGURES if zero and row.figures[key]]
        note = "  <-- test FAILED" if row.failed else ""
        note += f"  <-- {', '.join(flags)} must be 0" if flags else ""
        name = row.scenario if len(row.scenario) <= width else row.scenario[: width - 3] + "..."
        lines.append(f"{name:<{width}}{cells}{note}")
        for key in KEYS:
            totals[key] += row.figures[key]
    lines.append("-" * len(head))
    lines.append(f"{'all scenarios':<{width}}"
                 + "".join(f"  {totals[k]:>{w},}" for (k, _, _), w in zip(FIGURES, cols, strict=True)))
    runs_all = sum(r.runs_all for r in rows)
    lines.append(f"runs that ended as expected: {totals['runs']:,} of {runs_all:,}; contacts lost: {totals['lost']:,}; "
                 f"sent beyond the requests in flight: {totals['dup_beyond']:,}")
    lines.extend(LEGEND)
    return lines


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _is_controller(config):
        return
    folder = tally_dir(config)
    if not folder.is_dir():
        return
    rows = read_tally(folder)
    if not rows:
        return
    terminalreporter.write_sep("=", "fault suite: reliability and security under faults")
    for line in format_table(rows):
        terminalreporter.write_line(line)
