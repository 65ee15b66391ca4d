"""A run's limits, exactly at their edges (issue 13's surviving mutants): max_profiles, the switch to the bulk import
at bulk_threshold, the rejections kept in the record, the spreadsheet-formula guard of the rejections file, and the
checkpoint a resumed run goes on from. Engine in this process, state and exports in local folders, the sandbox over
HTTP on loopback."""

from __future__ import annotations

import csv
import functools
import io
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.server import Sandbox, serve
from shared import batching, contacts, engine, report, stream
from shared.sendgrid import RetryPolicy
from tests.engine_world import EngineWorld

KEY = "SG.limits-" + "k" * 20 + "." + "s" * 43
PUT = "PUT /v3/marketing/contacts"


def person(i: int) -> str:
    return f"p{i:05d}@example.com"


class World(EngineWorld):
    def __init__(self, box: Sandbox, url: str, tmp: Path) -> None:
        super().__init__(box, url, tmp, key=KEY, mapping={"email": "email", "first_name": "first"},
                         policy=RetryPolicy(max_attempts=2, backoff_base=0.01))

    def export(self, rows: list[tuple[str, str]], name: str = "v1") -> str:
        """(CustomerId, email) rows under a header; row i is on line i + 2."""
        key = f"members/{name}.csv"
        body = "".join(f"{c},{e},F\n" for c, e in rows)
        self.exports.write_bytes(key, ("CustomerId,email,first\n" + body).encode())
        return key

    def rejections_csv(self, record: dict[str, Any]) -> list[list[str]]:
        data = (self.tmp / "state" / record["rejections_file"]).read_text(encoding="utf-8")
        return list(csv.reader(io.StringIO(data)))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    box = Sandbox(api_keys=[KEY], job_delay=0.02, count_sends=True)
    with serve(box) as server:
        yield World(box, server.url, tmp_path)


PEOPLE = [(f"C{i}", person(i)) for i in range(40)]


def test_max_profiles_allows_exactly_that_many_and_refuses_one_more(world: World) -> None:
    key = world.export(PEOPLE)
    world.configure(max_profiles=len(PEOPLE) - 1)
    refused = world.run(key)
    assert refused["status"] == "refused" and "over max_profiles (39)" in refused["error"], refused
    assert world.box.stats["requests"].get(PUT, 0) == 0 and world.box.list_emails(world.list_id) == []

    world.configure(max_profiles=len(PEOPLE))  # the limit itself is allowed
    done = world.run(key)
    assert done["status"] == "completed" and done["counts"]["sent"] == len(PEOPLE), done
    assert world.box.list_emails(world.list_id) == [e for _, e in PEOPLE]


def test_exactly_bulk_threshold_contacts_go_as_json_and_the_rest_as_an_import(world: World) -> None:
    world.configure(bulk_threshold=25)
    done = world.run(world.export(PEOPLE))
    assert done["status"] == "completed" and done["counts"]["sent"] == len(PEOPLE), done
    json_jobs = [j for j in done["jobs"] if j.get("kind") != "import"]
    imports = [j for j in done["jobs"] if j.get("kind") == "import"]
    assert sum(j["contacts"] for j in json_jobs) == 25 and sum(j["contacts"] for j in imports) == 15, done["jobs"]
    assert world.box.list_emails(world.list_id) == [e for _, e in PEOPLE]
    assert set(world.box.send_counts().values()) == {1}


def test_the_record_keeps_a_sample_of_100_rejections_and_the_file_has_them_all(world: World) -> None:
    bad = [(f"B{i}", f"not-an-email-{i}") for i in range(130)]
    done = world.run(world.export([*PEOPLE[:3], *bad]))
    assert done["counts"]["rejected"] == {"invalid_email": 130}, done["counts"]
    assert len(done["rejections"]) == 100  # the record stays small (README: a sample of 100); the file is complete
    assert [r["line"] for r in done["rejections"]] == list(range(5, 105))
    assert len(world.rejections_csv(done)) == 1 + 130


