"""The bulk CSV import path against the sandbox: same list content as the JSON path, and complete at 300,000 rows."""

from __future__ import annotations

import csv
import gzip
import itertools
import math
import random
from pathlib import Path

import orjson
import pytest

from sandbox import samplegen
from shared import engine, limits, pipeline, sources, stream
from shared.bulk import ImportChunk, Importer
from shared.config import parse_config
from shared.contacts import ContactMapper, CustomField
from shared.secrets import EnvSecrets
from shared.state import StateStore
from shared.storage import LocalFolderStore


def _run(sandbox, export_root: Path, info: samplegen.ExportInfo, tmp: Path, *, bulk_threshold: int | None,
         list_name: str, max_profiles: int | None = None, workers: int = 0, **mapping: str) -> tuple[dict, str]:
    list_id = sandbox.box.create_list(list_name)
    config = samplegen.demo_destinations(list_id, max_profiles=max_profiles)
    config["destinations"][0]["bulk_threshold"] = bulk_threshold
    config["destinations"][0]["mapping"] |= mapping
    svc = engine.Services(
        config=parse_config(orjson.dumps(config), "destinations.json"),
        secrets=EnvSecrets({"SENDGRID_API_KEY": sandbox.key}),
        state=StateStore(LocalFolderStore(tmp / f"state-{list_name}")),
        sources=LocalFolderStore(export_root),
        environ={"SENDGRID_API_URL": sandbox.url, "EXPORT_WORKERS": str(workers)},
        poll_interval=0.1,
    )
    report = engine.run(engine.RunRequest("vip-newsletter", info.model_key, wait=True), svc)
    return report, list_id


@pytest.fixture
def fields(sandbox) -> None:
    sandbox.box.create_field("lifetime_value", "Number")
    sandbox.box.create_field("signup_date", "Date")


