"""pipeline: chunks mapped in worker processes give exactly what a serial read in this process gives.

Every case runs the same partition twice: with no workers (sources.read_rows in this process, the reference) and
with two real worker processes on tiny chunks (so chunk cuts fall everywhere: inside quoted line breaks, next to
bad rows, at the last line). Rows, line numbers, reasons, notes, encoded contacts, warnings and file errors must
be the same.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from sandbox import samplegen
from shared import contacts, delta, engine, pipeline, sources
from shared.config import parse_config
from shared.errors import SourceError
from shared.secrets import EnvSecrets
from shared.sources import Partition
from shared.state import StateStore
from shared.storage import LocalFolderStore

COLS = ("Id", "Email", "First", "Country", "Value")
REPO = Path(__file__).resolve().parent.parent
MAPPING = {"email": "Email", "first_name": "First", "country": "Country"}
CUSTOM = (contacts.CustomField("lifetime_value", "e1_N", "Number", "Value"),)


@pytest.fixture(scope="module", autouse=True)
def _stop_workers() -> Any:
    yield
    pipeline.shutdown()


def outcome(store: LocalFolderStore, part: Partition, workers: int, chunk_bytes: int = 40,
            spec: pipeline.MapperSpec | None = None, encoding: str = pipeline.JSON,
            only_changed: pipeline.Changed | None = None) -> dict[str, Any]:
    """Everything a run sees of a partition: per row, per contact, warnings, and the error that ended it."""
    mapper = contacts.ContactMapper(MAPPING, CUSTOM)
    spec = spec or pipeline.MapperSpec.of(MAPPING, CUSTOM)
    warnings: list[str] = []
    out: dict[str, Any] = {"read": 0, "rejects": [], "notes": [], "trimmed": {}, "contacts": [], "digests": b"",
                           "error": None}
    try:
        for chunk in pipeline.mapped_chunks(store, part, mapper, spec, ("Email",), warnings, workers=workers,
                                            min_bytes=0, chunk_bytes=chunk_bytes, encoding=lambda: encoding,
                                            digests=lambda: True, only_changed=lambda: only_changed):
            out["read"] += chunk.read
            out["rejects"] += chunk.rejects
            out["notes"] += chunk.notes
            for k, v in chunk.trimmed.items():
                out["trimmed"][k] = out["trimmed"].get(k, 0) + v
            assert chunk.fps.tolist() == [hash(e) for e in chunk.emails]  # made here, from a worker's chunk too
            out["contacts"] += [(e, chunk.contact(i)) for i, e in enumerate(chunk.emails)]
            assert len(chunk.digests) == 8 * len(chunk.emails)
            out["digests"] += chunk.digests
    except SourceError as e:
        out["error"] = str(e)
    out["warnings"] = warnings
    return out


def put(tmp_path: Path, name: str, data: bytes) -> LocalFolderStore:
    path = tmp_path / name
    path.write_bytes(gzip.compress(data, mtime=0) if name.endswith(".gz") else data)
    return LocalFolderStore(tmp_path)


def part_of(name: str, *, header: bool = False, columns: tuple[str, ...] | None = COLS) -> Partition:
    return Partition("seg", name, "csv", name.endswith(".gz"), columns, header)


def rows(*lines: str, end: str = "\r\n") -> bytes:
    return "".join(line + end for line in lines).encode()


GOOD = [f'"{i}","person.{i}@example.com","Ann {i}","NL","{i}.5"' for i in range(40)]

CASES: dict[str, tuple[bytes, dict[str, Any]]] = {
    "plain rows": (rows(*GOOD), {}),
    "lf endings and no final break": (rows(*GOOD, end="\n")[:-1], {}),
    "quoted line breaks and quotes": (rows(*GOOD[:5], '"9","q@example.com","Line\r\nbreak ""quoted""","NL","1"',
                                           '"10","r@example.com","multi\nline\nname","DE","2"', *GOOD[5:]), {}),
    "bad rows between good ones": (rows(*GOOD[:10], '"x","not an email","A","NL","1"', '"y","","B","NL","1"',
                                        '"short","row"', "", '"z","s@example.com","C","NL","twelve"',
                                        *GOOD[10:]), {}),
    "duplicates and case": (rows(*GOOD[:10], '"d","PERSON.3@Example.com","Dup","NL","1"', *GOOD[10:]), {}),
    "stray quote in an unquoted field": (rows(*GOOD[:10], '11,o"brien@example.com,O"Brien,IE,1', *GOOD[10:]), {}),
    "text after a closing quote": (rows(*GOOD[:10], '"12","t@example.com"x,"T","NL","1"', *GOOD[10:]), {}),
    "never closed quote": (rows(*GOOD[:10], '"13","u@example.com","open,"NL","1"', *GOOD[10:]), {}),
    "lone cr line endings": (rows(*GOOD[:20], end="\r"), {}),
    "nul byte": (rows(*GOOD[:10], '"14","v@example.com","Nul\x00","NL","1"', *GOOD[10:]), {}),
    "not utf-8": (rows(*GOOD[:10]) + b'"15","w@example.com","Caf\xe9","NL","1"\r\n' + rows(*GOOD[10:]), {}),
    "bom and header": (b"\xef\xbb\xbf" + rows('"Id","Email","First","Country","Value"', *GOOD), {"header": True}),
    "header with other columns": (rows('"Email","First"', *[f'"h{i}@example.com","H"' for i in range(30)]),
                                  {"header": True, "columns": None}),
    "blank line before header": (rows("", '"Email","First"', '"a@example.com","A"'),
                                 {"header": True, "columns": None}),
    "header lacks the email column": (rows('"Mail","First"', '"a@example.com","A"'),
                                      {"header": True, "columns": None}),
    "empty file with header": (b"", {"header": True, "columns": None}),
    "over-long line": (rows(*GOOD[:10], '"16","x@example.com","' + "L" * 300 + '","NL","1"', *GOOD[10:]),
                       {"max_line": 200}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("gz", [False, True], ids=["csv", "gzip"])
def test_workers_give_what_a_serial_read_gives(tmp_path: Path, case: str, gz: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data, kw = CASES[case]
    if "max_line" in kw:
        monkeypatch.setattr(sources, "MAX_CSV_LINE_BYTES", kw["max_line"])
    name = "seg.csv.gz" if gz else "seg.csv"
    store = put(tmp_path, name, data)
    part = part_of(name, header=kw.get("header", False), columns=kw.get("columns", COLS))
    serial = outcome(store, part, workers=0)
    assert outcome(store, part, workers=2) == serial
    assert outcome(store, part, workers=2, chunk_bytes=1 << 20) == serial
    assert serial["read"] or serial["error"] or not data
    # a contact's content digest is its import line's, whether it was mapped as JSON or as that line (delta sync)
    as_lines = outcome(store, part, workers=2, encoding=pipeline.CSV)
    assert as_lines["digests"] == serial["digests"]
    assert as_lines["digests"] == b"".join(pipeline.content_digest(line) for _, line in as_lines["contacts"])
    # a delta run reading once maps as lines and encodes as JSON only the contacts its record lacks: here every other
    digests = [serial["digests"][i : i + 8] for i in range(0, len(serial["digests"]), 8)]
    recorded = np.sort(np.frombuffer(b"".join(digests[::2]), dtype=np.uint64))
    only = outcome(store, part, workers=0, only_changed=delta.Unchanged(recorded))
    assert only["contacts"] == [(e, b"" if i % 2 == 0 else c) for i, (e, c) in enumerate(serial["contacts"])]
    assert {**only, "contacts": None} == {**serial, "contacts": None}


def test_a_truncated_gzip_ends_with_the_same_rows_and_error(tmp_path: Path) -> None:
    whole = gzip.compress(rows(*GOOD * 50), mtime=0)
    (tmp_path / "seg.csv.gz").write_bytes(whole[: len(whole) * 2 // 3])
    store = LocalFolderStore(tmp_path)
    part = part_of("seg.csv.gz")
    serial = outcome(store, part, workers=0)
    assert serial["error"] and "truncated or corrupt" in serial["error"] and serial["contacts"]
    assert outcome(store, part, workers=2, chunk_bytes=300) == serial


def test_chunks_are_whole_records_with_their_first_line(tmp_path: Path) -> None:
    data = rows('"Id","Email","First","Country","Value"', *GOOD[:3], '"9","q@example.com","a\r\nb\r\nc","NL","1"',
                *GOOD[3:])
    store = put(tmp_path, "seg.csv", data)
    chunks = list(sources.csv_chunks(store, part_of("seg.csv", header=True), COLS, chunk_bytes=50))
    assert all(isinstance(c, sources.CsvChunk) for c in chunks) and len(chunks) > 10
    assert b"".join(c.data for c in chunks) == data.split(b"\r\n", 1)[1]
    line = 2
    for c in chunks:
        assert c.first_line == line
        line += c.data.count(b"\r\n")
        assert sources.parse_csv_chunk(c)  # each parses on its own, without error


def test_a_cut_defeated_by_a_stray_quote_hands_over_to_read_rows(tmp_path: Path) -> None:
    data = rows(*GOOD[:3], '4,o"brien@example.com,X,IE,1', *GOOD[3:30])
    store = put(tmp_path, "seg.csv", data)
    items = list(sources.csv_chunks(store, part_of("seg.csv"), COLS, chunk_bytes=50, max_line=400))
    assert isinstance(items[-1], sources.ReadOn) and items[-1].line <= 4
    taken = sum(c.data.count(b"\n") for c in items[:-1])
    assert items[-1].line == taken + 1


class _DyingSpec(pipeline.MapperSpec):
    """Kills the worker process that builds it (only workers build from a spec): the pool breaks."""

    def build(self) -> contacts.ContactMapper:
        os._exit(3)


def test_a_broken_pool_hands_over_to_this_process(tmp_path: Path) -> None:
    store = put(tmp_path, "seg.csv", rows(*GOOD))
    part = part_of("seg.csv")
    serial = outcome(store, part, workers=0)
    dying = _DyingSpec(tuple(MAPPING.items()), CUSTOM)
    assert outcome(store, part, workers=2, spec=dying) == serial
    assert outcome(store, part, workers=2) == serial  # a new pool afterwards


class _SlowStore(LocalFolderStore):
    """Reads as slowly as a far blob: the pool breaks while chunks are still being submitted."""

    def open_read(self, key: str) -> Any:
        fh = super().open_read(key)
        slow_read = fh.read

        def read(n: int = -1) -> bytes:
            time.sleep(0.8)
            return slow_read(n)

        fh.read = read
        return fh


def test_a_pool_that_breaks_is_counted_once(tmp_path: Path) -> None:
    """Its failed submit and its pending results both report the same broken pool: one pool, one count, and workers
    stay available for the next partition."""
    put(tmp_path, "seg.csv", rows(*GOOD))
    part = part_of("seg.csv")
    serial = outcome(LocalFolderStore(tmp_path), part, workers=0)
    dying = _DyingSpec(tuple(MAPPING.items()), CUSTOM)
    assert outcome(_SlowStore(tmp_path), part, workers=1, chunk_bytes=200, spec=dying) == serial
    assert pipeline._fruitless == 1 and pipeline._cannot_start is None
    assert outcome(LocalFolderStore(tmp_path), part, workers=1) == serial  # a new pool, which maps
    assert pipeline._fruitless == 0


class _FdRacePool(pipeline.ProcessPoolExecutor):
    """Its second submit fails as CPython 3.11's can when a worker dies while the next one spawns (seen in CI)."""

    submits = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        type(self).submits += 1
        if type(self).submits > 1:
            raise ValueError("bad value(s) in fds_to_keep")
        return super().submit(fn, *args, **kwargs)


def test_any_failed_hand_over_leaves_the_chunk_to_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    store = put(tmp_path, "seg.csv", rows(*GOOD))
    part = part_of("seg.csv")
    serial = outcome(store, part, workers=0)
    pipeline.shutdown()
    with monkeypatch.context() as m:
        m.setattr(pipeline, "ProcessPoolExecutor", _FdRacePool)
        assert outcome(store, part, workers=2) == serial
    assert _FdRacePool.submits == 2 and pipeline._pool is None
    assert "ValueError: bad value(s) in fds_to_keep" in caplog.text and "reading on in this process" in caplog.text
    assert outcome(store, part, workers=2) == serial  # a new pool, which maps
    assert pipeline._fruitless == 0


def _in_child(tmp_path: Path, setup: str, body: str) -> subprocess.CompletedProcess[str]:
    """Run body in a fresh interpreter (process-wide multiprocessing state stays out of this one) with `store`,
    `spec` and `part` for tmp_path/seg.csv; setup runs before them."""
    script = (
        "import json, logging, multiprocessing, sys; from multiprocessing import resource_tracker\n"
        "from shared import pipeline, sources; from shared.storage import LocalFolderStore\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        + setup
        + f"store = LocalFolderStore({str(tmp_path)!r})\n"
        f"spec = pipeline.MapperSpec.of({dict(MAPPING)!r})\n"
        f"part = sources.Partition('seg', 'seg.csv', 'csv', False, {COLS!r}, False)\n"
        "def run(workers):\n"
        "    chunks = pipeline.mapped_chunks(store, part, spec.build(), spec, ('Email',), [], workers=workers,"
        " min_bytes=0, chunk_bytes=64)\n"
        "    return [[c.read, c.emails, c.data.decode()] for c in chunks]\n"
        + body
    )
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res


def test_workers_map_without_numpy(tmp_path: Path) -> None:
    """Workers only parse, map and encode: numpy (~10 MB a process) stays in the exporting process."""
    put(tmp_path, "seg.csv", rows(*GOOD))
    res = _in_child(tmp_path, "", f"assert sum(len(c[1]) for c in run(1)) == {len(GOOD)}\n"
                    "print(pipeline._get_pool(1).submit(eval, \"'numpy' in __import__('sys').modules\").result())\n"
                    "pipeline.shutdown()\n")
    assert res.stdout.strip() == "False"


@pytest.mark.parametrize("fails", ["pool", "worker"])
def test_workers_that_cannot_start_leave_the_mapping_to_this_process(tmp_path: Path, fails: str) -> None:
    """A host that cannot start processes (here: no such interpreter) maps in process and, after two pools that
    failed, stops trying: whether the pool itself fails (its resource tracker cannot start) or its workers do."""
    put(tmp_path, "seg.csv", rows(*GOOD))
    res = _in_child(tmp_path, ("resource_tracker.ensure_running()\n" if fails == "worker" else "")
                    + "multiprocessing.get_context('spawn').set_executable('/nonexistent/python3')\n",
                    "print(json.dumps([run(0), run(2), run(2)]))\n")
    serial, first, second = orjson.loads(res.stdout)
    flat = lambda chunks: ([e for c in chunks for e in c[1]], "".join(c[2] for c in chunks))  # noqa: E731
    assert sum(c[0] for c in serial) == len(GOOD) and flat(first) == flat(serial) == flat(second)
    # two pools fail (to start, or at once: how depends on timing), then no third is tried
    assert res.stderr.count("the worker processes failed") == pipeline.MAX_FRUITLESS_POOLS, res.stderr
    assert res.stderr.count("worker processes are not used any more") == 1, res.stderr


def test_worker_count_setting() -> None:
    assert pipeline.worker_count({}) == 0  # off unless asked for: each worker costs memory
    assert pipeline.worker_count({"EXPORT_WORKERS": "0"}) == 0
    assert pipeline.worker_count({"EXPORT_WORKERS": " 3 "}) == 3
    assert pipeline.worker_count({"EXPORT_WORKERS": "99"}) == pipeline.MAX_WORKERS
    assert pipeline.worker_count({"EXPORT_WORKERS": "many"}) == 0


def _engine_run(sandbox, root: Path, info: Any, tmp: Path, name: str, workers: int) -> tuple[dict, str, bytes]:
    list_id = sandbox.box.create_list(name)
    config = samplegen.demo_destinations(list_id, max_profiles=None)
    state = LocalFolderStore(tmp / f"state-{name}")
    svc = engine.Services(config=parse_config(orjson.dumps(config), "destinations.json"),
                          secrets=EnvSecrets({"SENDGRID_API_KEY": sandbox.key}), state=StateStore(state),
                          sources=LocalFolderStore(root), poll_interval=0.05,
                          environ={"SENDGRID_API_URL": sandbox.url, "EXPORT_WORKERS": str(workers)})
    report = engine.run(engine.RunRequest("vip-newsletter", info.model_key, wait=True), svc)
    with state.open_read(report["rejections_file"]) as fh:
        return report, list_id, fh.read()


def test_an_export_through_workers_matches_one_read_in_process(sandbox, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox.box.create_field("lifetime_value", "Number")
    sandbox.box.create_field("signup_date", "Date")
    info = samplegen.write_cdm_export(tmp_path / "x", 6_000, partitions=3, seed=13)
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 16 * 1024)
    serial, serial_list, serial_rejections = _engine_run(sandbox, tmp_path / "x", info, tmp_path, "serial", 0)
    pipeline.shutdown()
    parallel, parallel_list, parallel_rejections = _engine_run(sandbox, tmp_path / "x", info, tmp_path, "par", 2)
    assert pipeline._pool is not None  # the workers did the mapping
    assert serial["status"] == parallel["status"] == "completed"
    for key in ("counts", "rejections", "field_notes", "warnings", "file_errors"):
        assert parallel[key] == serial[key], key
    assert parallel["requests"]["count"] == serial["requests"]["count"]
    assert parallel_rejections.decode().splitlines() == serial_rejections.decode().splitlines()
    assert serial["counts"]["rejected_total"] > 0
    emails = sandbox.box.list_emails(serial_list)
    assert sandbox.box.list_emails(parallel_list) == emails and len(emails) == info.valid_distinct


# ------------------------------------------------------------------------------------------------ hostile files


def junk_bomb(valid: int, junk_rows: int) -> bytes:
    """A gzip CSV partition: `valid` good rows, then junk lines (issue 12 §6: 100 MiB of junk rows in ~100 KB)."""
    body = rows(*GOOD[:valid]) + b"this is not a row of this export\r\n" * junk_rows
    return gzip.compress(body, mtime=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_of_junk_rows_is_stopped_after_its_good_rows(tmp_path: Path, workers: int) -> None:
    (tmp_path / "seg.csv.gz").write_bytes(junk_bomb(40, 2_000_000))  # 66 MB of rows, 200 KB of gzip
    store, part = LocalFolderStore(tmp_path), part_of("seg.csv.gz")
    got = outcome(store, part, workers=workers, chunk_bytes=256 * 1024)
    assert len(got["contacts"]) == 40  # every good row before the junk was mapped
    assert got["error"].startswith("seg.csv.gz: stopped after ")
    assert "could not be read or had no usable email" in got["error"] and "not read" in got["error"]
    assert pipeline.Stop.JUNK_MIN_ROWS <= got["read"] < 100_000  # it stopped early, after a chunk or two
    assert len(got["rejects"]) == got["read"] - 40


def test_a_file_where_most_rows_lack_an_email_is_not_stopped(tmp_path: Path) -> None:
    """A legitimate segment: 95% of the profiles have no email. Rows without an email are not junk."""
    lines = [f'"{i}","","No Email","NL","1"' if i % 20 else GOOD[i % 40].replace('"person.', f'"p{i}.')
             for i in range(30_000)]
    store = put(tmp_path, "seg.csv", rows(*lines))
    got = outcome(store, part_of("seg.csv"), workers=0)
    assert got["error"] is None and got["read"] == 30_000 and len(got["contacts"]) == 1_500


def test_a_file_without_one_usable_row_is_stopped_at_the_second_threshold(tmp_path: Path) -> None:
    (tmp_path / "seg.csv.gz").write_bytes(gzip.compress(rows('"1","","No Email","NL","1"') * 250_000, mtime=0))
    got = outcome(LocalFolderStore(tmp_path), part_of("seg.csv.gz"), workers=0)
    assert got["error"].startswith("seg.csv.gz: stopped after ") and "not one of them gave a contact" in got["error"]
    assert pipeline.Stop.NOTHING_MIN_ROWS <= got["read"] < pipeline.Stop.NOTHING_MIN_ROWS + pipeline.ROWS_PER_CHUNK


@pytest.mark.parametrize(("data", "header", "note"), [
    (b"", False, True),  # a 0-byte CDM partition
    (b"", True, True),  # a 0-byte plain file
    (rows('"Id","Email","First","Country","Value"'), True, True),  # a header and no rows
    (rows('"x","not an email","A","NL","1"'), False, False),  # a row, rejected: not "0 rows"
])
def test_a_file_without_rows_is_noted_once(tmp_path: Path, data: bytes, header: bool, note: bool) -> None:
    store = put(tmp_path, "seg.csv", data)
    got = outcome(store, part_of("seg.csv", header=header, columns=None if header else COLS), workers=0)
    assert got["error"] is None
    assert got["warnings"] == (["0 rows in seg.csv"] if note else [])


@pytest.mark.parametrize(("encoding", "quoting"), [("latin-1", True), ("utf-16-le", True), ("utf-8", False)])
def test_workers_read_other_encodings_and_quote_styles_as_a_serial_read(tmp_path: Path, encoding: str,
                                                                        quoting: bool) -> None:
    """Other encodings reach the chunker as UTF-8; QuoteStyle.None partitions are read in this process."""
    lines = [line.replace("Ann", "Zoë Müller") for line in GOOD]
    if not quoting:  # quotes are data: an unquoted file, and a row with a lone quote that swallows nothing
        lines = [line.replace('"', "") for line in lines] + ['99,q@example.com,O"Brien,NL,1']
    data = ("\r\n".join(lines) + "\r\n").encode(encoding)
    store = put(tmp_path, "seg.csv", data)
    part = Partition("seg", "seg.csv", "csv", False, COLS, False, quoting=quoting, encoding=encoding)
    serial = outcome(store, part, workers=0)
    assert len(serial["contacts"]) == 40 + (not quoting) and "Zoë Müller" in serial["contacts"][0][1].decode()
    assert outcome(store, part, workers=2, chunk_bytes=200) == serial