@pytest.mark.parametrize("cell", ["=1+2", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx"])
def test_every_cell_a_spreadsheet_would_run_gets_an_apostrophe(cell: str) -> None:
    assert report.neutralise(cell) == "'" + cell


@pytest.mark.parametrize("cell", ["", "a=1", "plain", " =1", "1-2", "'=1"])
def test_other_cells_are_left_as_they_are(cell: str) -> None:
    assert report.neutralise(cell) == cell


def test_the_rejections_file_neutralises_a_minus_id(world: World) -> None:
    world.configure(id_column="CustomerId")
    done = world.run(world.export([*PEOPLE[:3], ("-2+3", "not-an-email"), ("@cmd", "bad-too")]))
    rows = world.rejections_csv(done)
    assert [r[3] for r in rows[1:]] == ["'-2+3", "'@cmd"]


def test_a_resumed_run_goes_on_exactly_after_the_last_accepted_request(world: World,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "Packer", functools.partial(batching.Packer, max_count=10))
    world.configure(max_in_flight=1)
    key = world.export(PEOPLE)
    checks = itertools.count()

    def deadline_at_the_third_request(self: stream.Stream, where: str = "before the next request") -> None:
        if where == "before the next request" and next(checks) == 2:
            raise engine.DeadlineReached(f"the run's deadline was reached {where}")

    with monkeypatch.context() as patch:  # two requests of 10 are accepted, then the deadline stops the run
        patch.setattr(stream.Stream, "deadline_check", deadline_at_the_third_request)
        first = world.run(key)
    assert first["status"] == "interrupted" and first["checkpoint"]["contacts_done"] == 20, first
    assert world.box.send_counts() == {e: 1 for _, e in PEOPLE[:20]}
    second = world.run(key, resume=first["run_id"])
    assert second["status"] == "completed" and second["counts"]["sent"] == len(PEOPLE), second
    assert world.box.list_emails(world.list_id) == [e for _, e in PEOPLE]
    assert world.box.send_counts() == {e: 1 for _, e in PEOPLE}  # none sent twice, none skipped


def test_contacts_sendgrid_refuses_by_name_are_left_out_and_the_rest_sent(world: World) -> None:
    """The sandbox refuses addresses on .invalid domains by name (a 400 naming them), as SendGrid refuses some our
    check lets through: the batch goes again without them, and they are counted apart from what was sent."""
    refused = [("R1", "someone@nowhere.invalid"), ("R2", "other@else.invalid")]
    rows = [*PEOPLE[:10], refused[0], *PEOPLE[10:30], refused[1], *PEOPLE[30:]]
    done = world.run(world.export(rows))
    assert done["status"] == "completed", done
    assert done["counts"]["sent"] == len(PEOPLE) and done["checkpoint"]["refused_by_sendgrid"] == 2
    assert done["counts"]["rejected"] == {"refused_by_sendgrid": 2}
    assert done["checkpoint"]["contacts_done"] == len(rows)  # the checkpoint passes the refused ones too
    assert world.box.list_emails(world.list_id) == [e for _, e in PEOPLE]


def test_the_rejections_file_holds_the_first_100000_rows_and_counts_the_rest() -> None:
    rows = report.RowReport(id_column="CustomerId")
    bad = contacts.Rejected("invalid email 'x'", contacts.Reason.INVALID_EMAIL)
    for line in range(100_001):
        rows.reject("f.csv", line + 2, bad, "C" * 250)
    body = b"".join(rows.csv_chunks()).decode()
    rows.close()
    assert (rows.written, rows.omitted) == (100_000, 1)  # README: the first 100,000 rejected rows
    lines = body.splitlines()
    assert len(lines) == 1 + 100_000 and lines[1] == "f.csv,2,invalid email 'x'," + "C" * 200  # ids cut to 200


def test_the_record_keeps_a_sample_of_100_notes_and_counts_them_all_by_column() -> None:
    rows = report.RowReport()
    for line in range(130):
        rows.note("f.csv", line + 2, contacts.Note("LifetimeValue: 'x' is not a number; left out", ("LifetimeValue",)))
    rows.close()
    assert len(rows.note_sample) == 100 and rows.note_sample[-1]["line"] == 101
    assert rows.notes == {"LifetimeValue": 130}


def test_a_resume_claims_the_export_version_no_run_has_claimed(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run saved without its export's claim (its process died in between, or a manual run): the resume claims it,
    or the timer's latest-export pass would start a second full run of the same version."""
    key = world.export(PEOPLE)
    info = world.exports.info(key)
    assert info is not None

    def deadline(self: stream.Stream, where: str = "before the next request") -> None:
        raise engine.DeadlineReached(f"the run's deadline was reached {where}")

    with monkeypatch.context() as patch:  # the first attempt stops before sending anything
        patch.setattr(stream.Stream, "deadline_check", deadline)
        first = world.run(key)
    state = world.services().state
    assert first["status"] == "interrupted" and state.export_claim("members", key, info.etag) is None, first
    second = world.run(key, resume=first["run_id"])
    assert second["status"] == "completed", second
    assert (state.export_claim("members", key, info.etag) or {}).get("run_id") == first["run_id"]