@pytest.fixture
def small_worker_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes take every partition, in chunks of ~64 KB: several are out with the workers when the run
    switches to the import, so those come back as JSON and are turned into import lines in the exporting process."""
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64 * 1024)


@pytest.mark.parametrize("workers", [0, 2])
def test_bulk_and_json_paths_give_the_same_list_content(sandbox, fields, tmp_path: Path, small_worker_chunks,
                                                        workers: int) -> None:
    info = samplegen.write_cdm_export(tmp_path / "x", 12_000, partitions=2, seed=11)
    json_report, json_list = _run(sandbox, tmp_path / "x", info, tmp_path, bulk_threshold=None, list_name="json")
    bulk_report, bulk_list = _run(sandbox, tmp_path / "x", info, tmp_path, bulk_threshold=5_000, list_name="bulk",
                                  workers=workers)
    assert json_report["status"] == bulk_report["status"] == "completed", (json_report["error"], bulk_report["error"])
    assert json_report["requests"]["imports"] == 0
    assert bulk_report["requests"]["imports"] == 1  # the first 5,000 as JSON requests, the rest in one import file
    assert {j.get("kind") for j in bulk_report["jobs"]} == {None, "import"}
    emails = sandbox.box.list_emails(json_list)
    assert emails == sandbox.box.list_emails(bulk_list) and len(emails) == info.valid_distinct
    assert json_report["counts"]["sent"] == bulk_report["counts"]["sent"] == info.valid_distinct


def test_after_the_switch_to_the_import_chunks_are_mapped_straight_to_import_lines(sandbox, fields, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """Only the chunk the threshold falls in is mapped as JSON and turned into import lines; every later one is
    mapped as import lines (ContactMapper.map_line), with no JSON on the way."""
    encodings: list[str] = []
    map_rows = pipeline.map_rows

    def spy(mapper, rows, *args, **kwargs):
        chunk = map_rows(mapper, rows, *args, **kwargs)
        encodings.append(chunk.encoding)
        return chunk

    monkeypatch.setattr(pipeline, "map_rows", spy)
    info = samplegen.write_cdm_export(tmp_path / "x", 12_000, partitions=2, seed=11)  # chunks of 4,096 rows
    report, list_id = _run(sandbox, tmp_path / "x", info, tmp_path, bulk_threshold=5_000, list_name="bulk")
    assert report["status"] == "completed" and report["requests"]["imports"] == 1
    assert encodings == ["json", "json", "csv", "csv"]  # 6,000 rows a partition: the threshold falls in chunk 2
    assert len(sandbox.box.list_emails(list_id)) == info.valid_distinct


def test_a_mapping_the_import_cannot_take_sends_every_contact_as_json(sandbox, fields, tmp_path: Path) -> None:
    """external_id is writable in an upsert but has no field id for the CSV import: the run says so and goes on with
    JSON requests instead of failing (the warning survives the max_profiles counting pass)."""
    info = samplegen.write_cdm_export(tmp_path / "x", 12_000, partitions=2, seed=11)
    report, list_id = _run(sandbox, tmp_path / "x", info, tmp_path, bulk_threshold=5_000, list_name="ext",
                           max_profiles=50_000, external_id="CustomerId")
    assert report["status"] == "completed", report["error"]
    assert report["requests"]["imports"] == 0 and report["counts"]["sent"] == info.valid_distinct
    assert any("cannot map external_id" in w and "JSON requests" in w for w in report["warnings"]), report["warnings"]
    assert len(sandbox.box.list_emails(list_id)) == info.valid_distinct


def test_import_files_go_while_the_rest_of_the_export_is_read(sandbox, fields, tmp_path: Path, monkeypatch) -> None:
    """Import files of limits.IMPORT_FILE_CONTACTS, each uploaded while the next is written: the first import's job
    starts before the export is read to its end (with one file of everything it waited for the end), and the list
    holds every contact once."""
    monkeypatch.setattr(limits, "IMPORT_FILE_CONTACTS", 500)
    read_at_upload: list[int] = []
    send_import = stream.Stream.send_import

    def spy(self, client, f):
        read_at_upload.append(self.record.counts.read)
        return send_import(self, client, f)

    monkeypatch.setattr(stream.Stream, "send_import", spy)
    info = samplegen.write_cdm_export(tmp_path / "x", 12_000, partitions=2, seed=11)  # chunks of 4,096 rows
    report, list_id = _run(sandbox, tmp_path / "x", info, tmp_path, bulk_threshold=5_000, list_name="files")
    assert report["status"] == "completed", report["error"]
    imports = [j for j in report["jobs"] if j.get("kind") == "import"]
    assert len(imports) == report["requests"]["imports"] == math.ceil((info.valid_distinct - 5_000) / 500)
    assert all(j["contacts"] == 500 for j in imports[:-1]) and 0 < imports[-1]["contacts"] <= 500
    assert read_at_upload[0] < info.rows, read_at_upload  # at most 4 files ahead of the sender: not past chunk 3
    assert len(sandbox.box.list_emails(list_id)) == report["counts"]["sent"] == info.valid_distinct


def _list_contents(sandbox, list_id: str) -> dict[str, tuple]:
    keys = ("first_name", "last_name", "city", "country", "postal_code", "state_province_region")
    out = {}
    for email in sandbox.box.list_emails(list_id):
        c = sandbox.box.contact(email)
        out[email] = (*tuple(c.get(k) for k in keys), tuple(sorted((c.get("custom_fields") or {}).items())))
    return out


def test_fields_are_identical_between_paths(sandbox, fields, tmp_path: Path) -> None:
    info = samplegen.write_cdm_export(tmp_path / "x", 3_000, partitions=1, seed=5)
    # the sandbox's contact store is shared by its lists: reset it between the paths so the second writes every field
    _, json_list = _run(sandbox, tmp_path / "x", info, tmp_path, bulk_threshold=None, list_name="a")
    before = _list_contents(sandbox, json_list)
    sandbox.box.reset()
    sandbox.box.create_field("lifetime_value", "Number")
    sandbox.box.create_field("signup_date", "Date")
    bulk_report, bulk_list = _run(sandbox, tmp_path / "x", info, tmp_path, bulk_threshold=1, list_name="b")
    assert bulk_report["requests"]["imports"] == 1 and bulk_report["status"] == "completed"
    assert _list_contents(sandbox, bulk_list) == before


@pytest.mark.slow
def test_300k_rows_through_the_bulk_path_complete_and_correct(sandbox, fields, tmp_path: Path) -> None:
    info = samplegen.write_cdm_export(tmp_path / "x", 300_000, partitions=6, seed=3)
    report, list_id = _run(sandbox, tmp_path / "x", info, tmp_path, bulk_threshold=200_000, list_name="big")
    assert report["status"] == "completed", report["error"]
    assert report["requests"]["imports"] == 1
    assert len(sandbox.box.list_emails(list_id)) == info.valid_distinct
    assert report["counts"]["sent"] == info.valid_distinct
    assert report["counts"]["rejected_total"] == info.bad_rows


# --- import files, without a sandbox -------------------------------------------------------------------------------

RESERVED = [{"name": n, "id": f"_rf_{n}"} for n in ("email", "first_name", "alternate_emails", "city")]
MAPPING = {"email": "Email", "first_name": "First", "alternate_emails": "Alt", "city": "City"}
CUSTOM = [CustomField("score", "e1_N", "Number", "Score"), CustomField("since", "e2_D", "Date", "Since")]
MAPPER = ContactMapper(MAPPING, CUSTOM)


def _row(n: int) -> list[str]:
    """A source row (in MAPPER.columns order) with what CSV must quote now and then."""
    values = {"Email": f"P{n}@Example.com", "First": f'Ann "{n}",\njr.' if n % 3 else "",  # a quote, a comma, a break
              "Alt": f"a{n}@example.com; b{n}@example.com" if n % 4 == 0 else "", "City": "",
              "Score": str(n / 2 if n % 2 else n), "Since": "2026-01-31" if n % 5 else ""}
    return [values[c] for c in MAPPER.columns]


def _expected_row(n: int) -> list[str]:
    """The import row csv.reader reads back: columns email, first_name, alternate_emails, city, score, since."""
    first = f'Ann "{n}",\njr.' if n % 3 else ""
    alt = f"a{n}@example.com,b{n}@example.com" if n % 4 == 0 else ""
    return [f"p{n}@example.com", first, alt, "", str(n / 2 if n % 2 else n), "01/31/2026" if n % 5 else ""]


def _chunk(first: int, ns: range) -> ImportChunk:
    mapped = pipeline.map_rows(MAPPER, [(n, _row(n), None) for n in ns], pipeline.CSV)
    return ImportChunk(first, mapped.emails, [(mapped.data, mapped.ends, 0)] if mapped.emails else [])


def _read_rows(files: list) -> list[list[str]]:
    rows: list[list[str]] = []
    for f in files:
        with gzip.open(f.path, "rt", encoding="utf-8", newline="") as fh:
            rows += list(csv.reader(fh))[1:]
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_the_kept_contacts_of_each_chunk_become_the_rows_in_order(tmp_path: Path, seed: int) -> None:
    """What the stream hands the importer (stream._import_chunks): each chunk's kept contacts (de-duplication drops
    some) as runs of lines, or, for a chunk mapped as JSON before the switch, its contacts turned into lines; files
    cut anywhere, inside a run too."""
    rng = random.Random(seed)
    chunks, ns, first = [], [], 0
    for c in range(rng.randint(1, 8)):
        rows = range(100 * c, 100 * c + rng.randint(0, 40))
        encoding = rng.choice([pipeline.CSV, pipeline.CSV, pipeline.JSON])
        mapped = pipeline.map_rows(MAPPER, [(n, _row(n), None) for n in rows], encoding)
        keep = [k for k in range(len(rows)) if rng.random() < rng.choice([1.0, 0.9, 0.5])]
        chunks.append((mapped, keep, first))
        ns += [rows[k] for k in keep]
        first += len(keep)
    importer = Importer(MAPPING, CUSTOM, RESERVED, per_file=rng.randint(1, 30), tmp_dir=str(tmp_path))
    files = list(importer.files(stream._import_chunks(chunks, MAPPER)))
    assert _read_rows(files) == [_expected_row(n) for n in ns]
    assert [f.last_index for f in files] == [n - 1 for n in itertools.accumulate(f.count for f in files)]
    importer.cleanup()


@pytest.mark.parametrize("sizes", [[3, 10, 0, 5, 1], [7, 7], [1] * 15, [20], []])
def test_files_split_chunks_at_the_per_file_limit_and_keep_every_row(tmp_path: Path, sizes: list[int]) -> None:
    importer = Importer(MAPPING, CUSTOM, RESERVED, per_file=7, tmp_dir=str(tmp_path))
    assert importer.headers == list(MAPPER.import_fields)
    chunks, first = [], 100  # stream indexes need not start at 0 (a resumed run, JSON requests before)
    for size in sizes:
        chunks.append(_chunk(first, range(first, first + size)))
        first += size
    files = list(importer.files(iter(chunks)))
    total = sum(sizes)
    assert [f.count for f in files] == [7] * (total // 7) + ([total % 7] if total % 7 else [])
    rows: list[list[str]] = []
    emails: list[str] = []
    for f in files:
        with gzip.open(f.path, "rt", encoding="utf-8", newline="") as fh:
            header, *body = list(csv.reader(fh))
        assert header == ["email", "first_name", "alternate_emails", "city", "score", "since"]
        assert len(body) == f.count and f.size == Path(f.path).stat().st_size
        assert f.last_index == 100 + len(rows) + f.count - 1
        assert f.field_mappings == ["_rf_email", "_rf_first_name", "_rf_alternate_emails", "_rf_city", "e1_N", "e2_D"]
        with gzip.open(f.emails_path, "rt", encoding="utf-8") as fh:
            emails += fh.read().splitlines()
        rows += body
    assert rows == [_expected_row(n) for n in range(100, 100 + total)]
    assert emails == [r[0] for r in rows]
    importer.cleanup()
    assert not any(tmp_path.iterdir())  # files and their folder are gone


def test_a_failing_source_leaves_no_partial_file(tmp_path: Path) -> None:
    importer = Importer(MAPPING, CUSTOM, RESERVED, per_file=7, tmp_dir=str(tmp_path))

    def chunks():
        yield _chunk(0, range(10))
        raise OSError("the blob read failed")

    files = importer.files(chunks())
    first = next(files)
    assert first.count == 7
    with pytest.raises(OSError, match="blob read failed"):
        next(files)  # the second file had 3 rows when the source failed
    importer.cleanup()
    assert not any(tmp_path.iterdir())


def test_folders_a_killed_run_left_behind_are_removed_by_the_next_import(tmp_path: Path) -> None:
    """A killed process never runs its cleanup: the next run's importer removes the import folders of processes
    that are gone, and folders unchanged for an hour (a pid taken again); a live process's folder and anything
    else stay."""
    import os
    import subprocess
    import sys
    import time

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live_pid = os.getppid()  # the process that started this one: alive
    names = (f"sg-import-{gone.stdout.strip()}-a1", f"sg-import-{live_pid}-b2", f"sg-import-{live_pid}-old",
             "sg-import-nopid", "unrelated")
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "part.csv.gz").write_bytes(b"x")
    hours_ago = time.time() - 7_200
    for name in names[2:]:
        os.utime(tmp_path / name / "part.csv.gz", (hours_ago, hours_ago))
        os.utime(tmp_path / name, (hours_ago, hours_ago))
    importer = Importer(MAPPING, CUSTOM, RESERVED, per_file=7, tmp_dir=str(tmp_path))
    files = list(importer.files([_chunk(0, range(3))]))
    assert len(files) == 1 and Path(files[0].path).parent.name.startswith(f"sg-import-{os.getpid()}-")
    importer.cleanup()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"sg-import-{live_pid}-b2", "unrelated"]

