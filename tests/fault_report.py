"""A pytest plugin: the fault suite's tally and its summary table (registered from conftest via `pytest_plugins`).

Tests record what they did through the `fault_tally` fixture; each record is one JSON line in a file of the process
that ran the test, so it works the same with pytest-xdist (workers are separate processes). The controller (the only
process without `config.workerinput`) clears the folder when the session starts and sums every file at the end.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

# (key, label, must be zero)
FIGURES: tuple[tuple[str, str, bool], ...] = (
    ("faults", "faults injected", False),
    ("runs", "runs survived", False),
    ("bad_inputs", "bad inputs tried", False),
    ("expected", "contacts expected", False),
    ("in_list", "contacts in the list", False),
    ("lost", "contacts lost", True),
    ("dup_beyond", "duplicates sent beyond the in-flight request", True),
)
KEYS = frozenset(k for k, _, _ in FIGURES)


def tally_dir(config: pytest.Config) -> Path:
    """The same folder in the controller and in every worker: the cache folder when the cache plugin runs."""
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("fault-tally"))
    return Path(config.rootpath) / ".pytest_cache" / "fault-tally"


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


@dataclass
class FaultTally:
    """Appends one JSON line per `record` call to this process's file."""

    path: Path
    test: str

    def record(self, **figures: int) -> None:
        unknown = set(figures) - KEYS
        if unknown:
            raise ValueError(f"unknown tally figure(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(KEYS))}")
        line = orjson.dumps({"test": self.test, **{k: int(v) for k, v in figures.items()}})
        with open(self.path, "ab") as fh:
            fh.write(line + b"\n")


@pytest.fixture
def fault_tally(request: pytest.FixtureRequest) -> Iterator[FaultTally]:
    folder = tally_dir(request.config)
    folder.mkdir(parents=True, exist_ok=True)
    worker = getattr(request.config, "workerinput", {}).get("workerid", "main")
    yield FaultTally(folder / f"{worker}-{os.getpid()}.jsonl", request.node.nodeid)


def pytest_sessionstart(session: pytest.Session) -> None:
    if _is_controller(session.config):
        folder = tally_dir(session.config)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)


def read_tally(folder: Path) -> tuple[dict[str, int], int]:
    """Sums of every figure over every record, and the number of records."""
    totals = dict.fromkeys(KEYS, 0)
    records = 0
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            entry: dict[str, Any] = orjson.loads(line)
            records += 1
            for key in KEYS:
                totals[key] += int(entry.get(key, 0))
    return totals, records


def format_table(totals: dict[str, int], records: int) -> list[str]:
    width = max(len(label) for _, label, _ in FIGURES)
    lines = [f"{'figure':<{width}}  {'value':>10}", f"{'-' * width}  {'-' * 10}"]
    for key, label, must_be_zero in FIGURES:
        flag = "  <-- must be 0" if must_be_zero and totals[key] else ""
        lines.append(f"{label:<{width}}  {totals[key]:>10,}{flag}")
    lines.append(f"({records} record(s) from the fault suite)")
    return lines


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _is_controller(config):
        return
    folder = tally_dir(config)
    if not folder.is_dir():
        return
    totals, records = read_tally(folder)
    if not records:
        return
    terminalreporter.write_sep("=", "fault suite: reliability and security under faults")
    for line in format_table(totals, records):
        terminalreporter.write_line(line)
